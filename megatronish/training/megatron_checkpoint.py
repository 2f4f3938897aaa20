"""Megatron-LM checkpoints in and out: `torch_dist` (read and written) and the legacy `torch` format (read).

Both are laid out as Megatron-LM's save_checkpoint lays them out: `latest_checkpointed_iteration.txt`
(the iteration as text) and `iter_XXXXXXX/`. What they hold (facts of megatron-core 0.18/0.19 with
its local or Transformer Engine layer spec):
- torch_dist: a torch.distributed.checkpoint folder (`.metadata`, `__<rank>_<i>.distcp`) plus
  `metadata.json` naming the backend. Tensors are global (unsharded) values; each per-layer tensor
  is stacked over all layers on a leading axis, its key without the layer number:
  `decoder.layers.self_attention.linear_qkv.weight` is [num_layers, (heads + 2 groups) x head dim, h].
  The norms carry Transformer Engine's names: input_layernorm -> `self_attention.linear_qkv.
  layer_norm_{weight,bias}`, pre_mlp_layernorm -> `mlp.linear_fc1.layer_norm_{weight,bias}`. Each
  linear has an `_extra_state/shard_<layer>_<num_layers>` byte item. The common state (args,
  iteration, checkpoint_version, ...) is `common.pt` (megatron-core <= 0.18) or the byte item
  `common_state/shard_0_1` (0.19: a torch.save zip). The vocabulary is padded to Megatron's size.
- torch (legacy): `mp_rank_<tp>[_<pp>]/model_optim_rng.pt` per rank: a dict with `args`, `iteration`,
  `checkpoint_version` and `model`, the rank's local shards under per-layer names (numbered within its
  pipeline stage). Column-parallel weights are cut on dim 0 (SwiGLU's fc1 as [gate_r; up_r] per rank),
  row-parallel ones on dim 1, the rest replicated.
Megatron's parameter names are megatronish's (`decoder.layers.<i>.self_attention.linear_qkv.weight`,
...) and so are the QKV and SwiGLU layouts, so a checkpoint maps onto a full state dict by renaming,
unstacking and concatenating only. Pickled `args` name megatron classes (enums); they are read
without megatron installed, as plain placeholders.
"""

import argparse
import glob
import io
import json
import os
import pickle
import re
import types
import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader

from megatronish.model import TransformerConfig
from megatronish.tensor_parallel import param_is_tensor_parallel
from megatronish.tensor_parallel.layers import shard_ranges
from megatronish.training.checkpoint_format import Block, add_block, save_blocks

TRACKER = "latest_checkpointed_iteration.txt"
CHECKPOINT_VERSION = 3.0
COMMON_STATE_ITEM = "common_state/shard_0_1"
COMMON_FILE = "common.pt"
METADATA_FILE = "metadata.json"
# megatron-core's sharded-state-dict flags (its save_checkpoint stores them; its loader builds the model's sharded
# state dict with them): the model's layout the keys above follow
CONTENT_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
MEGATRONISH_KEY = "megatronish"  # our own description (checkpoint.json's content) in a torch_dist common state
# Optimizer states, ours -> Megatron's name in `optimizer.state.<name>.<key>` (megatron-core's model-space layout)
OPTIMIZER_STATES = {"master": "fp32_param", "exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}
_NORM_KEYS = {  # megatronish / Megatron local-spec name -> Megatron's torch_dist (Transformer Engine) name
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "input_layernorm.bias": "self_attention.linear_qkv.layer_norm_bias",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
    "pre_mlp_layernorm.bias": "mlp.linear_fc1.layer_norm_bias",
}
_LINEARS = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")
_COLUMN_PARALLEL = ("word_embeddings.weight", "output_layer.weight", "linear_qkv.weight", "linear_qkv.bias",
                    "linear_fc1.weight", "linear_fc1.bias")
_ROW_PARALLEL = ("linear_proj.weight", "linear_fc2.weight")
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


@dataclass
class MegatronCheckpoint:
    """What a Megatron checkpoint holds, in megatronish terms."""
    folder: str
    format: str                               # "torch_dist" or "torch"
    iteration: int
    args: argparse.Namespace                  # Megatron's training arguments, as saved
    state: dict = field(default_factory=dict)  # {megatronish name: full value}; vocabularies padded as stored
    scheduler: dict | None = None             # Megatron's opt_param_scheduler state, when saved
    has_optimizer: bool = False


# ------------------------------------------------------------------------------------------ finding

def find(path: str) -> tuple[str, int, str] | None:
    """(iteration folder, iteration, format) of the Megatron checkpoint at `path` (a root with the tracker
    file, or an iter_XXXXXXX folder), or None when it is not one."""
    folder, iteration = path, None
    tracker = os.path.join(path, TRACKER)
    if os.path.isfile(tracker):
        with open(tracker) as f:
            text = f.read().strip()
        if not text.isdigit():  # "release" checkpoints have no iteration folder number
            return None
        iteration = int(text)
        folder = os.path.join(path, f"iter_{iteration:07d}")
    match = re.search(r"iter_(\d{7})$", os.path.normpath(folder))
    if match is None or not os.path.isdir(folder):
        return None
    iteration = int(match.group(1)) if iteration is None else iteration
    if os.path.isfile(os.path.join(folder, METADATA_FILE)):
        with open(os.path.join(folder, METADATA_FILE)) as f:
            backend = json.load(f).get("sharded_backend")
        return (folder, iteration, "torch_dist") if backend == "torch_dist" else None
    if glob.glob(os.path.join(folder, "mp_rank_*", "model_optim_rng.pt")):
        return folder, iteration, "torch"
    return None


# ------------------------------------------------------------------------------------------ reading

class _Placeholder:
    """Stands in for a megatron class named in a pickle (the enums in args); keeps what it was built from."""

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"{type(self).__name__}{self.args}"


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module.split(".")[0] == "megatron":
            return type(name, (_Placeholder,), {"__module__": module})
        return super().find_class(module, name)


_PICKLE = types.SimpleNamespace(Unpickler=_Unpickler, load=pickle.load, __name__="megatron_placeholder_pickle")


def torch_load(path_or_file):
    """torch.load of a Megatron file without megatron installed (its classes become placeholders)."""
    return torch.load(path_or_file, map_location="cpu", weights_only=False, pickle_module=_PICKLE)


def read(path: str) -> MegatronCheckpoint:
    """Read the Megatron checkpoint at `path` (one process, no process group needed)."""
    found = find(path)
    if found is None:
        raise FileNotFoundError(f"{path} is not a Megatron-LM checkpoint: expected {TRACKER} and iter_XXXXXXX/ "
                                "holding metadata.json (torch_dist) or mp_rank_*/model_optim_rng.pt (torch)")
    folder, iteration, fmt = found
    return _read_torch_dist(folder, iteration) if fmt == "torch_dist" else _read_legacy(folder, iteration)


def _read_common_state(folder: str, metadata) -> dict:
    if os.path.isfile(os.path.join(folder, COMMON_FILE)):  # megatron-core <= 0.18
        return torch_load(os.path.join(folder, COMMON_FILE))
    if COMMON_STATE_ITEM not in metadata.state_dict_metadata:
        raise ValueError(f"{folder} has neither common.pt nor the {COMMON_STATE_ITEM} item: not a complete "
                         "torch_dist checkpoint")
    planner = _RawBytesPlanner()
    _load_one_process({COMMON_STATE_ITEM: None}, folder, planner)
    common = torch_load(io.BytesIO(planner.raw[COMMON_STATE_ITEM]))
    return common[0] if isinstance(common, list) else common  # 0.19 saves the one shard in a list


class _RawBytesPlanner(DefaultLoadPlanner):
    """Keeps byte items as they are stored (the default planner unpickles them, which needs megatron)."""

    def __init__(self):
        super().__init__()
        self.raw = {}

    def load_bytes(self, read_item, value) -> None:
        self.raw[read_item.dest_index.fqn] = value.read()


def _load_one_process(state: dict, folder: str, planner=None) -> None:
    with warnings.catch_warnings():  # no_dist=True is the intent: one process reads the whole checkpoint
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=FileSystemReader(folder), planner=planner, no_dist=True)


def _read_torch_dist(folder: str, iteration: int) -> MegatronCheckpoint:
    reader = FileSystemReader(folder)
    metadata = reader.read_metadata()
    common = _read_common_state(folder, metadata)
    tensors = {key: torch.empty(meta.size, dtype=meta.properties.dtype)
               for key, meta in metadata.state_dict_metadata.items()
               if hasattr(meta, "size") and _is_model_key(key)}
    _load_one_process(tensors, folder)
    state = {}
    for key, value in tensors.items():
        if key.startswith("decoder.layers."):
            rest = key[len("decoder.layers."):]
            ours = next((mine for mine, theirs in _NORM_KEYS.items() if theirs == rest), rest)
            for layer in range(value.size(0)):
                state[f"decoder.layers.{layer}.{ours}"] = value[layer].clone()
        else:
            state[key] = value
    return MegatronCheckpoint(folder, "torch_dist", int(common.get("iteration", iteration)), common["args"], state,
                              common.get("opt_param_scheduler"),
                              any(k.startswith("optimizer.") for k in metadata.state_dict_metadata))


def _is_model_key(key: str) -> bool:
    """A model tensor of Megatron's sharded state dict (not optimizer state, RNG or extra state)."""
    return (key.startswith(("embedding.", "decoder.", "output_layer.")) and "_extra_state" not in key)


def _read_legacy(folder: str, iteration: int) -> MegatronCheckpoint:
    files = sorted(glob.glob(os.path.join(folder, "mp_rank_*", "model_optim_rng.pt")))
    ranks = {}
    for path in files:
        numbers = [int(n) for n in re.findall(r"\d+", os.path.basename(os.path.dirname(path)))]
        tp_rank, pp_rank = numbers[0], (numbers[1] if len(numbers) > 1 else 0)
        ranks[(tp_rank, pp_rank)] = torch_load(path)
    first = ranks[(0, 0)]
    args = first["args"]
    tp = args.tensor_model_parallel_size
    pp = getattr(args, "pipeline_model_parallel_size", 1)
    if sorted(ranks) != [(t, p) for t in range(tp) for p in range(pp)]:
        raise ValueError(f"{folder}: expected mp_rank files for TP {tp} x PP {pp} (from its args), found "
                         f"{sorted(ranks)}")
    if args.num_layers % pp or getattr(args, "decoder_first_pipeline_num_layers", None):
        raise ValueError(f"{folder}: an uneven pipeline split ({args.num_layers} layers over {pp} stages) is not "
                         "read from legacy files; convert it with Megatron-LM to torch_dist first")
    per_stage = args.num_layers // pp
    state = {}
    for p in range(pp):
        shards = [ranks[(t, p)]["model"] for t in range(tp)]
        for key in shards[0]:
            if "_extra_state" in key:
                continue
            match = _LAYER.match(key)
            name = f"decoder.layers.{int(match.group(1)) + p * per_stage}.{match.group(2)}" if match else key
            state[name] = _concatenate([s[key] for s in shards], key, args)
    return MegatronCheckpoint(folder, "torch", int(first.get("iteration", iteration)), args, state,
                              first.get("opt_param_scheduler"), "optimizer" in first)


def _concatenate(shards: list, key: str, args) -> torch.Tensor:
    """The full value of a tensor from its TP shards (legacy format)."""
    if len(shards) == 1 or not key.endswith(_COLUMN_PARALLEL + _ROW_PARALLEL):
        return shards[0]
    if key.endswith(_ROW_PARALLEL):
        return torch.cat(shards, dim=1)
    if key.endswith(("linear_fc1.weight", "linear_fc1.bias")) and getattr(args, "swiglu", False):
        halves = [s.chunk(2, dim=0) for s in shards]  # each rank: [gate_r; up_r]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(shards, dim=0)


# ------------------------------------------------------------------------------------------ config

def transformer_config(args, vocab_size: int, **overrides) -> TransformerConfig:
    """The megatronish TransformerConfig of a model saved with Megatron's `args`."""
    normalization = getattr(args, "normalization", "LayerNorm")
    if normalization not in ("LayerNorm", "RMSNorm"):
        raise ValueError(f"the checkpoint's --normalization {normalization} is not built here (LayerNorm, RMSNorm)")
    dtype = torch.bfloat16 if getattr(args, "bf16", False) else torch.float16 if getattr(args, "fp16", False) \
        else torch.float32
    values = dict(
        num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads,
        vocab_size=vocab_size, ffn_hidden_size=args.ffn_hidden_size,
        max_position_embeddings=args.max_position_embeddings,
        hidden_dropout=args.hidden_dropout, attention_dropout=args.attention_dropout,
        layernorm_epsilon=getattr(args, "norm_epsilon", 1e-5),
        activation="swiglu" if getattr(args, "swiglu", False) else "gelu", normalization=normalization,
        position_embedding_type=getattr(args, "position_embedding_type", "learned_absolute"),
        rotary_base=float(getattr(args, "rotary_base", 10000)), rotary_percent=getattr(args, "rotary_percent", 1.0),
        num_query_groups=args.num_query_groups if getattr(args, "group_query_attention", False) else None,
        kv_channels=getattr(args, "kv_channels", None), apply_layernorm_1p=getattr(args, "apply_layernorm_1p", False),
        add_bias_linear=getattr(args, "add_bias_linear", True),
        tie_word_embeddings=not getattr(args, "untie_embeddings_and_output_weights", False),
        init_method_std=getattr(args, "init_method_std", 0.02), params_dtype=dtype,
        make_vocab_size_divisible_by=getattr(args, "make_vocab_size_divisible_by", 128))
    if values["activation"] == "gelu" and getattr(args, "bias_gelu_fusion", True) is False:
        warnings.warn("the Megatron checkpoint was trained with --no-bias-gelu-fusion (exact erf GeLU); megatronish's "
                      "GeLU is the tanh form Megatron's fused bias-GeLU computes: logits differ by ~1e-3")
    if values["kv_channels"] == args.hidden_size // args.num_attention_heads:
        values["kv_channels"] = None  # Megatron fills it in; the same head dim
    values.update(overrides)
    return TransformerConfig(**values)


def model_state(checkpoint: MegatronCheckpoint, vocab_size: int) -> dict:
    """{name: full value} with the vocabulary cut to its `vocab_size` real rows (megatronish's full state)."""
    state = {}
    for name, value in checkpoint.state.items():
        if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            if value.size(0) < vocab_size:
                raise ValueError(f"{checkpoint.folder}: {name} has {value.size(0)} rows, fewer than the vocabulary "
                                 f"of {vocab_size}: the tokenizer does not match the checkpoint")
            value = value[:vocab_size]
        state[name] = value
    return state


def checkpoint_vocab_size(args) -> int:
    """The real vocabulary of a Megatron checkpoint, as far as its args tell: --vocab-size (NullTokenizer), the
    vocab.json it names when that file exists, else its padded size (padding rows then count as real)."""
    if getattr(args, "vocab_size", None):
        return int(args.vocab_size)
    vocab_file = getattr(args, "vocab_file", None)
    if vocab_file and os.path.isfile(vocab_file) and vocab_file.endswith(".json"):
        with open(vocab_file, encoding="utf-8") as f:
            return len(json.load(f))
    return int(args.padded_vocab_size)


# ------------------------------------------------------------------------------------------ writing

def megatron_args(config: TransformerConfig, *, tp: int = 1, pp: int = 1, iteration: int = 0,
                  seq_length: int | None = None, extra: dict | None = None) -> argparse.Namespace:
    """Megatron-LM's training arguments for a megatronish model (the fields its loader and
    --use-checkpoint-args read), by Megatron's names. They say no_save_optim / no_save_rng (what a Megatron-LM
    checkpoint holding only weights says), so that Megatron-LM's load_checkpoint neither asks for its optimizer,
    scheduler and RNG items nor needs --no-load-optim --no-load-rng: it starts them fresh."""
    multiple = config.make_vocab_size_divisible_by * tp
    values = dict(
        num_layers=config.num_layers, hidden_size=config.hidden_size, ffn_hidden_size=config.ffn_hidden_size,
        num_attention_heads=config.num_attention_heads, kv_channels=config.head_dim,
        group_query_attention=config.num_query_groups is not None, num_query_groups=config.query_groups,
        max_position_embeddings=config.max_position_embeddings,
        seq_length=seq_length or config.max_position_embeddings,
        position_embedding_type=config.position_embedding_type,
        add_position_embedding=config.position_embedding_type == "learned_absolute",
        rotary_base=int(config.rotary_base) if float(config.rotary_base).is_integer() else config.rotary_base,
        rotary_percent=config.rotary_percent, normalization=config.normalization,
        norm_epsilon=config.layernorm_epsilon, apply_layernorm_1p=config.apply_layernorm_1p,
        swiglu=config.activation == "swiglu", bias_gelu_fusion=config.activation == "gelu",
        add_bias_linear=config.add_bias_linear, untie_embeddings_and_output_weights=not config.tie_word_embeddings,
        hidden_dropout=config.hidden_dropout, attention_dropout=config.attention_dropout,
        init_method_std=config.init_method_std, make_vocab_size_divisible_by=config.make_vocab_size_divisible_by,
        padded_vocab_size=-(-config.vocab_size // multiple) * multiple, vocab_size=config.vocab_size,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        bf16=config.params_dtype == torch.bfloat16, fp16=config.params_dtype == torch.float16,
        params_dtype=config.params_dtype, ckpt_format="torch_dist", iteration=iteration,
        consumed_train_samples=0, consumed_valid_samples=0, no_save_optim=True, no_save_rng=True)
    values.update(extra or {})
    return argparse.Namespace(**values)


@dataclass(frozen=True)
class TorchDistLayout:
    """Where a rank's tensors go in Megatron-LM's torch_dist layout (the module docstring): each parameter's global
    value under Megatron's key, a layer's stacked over `num_layers` on a leading axis, the vocabulary padded. A TP
    shard is the block at its rank's offset on the partition dim (a stride-s shard, SwiGLU's [gate_r; up_r], is s
    blocks), a layer's at its index on the layer axis. Optimizer states go under `optimizer.state.<state>.<key>`
    at the parameter's global shape: where megatron-core's non-distributed optimizer keeps them (and its
    model-space distributed one). Saving, a vocabulary shard is written whole (the global rows are this TP size's
    padding, as Megatron's); loading, `vocab_rows` are the stored rows and a shard reads only its real rows."""
    num_layers: int
    vocab_rows: int | None = None

    @staticmethod
    def key(name: str, state: str | None = None) -> str:
        key, _ = torch_dist_key(name)
        return key if state is None else f"optimizer.state.{OPTIMIZER_STATES[state]}.{key}"

    def blocks(self, name: str, tensor: torch.Tensor, param: torch.Tensor, tp_rank: int, tp: int) -> list[Block]:
        """The blocks of Megatron's global tensor that `tensor` (shaped like `param`'s shard) covers."""
        shape, dim, pieces = list(tensor.shape), 0, [(0, tensor)]
        if param_is_tensor_parallel(param):
            dim = param.partition_dim
            shape[dim] *= tp
            ranges = shard_ranges(shape[dim], param.partition_stride, tp, tp_rank)
            pieces = [(start, piece) for (start, _), piece in zip(ranges, tensor.split(ranges[0][1] - ranges[0][0], dim))]
        unpadded = getattr(param, "unpadded_rows", None)
        if unpadded is not None and self.vocab_rows is not None:
            shape[0] = self.vocab_rows
            real = min(unpadded, self.vocab_rows)
            pieces = [(start, piece.narrow(0, 0, min(piece.size(0), real - start))) for start, piece in pieces
                      if start < real]
        _, layer = torch_dist_key(name)
        blocks = []
        for start, piece in pieces:
            offsets = [0] * len(shape)
            offsets[dim] = start
            if layer is None:
                blocks.append(Block(piece, tuple(shape), tuple(offsets)))
            else:
                blocks.append(Block(piece.unsqueeze(0), (self.num_layers, *shape), (layer, *offsets)))
        return blocks

    def extra_items(self, names) -> dict:
        """The `_extra_state` of each linear of the layers among `names`: an empty one, stored as megatron-core stores
        a sharded object (the list of its one shard, [None]; megatron-core's loader fails on a bare None)."""
        layers = sorted({layer for _, layer in map(torch_dist_key, names) if layer is not None})
        return {f"decoder.layers.{linear}._extra_state/shard_{layer}_{self.num_layers}": [None]
                for layer in layers for linear in _LINEARS}


def torch_dist_key(name: str) -> tuple[str, int | None]:
    """(Megatron's torch_dist key of a megatronish parameter name, its layer or None)."""
    match = _LAYER.match(name)
    if match is None:
        return name, None
    rest = match.group(2)
    return "decoder.layers." + _NORM_KEYS.get(rest, rest), int(match.group(1))


def common_state(args: argparse.Namespace, iteration: int, scheduler: dict | None = None,
                 description: dict | None = None) -> dict:
    """Megatron's common state: `args` (its training arguments), the iteration, the opt_param_scheduler state, the
    content metadata, and megatronish's own description of a training checkpoint under MEGATRONISH_KEY."""
    common = {"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration,
              "num_floating_point_operations_so_far": 0, "content_metadata": CONTENT_METADATA}
    if scheduler is not None:
        common["opt_param_scheduler"] = scheduler
    if description is not None:
        common[MEGATRONISH_KEY] = description
    return common


def write_common_state(folder: str, common: dict) -> None:
    """common.pt and metadata.json, as megatron-core 0.18 writes them (0.19 reads them too), written and synced."""
    buffer = io.BytesIO()
    torch.save(common, buffer)
    _write_synced(os.path.join(folder, COMMON_FILE), buffer.getvalue())
    _write_synced(os.path.join(folder, METADATA_FILE), json.dumps(
        {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
         "common_backend_version": 1}).encode())


def _write_synced(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def read_common_state(folder: str) -> dict:
    """The common state of the torch_dist checkpoint in `folder` (either megatron-core layout)."""
    return _read_common_state(folder, FileSystemReader(folder).read_metadata())


def save_torch_dist(save_dir: str, config: TransformerConfig, state: dict, *, iteration: int = 0,
                    args: argparse.Namespace | None = None, scheduler: dict | None = None) -> str:
    """Write `state` ({name: full unpadded value}) as a Megatron-LM torch_dist checkpoint at `iteration`:
    Megatron's keys, stacked layers, its vocabulary padding (for args.tensor_model_parallel_size), and the
    common state as megatron-core 0.18 writes it (common.pt, which 0.19 reads too). One process, as a training
    run at TP 1 x PP 1 writes it (the blocks are TorchDistLayout's)."""
    args = args or megatron_args(config, iteration=iteration)
    layout = TorchDistLayout(config.num_layers)
    folder = os.path.join(save_dir, f"iter_{iteration:07d}")
    os.makedirs(folder, exist_ok=True)
    layers = {}
    for name in state:
        key, layer = torch_dist_key(name)
        layers.setdefault(key, set()).add(layer)
    for key, held in layers.items():
        if held != {None} and held != set(range(config.num_layers)):
            raise ValueError(f"{key}: the state holds layers {sorted(held)}, expected 0..{config.num_layers - 1}")
    blocks = {}
    for name, value in state.items():
        if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            padded = value.new_zeros((args.padded_vocab_size, value.size(1)))
            padded[:value.size(0)] = value
            value = padded
        for block in layout.blocks(name, value.contiguous(), value, 0, 1):
            add_block(blocks, layout.key(name), block)
    blocks.update(layout.extra_items(state))
    save_blocks(blocks, folder, no_dist=True)
    write_common_state(folder, common_state(args, iteration, scheduler))
    with open(os.path.join(save_dir, TRACKER), "w") as f:
        f.write(str(iteration))
    return folder


# ------------------------------------------------------------------------------------------ training

_SHAPE_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "query_groups", "head_dim",
                 "activation", "normalization", "position_embedding_type", "add_bias_linear", "tie_word_embeddings",
                 "apply_layernorm_1p", "rotary_dim")


def load_for_training(load_dir: str, model_chunks: list, optimizer, scheduler, *, finetune: bool = False):
    """--load of a Megatron checkpoint: the weights into this rank's model chunks (at any TP/PP), and unless
    --finetune the iteration, consumed samples and learning-rate schedule. Megatron's optimizer state is not
    read (the optimizer starts fresh). Returns the TrainingProgress and a one-line summary."""
    from megatronish.model.full_state import load_full_state_dict
    from megatronish.training.progress import TrainingProgress

    checkpoint = read(load_dir)
    config = model_chunks[0].config
    saved = transformer_config(checkpoint.args, config.vocab_size)
    different = [f"{name}: checkpoint {getattr(saved, name)}, this run {getattr(config, name)}"
                 for name in _SHAPE_FIELDS if getattr(saved, name) != getattr(config, name)]
    if different:
        raise ValueError(f"the Megatron checkpoint {checkpoint.folder} holds another model ({'; '.join(different)}): "
                         "add --use-checkpoint-args, or the flags it was trained with")
    state = model_state(checkpoint, config.vocab_size)
    for chunk in model_chunks:
        load_full_state_dict(chunk, {name: state[name] for name, _ in chunk.named_parameters()})
    optimizer.reload_model_params()
    if finetune:
        return TrainingProgress(), f"weights only (--finetune: starting at iteration 0), {checkpoint.format} format"
    args = checkpoint.args
    progress = TrainingProgress(iteration=checkpoint.iteration,
                                consumed_train_samples=int(getattr(args, "consumed_train_samples", 0) or 0),
                                consumed_valid_samples=int(getattr(args, "consumed_valid_samples", 0) or 0))
    schedule = scheduler.state_dict()
    if checkpoint.scheduler is not None:
        schedule.update({name: checkpoint.scheduler[name] for name in schedule if name in checkpoint.scheduler})
    else:  # Megatron counts its schedule in samples too
        schedule["num_steps"] = progress.consumed_train_samples
    scheduler.load_state_dict(schedule)
    optimizer_note = ("its optimizer state is not read: the optimizer starts fresh" if checkpoint.has_optimizer else
                      "it holds no optimizer state: the optimizer starts fresh")
    return progress, (f"weights, iteration, consumed samples and learning-rate schedule from a Megatron "
                      f"{checkpoint.format} checkpoint; {optimizer_note}")


def checkpoint_model_args(load_dir: str) -> dict | None:
    """The model-shape flags (by megatronish's argument names) a Megatron checkpoint was trained with, for
    --use-checkpoint-args; None when `load_dir` is not a Megatron checkpoint."""
    found = find(load_dir)
    if found is None:
        return None
    folder, _, fmt = found
    if fmt == "torch":
        args = torch_load(sorted(glob.glob(os.path.join(folder, "mp_rank_*", "model_optim_rng.pt")))[0])["args"]
    else:
        args = _read_common_state(folder, FileSystemReader(folder).read_metadata())["args"]
    values = {name: getattr(args, name) for name in (
        "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "group_query_attention",
        "num_query_groups", "kv_channels", "max_position_embeddings", "position_embedding_type", "rotary_base",
        "rotary_percent", "normalization", "norm_epsilon", "swiglu", "untie_embeddings_and_output_weights",
        "apply_layernorm_1p", "make_vocab_size_divisible_by") if hasattr(args, name)}
    values["disable_bias_linear"] = not getattr(args, "add_bias_linear", True)
    return values
