"""Elastic jobs in tests: torchrun agents on 127.0.0.1 as nodes of one c10d rendezvous, nodes killed by PID,
and the per-iteration losses read back from the training log lines of every attempt."""

import json
import re
import socket
import time
from datetime import timedelta
from pathlib import Path

from launcher_testing import TORCHRUN, finish, kill_all, process_tree, start
from torch.distributed import TCPStore

from megatronish.testing import find_free_port
from megatronish.training.elastic import LAST_STEP_KEY

# Quick failure detection and rendezvous (torch's defaults: 5 s heartbeats x 3, 30 s of last call for more nodes).
RDZV_CONF = "last_call_timeout=3,keep_alive_interval=1,keep_alive_max_attempt=3,join_timeout=300"
LOSS_LINE = re.compile(r"^ iteration +(\d+)/ *\d+ \|.* lm loss: (\S+) \|", flags=re.M)


class ElasticJob:
    """An elastic torchrun job of up to `max_nodes` agents of `nproc` ranks on this machine. Node 0 starts
    first and hosts the rendezvous store (kill the others: a lost store host ends the whole job)."""

    def __init__(self, tmp_path: Path, entry_argv: list[str], nproc: int, max_nodes: int, min_nodes: int = 1,
                 max_restarts: int = 10, **env):
        self.tmp_path, self.port = tmp_path, find_free_port()
        self.env = dict(env, TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, MEGATRONISH_ELASTIC_STORE=f"127.0.0.1:{self.port}")
        self.command = [TORCHRUN, "--nnodes", f"{min_nodes}:{max_nodes}", "--nproc_per_node", str(nproc),
                        "--max-restarts", str(max_restarts), "--rdzv-backend", "c10d",
                        "--rdzv-endpoint", f"127.0.0.1:{self.port}", "--rdzv-id", "elastic-test",
                        "--rdzv-conf", RDZV_CONF, "--monitor-interval", "0.5", *entry_argv]
        self.agents, self.logs, self.orphans = [], [], []

    def start_node(self, *node_argv: str):
        """A new agent (a node joining) with extra pretrain flags (e.g. its own --local-checkpoint-dir)."""
        log = self.tmp_path / f"node{len(self.agents)}.txt"
        agent = start(self.command + list(node_argv), log, self.tmp_path, **self.env)
        self.agents.append(agent)
        self.logs.append(log)
        if len(self.agents) == 1:
            self._wait_for_store(agent)
        return agent

    def _wait_for_store(self, agent, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and agent.poll() is None:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.2)
        raise AssertionError(f"the first agent did not open the rendezvous store:\n{self.output()[-3000:]}")

    def kill_node(self, agent, agent_only: bool = False) -> None:
        """A node lost: its agent (and, unless `agent_only`, every worker under it) SIGKILLed by PID.
        Workers left behind are SIGKILLed at `finish` if they have not ended by then."""
        tree = process_tree(agent.pid)
        kill_all(tree[:1] if agent_only else tree)
        agent.wait()
        self.orphans += tree[1:]

    def output(self) -> str:
        return "\n".join(log.read_text() for log in self.logs if log.exists())

    def wait_for(self, pattern: str, timeout: float, count: int = 1) -> re.Match:
        """Until `pattern` has appeared `count` times in the logs (fails early when every agent ended)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = list(re.finditer(pattern, self.output(), flags=re.M))
            if len(found) >= count:
                return found[count - 1]
            if all(agent.poll() is not None for agent in self.agents):
                break
            time.sleep(0.3)
        raise AssertionError(f"{pattern!r} did not appear {count} time(s) within {timeout} s:\n{self.output()[-5000:]}")

    def wait_for_step(self, layout: str, iteration: int, timeout: float) -> None:
        """Until the job has finished `iteration` or a later one at `layout` (e.g. "TP 2 x PP 1 x DP 2"),
        as rank 0 records it in the rendezvous store (elastic.RestartReport)."""
        store = TCPStore("127.0.0.1", self.port, is_master=False, timeout=timedelta(seconds=30))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(agent.poll() is None for agent in self.agents):
            if store.check([LAST_STEP_KEY]):
                step = json.loads(store.get(LAST_STEP_KEY))
                if step["layout"] == layout and step["iteration"] >= iteration:
                    return
            time.sleep(0.3)
        raise AssertionError(f"no step {iteration} at {layout} within {timeout} s:\n{self.output()[-5000:]}")

    def finish(self, timeout: float) -> list[int | None]:
        return finish(self.agents, timeout, also_kill=self.orphans)

    def losses(self) -> dict[int, list[float]]:
        """{iteration: the loss of every attempt that ran it} from the log lines of all nodes."""
        found = {}
        for iteration, loss in LOSS_LINE.findall(self.output()):
            found.setdefault(int(iteration), []).append(float(loss))
        return found
