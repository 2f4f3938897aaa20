"""Entry points of tools/swarm_dht.py, tools/swarm_peer.py and tools/swarm_trainer.py.

Bad arguments exit with status 2 and one line naming the value and the fix, before anything
starts; a missing hivemind says how to install the `swarm` extra.
"""

import argparse
import asyncio
import logging
import os
import signal
import sys

from megatronish.training.arguments import ArgumentError

HIVEMIND_MISSING = ("SWARM needs hivemind: "
                    "pip install 'megatronish[swarm]'")


def _setup_logging() -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S"))
    logger = logging.getLogger("megatronish.swarm")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _parse(role: str, argv):
    from megatronish.swarm.arguments import parse_swarm_args
    try:
        return parse_swarm_args(role, argv)
    except ArgumentError as error:
        print(f"swarm_{role}.py: error: {error}", file=sys.stderr)
        sys.exit(2)


def _import_hivemind() -> None:
    try:
        import hivemind  # noqa: F401
    except ImportError:
        print(HIVEMIND_MISSING, file=sys.stderr)
        sys.exit(2)


def peer_main(argv=None) -> int:
    args = _parse("peer", argv)
    _import_hivemind()
    _setup_logging()
    from megatronish.swarm.peer import run_peer
    asyncio.run(run_peer(args))
    return 0


def trainer_main(argv=None) -> int:
    args = _parse("trainer", argv)
    _import_hivemind()
    _setup_logging()
    from megatronish.swarm.trainer import run_trainer
    losses = asyncio.run(run_trainer(args))
    logging.getLogger("megatronish.swarm").info(f"trained {len(losses)} steps")
    return 0


def dht_main(argv=None) -> int:
    """A DHT node that only bootstraps the swarm: prints (and with --address-file writes) its address."""
    parser = argparse.ArgumentParser(prog="swarm_dht.py", description=dht_main.__doc__)
    parser.add_argument("--initial-peers", nargs="*", default=[])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--announce-host", help="the address other machines reach this one at")
    parser.add_argument("--address-file", help="write the multiaddr to give peers as --initial-peers here")
    args = parser.parse_args(argv)
    _import_hivemind()
    _setup_logging()
    asyncio.run(_serve_dht(args))
    return 0


async def _serve_dht(args) -> None:
    from megatronish.swarm.network import start_node, stop_node, visible_address
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    p2p, node = await start_node(args)
    address = await visible_address(p2p)
    if args.address_file:  # written whole, then renamed: a reader never sees half an address
        with open(args.address_file + ".tmp", "w") as f:
            f.write(address + "\n")
        os.replace(args.address_file + ".tmp", args.address_file)
    logging.getLogger("megatronish.swarm").info(f"DHT bootstrap node at {address}")
    await stop.wait()
    await stop_node(p2p, node)
