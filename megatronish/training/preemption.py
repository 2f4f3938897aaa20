"""When to stop early: SIGTERM / SIGUSR1, --exit-interval, --exit-duration-in-mins, a lost agent.

A cluster that preempts a job sends SIGTERM (SLURM: `--signal=USR1@90` sends SIGUSR1 ahead of
the time limit) to the processes, maybe not to all of them at the same instant. The handler
only records the signal; at the next iteration boundary every rank takes part in one small
all-reduce (MAX) of "signal seen" and "time is up", so all ranks agree to stop at the same
iteration, save a checkpoint, and exit with status 0. Restarted with the same command (--load
pointing at --save), the job resumes there.

A rank started by torchrun also stops (and saves) when its agent is gone: an agent killed with
SIGKILL cannot pass a signal on, and its workers would train on with no one to restart or stop
them. The agent is the rank's parent; once it dies the rank is re-parented, which the check at
each iteration boundary notices.
"""

import os
import signal
import time

import torch
import torch.distributed as dist

from megatronish import parallel_state
from megatronish.stop_signals import STOP_SIGNALS


class ExitConditions:
    """Install with `ExitConditions(args)` once distributed is up; call `check(iteration)` after each
    iteration on every rank (a collective); `close()` restores the previous signal handlers."""

    def __init__(self, exit_interval: int | None = None, exit_duration_in_mins: float | None = None):
        self.exit_interval = exit_interval
        self.exit_duration_in_mins = exit_duration_in_mins
        self.start = time.monotonic()
        self.received: int | None = None
        self.stopped_by_peers = False  # the newest stop was for other ranks' signal or lost agent, none of this one's
        self.agent_pid = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None  # torchrun's agent
        self._previous = {}
        for signum in STOP_SIGNALS:
            try:
                self._previous[signum] = signal.signal(signum, self._on_signal)
            except ValueError:  # not the main thread: signals cannot be handled here
                pass

    def _on_signal(self, signum, frame) -> None:
        self.received = signum

    def check(self, iteration: int) -> str | None:
        """Why to stop after `iteration` (the same answer on every rank), or None to go on."""
        time_is_up = (self.exit_duration_in_mins is not None
                      and time.monotonic() - self.start > self.exit_duration_in_mins * 60.0)
        agent_gone = self.agent_pid is not None and os.getppid() != self.agent_pid
        flags = torch.tensor([float(self.received or 0), float(time_is_up), float(agent_gone)],
                             device=parallel_state.get_device())
        peers_only = self.received is None and not agent_gone
        parallel_state.all_reduce_in_group(flags, op=dist.ReduceOp.MAX)
        self.stopped_by_peers = peers_only and bool(flags[0] > 0 or flags[2] > 0)
        if flags[0] > 0:
            return f"received {signal.Signals(int(flags[0])).name}"
        if flags[2] > 0:
            return "a torchrun agent is gone (killed?): no one would restart or stop these ranks"
        if flags[1] > 0:
            return f"--exit-duration-in-mins {self.exit_duration_in_mins} reached"
        if self.exit_interval and iteration % self.exit_interval == 0:
            return f"--exit-interval {self.exit_interval}"
        return None

    def close(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}
