"""pretrain_gpt.py with faults injected into chosen ranks' training steps, for launcher tests.

Run by torchrun like pretrain_gpt.py. The environment says what to do (each fault once per
job: a marker file next to RESULT_FILE remembers it across torchrun's restarts):
    KILL_AT=rank:step          that global rank SIGKILLs itself during that training step
    SLEEP_AT=rank:step:secs    that rank sleeps before that step (busy, in no collective)
    STEP_DELAY=secs            every step takes at least this long (a signal then lands mid-run)
Rank 0 writes the iterations done so far to PROGRESS_FILE after each step, and at the end
{losses, final_valid, restart, exit_reason} to RESULT_FILE.
"""

import json
import os
import signal
import sys
import time

import torch.distributed as dist

from megatronish.training import training
from megatronish.training.arguments import parse_args

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
    time.sleep(float(os.environ.get("STEP_DELAY", 0)))
    result = real_train_step(*args, **kwargs)
    if RANK == 0 and os.environ.get("PROGRESS_FILE"):
        with open(os.environ["PROGRESS_FILE"], "w") as f:
            f.write(str(steps[0]))
    return result


training.train_step = train_step
result = training.pretrain(parse_args(sys.argv[1:]))
if RANK == 0:
    with open(RESULT_FILE, "w") as f:
        json.dump({"losses": result.losses, "final_valid": result.final_valid_loss,
                   "iteration": result.progress.iteration,
                   "restart": os.environ["TORCHELASTIC_RESTART_COUNT"]}, f)
dist.destroy_process_group()
