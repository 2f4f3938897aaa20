"""Run a function on N CPU ranks (gloo) and collect what each returns.

    from megatronish.testing import run_distributed

    def check(tp):                       # runs in every rank, torch.distributed is ready
        ...
        return some_picklable_value

    results = run_distributed(check, world_size=4, args=(2,))   # one result per rank

Ranks are forked (about 0.3 s for 4 ranks, against about 8 s with spawn), each pinned to one
torch thread so that ranks do not fight over the cores. An exception in any rank fails the
call with that rank's traceback; a rank that hangs (say, in a collective its peers never
reach) fails the call after `timeout` seconds instead of hanging the test suite.
"""

import importlib.util
import multiprocessing as mp
import os
import pickle
import socket
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist


def find_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn, args, kwargs, rank, world_size, port, collective_timeout, env, results):
    try:
        torch.set_num_threads(1)
        os.environ.update(env)
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
            LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
            # A forked child must stay on one thread: OpenMP's pool does not survive fork, and
            # a rank asking for more threads hangs in its first parallel region.
            MEGATRONISH_NUM_THREADS="1",
        )
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
            timeout=timedelta(seconds=collective_timeout),
        )
        try:
            value = fn(*args, **kwargs)
        finally:
            _reset_megatronish_state()
            dist.destroy_process_group()
        # Plain pickle: the queue's pickler would share tensors through file descriptors
        # of this process, which are gone once it exits.
        results.put((rank, True, pickle.dumps(value)))
    except BaseException:  # noqa: BLE001 - everything must reach the parent, SystemExit included
        results.put((rank, False, traceback.format_exc()))


def _reset_megatronish_state():
    from megatronish import parallel_state

    parallel_state.destroy_model_parallel()


class RankFailed(AssertionError):
    pass


def _failure_report(world_size, failures, results, grace_s=2.0):
    """Every failing rank's traceback, the cause first.

    When one rank raises and exits, its peers' pending collectives fail too ("connection reset
    by peer"), and their reports can arrive first. Gather what arrives within `grace_s`, then
    list the ranks whose errors are not such echoes before those that are.
    """
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if results.empty():
            time.sleep(0.05)
            continue
        rank, ok, value = results.get()
        if not ok:
            failures[rank] = value

    def is_echo(traceback_text):
        return "Connection reset by peer" in traceback_text or "Connection closed by peer" in traceback_text

    ranks = sorted(failures, key=lambda r: (is_echo(failures[r]), r))
    return "\n".join(f"rank {r} of {world_size} failed:\n{failures[r]}" for r in ranks)


def run_distributed(fn, world_size: int, args=(), kwargs=None, timeout: float = 120.0, env=None):
    """Run `fn(*args, **kwargs)` in `world_size` forked gloo ranks; return their results by rank.

    `fn` must be a module-level function (or any picklable callable) and its result picklable.
    `env` sets extra environment variables in each rank. Collectives that wait longer than
    `timeout` raise inside the ranks; the parent kills whatever is left after `timeout`
    plus a grace period.
    """
    ctx = mp.get_context("fork")
    results = ctx.SimpleQueue()
    port = find_free_port()
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(fn, args, kwargs or {}, rank, world_size, port, timeout, env or {}, results),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    collected = {}
    deadline_s = timeout + 5.0  # a little grace, so that a rank's own timeout error (with its traceback) wins
    start = time.monotonic()
    try:
        while len(collected) < world_size:
            if not results.empty():
                rank, ok, value = results.get()
                if not ok:
                    raise RankFailed(_failure_report(world_size, {rank: value}, results))
                collected[rank] = pickle.loads(value)
                continue
            dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in collected]
            if dead and results.empty():
                time.sleep(0.2)  # a result may still be in flight from a rank that just exited
                if results.empty():
                    codes = {r: procs[r].exitcode for r in dead}
                    raise RankFailed(f"rank(s) {dead} of {world_size} exited without a result (exit codes {codes})")
                continue
            if time.monotonic() - start > deadline_s:
                missing = sorted(set(range(world_size)) - set(collected))
                raise RankFailed(
                    f"timed out after {deadline_s:.0f} s waiting for rank(s) {missing} of {world_size}: "
                    "a collective probably hangs (ranks disagree on which collectives they call)"
                )
            time.sleep(0.01)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=5)
    return [collected[r] for r in range(world_size)]


def load_tool(name: str):
    """Import `tools/<name>.py` of this checkout as a module (the tools are scripts, not a package)."""
    path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_pretrain(argv: list[str]) -> dict:
    """pretrain_gpt.py's training for `argv` in this rank (call it inside run_distributed), as the numbers
    tests compare across layouts: per-iteration losses and gradient norms, validation losses, the final
    validation loss, the iteration reached and the samples consumed."""
    from megatronish import parallel_state
    from megatronish.training.arguments import parse_args
    from megatronish.training.training import pretrain

    try:
        result = pretrain(parse_args(argv))
    finally:
        parallel_state.destroy_model_parallel()
    return {"losses": result.losses, "grad_norms": result.grad_norms, "valid": result.validation_losses,
            "final_valid": result.final_valid_loss, "iteration": result.progress.iteration,
            "consumed": result.progress.consumed_train_samples}
