"""The signals by which launchers ask a job to stop, and the rule for helper processes.

torchrun forwards SIGTERM to each worker's whole process group, and SLURM signals every
process of a job step (`--signal=USR1@90` sends SIGUSR1 before the time limit). Helper
processes of a rank (data-loader workers) receive the signal too. Only the rank decides when
to stop (after agreeing with its peers, and saving), so helpers ignore these signals: a
helper that died of one would crash its rank before the save.
"""

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def ignore_stop_signals(*_) -> None:
    """Make this process (a rank's helper) ignore the stop signals. Usable as a DataLoader
    worker_init_fn; helpers still end when their rank ends (the DataLoader sees to that)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
