"""Running the training entry under real torchrun agents in tests, and signalling it the way the
launchers do: torchrun passes SIGTERM to each worker's process group (the worker and its data
loader workers), SLURM signals every process of the job step."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FAULT_ENTRY = str(Path(__file__).with_name("fault_entry.py"))
TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))


def start(command: list[str], log: Path, cwd: Path, **env) -> subprocess.Popen:
    """Start a launcher in a session of its own, output to `log`; the environment gets PYTHONPATH
    (this checkout) and `env`."""
    environment = dict(os.environ, PYTHONPATH=str(REPO), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
                       **{key: str(value) for key, value in env.items()})
    with open(log, "w") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=environment, cwd=cwd,
                                start_new_session=True)


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants now (from /proc)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo += children.get(current, [])
    return tree


def signal_every_process(pid: int, signum: int) -> int:
    """What SLURM does to a job step: the signal to every process in it. Returns how many got it."""
    count = 0
    for process in process_tree(pid):
        try:
            os.kill(process, signum)
            count += 1
        except ProcessLookupError:
            pass
    return count


def kill_all(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_for_file_value(path: Path, at_least: int, procs, timeout: float) -> None:
    """Until `path` holds a number >= at_least (fails early if every process in `procs` ended)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if int(path.read_text() or 0) >= at_least:
                return
        except (FileNotFoundError, ValueError):
            pass
        if all(proc.poll() is not None for proc in procs):
            raise AssertionError(f"the launchers ended before {path.name} reached {at_least}")
        time.sleep(0.1)
    raise AssertionError(f"{path.name} did not reach {at_least} within {timeout} s")


def finish(procs, timeout: float, also_kill=()) -> list[int | None]:
    """Wait for the launchers; whatever is still running after `timeout` (their process trees,
    and the pids in `also_kill`) is SIGKILLed. Returns each exit status (None: it was killed)."""
    deadline = time.monotonic() + timeout
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(max(deadline - time.monotonic(), 0.1)))
        except subprocess.TimeoutExpired:
            kill_all(process_tree(proc.pid))
            proc.wait()
            codes.append(None)
    kill_all(also_kill)
    return codes
