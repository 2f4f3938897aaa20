"""A SWARM peer: serves one pipeline stage to any trainer, and commits steps with its stage's other peers.

    join       choose a stage (--stage, or `auto`: the least served), take its state from a live peer of
               the stage (else --load, else the seeded initial weights when the run has not started),
               then announce itself in the DHT (network.py) with its iteration and measured throughput
    serve      forward / backward / forward_backward for trainers, one computation at a time on a compute
               thread (stage.py); while it drains or serves another stage it refuses them (the trainer
               reroutes)
    commit     driven by the trainer that owns the step (trainer.py): `prepare` sums the holders' gradient
               parts (fetched from the other peers of the stage), `exchange` adds the other end's part of
               the tied word embeddings, `apply` steps with the global norm and, on the peer the trainer
               names the stage's writer, saves the stage's part of a checkpoint at --save-interval
               (checkpoint.py)
    keep up    a peer whose stage has moved past it (it was frozen, or missed a commit while joining)
               downloads the state from a peer that is ahead
    rebalance  every --rebalance-period seconds, rebalancing.py's rule on the peer table; the peer it
               names drains (finishes the steps it holds parts of), leaves its stage and joins the other
    leave      on SIGTERM / SIGINT: drain, announce "left", exit
Every call to another peer has a timeout (--call-timeout); nothing waits for a frozen peer.
"""

import asyncio
import logging
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator

from hivemind.p2p import P2PContext, PeerID, ServicerBase
from hivemind.proto import runtime_pb2
from hivemind.utils import PerformanceEMA

from megatronish import parallel_state
from megatronish.data.tokenizers import tokenizer_from_args
from megatronish.swarm.checkpoint import save_stage_part
from megatronish.swarm.compute import COMMIT, WORK, ComputeThread
from megatronish.swarm.network import (
    HOLDING_STATE,
    PeerRecord,
    PeerTable,
    announce,
    start_node,
    stop_node,
    visible_address,
)
from megatronish.swarm.rebalancing import choose_move, choose_stage
from megatronish.swarm.stage import Refused, StageWorker
from megatronish.swarm.compression import roundtrip
from megatronish.swarm.wire import CALLS, Lossy, Payload, call, serve
from megatronish.training.arguments import transformer_config_from_args

log = logging.getLogger("megatronish.swarm")
WORK_KINDS = ("forward", "backward", "forward_backward")
DRAIN_TIMEOUT_CALLS = 10  # a draining peer waits at most this many call timeouts for its steps to commit


class StagePeer(ServicerBase):
    """The peer process's state and its RPC handlers (`rpc_*`, hivemind's ServicerBase convention)."""

    def __init__(self, args):
        self.args = args
        self.num_stages = args.pipeline_model_parallel_size
        tokenizer = tokenizer_from_args(args)
        self.config = transformer_config_from_args(args, tokenizer.vocab_size)
        self.compute = ComputeThread()
        self.saver = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-writer")
        self.worker: StageWorker | None = None
        self.stage: int | None = None
        self.state = "joining"
        self.queued_samples = 0
        self.moved_at = -float("inf")
        self.speed = {kind: PerformanceEMA(alpha=0.2, paused=True) for kind in WORK_KINDS}
        self.p2p = self.node = self.table = self.peer_id = None

    # ------------------------------------------------------------------ life

    async def run(self) -> None:
        """Serve until SIGTERM / SIGINT, then leave gracefully (a signal while joining just stops)."""
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        self.p2p, self.node = await start_node(self.args)
        self.peer_id = self.p2p.peer_id.to_base58()
        serving = asyncio.create_task(self._serve())
        await asyncio.wait([serving, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
        if serving.done():
            serving.result()  # it only returns by raising
        if self.state == "serving":
            log.info("stopping: finishing the steps this peer holds parts of, then leaving")
            await self.leave()
        serving.cancel()
        await stop_node(self.p2p, self.node)
        self.compute.shutdown()
        self.saver.shutdown(wait=True)

    async def _serve(self) -> None:
        await self.add_p2p_handlers(self.p2p)
        log.info(f"peer {self.peer_id} listening at {await visible_address(self.p2p)}")
        self.table = PeerTable(self.node, self.args.run_id, self.num_stages, self.args.update_period)
        loops = [asyncio.create_task(self.table.keep_refreshed(self.args.update_period))]
        try:
            await self.table.refreshed.wait()
            stage = int(self.args.stage) if self.args.stage != "auto" else choose_stage(self._throughputs(),
                                                                                        self.num_stages)
            await self.join(stage)
            loops += [asyncio.create_task(loop()) for loop in (self._announce_loop, self._keep_up_loop,
                                                                self._rebalance_loop)]
            await asyncio.gather(*loops)
        finally:
            for task in loops:
                task.cancel()

    async def join(self, stage: int) -> None:
        """Serve `stage`: build it, take its state, announce."""
        self.stage, self.state = stage, "joining"
        self.worker = None
        self.worker = await self._run(StageWorker, self.args, self.config, stage, self.num_stages,
                                      self.args.keep_forwards)
        await self._take_initial_state()
        await self._measure_speed()
        self.state = "serving"
        await self._announce()
        log.info(f"serving stage {stage} of {self.num_stages} at iteration {self.worker.iteration}")

    async def _measure_speed(self) -> None:
        """Time this stage's work on made-up micro-batches (after one untimed warm-up), so that trainers
        can wire by throughput from the first call on, and a first slow call does not starve the peer."""
        self.speed = {kind: PerformanceEMA(alpha=0.2, paused=True) for kind in WORK_KINDS}
        kinds = ("forward_backward",) if self.worker.is_last else ("forward", "backward")
        shape = (self.args.micro_batch_size, self.args.seq_length)
        for kind in kinds:
            await self._run(self.worker.benchmark, kind, *shape)
            for _ in range(2):
                await self._work(kind, shape[0], self.worker.benchmark, kind, *shape)

    async def leave(self) -> None:
        if not await self._drain():
            log.warning("leaving with steps still uncommitted: their trainers replay those micro-batches elsewhere")
        self.state = "left"
        await self._announce()

    async def _take_initial_state(self) -> None:
        waited = 0.0
        while True:
            sources = [r for r in self.table.records(self.stage, HOLDING_STATE) if r.peer_id != self.peer_id]
            for source in sorted(sources, key=lambda r: -r.iteration):
                if await self._download_state(source):
                    return
            if not sources:
                if self.args.load and await self._run(self.worker.load_checkpoint, self.args.load):
                    log.info(f"stage {self.stage}: loaded {self.args.load} at iteration {self.worker.iteration}")
                    return
                if not any(r.iteration > 0 for r in self.table.records(states=None)):
                    log.info(f"stage {self.stage}: no peer serves it yet, starting from the seeded initial weights")
                    return
            if waited % 30 == 0:
                log.warning(f"stage {self.stage} has no live peer to copy its state from and no checkpoint (--load) "
                            "while the run is past iteration 0: waiting for one")
            await asyncio.sleep(1.0)
            waited += 1.0
            await self.table.refresh()

    async def _download_state(self, source: PeerRecord) -> bool:
        """Copy weights, Adam state, LR schedule and iteration from `source` (a peer of this stage)."""
        start = time.perf_counter()
        try:
            result = await call(self.get_stub(self.p2p, source.peer).rpc_state, Payload({"stage": self.stage}),
                                "none", 10 * self.args.call_timeout)
        except Exception as error:  # noqa: BLE001 - any failure: try another source
            log.warning(f"stage {self.stage}: downloading the state from {source.peer_id} failed "
                        f"({type(error).__name__}: {error})")
            return False
        state = _state_from_payload(result)
        await self._run(self.worker.load_state, state)
        log.info(f"stage {self.stage}: downloaded the state at iteration {state['iteration']} (weights "
                 f"{await self._run(self.worker.digest)}) from {source.peer_id} in {time.perf_counter() - start:.2f} s")
        return True

    async def _drain(self) -> bool:
        """Stop taking micro-batches; wait until every step this peer holds a part of is applied here, and
        until the stage's other peers have its iteration (one of them may be behind and need its state)."""
        self.state = "draining"
        await self._announce()
        deadline = time.monotonic() + DRAIN_TIMEOUT_CALLS * self.args.call_timeout
        while time.monotonic() < deadline:
            held = [s for s in self.worker.step_gradients if s >= self.worker.iteration]
            others = [r.iteration for r in self.table.records(self.stage) if r.peer_id != self.peer_id]
            if not held and self.queued_samples == 0 and all(i >= self.worker.iteration for i in others):
                return True
            await asyncio.sleep(0.1)
        return False

    # ------------------------------------------------------------------ background loops

    async def _announce(self) -> None:
        record = PeerRecord(self.peer_id, self.stage, self.worker.iteration if self.worker else 0,
                            self.throughput(), self.state)
        try:
            await announce(self.node, self.args.run_id, record, self.args.update_period)
        except Exception as error:  # noqa: BLE001 - the next period tries again
            log.warning(f"announcing in the DHT failed ({type(error).__name__}: {error})")

    async def _announce_loop(self) -> None:
        while True:
            await self._announce()
            await asyncio.sleep(self.args.update_period)

    async def _keep_up_loop(self) -> None:
        """Download the state again when the stage has been ahead of this peer for longer than an apply
        takes to arrive (a call timeout and two update periods): it was left out of a commit."""
        behind_since = None
        while True:
            await asyncio.sleep(self.args.update_period)
            if self.state != "serving":
                behind_since = None
                continue
            newest, mine = self.table.stage_iteration(self.stage, HOLDING_STATE), self.worker.iteration
            if newest is None or newest <= mine:
                behind_since = None
                continue
            behind_since = behind_since or time.monotonic()
            if time.monotonic() - behind_since < self.args.call_timeout + 2 * self.args.update_period:
                continue
            log.info(f"stage {self.stage}: at iteration {mine} while the stage is at {newest}: downloading the state")
            ahead = [r for r in self.table.records(self.stage, HOLDING_STATE)
                     if r.iteration == newest and r.peer_id != self.peer_id]
            for source in ahead:
                if await self._download_state(source):
                    break
            behind_since = None

    async def _rebalance_loop(self) -> None:
        """Every --rebalance-period: the rule of rebalancing.py, once the swarm has settled (no peer joined,
        left or moved for two periods: measurements of a new arrangement need time, and peers act on
        tables a period old)."""
        if not self.args.rebalance_period:
            return
        arrangement, settled_since, period = None, time.monotonic(), self.args.rebalance_period
        while True:
            await asyncio.sleep(period)
            throughputs = self._throughputs()
            now_arranged = {(peer_id, stage) for stage, peers in throughputs.items() for peer_id in peers}
            if now_arranged != arrangement or self.state != "serving":
                arrangement, settled_since = now_arranged, time.monotonic()
            if time.monotonic() - settled_since < 2 * period or time.monotonic() - self.moved_at < 5 * period:
                continue
            move = choose_move(throughputs, self.num_stages, self.args.rebalance_gain)
            if move is None or move.peer_id != self.peer_id:
                continue
            log.info(f"rebalancing: stage capacities {_rates(move.capacities)} samples/s; moving this peer from "
                     f"stage {move.from_stage} to stage {move.to_stage} (estimated {_rates(move.after)})")
            old_stage = self.stage
            await self.leave()  # announces "left" under the old stage
            await self.join(move.to_stage)
            self.moved_at = time.monotonic()  # a peer that just moved stays a while (its move cost a download)
            log.info(f"rebalancing: moved from stage {old_stage} to stage {self.stage}")

    def _throughputs(self) -> dict[int, dict[str, float | None]]:
        """stage -> {peer id: samples/s} of serving peers, this peer's own figure fresh."""
        table = {}
        for record in self.table.records():
            if record.peer_id != self.peer_id:
                table.setdefault(record.stage, {})[record.peer_id] = record.throughput
        if self.state == "serving":
            table.setdefault(self.stage, {})[self.peer_id] = self.throughput()
        return table

    def throughput(self) -> float | None:
        """Samples per second of this stage's work (forward + backward), None until both are measured."""
        if self.worker is None:
            return None
        kinds = ("forward_backward",) if self.worker.is_last else ("forward", "backward")
        if any(self.speed[kind].num_updates == 0 for kind in kinds):
            return None
        return 1.0 / sum(1.0 / self.speed[kind].samples_per_second for kind in kinds)

    # ------------------------------------------------------------------ computing

    async def _run(self, fn, *args):
        """Run on the compute thread (one computation at a time: the stage's model is not shared), before
        any trainer's work that waits there."""
        return await self.compute.submit(COMMIT, fn, *args)

    async def _work(self, kind: str, samples: int, fn, *args):
        """A trainer's computation: queued, timed (throttled with --throttle) and counted in the throughput."""
        self.queued_samples += samples
        try:
            return await self.compute.submit(WORK, self._timed, kind, samples, fn, args)
        finally:
            self.queued_samples -= samples

    def _timed(self, kind, samples, fn, args):
        start = time.perf_counter()
        result = fn(*args)
        busy = time.perf_counter() - start
        if self.args.throttle > 1:  # an emulated slower device: it is busy for throttle x the time
            time.sleep((self.args.throttle - 1) * busy)
            busy *= self.args.throttle
        self.speed[kind].update(samples, interval=busy)
        return result

    def _check(self, meta: dict, serving: bool = True) -> None:
        if self.worker is None or meta["stage"] != self.stage:
            raise Refused(f"peer {self.peer_id} serves stage {self.stage}, not {meta['stage']}")
        if serving and self.state != "serving":
            raise Refused(f"peer {self.peer_id} is {self.state}: it takes no more micro-batches")

    # ------------------------------------------------------------------ trainer calls

    async def rpc_forward(self, requests: AsyncIterator[runtime_pb2.ExpertRequest],
                          context: P2PContext) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        async for message in serve(requests, self._forward):
            yield message

    async def rpc_backward(self, requests: AsyncIterator[runtime_pb2.ExpertRequest],
                           context: P2PContext) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        async for message in serve(requests, self._backward):
            yield message

    async def rpc_forward_backward(self, requests: AsyncIterator[runtime_pb2.ExpertRequest],
                                   context: P2PContext) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        async for message in serve(requests, self._forward_backward):
            yield message

    async def _forward(self, payload: Payload) -> Payload:
        meta = payload.meta
        self._check(meta)
        output = await self._work("forward", meta["samples"], self.worker.forward, payload.tensors[0], meta["seed"],
                                  meta["micro_batch"])
        return Payload(tensors=[Lossy(output)])

    async def _backward(self, payload: Payload) -> Payload:
        meta = payload.meta
        self._check(meta)
        inputs, grad_output = payload.tensors
        grad = await self._work("backward", meta["samples"], self.worker.backward, meta["step"], meta["micro_batch"],
                                meta["samples"], inputs, grad_output, meta["seed"])
        return Payload(tensors=[] if grad is None else [Lossy(grad)])

    async def _forward_backward(self, payload: Payload) -> Payload:
        meta = payload.meta
        self._check(meta)
        inputs, labels, loss_mask = payload.tensors
        loss, grad = await self._work("forward_backward", meta["samples"], self.worker.forward_backward, meta["step"],
                                      meta["micro_batch"], meta["samples"], inputs, labels, loss_mask,
                                      meta["num_microbatches"], meta["seed"])
        return Payload({"loss": loss}, [] if grad is None else [Lossy(grad)])

    # ------------------------------------------------------------------ committing a step

    async def rpc_part(self, requests: AsyncIterator[runtime_pb2.ExpertRequest],
                       context: P2PContext) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        async for message in serve(requests, self._part):
            yield message

    async def rpc_prepare(self, requests: AsyncIterator[runtime_pb2.ExpertRequest],
                          context: P2PContext) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        async for message in serve(requests, self._prepare):
            yield message

    async def rpc_embedding(self, requests: AsyncIterator[runtime_pb2.ExpertRequest],
                            context: P2PContext) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        async for message in serve(requests, self._embedding):
            yield message

    async def rpc_exchange(self, requests: AsyncIterator[runtime_pb2.ExpertRequest],
                           context: P2PContext) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        async for message in serve(requests, self._exchange):
            yield message

    async def rpc_apply(self, requests: AsyncIterator[runtime_pb2.ExpertRequest],
                        context: P2PContext) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        async for message in serve(requests, self._apply):
            yield message

    async def rpc_state(self, requests: AsyncIterator[runtime_pb2.ExpertRequest],
                        context: P2PContext) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        async for message in serve(requests, self._state):
            yield message

    async def _part(self, payload: Payload) -> Payload:
        meta = payload.meta
        self._check(meta, serving=False)
        return Payload(tensors=[Lossy(await self._run(self.worker.part, meta["step"], meta["micro_batches"]))])

    async def _prepare(self, payload: Payload) -> Payload:
        """Sum the holders' parts of step `step` (in peer-id order, the same on every peer of the stage).
        Holders that cannot give their part are reported, not fatal: the trainer replays their micro-batches."""
        meta = payload.meta
        self._check(meta, serving=False)
        step, holders, compression = meta["step"], meta["holders"], meta["compression"]
        if step < self.worker.iteration:
            return Payload({"applied": True})
        order = sorted(holders)
        fetched = await asyncio.gather(*(self._fetch_part(peer_id, step, holders[peer_id], compression)
                                         for peer_id in order), return_exceptions=True)
        failed = {peer_id: f"{type(r).__name__}: {r}" for peer_id, r in zip(order, fetched) if isinstance(r, Exception)}
        if failed:
            return Payload({"failed": failed})
        await self._run(self.worker.sum_parts, step, meta["attempt"], fetched)
        if self.worker.tied_embedding is not None:
            return Payload({"needs_exchange": True})
        return Payload({"squared_norm": await self._run(self.worker.squared_norm, step, meta["attempt"])})

    async def _fetch_part(self, peer_id: str, step: int, micro_batches: list, compression: str):
        if peer_id == self.peer_id:  # quantized as the others receive it, so that every peer sums the same values
            return roundtrip(await self._run(self.worker.part, step, micro_batches), compression)
        request = Payload({"stage": self.stage, "step": step, "micro_batches": micro_batches,
                           "compression": compression})
        stub = self.get_stub(self.p2p, PeerID.from_base58(peer_id))
        return (await call(stub.rpc_part, request, compression, self.args.call_timeout)).tensors[0]

    async def _embedding(self, payload: Payload) -> Payload:
        meta = payload.meta
        self._check(meta, serving=False)
        return Payload(tensors=[Lossy(await self._run(self.worker.embedding_part, meta["step"], meta["attempt"]))])

    async def _exchange(self, payload: Payload) -> Payload:
        """Tied embeddings: fetch the other end's part from `partner`, make the gradient first + last."""
        meta = payload.meta
        self._check(meta, serving=False)
        step, attempt, compression = meta["step"], meta["attempt"], meta["compression"]
        request = Payload({"stage": meta["partner_stage"], "step": step, "attempt": meta["partner_attempt"],
                           "compression": compression})
        stub = self.get_stub(self.p2p, PeerID.from_base58(meta["partner"]))
        other = (await call(stub.rpc_embedding, request, compression, self.args.call_timeout)).tensors[0]
        own = roundtrip(await self._run(self.worker.embedding_part, step, attempt), compression)
        first, last = (own, other) if self.worker.is_first else (other, own)
        await self._run(self.worker.set_embedding_gradient, step, attempt, first + last)
        return Payload({"squared_norm": await self._run(self.worker.squared_norm, step, attempt)})

    async def _apply(self, payload: Payload) -> Payload:
        """Step `step` with the global norm, after the steps before it (another trainer's) are applied here."""
        meta = payload.meta
        self._check(meta, serving=False)
        step = meta["step"]
        deadline = time.monotonic() + self.args.call_timeout
        while self.worker.iteration < step and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self.worker.iteration > step:
            return Payload({"iteration": self.worker.iteration, "digest": await self._run(self.worker.digest)})
        updated = await self._run(self.worker.apply, step, meta["attempt"], meta["norm"])
        digest = await self._run(self.worker.digest)
        log.info(f"stage {self.stage}: applied step {step}: iteration {step + 1}, weights {digest}"
                 + ("" if updated else " (update skipped: non-finite gradient norm)")
                 + f" | calls to peers sent {CALLS.sent} B, received {CALLS.received} B")
        iteration, args = step + 1, self.args
        if meta["writer"] and args.save and (iteration % args.save_interval == 0 or iteration == args.train_iters):
            blocks, common = await self._run(self.worker.checkpoint_part, args)
            self.saver.submit(self._save_part, blocks, common)
        return Payload({"iteration": step + 1, "digest": digest, "updated": updated})

    def _save_part(self, blocks: dict, common: dict) -> None:
        try:
            published = save_stage_part(self.args.save, self.stage, self.num_stages, blocks, common)
        except Exception as error:  # noqa: BLE001 - a failed save leaves the previous checkpoint the newest
            log.error(f"stage {self.stage}: saving its part of iteration {common['iteration']} failed: "
                      f"{type(error).__name__}: {error}")
            return
        log.info(f"stage {self.stage}: saved its part of iteration {common['iteration']}"
                 + (f"; assembled checkpoint {published}" if published else ""))

    async def _state(self, payload: Payload) -> Payload:
        self._check(payload.meta, serving=False)
        return _state_payload(await self._run(self.worker.state))


def _state_payload(state: dict) -> Payload:
    """A stage's state (StageWorker.state) as metadata and exact tensors."""
    optimizer = state["optimizer"]
    keys = [(name, key) for name, tensors in optimizer["params"].items() for key in tensors]
    meta = {"iteration": state["iteration"], "scheduler": state["scheduler"], "step": optimizer["step"],
            "grad_scaler": optimizer["grad_scaler"], "keys": keys}
    return Payload(meta, [optimizer["params"][name][key] for name, key in keys])


def _state_from_payload(payload: Payload) -> dict:
    meta, params = payload.meta, {}
    for (name, key), tensor in zip(meta["keys"], payload.tensors):
        params.setdefault(name, {})[key] = tensor
    return {"iteration": meta["iteration"], "scheduler": meta["scheduler"],
            "optimizer": {"params": params, "step": meta["step"], "grad_scaler": meta["grad_scaler"]}}


def _rates(capacities) -> str:
    return "[" + ", ".join(f"{c:.1f}" for c in capacities) + "]"


async def run_peer(args) -> None:
    """tools/swarm_peer.py: one peer, until SIGTERM / SIGINT."""
    parallel_state.initialize_distributed("gloo")  # a world of one: the stage's layout lives in it
    await StagePeer(args).run()
