"""pretrain_gpt.py with faults injected into chosen ranks' training steps, for launcher tests.

Run by torchrun like pretrain_gpt.py (through its main: the same checks and exit statuses). The
environment says what to do (each fault once per job: a marker file next to RESULT_FILE remembers
it across torchrun's restarts):
    KILL_AT=rank:step          that global rank SIGKILLs itself during that training step
    SLEEP_AT=rank:step:secs    that rank sleeps before that step (busy, in no collective)
    HOLD_AT=rank:step:path,... that rank waits before that step until the file `path` exists
    STEP_DELAY=secs            every step takes at least this long (a signal then lands mid-run)
Rank 0 writes the iterations done so far to PROGRESS_FILE after each step, and at the end
{losses, final_valid, restart, exit_reason} to RESULT_FILE.
"""

import json
import os
import signal
import sys
import time

import pretrain_gpt
from megatronish.training import training

RANK, RESULT_FILE = int(os.environ["RANK"]), os.environ["RESULT_FILE"]
real_train_step, steps = training.train_step, [0]


def _once(name: str, spec: str | None):
    """(rank, step, *rest) of a fault that is due in this rank and not yet done, else None."""
    if not spec:
        return None
    rank, step, *rest = spec.split(":")
    marker = f"{RESULT_FILE}.{name}-done"
    if int(rank) != RANK or int(step) != steps[0] or os.path.exists(marker):
        return None
    open(marker, "w").close()
    return rest


def train_step(*args, **kwargs):
    steps[0] += 1
    if _once("kill", os.environ.get("KILL_AT")) is not None:
        os.kill(os.getpid(), signal.SIGKILL)
    sleep = _once("sleep", os.environ.get("SLEEP_AT"))
    if sleep is not None:
        time.sleep(float(sleep[0]))
    for i, spec in enumerate(filter(None, os.environ.get("HOLD_AT", "").split(","))):
        hold = _once(f"hold{i}", spec)
        while hold is not None and not os.path.exists(hold[0]):
            time.sleep(0.1)
    time.sleep(float(os.environ.get("STEP_DELAY", 0)))
    result = real_train_step(*args, **kwargs)
    if RANK == 0 and os.environ.get("PROGRESS_FILE"):
        with open(os.environ["PROGRESS_FILE"], "w") as f:
            f.write(str(steps[0]))
    return result


def pretrain_and_record(args):
    result = training.pretrain(args)
    if RANK == 0:
        with open(RESULT_FILE, "w") as f:
            json.dump({"losses": result.losses, "final_valid": result.final_valid_loss,
                       "iteration": result.progress.iteration,
                       "restart": os.environ["TORCHELASTIC_RESTART_COUNT"]}, f)
    return result


training.train_step = train_step
pretrain_gpt.pretrain = pretrain_and_record
pretrain_gpt.main(sys.argv[1:])
