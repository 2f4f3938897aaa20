"""What torchrun does at a stop signal, timed (the README's preemption table):

    PYTHONPATH=. python tests/training/preemption_timings.py

Three runs of the tests' fault entry (2 ranks, TP=2, --num-workers 2, 0.2 s per step) under
torchrun --standalone: SIGTERM to the agent, SIGTERM to every process (as SLURM does), SIGKILL
to the agent. Prints, for each, the iteration saved and how long until every process was gone.
"""
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from checkpoint_testing import build_corpus, tiny_argv  # noqa: E402
from launcher_testing import (  # noqa: E402
    FAULT_ENTRY,
    TORCHRUN,
    finish,
    kill_all,
    process_tree,
    signal_every_process,
    start,
    wait_for_file_value,
)

from megatronish.training.checkpointing import read_latest_iteration  # noqa: E402

DELIVERIES = {
    "SIGTERM to the torchrun agent": lambda pid: os.kill(pid, signal.SIGTERM),
    "SIGTERM to every process (as SLURM)": lambda pid: signal_every_process(pid, signal.SIGTERM),
    "SIGKILL to the torchrun agent": lambda pid: os.kill(pid, signal.SIGKILL),
}


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def measure(corpus: str, folder: Path, deliver) -> str:
    save = folder / "ckpt"
    command = [TORCHRUN, "--standalone", "--nproc_per_node", "2", FAULT_ENTRY,
               *tiny_argv(corpus, "--save", str(save), "--load", str(save), "--num-workers", "2",
                          "--save-interval", "1000", iters=500, tp=2)]
    proc = start(command, folder / "log.txt", folder, STEP_DELAY=0.2, PROGRESS_FILE=folder / "progress",
                 RESULT_FILE=folder / "result")
    wait_for_file_value(folder / "progress", 5, [proc], timeout=180)
    tree = process_tree(proc.pid)
    signalled_after = int((folder / "progress").read_text())
    start_time = time.monotonic()
    deliver(proc.pid)
    returncode = finish([proc], timeout=120)[0]
    while any(alive(pid) for pid in tree[1:]) and time.monotonic() - start_time < 120:
        time.sleep(0.1)
    seconds = time.monotonic() - start_time
    kill_all(tree[1:])
    log = (folder / "log.txt").read_text()
    stop_line = next((line for line in log.splitlines() if "exiting after" in line), "no stop line")
    return (f"{len(tree)} processes; signal after iteration {signalled_after}; checkpoint of iteration "
            f"{read_latest_iteration(str(save))}; every process gone {seconds:.1f} s after the signal; torchrun exit "
            f"status {returncode}; a loader worker killed: {'killed by signal' in log}; {stop_line!r}")


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="preemption-timings-"))
    try:
        corpus = build_corpus(root)
        for name, deliver in DELIVERIES.items():
            print(f"{name}: {measure(corpus, Path(tempfile.mkdtemp(dir=root)), deliver)}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
