"""Elastic training on torchrun's elastic agents: a layout for every world size, waiting for nodes, restart reports.

    torchrun --nnodes 1:4 --nproc_per_node 8 --max-restarts 100 --rdzv-backend c10d --rdzv-endpoint HOST:PORT \
        pretrain_gpt.py --tp 8 --global-batch-size 512 --save CKPT --load CKPT \
        --local-checkpoint-interval 10 --local-checkpoint-dir /local/ckpt --wait-for-nodes-minutes 30 ...
(launch/elastic.sh runs this.) When a node leaves or joins, torchrun stops every worker and starts
them again with the new WORLD_SIZE: a node lost makes the surviving workers' collectives fail and
their agents restart them; a node that joins is seen waiting by the agents, which stop their
workers with SIGTERM (the workers save first, preemption.py). Every worker then
  1. takes the layout for the new world (`resolve_layout`): --tp and --pp are kept and DP follows
     the world; with --layout auto the layout planner chooses TP and PP for it. A world that no
     layout fits waits up to --wait-for-nodes-minutes (counted from the first attempt that had to
     wait) for torchrun to bring more nodes, then exits with status 3 saying what it needs;
  2. resumes from the newest complete checkpoint, durable or local (local_checkpoint.py). The
     global batch and the order of samples do not depend on DP (data/samplers.py), so the run
     continues on the trajectory it was on;
  3. reports (`RestartReport`): the old and the new layout, the iteration it resumed from, the
     iterations redone, and the time from the last step at the old layout to the first at the new
     one, in parts (failure detection and rendezvous, start-up, checkpoint load, first step).
The facts that outlive the workers (the last iteration reached, when waiting began) are kept in
a store that outlives them (`job_store`): torchrun's rendezvous store, named by
$MEGATRONISH_ELASTIC_STORE (launch/elastic.sh sets it to the --rdzv-endpoint).

torch 2.13's agents share one TCP store with their workers, built in the first rendezvous round
only: a node that joins in a later round waits forever for that round's store address. Elastic
launches therefore set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (launch/elastic.sh does), and every
round's workers start a store of their own.
"""

import argparse
import copy
import json
import os
import sys
import time
from datetime import timedelta

import torch.distributed as dist

from megatronish.attempt_store import agents_store
from megatronish.training.arguments import ArgumentError, validate_layout_args
from megatronish.training.checkpointing import LoadedCheckpoint
from megatronish.training.utils import print_rank_0

JOB_STORE_ENV = "MEGATRONISH_ELASTIC_STORE"              # host:port of torchrun's rendezvous store
LAST_STEP_KEY = "megatronish/elastic/last_step"          # {"iteration", "time", "layout"} of the newest step
WAITING_SINCE_KEY = "megatronish/elastic/waiting_since"  # when the first attempt of a wait began
STORE_TIMEOUT = timedelta(seconds=60)
EXIT_NO_LAYOUT = 3
EXIT_PEERS_LEFT = 4  # a worker that stopped because other nodes are leaving: its agent should restart it
LARGER_WORLDS_TRIED = 64  # nodes added, when looking for the smallest world that fits


class LayoutDoesNotFit(ArgumentError):
    """No layout of these arguments fits this world size, and a larger world would fit. The message is the
    one pretrain_gpt.py (and the planner) give for the layout; `needs()` adds the world that would fit."""

    def __init__(self, message: str, world_size: int, fitting_world_size: int):
        super().__init__(message)
        self.world_size, self.fitting_world_size = world_size, fitting_world_size

    def needs(self) -> str:
        return f"{self} (this world has {self.world_size} ranks; {_describe_world(self.fitting_world_size)} would fit)"


def resolve_layout(args: argparse.Namespace, world_size: int) -> None:
    """Set the layout of `args` for `world_size` ranks: --tp/--pp as given (DP follows), or with --layout
    auto the planner's choice. Raises LayoutDoesNotFit naming the smallest larger world that fits, or
    ArgumentError when no world would fit (a bad command line)."""
    if args.layout == "auto":
        plan = _planned_layout(args, world_size)
        if plan is None:
            larger = _smallest_fitting_world(args, world_size)
            if larger is None:
                raise ArgumentError(f"--layout auto: no layout of this model and batch fits {world_size} ranks or "
                                    "any larger world: check the model shape and --global-batch-size")
            raise LayoutDoesNotFit(f"--layout auto: no layout of this model and batch fits {world_size} ranks",
                                   world_size, larger)
        args.tensor_model_parallel_size, args.pipeline_model_parallel_size = plan.tp, plan.pp
        args.virtual_pipeline_model_parallel_size, args.num_layers_per_virtual_pipeline_stage = plan.virtual_pp, None
        return
    try:
        validate_layout_args(copy.copy(args), world_size)
    except ArgumentError as error:
        larger = _smallest_fitting_world(args, world_size)
        if larger is None:
            raise
        raise LayoutDoesNotFit(str(error), world_size, larger) from None


def resolve_layout_or_wait(args: argparse.Namespace, world_size: int) -> None:
    """resolve_layout; when the world is too small for any layout and --wait-for-nodes-minutes is set,
    wait for torchrun to restart this worker with more nodes, and exit with status 3 once the time is up
    (without it, validate_args reports the layout's problems with the rest: pretrain_gpt.py exits 2)."""
    if getattr(args, "argument_errors", None):
        return  # flags that did not parse: validate_args reports them with everything else
    if args.layout != "auto" and not args.wait_for_nodes_minutes:
        return  # nothing to choose or wait for: validate_args checks the given layout with everything else
    try:
        resolve_layout(args, world_size)
    except LayoutDoesNotFit as error:
        if not args.wait_for_nodes_minutes:
            raise  # --layout auto, and no waiting asked for
        _wait_for_more_nodes(error.needs(), args.wait_for_nodes_minutes, job_store())
    except ArgumentError:
        if args.layout == "auto":
            raise
        # a given layout that no world fits: validate_args reports it with every other problem of the command line
    if args.wait_for_nodes_minutes and int(os.environ.get("RANK", 0)) == 0:
        store = job_store()
        if store is not None:
            store.delete_key(WAITING_SINCE_KEY)  # a world fits: a later wait starts its own clock


def job_store() -> dist.Store | None:
    """A store that outlives the workers' restarts: the rendezvous store at $MEGATRONISH_ELASTIC_STORE, else the
    store torchrun's agents share with their workers (fixed-size jobs), else None (not under torchrun)."""
    address = os.environ.get(JOB_STORE_ENV)
    if not address:
        return agents_store(STORE_TIMEOUT)
    host, port = address.rsplit(":", 1)
    return dist.TCPStore(host, int(port), is_master=False, timeout=STORE_TIMEOUT)


def restart_expected() -> bool:
    """Whether this worker's torchrun agent restarts it when it fails (--max-restarts > 0)."""
    return int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0)) > 0


def _planned_layout(args, world_size: int):
    from megatronish.planner import choose_layout  # the planner imports the model zoo: only for --layout auto

    plan = choose_layout(args, world_size)
    return plan.layout if plan is not None else None


def _fits(args, world_size: int) -> bool:
    if args.layout == "auto":
        return _planned_layout(args, world_size) is not None
    try:
        validate_layout_args(copy.copy(args), world_size)
        return True
    except ArgumentError:
        return False


def _smallest_fitting_world(args, world_size: int) -> int | None:
    """The smallest world of whole nodes (LOCAL_WORLD_SIZE ranks each) larger than this one that a layout fits."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    for nodes_added in range(1, LARGER_WORLDS_TRIED + 1):
        if _fits(args, world_size + nodes_added * per_node):
            return world_size + nodes_added * per_node
    return None


def _describe_world(world_size: int) -> str:
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    nodes = f" ({world_size // per_node} nodes of {per_node})" if per_node > 1 else ""
    return f"a world of {world_size} ranks{nodes}"


def _wait_for_more_nodes(need: str, minutes: float, store) -> None:
    """Sleep until the deadline (torchrun's agents stop this worker when a node joins), then exit 3."""
    rank_0 = int(os.environ.get("RANK", 0)) == 0
    started = time.time()
    if store is not None:  # the clock starts at the first attempt that waited: restarts do not extend it
        if rank_0 and not store.check([WAITING_SINCE_KEY]):
            store.set(WAITING_SINCE_KEY, str(started))
        started = float(store.get(WAITING_SINCE_KEY)) if store.check([WAITING_SINCE_KEY]) else started
    left = started + minutes * 60.0 - time.time()
    if rank_0:
        print(f"elastic: waiting for more nodes: {need}; waiting up to {max(left, 0.0):.0f} s more "
              f"(--wait-for-nodes-minutes {minutes}) for torchrun to bring them", flush=True)
    time.sleep(max(left, 0.0))
    if rank_0:
        print(f"pretrain_gpt.py: error: no node joined within --wait-for-nodes-minutes {minutes}: {need}",
              file=sys.stderr, flush=True)
    sys.exit(EXIT_NO_LAYOUT)


def _process_start_time() -> float:
    """When this process started (wall clock, 10 ms resolution; Linux), else now."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


class RestartReport:
    """Rank 0 records each finished iteration in the job's store (`job_store`); after the first iteration of a
    restarted attempt it logs what the restart cost. Create after torch.distributed is up."""

    def __init__(self):
        self.process_start = _process_start_time()
        self.store = job_store() if dist.get_rank() == 0 else None
        self.previous = (json.loads(self.store.get(LAST_STEP_KEY))
                         if self.store is not None and self.store.check([LAST_STEP_KEY]) else None)
        self.loaded: LoadedCheckpoint | None = None
        self.resumed_from = 0
        self.first_step_start: float | None = None
        self.reported = False

    def resumed(self, loaded: LoadedCheckpoint | None) -> None:
        self.loaded, self.resumed_from = loaded, loaded.progress.iteration if loaded else 0

    def step_starts(self) -> None:
        if self.first_step_start is None:
            self.first_step_start = time.time()

    def step_done(self, iteration: int, layout: str) -> None:
        if self.store is None:
            return
        now = time.time()
        self.store.set(LAST_STEP_KEY, json.dumps({"iteration": iteration, "time": now, "layout": layout}))
        if not self.reported:
            self.reported = True
            message = self.describe(layout, now)
            if message:
                print_rank_0(message)

    def describe(self, layout: str, now: float) -> str | None:
        """The log line of a restart, after its first step (None for the first attempt of a fresh run)."""
        resumed_from = self.resumed_from
        if self.previous is None and self.loaded is None:
            return None
        old = self.previous["layout"] if self.previous else self.loaded.saved_layout
        source = f" ({self.loaded.folder})" if self.loaded else " (no checkpoint: from scratch)"
        load = self.loaded.seconds if self.loaded else 0.0
        first_step = now - self.first_step_start
        startup = self.first_step_start - self.process_start - load
        parts = f"{startup:.1f} s start-up, {load:.1f} s load, {first_step:.1f} s first step"
        if self.previous is None:
            return (f"elastic restart: layout {old} -> {layout}; resumed from iteration {resumed_from}{source}; work "
                    f"lost: unknown (no earlier attempt of this job recorded); {parts}")
        redone = self.previous["iteration"] - resumed_from
        detection = self.process_start - self.previous["time"]
        return (f"elastic restart: layout {old} -> {layout}; resumed from iteration {resumed_from}{source}; work lost: "
                f"{redone} iteration(s) redone (the previous attempt reached iteration {self.previous['iteration']}); "
                f"{now - self.previous['time']:.1f} s from its last step to this attempt's first: "
                f"{detection:.1f} s failure detection, rendezvous and restart, {parts}")
