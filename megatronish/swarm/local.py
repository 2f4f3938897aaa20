"""A swarm of real processes on this machine (tests, tools/bench_swarm.py): a bootstrap DHT node, peers
and trainers started from the tools, each in a session of its own (its p2p daemon in its process
group), output in log files, and a teardown that leaves no process behind (checked). Also the
readers of the trainers' and peers' log lines.

    swarm = LocalSwarm(folder, model_flags)
    swarm.start_dht()
    peers = [swarm.peer(f"peer{i}", "--stage", str(i // 2)) for i in range(4)]
    steps = step_lines(swarm.finish(swarm.trainer("trainer")))
    swarm.close()
"""

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STEP_LINE = re.compile(r"step (\d+) \| lm loss (\S+) \| samples (\d+)-(\d+), (\d+) per stage \((.*?)\) \| "
                       r"rerouted (\d+) \| replayed (\d+) \| [\d.]+ s \| at ([\d.]+) s \| "
                       r"sent (\d+) B, received (\d+) B")


def environment(folder: Path) -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO), MEGATRONISH_NUM_THREADS="1", MEGATRONISH_CACHE=str(folder / "cache"),
                HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")


@dataclass
class Member:
    name: str
    proc: subprocess.Popen
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")


class LocalSwarm:
    """`flags` go to every peer and trainer (the model, --pp, timeouts...)."""

    def __init__(self, folder: Path, flags: list[str]):
        self.folder, self.members = Path(folder), []
        # A run id of its own: swarms started at once on one machine (tests in parallel) never mix records.
        self.flags = ["--run-id", f"local-{os.getpid()}-{uuid.uuid4().hex[:8]}", *flags]
        self.address = None

    def start(self, name: str, tool: str, *flags: str) -> Member:
        log = self.folder / f"{name}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen([sys.executable, str(REPO / "tools" / f"swarm_{tool}.py"), *flags], stdout=out,
                                    stderr=subprocess.STDOUT, env=environment(self.folder), cwd=self.folder,
                                    start_new_session=True)
        self.members.append(Member(name, proc, log))
        return self.members[-1]

    def start_dht(self) -> None:
        address_file = self.folder / "bootstrap.addr"
        dht = self.start("dht", "dht", "--address-file", str(address_file))
        deadline = time.monotonic() + 120
        while not address_file.exists():
            assert dht.proc.poll() is None and time.monotonic() < deadline, dht.text()
            time.sleep(0.1)
        self.address = address_file.read_text().strip()

    def peer(self, name: str, *flags: str) -> Member:
        return self.start(name, "peer", "--initial-peers", self.address, *self.flags, *flags)

    def trainer(self, name: str, *flags: str) -> Member:
        return self.start(name, "trainer", "--initial-peers", self.address, *self.flags, *flags)

    def wait_for(self, member: Member, pattern: str, timeout: float = 300.0) -> re.Match:
        """Until `member`'s log matches `pattern` (fails at once if the process ended without it)."""
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, member.text())
            if match:
                return match
            if member.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{member.name} never logged {pattern!r}:\n{member.text()[-4000:]}")
            time.sleep(0.2)

    def wait_for_any(self, members: list[Member], pattern: str, timeout: float = 300.0) -> Member:
        """The first of `members` whose log matches `pattern`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for member in members:
                if re.search(pattern, member.text()):
                    return member
            time.sleep(0.2)
        raise AssertionError(f"none of {[m.name for m in members]} logged {pattern!r}")

    def finish(self, member: Member, timeout: float = 400.0) -> str:
        """Wait for `member` to exit; it must exit 0. Returns its log."""
        try:
            code = member.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{member.name} did not finish in {timeout} s:\n{member.text()[-4000:]}") from None
        assert code == 0, f"{member.name} exited with {code}:\n{member.text()[-4000:]}"
        return member.text()

    def signal(self, member: Member, signum: int, whole_group: bool = True) -> None:
        """Kill (SIGKILL), freeze (SIGSTOP), resume (SIGCONT) the member's whole process tree, or SIGTERM
        the member alone (a graceful leave: it shuts its own p2p daemon down)."""
        if whole_group:
            os.killpg(member.proc.pid, signum)
        else:
            member.proc.send_signal(signum)

    def close(self) -> None:
        """SIGKILL every member's process group, then check that none of their processes is left."""
        for member in self.members:
            try:
                os.killpg(member.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            member.proc.wait(30)
        groups = {member.proc.pid for member in self.members}
        deadline = time.monotonic() + 10
        while (left := _processes_in_groups(groups)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, f"processes left behind: {left}"


def _processes_in_groups(groups: set[int]) -> list[str]:
    left = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if fields[0] != "Z" and int(fields[2]) in groups:  # state, ppid, pgrp
                left.append(entry)
    return left


@dataclass
class StepLine:
    """What a trainer logged about one committed step."""
    loss: float
    first_sample: int
    last_sample: int
    per_stage: int                              # samples of the step on each stage
    holders: dict                               # stage -> {holder (last 6 characters of its id): samples}
    reroutes: int
    replays: int
    at: float                                   # seconds after the trainer's first step started
    sent: int                                   # bytes the trainer had sent and received by then
    received: int


def step_lines(log: str) -> dict[int, StepLine]:
    """step -> its StepLine, from a trainer's log (each step must be logged once)."""
    steps = {}
    for match in STEP_LINE.finditer(log):
        step, loss, first, last, per_stage, holders, reroutes, replays, at, sent, received = match.groups()
        assert int(step) not in steps, f"step {step} logged twice"
        per_holder = {}
        for part in holders.split("; "):
            stage, counts = part.split(": ", 1)
            per_holder[int(stage.split()[1])] = {h: int(n) for h, n in (c.split() for c in counts.split(", "))}
        steps[int(step)] = StepLine(float(loss), int(first), int(last), int(per_stage), per_holder, int(reroutes),
                                    int(replays), float(at), int(sent), int(received))
    return steps


def last_digests(log: str) -> dict[int, tuple[int, str]]:
    """stage -> (iteration, weights digest) of the last apply or state download the peer logged there."""
    found = {}
    pattern = (r"stage (\d+): (?:applied step \d+: iteration (\d+), weights (\w+)|downloaded the state at "
               r"iteration (\d+) \(weights (\w+)\))")
    for match in re.finditer(pattern, log):
        stage, a_iteration, a_digest, d_iteration, d_digest = match.groups()
        found[int(stage)] = (int(a_iteration or d_iteration), a_digest or d_digest)
    return found
