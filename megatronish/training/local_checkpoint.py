"""Cheap node-local checkpoints, replicated to a buddy node (--local-checkpoint-interval K --local-checkpoint-dir DIR).

Every K iterations each node writes the training state into DIR, a folder on its own disk, in the durable
format (checkpointing.py: DCP blocks plus checkpoint.json), but holds only a part of each checkpoint:
    DIR/iter_0000040/__<r>_0.distcp       the data file of each rank r on this node, and a copy of the data
                                          file of each rank whose buddy is on this node
    DIR/iter_0000040/.metadata            DCP's index and the common state: on every node
    DIR/iter_0000040/checkpoint.json
The buddy of rank r is rank r + L (mod the world size), L being the ranks per node (torchrun's
LOCAL_WORLD_SIZE): the same local rank on the next node. Losing any one node therefore loses no
data file: the nodes left hold every rank's file together. (Within one node there is no buddy.)

Saving: the main thread copies the state to CPU memory (the staging of the durable asynchronous save)
and goes on training; a thread writes `iter_N.tmp` with DCP over a process group of its own, sends
this rank's data file to its buddy, keeps the copy it receives, and once every node holds its part,
renames the folder to `iter_N` on every node; only after all have renamed are older local
checkpoints deleted. A kill at any moment therefore leaves the previous one complete. The next save
waits for the one in flight (the stall is the staging copy, plus the wait when a write takes longer
than K iterations).

Resuming (`resume`): every rank reports what its node's DIR holds; the newest iteration that the
nodes hold completely between them is compared with the newest durable checkpoint (--load), and the
newer wins (a local one on a tie: local disks are faster to read). Each node then receives from the
others the files of that checkpoint it lacks (a new node, or the copies of a lost one), every rank
reads its blocks at its new layout from its node's folder, and the other local checkpoints are
deleted.
"""

import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemReader

from megatronish.training.checkpoint_format import DCP_METADATA_FILE, data_file_lengths, save_blocks
from megatronish.training.checkpoint_manifest import checkpoint_iterations
from megatronish.training.checkpointing import (
    COMMON_FILENAME,
    LoadedCheckpoint,
    _fsync_dir,
    _publish,
    _remove_stale_temporaries,
    _write_bytes_durably,
    _write_json_durably,
    durable_checkpoint_iteration,
    checkpoint_dir,
    checkpoint_state,
    load_checkpoint_folder,
    load_newest_checkpoint,
    stage_on_cpu,
)
from megatronish.training.progress import TrainingProgress
from megatronish.training.utils import print_rank_0


def data_file_name(rank: int) -> str:
    """The data file DCP writes for a rank (one file per rank: single_file_per_rank, one writer thread)."""
    return f"__{rank}_0.distcp"


class LocalCheckpoints:
    """The local checkpoints of one rank. Create on every rank (collective), after torch.distributed is up."""

    def __init__(self, directory: str, interval: int):
        self.directory, self.interval = os.path.abspath(directory), interval
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        ranks_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))
        self.first_on_node = int(os.environ.get("LOCAL_RANK", self.rank)) == 0  # acts for the node's folder
        self.buddy = (self.rank + ranks_per_node) % self.world_size if self.world_size > ranks_per_node else None
        self.buddy_of = (self.rank - ranks_per_node) % self.world_size if self.buddy is not None else None
        self.group = dist.new_group(backend="gloo")  # the writer thread's collectives never meet training's
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="local-checkpoint-writer")
        self._pending: Future | None = None
        self.stall_seconds = 0.0  # of the newest save, in the training loop's thread
        os.makedirs(self.directory, exist_ok=True)
        if self.buddy is None:
            print_rank_0(f"> local checkpoints in {self.directory}: all ranks on one node, no buddy copies")

    def due(self, iteration: int) -> bool:
        return iteration % self.interval == 0

    # ------------------------------------------------------------------------------------------ saving

    def save(self, progress: TrainingProgress, model, optimizer, scheduler, args) -> None:
        """Stage this iteration's state and write it in the background. Collective."""
        start = time.perf_counter()
        self.wait()
        state, common = checkpoint_state(progress, model, optimizer, scheduler, args)
        self._pending = self._writer.submit(self._write, stage_on_cpu(state), common)
        self.stall_seconds = time.perf_counter() - start

    def wait(self) -> None:
        """Until the save in flight is on disk on every node (raises its error, if it failed)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def _write(self, state: dict, common: dict) -> None:
        final = checkpoint_dir(self.directory, common["iteration"])
        temporary = final + ".tmp"
        if self.first_on_node:
            _remove_stale_temporaries(self.directory)  # a save killed midway (maybe of this very iteration)
        dist.barrier(group=self.group)
        os.makedirs(temporary, exist_ok=True)
        save_blocks(state, temporary, process_group=self.group)  # this rank's data file; rank 0 adds the index
        index = [None]
        if self.rank == 0:
            with open(os.path.join(temporary, DCP_METADATA_FILE), "rb") as f:
                index = [f.read()]
        dist.broadcast_object_list(index, src=0, group=self.group)
        if self.first_on_node:
            if self.rank != 0:
                _write_bytes_durably(os.path.join(temporary, DCP_METADATA_FILE), index[0])
            _write_json_durably(os.path.join(temporary, COMMON_FILENAME), common)
        self._exchange_with_buddy(temporary)
        _fsync_dir(temporary)
        dist.barrier(group=self.group)  # every node holds its part
        if self.first_on_node:
            _publish(temporary, final)
        dist.barrier(group=self.group)  # every node has published: the older ones are not needed any more
        if self.first_on_node:
            self._delete_all_but(common["iteration"])

    def _exchange_with_buddy(self, folder: str) -> None:
        """Send this rank's data file to the buddy; keep the one of the rank this one is the buddy of."""
        if self.buddy is None:
            return
        own = _read_file(os.path.join(folder, data_file_name(self.rank)))
        size, incoming_size = torch.tensor([own.numel()]), torch.zeros(1, dtype=torch.long)
        _wait_all([dist.isend(size, self.buddy, group=self.group),
                   dist.irecv(incoming_size, self.buddy_of, group=self.group)])
        incoming = torch.empty(int(incoming_size.item()), dtype=torch.uint8)
        _wait_all([dist.isend(own, self.buddy, group=self.group),
                   dist.irecv(incoming, self.buddy_of, group=self.group)])
        _write_bytes_durably(os.path.join(folder, data_file_name(self.buddy_of)), incoming.numpy())

    def _delete_all_but(self, iteration: int | None) -> None:
        """Remove every local checkpoint of this node but `iteration` (None: all), and unfinished ones."""
        _remove_stale_temporaries(self.directory)
        for old in checkpoint_iterations(self.directory):
            if old != iteration:
                shutil.rmtree(checkpoint_dir(self.directory, old), ignore_errors=True)

    def clean_up(self, keep: int | None = None) -> None:
        """Delete this node's local checkpoints but `keep` (after a resume, or at the end). Collective."""
        self.wait()
        dist.barrier()
        if self.first_on_node:
            self._delete_all_but(keep)

    # ----------------------------------------------------------------------------------------- loading

    def _inventory(self) -> dict:
        """{iteration: {"files": {name: size}, "needs": {data file: bytes} or None}} of this node's folder;
        "needs" comes from the index and is None where this node lacks the index or the common file."""
        found = {}
        for iteration in checkpoint_iterations(self.directory):
            folder = checkpoint_dir(self.directory, iteration)
            files = {name: os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder)
                     if not name.endswith(".tmp")}
            needs = None
            if DCP_METADATA_FILE in files and COMMON_FILENAME in files:
                try:
                    needs = data_file_lengths(FileSystemReader(folder).read_metadata())
                except Exception:  # an unreadable index here: another node may hold a good one
                    pass
            found[iteration] = {"files": files, "needs": needs}
        return found

    def _node_inventories(self) -> dict[int, dict]:
        """{first rank of a node: its node's inventory}, the same on every rank. Collective."""
        reports = [None] * self.world_size
        dist.all_gather_object(reports, (self.first_on_node, self._inventory()))
        return {rank: inventory for rank, (first, inventory) in enumerate(reports) if first}

    def newest_complete(self, nodes: dict[int, dict]) -> int | None:
        """The newest iteration whose every file is held, whole, by some node."""
        for iteration in sorted({i for inventory in nodes.values() for i in inventory}, reverse=True):
            needs = next((inventory[iteration]["needs"] for inventory in nodes.values()
                          if inventory.get(iteration, {}).get("needs") is not None), None)
            if needs is None:
                continue
            needs = {**needs, DCP_METADATA_FILE: 1, COMMON_FILENAME: 1}
            if all(any(inventory.get(iteration, {"files": {}})["files"].get(name, -1) >= length
                       for inventory in nodes.values()) for name, length in needs.items()):
                return iteration
        return None

    def _fetch_missing_files(self, iteration: int, nodes: dict[int, dict]) -> float:
        """Every node receives the files of `iteration` it lacks, each from the lowest rank that holds it.
        Returns the bytes received by this rank. Collective; transfers run one pair at a time, in one order
        on every rank (a rank waits only on the transfer it takes part in, never in a cycle)."""
        holders = {}
        for rank, inventory in sorted(nodes.items()):
            for name, size in inventory.get(iteration, {"files": {}})["files"].items():
                holders.setdefault(name, (rank, size))
        folder = checkpoint_dir(self.directory, iteration)
        received = 0
        for receiver, inventory in sorted(nodes.items()):
            have = inventory.get(iteration, {"files": {}})["files"]
            for name, (sender, size) in sorted(holders.items()):
                if have.get(name, -1) >= size or self.rank not in (sender, receiver):
                    continue
                if self.rank == sender:
                    dist.send(_read_file(os.path.join(folder, name)), receiver)
                else:
                    data = torch.empty(size, dtype=torch.uint8)
                    dist.recv(data, sender)
                    os.makedirs(folder, exist_ok=True)
                    _write_bytes_durably(os.path.join(folder, name), data.numpy())
                    received += size
        dist.barrier()  # the other ranks of each node read what its first rank received
        return received

    def load(self, iteration: int, nodes: dict[int, dict], model, optimizer, scheduler, **options) -> LoadedCheckpoint:
        start = time.perf_counter()
        received = self._fetch_missing_files(iteration, nodes)
        fetch_seconds = time.perf_counter() - start
        loaded = load_checkpoint_folder(checkpoint_dir(self.directory, iteration), model, optimizer, scheduler,
                                        no_dist=True, **options)
        loaded.seconds += fetch_seconds
        loaded.node_local = True
        total = torch.tensor([float(received)])
        dist.all_reduce(total)
        if total.item():
            print_rank_0(f"local checkpoint {iteration}: {total.item() / 2**20:.1f} MiB of files sent to the nodes "
                         f"that lacked them ({fetch_seconds:.2f} s)")
        return loaded


def resume(local: LocalCheckpoints | None, args, model, optimizer, scheduler) -> LoadedCheckpoint | None:
    """Load the newest complete checkpoint, local or durable (--load); None: a fresh start. Collective.
    A run resumes from its own local checkpoints even with --finetune (they continue the fine-tuning)."""
    options = dict(load_optim=not args.no_load_optim, load_rng=not args.no_load_rng, seed=args.seed)
    nodes = local._node_inventories() if local else {}
    local_iteration = local.newest_complete(nodes) if local else None
    durable = durable_checkpoint_iteration(args.load) if args.load and not args.finetune else None
    loaded = None
    if local_iteration is not None and (durable is None or local_iteration >= durable):
        print_rank_0(f"resuming from the local checkpoint of iteration {local_iteration} in {local.directory}"
                     + (f" (the newest durable one is {durable})" if durable is not None else ""))
        loaded = local.load(local_iteration, nodes, model, optimizer, scheduler, **options)
    elif args.load:
        loaded = load_newest_checkpoint(args.load, model, optimizer, scheduler, finetune=args.finetune,
                                        allow_architecture_change=args.allow_architecture_change, **options)
    if local:
        local.clean_up(keep=local_iteration if loaded and loaded.node_local else None)
    return loaded


def _read_file(path: str) -> torch.Tensor:
    data = bytearray(os.path.getsize(path))  # read into place: data files hold gigabytes of optimizer state
    with open(path, "rb") as f:
        f.readinto(data)
    return torch.frombuffer(data, dtype=torch.uint8)


def _wait_all(works) -> None:
    for work in works:
        work.wait()
