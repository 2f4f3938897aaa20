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
        if procs and all(proc.poll() is not None for proc in procs):
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


SLURM_CONF = """\
ClusterName=megatronish-test
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
AuthInfo=socket={root}/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=30
NodeName={host} CPUs={cpus} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    """A one-node SLURM cluster (slurmctld + slurmd from Debian's slurm-wlm, a munge daemon) in
    `root`; `env` points SLURM's commands at it. Raises RuntimeError saying why when it cannot start."""

    def __init__(self, root: Path):
        from megatronish.testing import find_free_port

        missing = [tool for tool in ("slurmctld", "slurmd", "sbatch", "munged") if not shutil.which(tool)]
        if missing:
            raise RuntimeError(f"{', '.join(missing)} not installed (apt-get install slurm-wlm)")
        self.root, self.host = root, subprocess.run(["hostname", "-s"], capture_output=True, text=True).stdout.strip()
        for folder in ("state", "spool"):
            (root / folder).mkdir(parents=True, exist_ok=True)
        conf = root / "slurm.conf"
        conf.write_text(SLURM_CONF.format(host=self.host, root=root, ctld_port=find_free_port(),
                                          slurmd_port=find_free_port(), cpus=os.cpu_count()))
        self.env = dict(os.environ, SLURM_CONF=str(conf))
        self.daemons = []
        # A munge daemon of this cluster's own (its socket named in slurm.conf), beside any system one.
        self._run_daemon(["munged", "--foreground", "--force", f"--socket={root}/munge.socket",
                          f"--pid-file={root}/munged.pid", f"--log-file={root}/munged.log",
                          f"--seed-file={root}/munged.seed"])
        self._run_daemon(["slurmctld", "-D", "-i", "-f", str(conf)])
        self._run_daemon(["slurmd", "-D", "-f", str(conf)])
        deadline = time.monotonic() + 60
        while "idle" not in self.run("sinfo", "-h", "-o", "%T", check=False).stdout:
            if time.monotonic() > deadline or any(d.poll() is not None for d in self.daemons):
                self.stop()
                raise RuntimeError("slurmctld/slurmd did not bring the node up within 60 s (see "
                                   f"{root}/slurmctld.log, {root}/slurmd.log)")
            time.sleep(0.5)

    def _run_daemon(self, command):
        log = open(self.root / f"{command[0]}.out", "w")
        self.daemons.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                             start_new_session=True))

    def run(self, *command, check=True) -> subprocess.CompletedProcess:
        return subprocess.run(command, capture_output=True, text=True, env=self.env, check=check, timeout=60)

    def job_field(self, job_id: str, field: str) -> str:
        return self._field("job", job_id, field)

    def node_field(self, field: str) -> str:
        return self._field("node", self.host, field)

    def _field(self, kind: str, name: str, field: str) -> str:
        text = self.run("scontrol", "show", kind, name, check=False).stdout
        return next((item.split("=", 1)[1] for item in text.split() if item.startswith(field + "=")), "")

    def stop(self) -> None:
        for daemon in reversed(self.daemons):
            kill_all(process_tree(daemon.pid))
            daemon.wait()
        self.daemons = []
