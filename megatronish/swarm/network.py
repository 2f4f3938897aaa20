"""The swarm's network: a hivemind p2p daemon and DHT node per process, and the table of peers.

Every peer, trainer and bootstrap node runs one P2P (hivemind's p2p daemon, p2pd) and one
DHTNode in its own event loop: two processes per member (Python + p2pd), not hivemind's ten of a
`moe.Server`. They listen on --host (127.0.0.1 unless told otherwise) with NAT traversal, port
mapping and relays off: libp2p's defaults would probe outside addresses.

Each serving peer keeps a record under the DHT key "<run-id>.stage<k>", subkey its peer id:
    {"stage", "iteration", "throughput" (samples/s of the stage's work, None until measured),
     "state" ("serving", "draining": finishing its steps before leaving, "left")}
stored with an expiration a few update periods ahead and refreshed every --update-period.
`PeerTable` reads all stages' keys in the background and caches the records until their own
expiration: a DHT read can come back empty while a frozen peer holds the key (measured with
hivemind 1.1.12), and the table must not forget live peers because of it.
"""

import asyncio
import logging
from dataclasses import asdict, dataclass

from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P, PeerID
from hivemind.utils import get_dht_time

log = logging.getLogger("megatronish.swarm")
HOLDING_STATE = ("serving", "draining")  # peers a stage's state can be copied from, and that take part in commits
RECORD_LIFETIME_PERIODS = 20  # a record outlives this many missed refreshes
DHT_WAIT_TIMEOUT = 1.0  # seconds a DHT request waits for a node (a frozen one holds reads up this long)


def p2p_options(args) -> dict:
    """hivemind.P2P.create arguments: listen on --host only; no NAT traversal, port mapping or relays."""
    options = dict(host_maddrs=[f"/ip4/{args.host}/tcp/{args.port}"], use_relay=False, use_auto_relay=False,
                   auto_nat=False, nat_port_map=False)
    if args.announce_host:
        if not args.port:
            raise ValueError("--announce-host needs a fixed --port (others dial that address)")
        options["announce_maddrs"] = [f"/ip4/{args.announce_host}/tcp/{args.port}"]
    return options


async def start_node(args, client_mode: bool = False) -> tuple[P2P, DHTNode]:
    """This process's p2p daemon and DHT node, joined to --initial-peers (if any)."""
    p2p = await P2P.create(initial_peers=args.initial_peers or None, **p2p_options(args))
    node = await DHTNode.create(p2p=p2p, initial_peers=args.initial_peers or None, client_mode=client_mode,
                                wait_timeout=DHT_WAIT_TIMEOUT)
    return p2p, node


async def visible_address(p2p: P2P) -> str:
    return str((await p2p.get_visible_maddrs())[0])


async def stop_node(p2p: P2P, node: DHTNode, timeout: float = 10.0) -> None:
    """Shut the DHT node and the p2p daemon down (bounded: the daemon may be gone already)."""
    try:
        await asyncio.wait_for(node.shutdown(), timeout)
    except Exception as error:  # noqa: BLE001 - shutting down regardless
        log.warning(f"the DHT node did not shut down cleanly ({type(error).__name__}: {error})")
    try:
        await asyncio.wait_for(p2p.shutdown(), timeout)
    except Exception as error:  # noqa: BLE001
        log.warning(f"the p2p daemon did not shut down cleanly ({type(error).__name__}: {error})")


def stage_key(run_id: str, stage: int) -> str:
    return f"{run_id}.stage{stage}"


@dataclass
class PeerRecord:
    peer_id: str
    stage: int
    iteration: int
    throughput: float | None
    state: str = "serving"
    expiration: float = 0.0

    @property
    def peer(self) -> PeerID:
        return PeerID.from_base58(self.peer_id)


async def announce(node: DHTNode, run_id: str, record: PeerRecord, update_period: float) -> None:
    """Store (or refresh) this peer's record; it expires unless refreshed within a few update periods."""
    record.expiration = get_dht_time() + RECORD_LIFETIME_PERIODS * update_period
    value = {k: v for k, v in asdict(record).items() if k not in ("peer_id", "expiration")}
    await node.store(stage_key(run_id, record.stage), value, record.expiration, subkey=record.peer_id)


class PeerTable:
    """The swarm's peers per stage, as last read from the DHT (records kept until they expire, or longer
    for peers that answer calls: a call answered is as good a sign of life as a record)."""

    def __init__(self, node: DHTNode, run_id: str, num_stages: int, update_period: float):
        self.node, self.run_id, self.num_stages = node, run_id, num_stages
        self.lifetime = RECORD_LIFETIME_PERIODS * update_period
        self._records: dict[tuple[int, str], PeerRecord] = {}
        self.refreshed = asyncio.Event()

    def answered(self, stage: int, peer_id: str) -> None:
        """`peer_id` just answered a call for `stage`: keep its record at least another lifetime."""
        record = self._records.get((stage, peer_id))
        if record is not None:
            record.expiration = max(record.expiration, get_dht_time() + self.lifetime)

    async def refresh(self) -> None:
        keys = [stage_key(self.run_id, stage) for stage in range(self.num_stages)]
        try:
            found = await self.node.get_many(keys, sufficient_expiration_time=float("inf"))  # the newest values
        except Exception as error:  # noqa: BLE001 - a failed read keeps the cached table
            log.warning(f"reading the peer table from the DHT failed ({type(error).__name__}: {error})")
            return
        for stage, key in enumerate(keys):
            entry = found.get(key)
            if entry is None or not isinstance(entry.value, dict):
                continue
            for peer_id, item in entry.value.items():
                cached = self._records.get((stage, peer_id))
                if cached is None or item.expiration_time > cached.expiration:
                    self._records[(stage, peer_id)] = PeerRecord(peer_id=peer_id, expiration=item.expiration_time,
                                                                 **{k: item.value[k] for k in (
                                                                     "stage", "iteration", "throughput", "state")})
        self.refreshed.set()

    async def keep_refreshed(self, period: float) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(period)

    def records(self, stage: int | None = None, states: tuple | None = ("serving",)) -> list[PeerRecord]:
        """Unexpired records (of one stage, or all; in one of `states`, or any), newest per peer and stage."""
        now = get_dht_time()
        for key in [k for k, r in self._records.items() if r.expiration < now]:
            del self._records[key]
        return [r for (s, _), r in sorted(self._records.items())
                if (stage is None or s == stage) and (states is None or r.state in states)]

    def stage_iteration(self, stage: int, states: tuple = ("serving",)) -> int | None:
        """The newest iteration any peer of `stage` in `states` reports (None: no such peer)."""
        iterations = [r.iteration for r in self.records(stage, states)]
        return max(iterations) if iterations else None

    def swarm_iteration(self) -> int | None:
        """The iteration every stage has reached (None while a stage has no serving peer)."""
        per_stage = [self.stage_iteration(stage) for stage in range(self.num_stages)]
        return None if None in per_stage else min(per_stage)

