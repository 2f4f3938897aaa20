"""A key-value store of this restart attempt's own, for ranks started by torchrun's agents.

torchrun's agents host one TCPStore for every attempt of a job (`--max-restarts`). The keys a
failed attempt left there (gloo's peer addresses) would be read by the next attempt, whose
ranks then connect to dead peers ("Gloo connectFullMesh failed ... Connection refused") or
wait forever. TORCHELASTIC_RESTART_COUNT cannot name the attempt: it counts the restarts of
one agent, and across nodes they differ (the node whose rank failed counts a restart, the
others restart for the membership change and do not).

So global rank 0 starts a fresh, empty store server for its attempt and publishes its address
with a random token in the agents' store. A stale address (from an earlier attempt) names a
server that died with its rank 0: the other ranks read the key again until the address they
read answers with the token it was published with. Every attempt of every agent then meets in
a store that no earlier attempt ever wrote to.
"""

import os
import secrets
import time
from datetime import timedelta

import torch.distributed as dist

ADDRESS_KEY = "megatronish/attempt_store"  # in the agents' store: "host:port:token"
TOKEN_KEY = "megatronish/token"            # in the attempt's store: the token
CONNECT_TIMEOUT = timedelta(seconds=2)      # to a published address, before reading the key again


def torchelastic_attempt_store(timeout: timedelta) -> dist.Store | None:
    """Under a torchrun agent that shares its store with the workers, this attempt's own store;
    None elsewhere (init_process_group then builds one from MASTER_ADDR/MASTER_PORT)."""
    agents = agents_store(timeout)
    if agents is None:
        return None
    host, world_size = os.environ["MASTER_ADDR"], int(os.environ["WORLD_SIZE"])
    if int(os.environ["RANK"]) == 0:  # global rank 0 runs on the agents' store host (node rank 0)
        store = dist.TCPStore(host, 0, world_size, is_master=True, timeout=timeout, wait_for_workers=False)
        token = secrets.token_hex(8)
        store.set(TOKEN_KEY, token)
        agents.set(ADDRESS_KEY, f"{host}:{store.port}:{token}")
        return store
    return _join_published_store(agents, world_size, timeout)


def agents_store(timeout: timedelta) -> dist.Store | None:
    """A client of the torchrun agents' store, which outlives the workers' restarts (elastic.py keeps the
    progress of each attempt there); None when not under an agent that shares its store."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["WORLD_SIZE"]),
                         is_master=False, timeout=timeout)


def _join_published_store(agents: dist.Store, world_size: int, timeout: timedelta) -> dist.Store:
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        host, port, token = agents.get(ADDRESS_KEY).decode().rsplit(":", 2)
        try:
            store = dist.TCPStore(host, int(port), world_size, is_master=False, timeout=CONNECT_TIMEOUT,
                                  wait_for_workers=False)
            if store.get(TOKEN_KEY).decode() == token:
                store.set_timeout(timeout)
                return store
        except (RuntimeError, dist.DistStoreError):  # dead: an earlier attempt's rank 0 published it
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank 0 of this attempt did not publish its store in {ADDRESS_KEY!r} of the torchrun "
                               f"agents' store within {timeout} (--distributed-timeout-minutes): is rank 0 alive?")
        time.sleep(0.2)
