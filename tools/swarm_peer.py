"""SWARM peer: see megatronish/swarm/ and the README's SWARM section.

    python tools/swarm_dht.py --address-file boot.addr                       # the bootstrap DHT node
    python tools/swarm_peer.py --initial-peers $(cat boot.addr) --pp 2 --stage auto
    python tools/swarm_trainer.py --initial-peers $(cat boot.addr) --pp 2
"""

import sys

from megatronish.swarm.cli import peer_main

if __name__ == "__main__":
    sys.exit(peer_main())
