"""A SWARM trainer: reads the data, wires micro-batches through the stages' peers, and commits its steps.

Data: the run's step t takes the samples pretrain_gpt.py's iteration t takes (global batch t of the
same dataset, in micro-batches of --micro-batch-size); with N trainers, step t belongs to trainer
t mod N, so each sample is used once per epoch across trainers. A trainer may start a step while
the --max-staleness steps before it are still being applied (SWARM's asynchrony; 0: every step
sees the weights of the previous one, as in pretrain_gpt.py).

Wiring: each call goes to the peer of the stage that should free up first (`Balancer`: the work
this trainer has queued there over the throughput the peer announces, peers not yet measured are
probed first, random tie-break): SWARM's stochastic wiring. A micro-batch goes forward through
stages 0..p-2, forward and backward on the last stage (it returns the loss and the gradient of its
input), and backward through stages p-2..0; each backward recomputes its forward from the inputs
sent with it, so any peer of the stage can run it. A call that fails or times out (--call-timeout)
bans its peer for --ban-time and is rerouted to another peer of the stage; a stage with no live
peer makes the call wait, with a log line.

Committing step t (after all its micro-batches), per stage, with every peer of the stage:
    replay    a peer that failed any call since it took a micro-batch's backward loses what it holds:
              the trainer kept each micro-batch's stage inputs and output gradients and replays those
              backward passes on other peers (no forward again, nothing counted twice)
    prepare   every peer sums the holders' parts (it fetches them; a holder that cannot give its exact
              set of micro-batches is reported, replayed, and the prepare repeated)
    exchange  (tied embeddings) the first and last stage add each other's part of that gradient
    apply     the global gradient norm (summed over stages) clips; AdamW; iteration t -> t + 1; one
              peer per stage is named the writer and saves its part of the checkpoint at its --save-interval
The log line of each step counts its samples per stage and holder, its reroutes and replays.
"""

import asyncio
import logging
import math
import random
import time
from dataclasses import dataclass, field

import torch

from megatronish.data.tokenizers import tokenizer_from_args
from megatronish.swarm.network import HOLDING_STATE, PeerTable, start_node, stop_node
from megatronish.swarm.peer import StagePeer
from megatronish.swarm.stage import Refused
from megatronish.swarm.wire import CALLS, Lossy, Payload, call
from megatronish.training.training import build_datasets

log = logging.getLogger("megatronish.swarm")
WORK = {"forward": 0.25, "backward": 0.75, "forward_backward": 1.0}  # a stage's work per sample, by call kind
RECOMPUTE_SHARE = 1 / 3  # of a backward's work: the forward it recomputes unless its peer kept it
FAST_FAILURE_BAN = 1.0  # seconds out of the wiring after a call that failed without timing out
COMMIT_RETRIES = 2  # a commit call that fails at once (not a timeout) is tried this many more times


@dataclass
class MicroBatch:
    index: int                      # global: step * micro-batches per step + position in the step
    step: int
    batch: dict                     # tokens, labels, loss_mask
    seed: int
    inputs: dict = field(default_factory=dict)        # stage -> what it got (kept for retries and replays)
    grad_outputs: dict = field(default_factory=dict)  # stage (not the last) -> gradient of its output
    forward_peers: dict = field(default_factory=dict) # stage -> peer id that ran its forward (may have kept it)
    holders: dict = field(default_factory=dict)       # stage -> peer id holding its backward's gradients
    held_since: dict = field(default_factory=dict)    # stage -> when it did
    loss: float | None = None

    @property
    def samples(self) -> int:
        return self.batch["tokens"].size(0)


@dataclass
class StepReport:
    reroutes: int = 0
    replays: int = 0


class Balancer:
    """Which peer of a stage takes the next call: the one expected to free up first."""

    def __init__(self, table: PeerTable, ban_time: float):
        self.table, self.ban_time = table, ban_time
        self.queued: dict[str, float] = {}       # peer id -> work units this trainer has in flight there
        self.banned_until: dict[str, float] = {}
        self.failed_at: dict[str, float] = {}    # peer id -> the last time a call to it failed
        self.timed_out_at: dict[str, float] = {}  # ... timed out

    def choose(self, stage: int, work: float, kept_by: str | None = None) -> str | None:
        """`kept_by`: the peer that ran this backward's forward; it does less work (no recomputation)."""
        now = time.monotonic()
        candidates = [r for r in self.table.records(stage) if self.banned_until.get(r.peer_id, 0) <= now]
        if not candidates:
            return None

        def finish_time(record):
            queued = self.queued.get(record.peer_id, 0.0)
            if record.throughput is None:  # not measured yet: probe it while it is idle
                return 0.0 if queued == 0 else math.inf
            own_work = work * (1 - RECOMPUTE_SHARE) if record.peer_id == kept_by else work
            return (queued + own_work) / record.throughput

        return min(candidates, key=lambda r: (finish_time(r), random.random())).peer_id

    def failed(self, peer_id: str, error: BaseException | None = None) -> None:
        """A call to `peer_id` failed: it loses the gradients it holds (they are replayed) and leaves the
        wiring for --ban-time when it timed out (frozen, or far too slow), for FAST_FAILURE_BAN when it
        failed at once (dead peers keep failing at once and cost little; a live one is back soon)."""
        now = time.monotonic()
        timed_out = isinstance(error, asyncio.TimeoutError)
        self.banned_until[peer_id] = now + (self.ban_time if timed_out else min(self.ban_time, FAST_FAILURE_BAN))
        self.failed_at[peer_id] = now
        if timed_out:
            self.timed_out_at[peer_id] = now

    def unresponsive(self, peer_id: str) -> bool:
        """Timed out within --ban-time: left out of commits too (each would wait for its timeout)."""
        return time.monotonic() - self.timed_out_at.get(peer_id, -math.inf) < self.ban_time

    def lost(self, micro_batch: MicroBatch, stage: int) -> bool:
        """Whether the holder of `micro_batch`'s gradients on `stage` failed since it took them."""
        return self.failed_at.get(micro_batch.holders[stage], -math.inf) >= micro_batch.held_since[stage]


class SwarmTrainer:
    def __init__(self, args):
        self.args = args
        self.num_stages = args.pipeline_model_parallel_size
        self.per_step = args.global_batch_size // args.micro_batch_size
        self.inflight = asyncio.Semaphore(args.max_inflight)
        self.applied = 0  # the iteration this trainer knows every stage has reached
        self.p2p = self.node = self.table = self.balancer = None
        self.losses: dict[int, float] = {}
        self.began = None  # when the first step started (the step lines say how long after it each ended)

    # ------------------------------------------------------------------ the run

    async def run(self) -> dict[int, float]:
        """Train this trainer's steps up to --train-iters; returns {step: lm loss}."""
        args = self.args
        tokenizer = tokenizer_from_args(args)
        self.dataset = build_datasets(args, tokenizer)[0]
        self.p2p, self.node = await start_node(args, client_mode=True)
        self.table = PeerTable(self.node, args.run_id, self.num_stages, args.update_period)
        self.balancer = Balancer(self.table, args.ban_time)
        refresher = asyncio.create_task(self.table.keep_refreshed(args.update_period))
        try:
            start = await self._wait_for_stages()
            self.began = time.monotonic()
            steps = [t for t in range(start, args.train_iters) if t % args.num_trainers == args.trainer_index]
            log.info(f"trainer {args.trainer_index} of {args.num_trainers}: steps {steps[:1]}..{steps[-1:]} "
                     f"from iteration {start}, {self.per_step} micro-batches of {args.micro_batch_size} per step")
            commits = None
            for step in steps:
                await self._wait_for_iteration(step - args.max_staleness)
                micro_batches = [self._micro_batch(step, i) for i in range(self.per_step)]
                report = StepReport()
                runs = [asyncio.create_task(self._run_micro_batch(mb, report)) for mb in micro_batches]
                commits = asyncio.create_task(self._commit_after(step, micro_batches, runs, report, commits))
            if commits is not None:
                await commits
        finally:
            refresher.cancel()
            await stop_node(self.p2p, self.node)
        return self.losses

    async def _wait_for_stages(self) -> int:
        """Wait until every stage has a serving peer; the run's iteration (where this trainer starts)."""
        waited = 0
        while (iteration := self.table.swarm_iteration()) is None:
            if waited % 10 == 0:
                missing = [s for s in range(self.num_stages) if self.table.stage_iteration(s) is None]
                log.info(f"waiting for peers of stage(s) {missing}")
            await asyncio.sleep(1.0)
            waited += 1
        self.applied = iteration
        return iteration

    async def _wait_for_iteration(self, iteration: int) -> None:
        while max(self.applied, self.table.swarm_iteration() or 0) < iteration:
            await asyncio.sleep(0.02)

    def _micro_batch(self, step: int, position: int) -> MicroBatch:
        """pretrain_gpt.py's micro-batch: consecutive samples of the shuffled dataset (samplers.py, DP = 1)."""
        index = step * self.per_step + position
        first = index * self.args.micro_batch_size
        samples = [self.dataset[i] for i in range(first, first + self.args.micro_batch_size)]
        batch = {key: torch.stack([s[key] for s in samples]) for key in ("tokens", "labels", "loss_mask")}
        return MicroBatch(index, step, batch, seed=self.args.seed * 1_000_003 + index)

    # ------------------------------------------------------------------ one micro-batch

    async def _run_micro_batch(self, mb: MicroBatch, report: StepReport) -> None:
        last = self.num_stages - 1
        async with self.inflight:
            hidden = mb.batch["tokens"]
            for stage in range(last):
                mb.inputs[stage] = hidden
                mb.forward_peers[stage], result = await self._call_stage(stage, "forward", mb,
                                                                         [_sent(stage, hidden)], report)
                hidden = result.tensors[0]
            mb.inputs[last] = hidden
            await self._last_stage(mb, report)
            for stage in reversed(range(last)):
                await self._backward(stage, mb, report)

    async def _last_stage(self, mb: MicroBatch, report: StepReport) -> None:
        last = self.num_stages - 1
        tensors = [_sent(last, mb.inputs[last]), mb.batch["labels"], mb.batch["loss_mask"]]
        peer_id, result = await self._call_stage(last, "forward_backward", mb, tensors, report,
                                                 num_microbatches=self.per_step)
        mb.loss = result.meta["loss"]
        self._hold(mb, last, peer_id)
        if last > 0:
            mb.grad_outputs[last - 1] = result.tensors[0]

    async def _backward(self, stage: int, mb: MicroBatch, report: StepReport) -> None:
        tensors = [_sent(stage, mb.inputs[stage]), Lossy(mb.grad_outputs[stage])]
        peer_id, result = await self._call_stage(stage, "backward", mb, tensors, report)
        self._hold(mb, stage, peer_id)
        if stage > 0:
            mb.grad_outputs[stage - 1] = result.tensors[0]

    def _hold(self, mb: MicroBatch, stage: int, peer_id: str) -> None:
        mb.holders[stage], mb.held_since[stage] = peer_id, time.monotonic()

    async def _call_stage(self, stage: int, kind: str, mb: MicroBatch, tensors: list, report: StepReport,
                          **meta) -> tuple[str, Payload]:
        """Run one call on the peer of `stage` that frees up first; reroute until one succeeds."""
        work = WORK[kind] * mb.samples
        payload = Payload({"stage": stage, "step": mb.step, "micro_batch": mb.index, "samples": mb.samples,
                           "seed": mb.seed, "compression": self.args.compression, **meta}, tensors)
        waited_since = None
        while True:
            peer_id = self.balancer.choose(stage, work, mb.forward_peers.get(stage) if kind == "backward" else None)
            if peer_id is None:
                if waited_since is None or time.monotonic() - waited_since > 10:
                    log.warning(f"stage {stage} has no live peer: micro-batch {mb.index} of step {mb.step} waits")
                    waited_since = time.monotonic()
                await asyncio.sleep(0.5)
                continue
            start = time.monotonic()
            self.balancer.queued[peer_id] = self.balancer.queued.get(peer_id, 0.0) + work
            try:
                result = await self._call(peer_id, kind, payload)
                self.table.answered(stage, peer_id)
                return peer_id, result
            except Exception as error:  # noqa: BLE001 - any failure: another peer of the stage
                self.balancer.failed(peer_id, error)
                report.reroutes += 1
                log.warning(f"stage {stage}: {kind} of micro-batch {mb.index} on {peer_id} failed after "
                            f"{time.monotonic() - start:.2f} s ({_describe(error)}): rerouting")
            finally:
                self.balancer.queued[peer_id] -= work

    async def _call(self, peer_id: str, method: str, payload: Payload, timeout_calls: float = 1) -> Payload:
        stub = StagePeer.get_stub(self.p2p, _peer(peer_id))
        return await call(getattr(stub, f"rpc_{method}"), payload, self.args.compression,
                          timeout_calls * self.args.call_timeout)

    async def _commit_call(self, peer_id: str, method: str, payload: Payload, timeout_calls: float) -> Payload:
        """A commit call (idempotent: prepare, exchange, apply): retried when it fails at once (a stream
        that breaks under load), so that a live peer is not left out of a step it should apply."""
        for retry in range(COMMIT_RETRIES + 1):
            try:
                return await self._call(peer_id, method, payload, timeout_calls)
            except (asyncio.TimeoutError, Refused):
                raise
            except Exception:  # noqa: BLE001 - try again, then give up
                if retry == COMMIT_RETRIES:
                    raise
                await asyncio.sleep(0.2)

    # ------------------------------------------------------------------ committing a step

    async def _commit_after(self, step, micro_batches, runs, report, previous) -> None:
        started = time.monotonic()
        await asyncio.gather(*runs)
        if previous is not None:
            await previous  # commits go in step order
        holders = await self._commit(step, micro_batches, report)
        self.applied = max(self.applied, step + 1)
        self.losses[step] = sum(mb.loss for mb in micro_batches) / len(micro_batches)
        counts = "; ".join(f"stage {stage}: " + ", ".join(f"{peer_id[-6:]} {n}" for peer_id, n in per_peer.items())
                           for stage, per_peer in holders.items())
        first, size = micro_batches[0].index * self.args.micro_batch_size, self.args.global_batch_size
        log.info(f"step {step} | lm loss {self.losses[step]:.6E} | samples {first}-{first + size - 1}, {size} per "
                 f"stage ({counts}) | rerouted {report.reroutes} | replayed {report.replays} | "
                 f"{time.monotonic() - started:.2f} s | at {time.monotonic() - self.began:.2f} s | "
                 f"sent {CALLS.sent} B, received {CALLS.received} B")
        if step % self.args.log_interval == 0:
            log.info("peers (samples/s): " + "; ".join(
                f"stage {stage}: " + ", ".join(f"{r.peer_id[-6:]} {r.throughput or 0:.1f}"
                                                for r in self.table.records(stage))
                for stage in range(self.num_stages)))

    async def _commit(self, step: int, micro_batches: list, report: StepReport) -> dict:
        """Commit `step` on every stage; returns {stage: {holder: samples}} of the applied sums."""
        while True:
            prepared = await asyncio.gather(*(self._prepare(stage, step, micro_batches, report)
                                              for stage in range(self.num_stages)))
            norms = await self._squared_norms(step, prepared)
            if norms is not None:
                break
        norm = math.sqrt(sum(norms))
        await asyncio.gather(*(self._apply(stage, step, attempt, peers, norm)
                               for stage, (attempt, peers) in enumerate(prepared)))
        return {stage: _samples_per_holder(micro_batches, stage) for stage in range(self.num_stages)}

    async def _prepare(self, stage: int, step: int, micro_batches: list, report: StepReport):
        """Every live peer of `stage` sums the holders' parts. Returns (attempt, {peer: reply meta})."""
        attempt = 0
        while True:
            await self._replay_lost(stage, micro_batches, report)
            holders = {}
            for mb in micro_batches:
                holders.setdefault(mb.holders[stage], []).append(mb.index)
            attempt += 1
            peers = self._committing_peers(stage) | set(holders)
            meta = {"stage": stage, "step": step, "attempt": attempt, "holders": holders,
                    "compression": self.args.compression}
            replies = await asyncio.gather(*(self._commit_call(p, "prepare", Payload(meta), 3) for p in peers),
                                           return_exceptions=True)
            ready = {}
            for peer_id, reply in zip(peers, replies):
                if isinstance(reply, Exception):
                    log.warning(f"stage {stage}: preparing step {step} on {peer_id} failed ({_describe(reply)})")
                    self.balancer.failed(peer_id, reply)
                elif reply.meta.get("failed"):
                    for holder, reason in reply.meta["failed"].items():
                        log.warning(f"stage {stage}: {peer_id} could not get {holder}'s part of step {step} ({reason})")
                        self.balancer.failed(holder)
                elif not reply.meta.get("applied"):
                    ready[peer_id] = reply.meta
            if ready and not any(self.balancer.lost(mb, stage) for mb in micro_batches):
                return attempt, ready
            await asyncio.sleep(0.1)

    async def _replay_lost(self, stage: int, micro_batches: list, report: StepReport) -> None:
        """Backward passes whose holder failed since: run them again on live peers of the stage."""
        lost = [mb for mb in micro_batches if self.balancer.lost(mb, stage)]
        for mb in lost:
            log.info(f"stage {stage}: replaying the backward of micro-batch {mb.index} (its holder "
                     f"{mb.holders[stage]} failed)")
            report.replays += 1
        replay = self._last_stage if stage == self.num_stages - 1 else (lambda mb, r: self._backward(stage, mb, r))
        await asyncio.gather(*(replay(mb, report) for mb in lost))

    def _committing_peers(self, stage: int) -> set[str]:
        """Peers that take part in a commit: serving or draining, and not unresponsive lately. Every live
        peer should apply every step: a peer left out falls behind, and must not become its stage's last."""
        return {r.peer_id for r in self.table.records(stage, HOLDING_STATE)
                if not self.balancer.unresponsive(r.peer_id)}

    async def _squared_norms(self, step: int, prepared: list) -> list[float] | None:
        """Each stage's share of the squared global norm; the tied embeddings' exchange first where needed.
        None when an exchange found no partner (prepare again)."""
        norms = []
        for stage, (attempt, ready) in enumerate(prepared):
            if not any(meta.get("needs_exchange") for meta in ready.values()):
                norms.append(next(iter(ready.values()))["squared_norm"])
                continue
            other = 0 if stage == self.num_stages - 1 else self.num_stages - 1
            other_attempt, partners = prepared[other]
            norm = await self._exchange(stage, step, attempt, ready, other, other_attempt, list(partners))
            if norm is None:
                return None
            norms.append(norm)
        return norms

    async def _exchange(self, stage, step, attempt, ready: dict, other, other_attempt, partners) -> float | None:
        """Every prepared peer of `stage` takes the other end's part from one partner peer. Peers that fail
        with a partner that served another peer are left out of the apply (they catch up by downloading the
        state); when every call fails, the partner is the suspect: the next one is tried."""
        for partner in partners:
            meta = {"stage": stage, "step": step, "attempt": attempt, "partner": partner, "partner_stage": other,
                    "partner_attempt": other_attempt, "compression": self.args.compression}
            peers = list(ready)
            replies = await asyncio.gather(*(self._commit_call(p, "exchange", Payload(meta), 1) for p in peers),
                                           return_exceptions=True)
            done = {p: r for p, r in zip(peers, replies) if not isinstance(r, Exception)}
            if done:
                for peer_id in set(peers) - set(done):
                    del ready[peer_id]
                return next(iter(done.values())).meta["squared_norm"]
            log.warning(f"stage {stage}: the tied-embedding exchange of step {step} with {partner} failed "
                        f"({_describe(replies[0])}): trying another peer of stage {other}")
            self.balancer.failed(partner, replies[0])
        return None

    async def _apply(self, stage, step, attempt, ready: dict, norm: float) -> None:
        """Apply on every prepared peer; at least one peer of the stage must reach iteration step + 1. One of
        them is the stage's writer: it saves its part of the checkpoint when its --save-interval says so."""
        while True:
            peers = list(ready)
            metas = [{"stage": stage, "step": step, "attempt": attempt, "norm": norm, "writer": i == 0}
                     for i in range(len(peers))]
            replies = await asyncio.gather(*(self._commit_call(p, "apply", Payload(m), 2)
                                             for p, m in zip(peers, metas)), return_exceptions=True)
            applied = [p for p, r in zip(peers, replies) if not isinstance(r, Exception)]
            for peer_id, reply in zip(peers, replies):
                if isinstance(reply, Exception):
                    log.warning(f"stage {stage}: applying step {step} on {peer_id} failed ({_describe(reply)})")
            if applied:
                return
            await asyncio.sleep(0.5)


def _sent(stage: int, tensor: torch.Tensor):
    """Stage 0 takes token ids (exact); later stages take activations (may be quantized)."""
    return tensor if stage == 0 else Lossy(tensor)


def _samples_per_holder(micro_batches: list, stage: int) -> dict[str, int]:
    counts = {}
    for mb in micro_batches:
        counts[mb.holders[stage]] = counts.get(mb.holders[stage], 0) + mb.samples
    return counts


def _peer(peer_id: str):
    from hivemind.p2p import PeerID
    return PeerID.from_base58(peer_id)


def _describe(error: BaseException) -> str:
    if isinstance(error, asyncio.TimeoutError):
        return "timed out"
    if isinstance(error, Refused):
        return f"refused: {error}"
    return f"{type(error).__name__}: {error}"


async def run_trainer(args) -> dict[int, float]:
    """tools/swarm_trainer.py: train this trainer's steps; returns {step: lm loss}."""
    return await SwarmTrainer(args).run()
