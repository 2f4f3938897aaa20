"""The layout-independent checkpoint format: tensors as blocks of their global value, via DCP.

Every tensor is stored by torch.distributed.checkpoint (DCP) under its global shape, and each
rank contributes the rectangular block it holds, with the block's offsets. A load at another
TP/DP size asks DCP for the blocks it needs now, and DCP reads exactly those bytes from
whichever files hold them. How a parameter's TP shard maps to a block:
  - replicated parameter: the whole tensor, offsets 0 (DP and TP replicas write it once: DCP
    removes duplicate (name, offsets) entries across ranks);
  - partitioned parameter, stride 1: the slice [r*c, (r+1)*c) of its partition dim;
  - stride s > 1 (e.g. SwiGLU's [gate; up]): the shard is s pieces spread over the full dim, so
    it is stored viewed as [..., s, dim/s, ...]; rank r's shard is then the block [:, r*c:(r+1)*c];
  - vocabulary weights (`unpadded_rows`): the global shape has the true vocabulary rows, the
    padding is not stored, and a rank keeps only its rows below the true size. Loading at another
    TP size (other padding) fills the rows it reads and zeroes the rest.

We drive DCP with our own small planners instead of wrapping tensors in DTensor or ShardedTensor:
DTensor's Shard placement can only express torch.chunk-style even splits (not the stripped
vocabulary rows), ShardedTensor rejects replicas of one shard (every DP rank holds one) and is
deprecated. A planner that states (global shape, offsets) per tensor is all DCP needs, works the
same on gloo/CPU and NCCL/GPU, and keeps the files DCP's standard ones (readable by DCP tools).

A state value may also be a list of Blocks of one tensor (Megatron's torch_dist layout stacks a rank's
layers, and cuts a SwiGLU shard in two, so one rank holds several blocks of it: megatron_checkpoint.py).

This module only maps tensors to blocks and reads/writes them; checkpointing.py decides what a
checkpoint holds and when it is written.
"""

import io
import os
import warnings
from dataclasses import dataclass

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    ReadItem,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megatronish import parallel_state
from megatronish.tensor_parallel import param_is_tensor_parallel

DCP_METADATA_FILE = ".metadata"
MAX_LISTED = 24  # mismatched tensors named in one error


@dataclass
class Block:
    """A rectangular block of a tensor's global value: `local` is the data (a view into the live
    tensor, so that a load writes in place), at `offsets` within `global_shape`."""
    local: torch.Tensor
    global_shape: tuple
    offsets: tuple


def parameter_block(tensor: torch.Tensor, param: torch.Tensor, tp_rank: int | None = None,
                    tp_size: int | None = None) -> Block | None:
    """The block of the global value that `tensor` (shaped like `param`'s TP shard: the parameter,
    its fp32 master or an Adam moment) covers; None when it holds only vocabulary padding."""
    if not param_is_tensor_parallel(param):
        return Block(tensor, tuple(tensor.shape), (0,) * tensor.dim())
    if tp_size is None:
        tp_size = parallel_state.get_tensor_model_parallel_world_size()
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
    dim, stride = param.partition_dim, param.partition_stride
    shape = list(tensor.shape)
    per_rank = shape[dim] // stride
    if stride > 1:
        local_shape = shape[:dim] + [stride, per_rank] + shape[dim + 1:]
        global_shape = shape[:dim] + [stride, per_rank * tp_size] + shape[dim + 1:]
        offsets = [0] * len(global_shape)
        offsets[dim + 1] = tp_rank * per_rank
        return Block(tensor.view(local_shape), tuple(global_shape), tuple(offsets))
    global_shape = list(shape)
    global_shape[dim] = per_rank * tp_size
    offsets = [0] * len(shape)
    offsets[dim] = tp_rank * per_rank
    unpadded = getattr(param, "unpadded_rows", None)
    if unpadded is not None:
        if dim != 0:
            raise ValueError(f"a vocabulary weight must be split along dim 0, this one along dim {dim}")
        rows = min(max(unpadded - offsets[0], 0), per_rank)  # this rank's rows below the true vocabulary
        if rows == 0:
            return None
        global_shape[0] = unpadded
        tensor = tensor.narrow(0, 0, rows)
    return Block(tensor, tuple(global_shape), tuple(offsets))


class MegatronishLayout:
    """Where a rank's tensors go in this format: one block per tensor, named `model.<param name>` and
    `optimizer.<param name>.<state>` (megatron_checkpoint.TorchDistLayout places them as Megatron-LM does)."""

    @staticmethod
    def key(name: str, state: str | None = None) -> str:
        return f"model.{name}" if state is None else f"optimizer.{name}.{state}"

    @staticmethod
    def blocks(name: str, tensor: torch.Tensor, param: torch.Tensor, tp_rank: int, tp: int) -> list[Block]:
        block = parameter_block(tensor, param, tp_rank, tp)
        return [] if block is None else [block]

    @staticmethod
    def extra_items(names) -> dict:
        return {}


def blocks_of(value) -> list[Block] | None:
    """The Blocks of a state value (one Block, or a list of them), None for any other value."""
    if isinstance(value, Block):
        return [value]
    if isinstance(value, list) and value and all(isinstance(block, Block) for block in value):
        return value
    return None


def add_block(state: dict, name: str, block: Block) -> None:
    """Put `block` under `name`; a second block of the same tensor makes the value a list."""
    if name not in state:
        state[name] = block
    else:
        state[name] = blocks_of(state[name]) + [block]


def _block_at(blocks: list[Block], offsets) -> Block:
    """The block of one tensor at `offsets` (a rank's blocks of a tensor never start at the same place)."""
    return next(block for block in blocks if tuple(block.offsets) == tuple(offsets))


class _BlockSavePlanner(DefaultSavePlanner):
    """Writes each Block as one chunk of its global tensor, any other value as pickled bytes."""

    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def create_local_plan(self) -> SavePlan:
        items = []
        for name, value in self.state_dict.items():
            blocks = blocks_of(value)
            if blocks is None:
                items.append(WriteItem(index=MetadataIndex(name), type=WriteItemType.BYTE_IO))
            for index, block in enumerate(blocks or []):
                chunk = ChunkStorageMetadata(offsets=torch.Size(block.offsets), sizes=block.local.shape)
                items.append(WriteItem(
                    index=MetadataIndex(name, torch.Size(block.offsets), index), type=WriteItemType.SHARD,
                    tensor_data=TensorWriteData(chunk=chunk, properties=TensorProperties.create_from_tensor(block.local),
                                                size=torch.Size(block.global_shape))))
        self.plan = SavePlan(items)
        return self.plan

    def resolve_data(self, write_item: WriteItem):
        value = self.state_dict[write_item.index.fqn]
        blocks = blocks_of(value)
        if blocks is not None:
            return _block_at(blocks, write_item.index.offset).local.contiguous()
        buffer = io.BytesIO()
        torch.save(value, buffer)
        return buffer


class _BlockLoadPlanner(DefaultLoadPlanner):
    """Reads into each Block's `local` view in place; other values are unpickled into the dict."""

    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        self.state_dict, self.metadata, self.is_coordinator = state_dict, metadata, is_coordinator

    def create_local_plan(self) -> LoadPlan:
        requests = []
        for name, value in self.state_dict.items():
            stored = self.metadata.state_dict_metadata[name]
            blocks = blocks_of(value)
            if blocks is not None:
                chunks = [ChunkStorageMetadata(offsets=torch.Size(block.offsets), sizes=block.local.shape)
                          for block in blocks]
                requests += create_read_items_for_chunk_list(name, stored, chunks)
            else:
                index = MetadataIndex(name)
                requests.append(ReadItem(type=LoadItemType.BYTE_IO, dest_index=index, dest_offsets=torch.Size((0,)),
                                         storage_index=index, storage_offsets=torch.Size((0,)),
                                         lengths=torch.Size((0,))))
        return LoadPlan(requests)

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        # Our own checkpoints only: the bytes are RNG states (Python/NumPy objects need full unpickling).
        self.state_dict[read_item.dest_index.fqn] = torch.load(value, weights_only=False)

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        target = _block_at(blocks_of(self.state_dict[read_item.dest_index.fqn]), read_item.dest_index.offset).local
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            target = target.narrow(dim, start, length)
        return target

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass  # resolve_tensor handed out a view of the destination: the data is already in place


def save_blocks(state: dict, directory: str, process_group=None, no_dist: bool = False) -> None:
    """Write {name: Block or picklable} with DCP into `directory` (a collective over `process_group`)."""
    import torch.distributed.checkpoint as dcp

    writer = dcp.FileSystemWriter(directory, sync_files=True, single_file_per_rank=True)
    with warnings.catch_warnings():  # no_dist is deliberate (one process writes alone): DCP warns about it anyway
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, storage_writer=writer, planner=_BlockSavePlanner(), process_group=process_group,
                 no_dist=no_dist)


def load_blocks(state: dict, directory: str, no_dist: bool = False) -> None:
    """Fill the Blocks of `state` in place (and replace its other values by the stored ones).
    Check the request against `read_metadata(directory)` first: DCP's own errors are terse."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # no_dist is deliberate (offline tools): DCP warns about it anyway
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=FileSystemReader(directory), planner=_BlockLoadPlanner(), no_dist=no_dist)


def read_metadata(directory: str):
    """DCP's index of a checkpoint folder, after checking that every data file it names is there
    and long enough. Raises FileNotFoundError / ValueError naming the bad file."""
    path = os.path.join(directory, DCP_METADATA_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: {directory} is not a complete checkpoint (DCP index file absent)")
    try:
        metadata = FileSystemReader(directory).read_metadata()
    except Exception as error:  # a truncated or foreign pickle: any unpickling error
        raise ValueError(f"{path} is unreadable ({type(error).__name__}: {error}): the checkpoint is truncated "
                         "or corrupt; delete it or load an older one") from error
    for relative_path, length in sorted(data_file_lengths(metadata).items()):
        file = os.path.join(directory, relative_path)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"checkpoint data file {file} is missing: the checkpoint is incomplete; "
                                    "delete it or load an older one")
        size = os.path.getsize(file)
        if size < length:
            raise ValueError(f"checkpoint data file {file} is truncated: {size} bytes, the index needs {length}; "
                             "delete the checkpoint or load an older one")
    return metadata


def data_file_lengths(metadata) -> dict[str, int]:
    """{data file named by DCP's index (relative path): the bytes the index needs of it}."""
    needed = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    return needed


def check_against_metadata(state: dict, metadata) -> None:
    """Raise one error listing every tensor of `state` that the checkpoint lacks or holds at
    another shape (name, saved shape, expected shape)."""
    stored = metadata.state_dict_metadata
    missing = [name for name in state if name not in stored]
    mismatched = []
    for name, value in state.items():
        blocks = blocks_of(value)
        if blocks is not None and name in stored:
            entry = stored[name]
            saved = tuple(entry.size) if isinstance(entry, TensorStorageMetadata) else "not a tensor"
            if saved != tuple(blocks[0].global_shape):
                mismatched.append(f"{name}: saved {list(saved) if isinstance(saved, tuple) else saved}, "
                                  f"expected {list(blocks[0].global_shape)}")
    if mismatched:
        shown = mismatched[:MAX_LISTED] + ([f"... and {len(mismatched) - MAX_LISTED} more"]
                                           if len(mismatched) > MAX_LISTED else [])
        raise ValueError(f"the checkpoint does not fit this model ({len(mismatched)} tensor(s) differ in shape):\n  "
                         + "\n  ".join(shown)
                         + "\nload it with the model arguments it was saved with (see its checkpoint.json)")
    if missing:
        raise KeyError(f"the checkpoint has no entry for {len(missing)} tensor(s): {missing[:8]}"
                       f"{' ...' if len(missing) > 8 else ''}; was it saved from another model?")


def stored_byte_keys(metadata) -> list[str]:
    return [name for name, entry in metadata.state_dict_metadata.items() if isinstance(entry, BytesStorageMetadata)]
