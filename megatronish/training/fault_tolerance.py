"""Fault-tolerant data parallelism on torchft: replicas die and (re)join while the others keep stepping.

    torchft_lighthouse --min_replicas 1 --bind 0.0.0.0:29510 &
    # on each replica's node (replica i = one TP x PP group, its own torchrun):
    torchrun --standalone --nproc_per_node 2 pretrain_gpt.py --tp 2 --fault-tolerant-dp \
        --ft-lighthouse http://LIGHTHOUSE_HOST:29510 --ft-replica-id i ...
(launch/elastic.sh does both; `pip install megatronish[ft]` brings torchft.) Each replica is a torchft
replica group: the lighthouse keeps the quorum, the replicas that are alive at a step. Each step:
  1. `Manager.start_quorum()`, synchronous: this step's quorum. A replica that joins behind the others
     heals first: it receives the optimizer state (master weights, moments; the weights follow), the LR
     schedule and the progress (iteration, consumed samples) from a live replica;
  2. the fixed global batch is split over the P participants: micro-batch k goes to the participant of
     rank k mod P (samplers.micro_batches_of_rank), so the survivors of a failure take over the
     micro-batches of the missing replica (more gradient accumulation each);
  3. forward and backward over this replica's micro-batches (train_step), then its gradients and loss,
     weighted by its share of the global batch, are summed over the replicas with `Manager.allreduce`:
     by hand, as torchft's DistributedDataParallel crashes the survivor when a peer dies inside the
     all-reduce (measured: ../shared/notes/hivemind_torchft.md);
  4. `Manager.should_commit()`: every replica steps the optimizer, or, when a collective of the step
     failed (a replica died in it), none does and the iteration runs again with the new quorum.
A failed replica is dropped from the quorum after the lighthouse's heartbeat timeout (5 s by default).
The update does not depend on how many replicas are alive, and all replicas hold bit-identical weights.
The torchft step counter is kept equal to the iteration, so the replica that is furthest ahead is the
one others heal from.
"""

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.utils.data import default_collate

from megatronish.data.samplers import micro_batches_of_rank
from megatronish.training.progress import TrainingProgress
from megatronish.training.utils import print_rank_0

INSTALL_HINT = "--fault-tolerant-dp needs torchft: pip install 'megatronish[ft]' (torchft 0.2.0)"


class FaultTolerantReplicas:
    """This rank's part of a torchft replica group. Create on every rank of the replica (it starts the
    torchft Manager; group rank 0 registers the replica with the lighthouse)."""

    def __init__(self, args, optimizer, scheduler, progress: TrainingProgress):
        # torchft's Rust side logs six INFO lines per step (quorum, commit) into the training log; warnings
        # and errors stay. Set RUST_LOG=info to see them all.
        os.environ.setdefault("RUST_LOG", "warn")
        try:
            import torchft
        except ImportError as error:
            raise ImportError(INSTALL_HINT) from error
        self.optimizer, self.scheduler, self.progress = optimizer, scheduler, progress
        self.micro_batch_size = args.micro_batch_size
        self.global_batch, self.participants = args.global_batch_size, 1  # of the step in progress
        timeout = timedelta(seconds=args.ft_timeout_seconds)
        host, port = _replica_store_address()
        self.manager = torchft.Manager(
            pg=torchft.ProcessGroupGloo(timeout=timeout), load_state_dict=self._load_state_dict,
            state_dict=self._state_dict, min_replica_size=args.ft_min_replicas, use_async_quorum=False,
            timeout=timeout, quorum_timeout=timeout, connect_timeout=timeout, rank=dist.get_rank(),
            world_size=dist.get_world_size(), store_addr=host, store_port=port, lighthouse_addr=args.ft_lighthouse,
            replica_id=f"megatronish_{args.ft_replica_id}", hostname=args.ft_host or socket.gethostname())
        self.manager.load_state_dict({"step": progress.iteration, "batches_committed": 0})
        print_rank_0(f"> fault-tolerant DP: replica {args.ft_replica_id} of the quorum kept by {args.ft_lighthouse}")

    def start_step(self, dataset, batch_schedule) -> list[dict]:
        """Join this step's quorum (healing first when behind) and return this replica's micro-batches of the
        step's global batch (batch_schedule: the size at the consumed samples, ramp-ups included)."""
        self.manager.start_quorum()
        self.participants = self.manager.num_participants()
        self.global_batch = batch_schedule.global_batch(self.progress.consumed_train_samples)
        rank = self.manager.participating_rank()
        if rank is None:  # not in this quorum: contributes nothing (its all-reduces send zeros)
            return []
        return [default_collate([dataset[i] for i in indices]) for indices in micro_batches_of_rank(
            self.progress.consumed_train_samples, self.global_batch, self.micro_batch_size, rank, self.participants)]

    def reduce(self, chunks, loss: float, num_batches: int) -> float | None:
        """Sum the gradients and the loss over the replicas, each weighted by its share of the global batch
        (train_step averaged them over this replica's micro-batches); the step's loss, or None when the step
        must be discarded (a replica failed during it: nothing is applied anywhere)."""
        share = num_batches * self.participants * self.micro_batch_size / self.global_batch
        total = torch.tensor([loss * share], dtype=torch.float64)
        works = []
        for chunk in chunks:
            chunk.grad_buffer.mul_(share)
            works.append(self.manager.allreduce(chunk.grad_buffer))  # the mean over the participants
        works.append(self.manager.allreduce(total))
        for work in works:
            work.wait()
        if not self.manager.should_commit():
            print_rank_0(f"fault-tolerant DP: iteration {self.progress.iteration + 1} discarded (a replica failed "
                         "during it); running it again with the new quorum")
            return None
        return total.item()

    def _state_dict(self) -> dict:
        return {"optimizer": self.optimizer.sharded_state_by_name(), "scheduler": self.scheduler.state_dict(),
                "progress": self.progress.to_dict()}

    def _load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_by_name(state["optimizer"])  # the weights too
        self.scheduler.load_state_dict(state["scheduler"])
        for key, value in state["progress"].items():
            setattr(self.progress, key, value)
        print_rank_0(f"fault-tolerant DP: healed from a live replica at iteration {self.progress.iteration}")

    def shutdown(self) -> None:
        self.manager.shutdown(wait=False)


def _replica_store_address() -> tuple[str, int]:
    """Host and port of the TCP store of this replica's process group (this attempt's own, under torchrun)."""
    store = dist.distributed_c10d._get_default_store()
    while isinstance(store, dist.PrefixStore):
        store = store.underlying_store
    if not isinstance(store, dist.TCPStore):
        raise RuntimeError("--fault-tolerant-dp needs the replica's ranks started by torchrun (a TCP store): "
                           "torchrun --standalone --nproc_per_node <TP x PP> pretrain_gpt.py ...")
    return store.host, store.port
