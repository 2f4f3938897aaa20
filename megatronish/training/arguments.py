"""Command-line arguments of pretrain_gpt.py, with Megatron-LM's names.

A Megatron GPT launch script runs with only the script path changed. Two sets of defaults:
  - with --data-path: Megatron's (the model shape, --seq-length, --micro-batch-size,
    --train-iters and --lr are then required, as in Megatron);
  - without --data-path: the built-in demo, a small GPT on the embedded default corpus
    (Python's standard library, byte tokens) sized to train visibly within minutes on a
    laptop CPU. Any flag given explicitly still wins over the demo default.
`validate_args` checks everything that can be checked before any data or model is built and
raises ArgumentError with one line naming the value and the fix. `transformer_config_from_args`
is the one place where arguments become the model's TransformerConfig.
"""

import argparse
import difflib
import errno
import math
import os
import tempfile

import torch

from megatronish.data.gpt_dataset import parse_data_path, split_document_ranges
from megatronish.data.indexed_dataset import IndexedDataset, dataset_exists
from megatronish.data.tokenizers import TOKENIZER_TYPES
from megatronish.model import TransformerConfig
from megatronish.model.pipeline_split import validate_pipeline_split


class ArgumentError(ValueError):
    """A bad command line; the message is one line that names the value and the fix."""


# Flags whose default depends on whether data is given: (Megatron default, demo default).
# A Megatron default of None means the flag is required when --data-path is given.
DEFAULTS = {
    "num_layers": (None, 4),
    "hidden_size": (None, 128),
    "num_attention_heads": (None, 8),   # 8 heads: the demo also runs at --tp 2, 4 and 8
    "seq_length": (None, 128),
    "micro_batch_size": (None, 8),
    "global_batch_size": (None, 16),        # None: micro_batch_size x data-parallel size
    "train_iters": (None, 200),
    "lr": (None, 2.0e-3),
    "min_lr": (0.0, 2.0e-4),
    "lr_decay_style": ("linear", "cosine"),
    "lr_warmup_iters": (0, 0),
    "lr_warmup_fraction": (None, 0.05),     # the demo's only if --lr-warmup-iters is not given
    "weight_decay": (0.01, 0.1),
    "adam_beta2": (0.999, 0.95),
    "hidden_dropout": (0.1, 0.0),
    "attention_dropout": (0.1, 0.0),
    "log_interval": (100, 10),
    "eval_interval": (1000, 50),
    "eval_iters": (100, 10),
    "save": (None, "checkpoints/default"),
    "save_interval": (None, 100),
    "split": ("969, 30, 1", "90, 5, 5"),
    "tokenizer_type": (None, "ByteTokenizer"),
    "sample_tokens": (0, 200),
    "num_workers": (2, 0),                  # the demo's batches are cheap to read: no worker processes
}
MODEL_SHAPE_FLAGS = ("num_layers", "hidden_size", "num_attention_heads", "seq_length")
REQUIRED_WITH_DATA = MODEL_SHAPE_FLAGS + ("micro_batch_size", "train_iters", "lr")


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _shown(dest: str, help_text: str) -> str:
    megatron, demo = DEFAULTS[dest]
    return f"{help_text} (default: {megatron if megatron is not None else 'required'}; demo: {demo})"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pretrain_gpt.py", allow_abbrev=False,
        description="Pretrain a GPT with tensor parallelism (Megatron-LM flags). Without --data-path it trains "
                    "a small demo model on the embedded default corpus.")
    d = _shown

    g = p.add_argument_group("model")
    g.add_argument("--num-layers", type=int, help=d("num_layers", "transformer layers"))
    g.add_argument("--hidden-size", type=int, help=d("hidden_size", "hidden size"))
    g.add_argument("--ffn-hidden-size", type=int, help="MLP hidden size (default: 4 x hidden; with --swiglu, "
                   "2/3 of that rounded down to a multiple of 64, as Megatron)")
    g.add_argument("--num-attention-heads", type=int, help=d("num_attention_heads", "attention heads"))
    g.add_argument("--seq-length", type=int, help=d("seq_length", "tokens per sample"))
    g.add_argument("--max-position-embeddings", type=int, help="longest sequence the model accepts "
                   "(default: --seq-length)")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="pad the vocabulary to a multiple of this x TP (default: 128)")
    g.add_argument("--normalization", choices=("LayerNorm", "RMSNorm"), default="LayerNorm")
    g.add_argument("--norm-epsilon", "--layernorm-epsilon", dest="norm_epsilon", type=float, default=1e-5)
    g.add_argument("--position-embedding-type", choices=("learned_absolute", "rope"), default="learned_absolute")
    g.add_argument("--rotary-base", type=float, default=10000.0)
    g.add_argument("--swiglu", action="store_true", help="SwiGLU MLP instead of GeLU")
    g.add_argument("--disable-bias-linear", action="store_true", help="no biases in the linear layers")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true",
                   help="a separate output layer instead of reusing the word embeddings")
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--hidden-dropout", type=float, help=d("hidden_dropout", "dropout on the residual branches"))
    g.add_argument("--attention-dropout", type=float, help=d("attention_dropout", "dropout on attention probabilities"))
    g.add_argument("--attention-backend", choices=("sdpa", "explicit"), default="sdpa",
                   help="torch scaled_dot_product_attention, or the explicit softmax path of megatronish.ops")
    g.add_argument("--recompute-granularity", choices=("full", "selective"),
                   help="activation recompute: whole layers, or the attention core only")
    g.add_argument("--torch-compile", action="store_true",
                   help="torch.compile the model (Inductor), with the fused kernels as custom ops in its graph")

    g = p.add_argument_group("parallelism and distributed")
    g.add_argument("--tensor-model-parallel-size", "--tp", dest="tensor_model_parallel_size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true", help="split norms and dropout along the sequence "
                   "across TP ranks (needs TP > 1)")
    g.add_argument("--pipeline-model-parallel-size", "--pp", dest="pipeline_model_parallel_size", type=int,
                   default=1, help="pipeline stages: the layers are split into this many consecutive parts")
    g.add_argument("--virtual-pipeline-model-parallel-size", type=int,
                   help="model chunks per pipeline stage (interleaved 1F1B; needs micro-batches a multiple of PP)")
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int,
                   help="layers per model chunk: another way to give --virtual-pipeline-model-parallel-size")
    g.add_argument("--decoder-first-pipeline-num-layers", type=int,
                   help="layers on the first pipeline stage (default: an even share); the middle stages share the rest")
    g.add_argument("--decoder-last-pipeline-num-layers", type=int,
                   help="layers on the last pipeline stage (default: an even share)")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="shard fp32 master weights and Adam state across data-parallel ranks")
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="start each gradient bucket's DP reduction during the last micro-batch's backward")
    g.add_argument("--distributed-backend", choices=("nccl", "gloo"), help="default: nccl with GPUs, gloo on CPU")
    g.add_argument("--distributed-timeout-minutes", type=float, default=10.0)
    g.add_argument("--local-rank", "--local_rank", dest="local_rank", type=int,
                   help="ignored (torch.distributed.launch passes it; torchrun sets LOCAL_RANK)")

    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, help=d("micro_batch_size", "samples per forward/backward"))
    g.add_argument("--global-batch-size", type=int,
                   help=d("global_batch_size", "samples per optimizer step over all DP ranks (None: "
                          "micro-batch x DP); gradients are accumulated over the micro-batches"))
    g.add_argument("--train-iters", type=int, help=d("train_iters", "optimizer steps"))
    g.add_argument("--exit-interval", type=int, help="stop (after saving) when the iteration is a multiple of this")
    g.add_argument("--exit-duration-in-mins", type=float,
                   help="stop (after saving) at the first iteration boundary after this many minutes")
    g.add_argument("--exit-signal-handler", action="store_true",
                   help="accepted for Megatron scripts: SIGTERM and SIGUSR1 always make every rank save and exit 0")
    g.add_argument("--max-nan-iterations", type=int, default=1,
                   help="stop with an error after this many iterations in a row whose loss or gradient norm is "
                        "not finite (their steps are skipped; 0: never stop) (default: 1, as Megatron's "
                        "--check-for-nan-in-loss-and-grad)")
    g.add_argument("--dry-run", action="store_true",
                   help="check the arguments, print the plan of this layout (memory per rank, itemized, and time per "
                        "iteration: megatronish.planner) and exit before building anything")
    g.add_argument("--skip-train", action="store_true",
                   help="no training iterations: load (--load), run the final evaluation, and exit")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--bf16", action="store_true", help="bf16 model, fp32 master weights and gradients")
    g.add_argument("--fp16", action="store_true", help="fp16 model with loss scaling, fp32 master weights")
    g.add_argument("--loss-scale", type=float, help="a constant fp16 loss scale (default: dynamic)")
    g.add_argument("--initial-loss-scale", type=float, default=2.0**32)
    g.add_argument("--min-loss-scale", type=float, default=1.0)
    g.add_argument("--loss-scale-window", type=int, default=1000, help="clean steps before the scale doubles")
    g.add_argument("--hysteresis", type=int, default=2, help="overflows tolerated before the scale halves")
    g.add_argument("--accumulate-allreduce-grads-in-fp32", action="store_true",
                   help="accepted for Megatron scripts; gradients are always accumulated and reduced in fp32")

    g = p.add_argument_group("optimizer and learning rate")
    g.add_argument("--optimizer", choices=("adam",), default="adam", help="AdamW (decoupled weight decay)")
    g.add_argument("--lr", type=float, help=d("lr", "peak learning rate"))
    g.add_argument("--min-lr", type=float, help=d("min_lr", "learning rate at the end of the decay"))
    g.add_argument("--lr-decay-style", choices=("constant", "linear", "cosine"), help=d("lr_decay_style", "decay"))
    g.add_argument("--lr-decay-iters", type=int, help="iterations of warmup + decay (default: --train-iters)")
    g.add_argument("--lr-warmup-fraction", type=float,
                   help=d("lr_warmup_fraction", "warmup as a fraction of --lr-decay-iters"))
    g.add_argument("--lr-warmup-iters", type=int, help=d("lr_warmup_iters", "warmup iterations"))
    g.add_argument("--lr-warmup-init", type=float, default=0.0, help="learning rate at the start of warmup")
    g.add_argument("--weight-decay", type=float, help=d("weight_decay", "AdamW weight decay (not on biases and norms)"))
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, help=d("adam_beta2", "Adam beta2"))
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0, help="clip the global gradient norm to this (0: off)")

    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="*", help="indexed dataset prefix(es), or weight prefix pairs to blend; "
                   "omit to train the demo on the embedded default corpus")
    g.add_argument("--split", help=d("split", "train, valid, test proportions of the documents"))
    g.add_argument("--data-impl", choices=("mmap",), help="accepted for Megatron scripts (mmap is the only format)")
    g.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES + ("GPTSentencePieceTokenizer",),
                   help=d("tokenizer_type", "tokenizer (GPT2BPETokenizer when --vocab-file and --merge-file are given)"))
    g.add_argument("--vocab-file")
    g.add_argument("--merge-file")
    g.add_argument("--tokenizer-model")
    g.add_argument("--eod-mask-loss", action="store_true", help="no loss on the token after each end-of-document")
    g.add_argument("--num-workers", type=int, help=d("num_workers", "data loader worker processes per rank"))
    g.add_argument("--data-cache-path", help="where sample indices are cached (default: ~/.cache/megatronish)")

    g = p.add_argument_group("evaluation, logging, checkpoints")
    g.add_argument("--eval-interval", type=int, help=d("eval_interval", "evaluate every this many iterations"))
    g.add_argument("--eval-iters", type=int, help=d("eval_iters", "validation batches per evaluation (0: none)"))
    g.add_argument("--log-interval", type=int, help=d("log_interval", "log every this many iterations"))
    g.add_argument("--tensorboard-dir", help="write TensorBoard scalars here (needs the tensorboard package)")
    g.add_argument("--wandb-project", help="log to Weights & Biases (needs the wandb package)")
    g.add_argument("--wandb-exp-name", help="run name on Weights & Biases")
    g.add_argument("--save", help=d("save", "checkpoint folder"))
    g.add_argument("--save-interval", type=int, help=d("save_interval", "save every this many iterations"))
    g.add_argument("--load", help="resume from the newest checkpoint here (an empty folder starts fresh)")
    g.add_argument("--no-load-optim", action="store_true", help="load only the model weights")
    g.add_argument("--no-load-rng", action="store_true", help="do not restore the random streams")
    g.add_argument("--keep-last", type=int, help="keep only the newest N checkpoints")
    g.add_argument("--allow-architecture-change", action="store_true",
                   help="with --finetune: load a checkpoint of another architecture (the parameters both models share "
                        "load, the others keep their initialization)")
    g.add_argument("--finetune", action="store_true",
                   help="load only the model weights from --load and start at iteration 0 (new optimizer, data, RNG)")
    g.add_argument("--async-save", action="store_true",
                   help="write checkpoints in a background thread while training goes on")
    g.add_argument("--sample-tokens", type=int, help=d("sample_tokens", "tokens to generate after training"))
    g.add_argument("--sample-prompt", default="def ", help="prompt of the generated sample (default: 'def ')")
    return p


def parse_args(argv: list[str] | None = None, extra_args_provider=None) -> argparse.Namespace:
    """Parse, fill the defaults that depend on --data-path, and reject unknown flags (with a suggestion).
    `extra_args_provider(parser)` adds a tool's own flags (Megatron's hook of that name)."""
    parser = build_parser()
    if extra_args_provider is not None:
        extra_args_provider(parser)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        raise ArgumentError(_unknown_flag_message(parser, unknown))
    args.demo = not args.data_path
    warmup_iters_given = args.lr_warmup_iters is not None
    for dest, (megatron, demo) in DEFAULTS.items():
        if dest == "lr_warmup_fraction" and warmup_iters_given:
            continue  # an explicit warmup in iterations replaces the demo's warmup fraction
        if getattr(args, dest) is None:
            setattr(args, dest, demo if args.demo else megatron)
    if args.tokenizer_type is None and args.vocab_file and args.merge_file:
        args.tokenizer_type = "GPT2BPETokenizer"
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.ffn_hidden_size is None and args.hidden_size is not None:
        # Megatron's rule: SwiGLU keeps the MLP's parameter count near that of a 4h GeLU MLP.
        args.ffn_hidden_size = int(4 * args.hidden_size * 2 / 3 / 64) * 64 if args.swiglu else 4 * args.hidden_size
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    return args


def _unknown_flag_message(parser: argparse.ArgumentParser, unknown: list[str]) -> str:
    flag = unknown[0].split("=")[0]
    if not flag.startswith("-"):
        return f"unexpected argument {flag!r}: every option is a --flag (see --help)"
    known = [s for action in parser._actions for s in action.option_strings]
    close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else "; see --help for the supported flags"
    return f"unrecognized argument {flag}{hint}"


def validate_args(args: argparse.Namespace, world_size: int) -> None:
    """Every check that needs no data and no model; raises ArgumentError with one line."""
    def fail(message):
        raise ArgumentError(message)

    _validate_ranges(args, fail)
    validate_layout_args(args, world_size)
    for dest in ("train_iters", "lr"):
        if getattr(args, dest) is None:
            fail(f"{_flag(dest)} is required when --data-path is given (or omit --data-path to run the built-in demo)")
    for dest in ("train_iters", "log_interval", "eval_interval"):
        if getattr(args, dest) < 1:
            fail(f"{_flag(dest)} must be a positive integer, got {getattr(args, dest)}")
    if args.loss_scale is not None and not args.fp16:
        fail(f"--loss-scale {args.loss_scale} applies to --fp16 only: add --fp16 or drop --loss-scale")
    if args.lr <= 0 or not 0 <= args.min_lr <= args.lr:
        fail(f"need --lr > 0 and 0 <= --min-lr <= --lr, got --lr {args.lr} --min-lr {args.min_lr}")
    if args.lr_warmup_fraction is not None:
        if args.lr_warmup_iters:
            fail(f"--lr-warmup-fraction {args.lr_warmup_fraction} and --lr-warmup-iters {args.lr_warmup_iters} "
                 "are both set: give only one")
        if not 0 <= args.lr_warmup_fraction < 1:
            fail(f"--lr-warmup-fraction {args.lr_warmup_fraction} must be in [0, 1)")
    if args.lr_decay_iters < 1:
        fail(f"--lr-decay-iters {args.lr_decay_iters} must be positive")
    if args.lr_decay_style != "constant" and warmup_iters(args) >= args.lr_decay_iters:
        fail(f"the warmup ({warmup_iters(args)} iterations) must be shorter than --lr-decay-iters "
             f"{args.lr_decay_iters}: shorten the warmup or raise --lr-decay-iters")
    if args.clip_grad < 0 or args.eval_iters < 0:
        fail(f"--clip-grad ({args.clip_grad}) and --eval-iters ({args.eval_iters}) must be >= 0")
    if args.save_interval is not None and args.save_interval < 1:
        fail(f"--save-interval {args.save_interval} must be positive")
    if args.exit_duration_in_mins is not None and args.exit_duration_in_mins <= 0:
        fail(f"--exit-duration-in-mins {args.exit_duration_in_mins} must be positive")
    if args.keep_last is not None and args.keep_last < 1:
        fail(f"--keep-last {args.keep_last} must be positive")
    if args.allow_architecture_change and not (args.finetune and args.load):
        fail("--allow-architecture-change applies to --finetune --load only: add them, or resume with the "
             "checkpoint's own model arguments")
    if args.distributed_backend == "nccl" and not torch.cuda.is_available():
        fail("--distributed-backend nccl needs CUDA GPUs and none is visible: use --distributed-backend gloo")
    _validate_data_args(args, fail)
    _validate_save_folder(args, fail)


def validate_layout_args(args: argparse.Namespace, world_size: int) -> None:
    """The rules of the model shape, precision, batch and TP x PP x DP layout (no data, no training schedule).

    validate_args starts with these, and the layout planner (megatronish.planner) asks them of every
    layout it considers, so a layout it rejects is rejected here with the same message. Derives
    args.data_parallel_size, the default --global-batch-size and the virtual pipeline size.
    """
    def fail(message):
        raise ArgumentError(message)

    for dest in MODEL_SHAPE_FLAGS + ("micro_batch_size",):
        if getattr(args, dest) is None:
            fail(f"{_flag(dest)} is required when --data-path is given (or omit --data-path to run the built-in demo)")
    for dest in ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "micro_batch_size",
                 "ffn_hidden_size", "max_position_embeddings", "tensor_model_parallel_size"):
        if getattr(args, dest) < 1:
            fail(f"{_flag(dest)} must be a positive integer, got {getattr(args, dest)}")

    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if pp < 1:
        fail(f"--pipeline-model-parallel-size must be a positive integer, got {pp}")
    if world_size % (tp * pp) != 0:
        fail(f"--tensor-model-parallel-size {tp} x --pipeline-model-parallel-size {pp} = {tp * pp} does not divide "
             f"the world size {world_size}: launch a multiple of {tp * pp} processes (torchrun --nproc_per_node) "
             f"or choose TP and PP sizes whose product divides {world_size}")
    _derive_virtual_pipeline_size(args, fail)
    dp = world_size // (tp * pp)
    args.data_parallel_size = dp
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * dp
    if args.global_batch_size < 1:
        fail(f"--global-batch-size must be a positive integer, got {args.global_batch_size}")
    if args.global_batch_size % (args.micro_batch_size * dp) != 0:
        fail(f"--global-batch-size {args.global_batch_size} is not divisible by --micro-batch-size "
             f"{args.micro_batch_size} x data-parallel size {dp}: use a multiple of {args.micro_batch_size * dp}")
    num_microbatches = args.global_batch_size // (args.micro_batch_size * dp)
    if args.virtual_pipeline_model_parallel_size and num_microbatches % pp != 0:
        fail(f"the interleaved pipeline schedule needs the micro-batches per step ({num_microbatches} = "
             f"--global-batch-size {args.global_batch_size} / (--micro-batch-size {args.micro_batch_size} x DP {dp}))"
             f" to be a multiple of --pipeline-model-parallel-size {pp}: change the batch sizes, or drop the "
             "virtual pipeline stages")
    if args.num_attention_heads % tp != 0:
        fail(f"--num-attention-heads {args.num_attention_heads} is not divisible by --tp {tp}: each rank holds whole "
             f"heads; choose a TP size that divides {args.num_attention_heads}")
    if args.hidden_size % args.num_attention_heads != 0:
        fail(f"--hidden-size {args.hidden_size} is not divisible by --num-attention-heads {args.num_attention_heads}")
    if args.ffn_hidden_size % tp != 0:
        fail(f"--ffn-hidden-size {args.ffn_hidden_size} is not divisible by --tp {tp}")
    if args.seq_length > args.max_position_embeddings:
        fail(f"--seq-length {args.seq_length} exceeds --max-position-embeddings {args.max_position_embeddings}: "
             "raise --max-position-embeddings or shorten --seq-length")
    if args.sequence_parallel and tp == 1:
        args.sequence_parallel = False  # nothing to split; Megatron turns it off the same way
    if args.sequence_parallel and args.seq_length % tp != 0:
        fail(f"--sequence-parallel needs --seq-length {args.seq_length} divisible by --tp {tp}")
    if args.fp16 and args.bf16:
        fail("--fp16 and --bf16 are both set: choose one")
    try:  # the model's own checks too, so that none of them can fire after data loading started
        config = transformer_config_from_args(args, vocab_size=1)
        config.validate(tp)
        config.validate_sequence_length(args.seq_length, tp)
        validate_pipeline_split(config, pp, args.virtual_pipeline_model_parallel_size)
    except ValueError as error:
        fail(str(error))


FLOAT_FLAGS = ("lr", "min_lr", "lr_warmup_init", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps", "clip_grad",
               "init_method_std", "hidden_dropout", "attention_dropout", "norm_epsilon", "rotary_base",
               "loss_scale", "initial_loss_scale", "min_loss_scale", "distributed_timeout_minutes",
               "exit_duration_in_mins", "lr_warmup_fraction")


def _validate_ranges(args, fail) -> None:
    """Values that would otherwise fail far from their flag (blaming another), or never."""
    for dest in FLOAT_FLAGS:
        value = getattr(args, dest)
        if value is not None and not math.isfinite(value):
            fail(f"{_flag(dest)} {value} must be a finite number")
    for dest in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(args, dest) < 1:
            fail(f"{_flag(dest)} {getattr(args, dest)} must be in [0, 1) (typical: 0.9 and 0.95-0.999)")
    if args.adam_eps <= 0:
        fail(f"--adam-eps {args.adam_eps} must be positive (typical: 1e-8)")
    if not 0 <= args.seed < 2**32:
        fail(f"--seed {args.seed} must be in [0, 2**32): NumPy seeds are unsigned 32-bit")
    if args.distributed_timeout_minutes <= 0:
        fail(f"--distributed-timeout-minutes {args.distributed_timeout_minutes} must be positive (fractions allowed)")
    for dest in ("weight_decay", "lr_warmup_iters", "lr_warmup_init", "max_nan_iterations", "num_workers"):
        if getattr(args, dest) is not None and getattr(args, dest) < 0:
            fail(f"{_flag(dest)} {getattr(args, dest)} must be >= 0")
    if args.exit_interval is not None and args.exit_interval < 1:
        fail(f"--exit-interval {args.exit_interval} must be positive")


def _validate_save_folder(args, fail) -> None:
    """An unwritable --save fails now, not at the first save --save-interval iterations later. Probed
    with a nameless file in the folder, or in the nearest existing folder above it (nothing is created)."""
    if not args.save:
        return
    existing = os.path.abspath(args.save)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    try:
        if not os.path.isdir(existing):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        with tempfile.TemporaryFile(dir=existing) as probe:
            probe.write(b"0")
            probe.flush()
    except OSError as error:
        fail(f"--save {args.save} is not writable ({error.strerror or error}"
             f"{': ' + existing if existing != os.path.abspath(args.save) else ''}): give a folder this job can "
             "create files in")


def _validate_data_args(args, fail) -> None:
    tokenizer_files = [f for f in ("vocab_file", "merge_file", "tokenizer_model") if getattr(args, f)]
    try:
        split_document_ranges(args.split, 1)
    except ValueError as error:
        fail(str(error))
    if args.demo:
        if args.tokenizer_type != "ByteTokenizer" or tokenizer_files:
            given = _flag(tokenizer_files[0]) if tokenizer_files else f"--tokenizer-type {args.tokenizer_type}"
            fail(f"--data-path is missing: {given} needs a dataset tokenized with it; give --data-path PREFIX "
                 "(from tools/preprocess_data.py), or drop the tokenizer flags to train the demo on the default corpus")
        return
    try:
        prefixes, _ = parse_data_path(args.data_path)
    except ValueError as error:
        fail(str(error))
    for prefix in prefixes:
        if not dataset_exists(prefix):
            fail(f"--data-path {prefix}: {prefix}.bin / {prefix}.idx not found; give the prefix without the "
                 "extension, as written by tools/preprocess_data.py")
    documents = {prefix: IndexedDataset(prefix).num_documents for prefix in prefixes}
    train_ranges = [split_document_ranges(args.split, n)[0] for n in documents.values()]
    if not args.skip_train and all(start == stop for start, stop in train_ranges):
        counts = ", ".join(f"{prefix}: {n} documents" for prefix, n in documents.items())
        fail(f"--split {args.split} leaves no training documents ({counts}): give the training split a larger share")
    if args.tokenizer_type is None:
        fail("--tokenizer-type is required with --data-path (or give --vocab-file and --merge-file for GPT-2 BPE)")
    for dest in tokenizer_files:
        path = getattr(args, dest)
        if not os.path.exists(path):
            fail(f"{_flag(dest)} {path} does not exist: give the path of the tokenizer file")
    needs = {"GPT2BPETokenizer": ("vocab_file", "merge_file"), "SentencePieceTokenizer": ("tokenizer_model",),
             "GPTSentencePieceTokenizer": ("tokenizer_model",), "HuggingFaceTokenizer": ("tokenizer_model",)}
    for dest in needs.get(args.tokenizer_type, ()):
        if not getattr(args, dest):
            fail(f"--tokenizer-type {args.tokenizer_type} needs {_flag(dest)}")


def _derive_virtual_pipeline_size(args, fail) -> None:
    """--num-layers-per-virtual-pipeline-stage N -> --virtual-pipeline-model-parallel-size L / (PP N); 1 means none."""
    pp, per_stage = args.pipeline_model_parallel_size, args.num_layers_per_virtual_pipeline_stage
    if per_stage is not None:
        if per_stage < 1 or args.num_layers % (pp * per_stage) != 0:
            fail(f"--num-layers-per-virtual-pipeline-stage {per_stage} x --pipeline-model-parallel-size {pp} must "
                 f"divide --num-layers {args.num_layers}")
        derived = args.num_layers // (pp * per_stage)
        if args.virtual_pipeline_model_parallel_size not in (None, derived):
            fail(f"--num-layers-per-virtual-pipeline-stage {per_stage} means {derived} virtual stages, but "
                 f"--virtual-pipeline-model-parallel-size is {args.virtual_pipeline_model_parallel_size}: give only one")
        args.virtual_pipeline_model_parallel_size = derived
    virtual = args.virtual_pipeline_model_parallel_size
    if virtual is not None and virtual < 1:
        fail(f"--virtual-pipeline-model-parallel-size must be a positive integer, got {virtual}")
    if virtual == 1:
        args.virtual_pipeline_model_parallel_size = None  # one chunk per stage: plain 1F1B
    elif virtual is not None and pp == 1:
        fail(f"--virtual-pipeline-model-parallel-size {virtual} needs --pipeline-model-parallel-size > 1")


def warmup_iters(args: argparse.Namespace) -> int:
    if args.lr_warmup_fraction is not None:
        return int(args.lr_warmup_fraction * args.lr_decay_iters)
    return args.lr_warmup_iters


def params_dtype(args: argparse.Namespace) -> torch.dtype:
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32


def transformer_config_from_args(args: argparse.Namespace, vocab_size: int) -> TransformerConfig:
    """The one place where command-line arguments become the model's configuration."""
    return TransformerConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        vocab_size=vocab_size,
        ffn_hidden_size=args.ffn_hidden_size,
        max_position_embeddings=args.max_position_embeddings,
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        layernorm_epsilon=args.norm_epsilon,
        activation="swiglu" if args.swiglu else "gelu",
        normalization=args.normalization,
        position_embedding_type=args.position_embedding_type,
        rotary_base=args.rotary_base,
        add_bias_linear=not args.disable_bias_linear,
        tie_word_embeddings=not args.untie_embeddings_and_output_weights,
        init_method_std=args.init_method_std,
        params_dtype=params_dtype(args),
        sequence_parallel=args.sequence_parallel,
        recompute_granularity=args.recompute_granularity,
        attention_backend=args.attention_backend,
        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
        num_layers_in_first_pipeline_stage=args.decoder_first_pipeline_num_layers,
        num_layers_in_last_pipeline_stage=args.decoder_last_pipeline_num_layers,
    )
