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

from megatronish.data.gpt_dataset import parse_and_normalize_split, parse_data_path, sequence_range, split_matrix
from megatronish.data.indexed_dataset import IndexedDataset, dataset_exists
from megatronish.data.tokenizers import (TOKENIZER_TYPES, add_tokenizer_options, import_tiktoken,
                                         tiktoken_special_tokens)
from megatronish.model import TransformerConfig
from megatronish.model.pipeline_split import validate_pipeline_split
from megatronish.training.batch_schedule import BatchSchedule, parse_step_schedule
from megatronish.training.megatron_flags import add_compatibility_arguments, compatibility_messages


class ArgumentError(ValueError):
    """A bad command line; the message has one line per problem, each naming the value and the fix."""


class _CollectingParser(argparse.ArgumentParser):
    """argparse that records a bad value or choice and goes on, so that every error of a command line
    is reported together (argparse itself stops at the first)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.errors: list[str] = []

    def _get_value(self, action, arg_string):
        try:
            return super()._get_value(action, arg_string)
        except argparse.ArgumentError as error:
            self.errors.append(str(error))
            return None

    def _check_value(self, action, value):
        if value is not None:
            try:
                super()._check_value(action, value)
            except argparse.ArgumentError as error:
                self.errors.append(str(error))

    def error(self, message):
        raise ArgumentError("\n".join(self.errors + [message]))


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
    p = _CollectingParser(
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
    g.add_argument("--position-embedding-type", choices=("learned_absolute", "rope", "none"),
                   default="learned_absolute", help="none: no position information (NoPE)")
    g.add_argument("--no-position-embedding", action="store_true",
                   help="no learned position table (Megatron: only with --position-embedding-type rope, where it "
                        "changes nothing; otherwise use --position-embedding-type none)")
    g.add_argument("--rotary-base", type=float, default=10000.0)
    g.add_argument("--rotary-percent", type=float, default=1.0,
                   help="RoPE rotates the first int(head dim x this) dims of each head, the rest pass (default 1.0)")
    g.add_argument("--group-query-attention", action="store_true",
                   help="grouped-query attention: --num-query-groups key/value heads, each shared by a group of "
                        "query heads; TP splits the groups")
    g.add_argument("--num-query-groups", type=int, default=1, help="key/value heads with --group-query-attention")
    g.add_argument("--kv-channels", type=int, help="the head dim (default: --hidden-size / --num-attention-heads)")
    g.add_argument("--apply-layernorm-1p", action="store_true",
                   help="norm weights centered on zero: stored as scale - 1, applied as 1 + weight")
    g.add_argument("--swiglu", action="store_true", help="SwiGLU MLP instead of GeLU")
    g.add_argument("--disable-bias-linear", action="store_true", help="no biases in the linear layers")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true",
                   help="a separate output layer instead of reusing the word embeddings")
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--hidden-dropout", type=float, help=d("hidden_dropout", "dropout on the residual branches"))
    g.add_argument("--attention-dropout", type=float, help=d("attention_dropout", "dropout on attention probabilities"))
    g.add_argument("--attention-backend", choices=tuple(ATTENTION_BACKENDS), default="auto",
                   help="Megatron's names mapped onto the two paths here: auto, flash, fused and sdpa run torch "
                        "scaled_dot_product_attention (flash/fused kernels where the device has them); unfused, "
                        "local and explicit run the explicit softmax path of megatronish.ops (default: auto)")
    g.add_argument("--transformer-impl", choices=("local", "transformer_engine"), default="transformer_engine",
                   help="accepted for Megatron scripts: the layers here are megatronish's either way (one info line)")
    g.add_argument("--recompute-granularity", choices=("full", "selective"),
                   help="activation recompute: whole layers, or the attention core only")
    g.add_argument("--torch-compile", action="store_true",
                   help="torch.compile the model (Inductor), with the fused kernels as custom ops in its graph")
    g.add_argument("--recompute-method", choices=("uniform", "block"),
                   help="with --recompute-granularity full: every layer is recomputed on its own here (Megatron's "
                        "uniform with --recompute-num-layers 1); other choices only trade memory, a warning says so")
    g.add_argument("--recompute-num-layers", type=int, help="see --recompute-method")

    g = p.add_argument_group("parallelism and distributed")
    g.add_argument("--tensor-model-parallel-size", "--tp", dest="tensor_model_parallel_size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true", help="split norms and dropout along the sequence "
                   "across TP ranks (needs TP > 1)")
    g.add_argument("--pipeline-model-parallel-size", "--pp", dest="pipeline_model_parallel_size", type=int,
                   default=1, help="pipeline stages: the layers are split into this many consecutive parts")
    g.add_argument("--virtual-pipeline-model-parallel-size", type=int,
                   help="model chunks per pipeline stage (interleaved 1F1B; needs micro-batches a multiple of PP)")
    g.add_argument("--num-virtual-stages-per-pipeline-rank", type=int,
                   help="Megatron's newer name for --virtual-pipeline-model-parallel-size")
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
    g.add_argument("--distributed-backend", choices=("nccl", "gloo"),
                   help="default: nccl with GPUs, gloo on CPU; nccl without a GPU falls back to gloo (one warning)")
    g.add_argument("--distributed-timeout-minutes", type=float, default=10.0)
    g.add_argument("--local-rank", "--local_rank", dest="local_rank", type=int,
                   help="ignored (torch.distributed.launch passes it; torchrun sets LOCAL_RANK)")

    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, help=d("micro_batch_size", "samples per forward/backward"))
    g.add_argument("--global-batch-size", type=int,
                   help=d("global_batch_size", "samples per optimizer step over all DP ranks (None: "
                          "micro-batch x DP); gradients are accumulated over the micro-batches"))
    g.add_argument("--train-iters", type=int, help=d("train_iters", "optimizer steps"))
    g.add_argument("--train-samples", type=int, help="train on this many samples instead of --train-iters "
                   "(Megatron's sample-based training; the LR schedule then takes --lr-*-samples)")
    g.add_argument("--rampup-batch-size", type=int, nargs=3, metavar=("START", "INCREMENT", "SAMPLES"),
                   help="grow the global batch from START by INCREMENT over the first SAMPLES samples (needs "
                        "--train-samples, as in Megatron)")
    g.add_argument("--step-batch-size-schedule", help="\"THRESHOLD:BATCH ...\" global batch sizes from token "
                   "thresholds (K/M/B/T suffixes), e.g. \"0:16 2.4B:320\"; replaces --global-batch-size")
    g.add_argument("--calculate-per-token-loss", action="store_true",
                   help="every token of a global batch weighs the same in the loss and gradient (Megatron's), "
                        "instead of every micro-batch's mean")
    g.add_argument("--grad-reduce-in-bf16", action="store_true",
                   help="send gradients in bf16 in the data-parallel reduction (accumulated in fp32)")
    g.add_argument("--overlap-param-gather", action="store_true",
                   help="with --use-distributed-optimizer: start the all-gather of the updated parameters after "
                        "the step and wait for each bucket only when the next forward reaches its first layer, as "
                        "Megatron (the same values; the gather hides behind the forward)")
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
                   help="check the whole command line (for $WORLD_SIZE ranks, default TP x PP), print the resolved "
                        "configuration and the plan of this layout (memory per rank, itemized, and time per "
                        "iteration: megatronish.planner) and exit before building anything")
    g.add_argument("--skip-train", action="store_true",
                   help="no training iterations: load (--load), run the final evaluation, and exit")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--deterministic-mode", action="store_true",
                   help="deterministic kernels only (torch.use_deterministic_algorithms), as Megatron's flag")
    g.add_argument("--manual-gc", action="store_true",
                   help="no automatic Python garbage collection during training; collect every --manual-gc-interval "
                        "iterations (and around evaluations) instead, so that all ranks pause together")
    g.add_argument("--manual-gc-interval", type=int, default=0,
                   help="with --manual-gc: collect every this many iterations (0: only around evaluations)")
    g.add_argument("--empty-unused-memory-level", type=int, choices=(0, 1, 2), default=0,
                   help="release cached GPU memory: 1 after each optimizer step, 2 also after each forward-backward "
                        "(no effect on CPU)")
    g.add_argument("--cross-entropy-loss-fusion", action="store_true",
                   help="accepted for Megatron scripts: the vocabulary-parallel cross entropy here is always the "
                        "fused one (one pass, gradient written over the logits)")
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
    g.add_argument("--lr-decay-samples", type=int, help="with --train-samples: samples of warmup + decay "
                   "(default: --train-samples)")
    g.add_argument("--lr-warmup-samples", type=int, default=0, help="with --train-samples: warmup samples")
    g.add_argument("--decoupled-lr", type=float, help="peak learning rate of the word embeddings and output layer")
    g.add_argument("--decoupled-min-lr", type=float, help="their minimum learning rate (default: --min-lr)")
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
    g.add_argument("--mock-data", action="store_true", help="Megatron's synthetic data instead of --data-path: "
                   "100000 sequences 1, 2, 3, ... of random lengths, split and sampled as real data")
    g.add_argument("--train-data-path", nargs="*", help="the training split's own prefix(es) (Megatron's "
                   "blend per split); --data-path and --split are then not used")
    g.add_argument("--valid-data-path", nargs="*", help="the validation split's own prefix(es)")
    g.add_argument("--test-data-path", nargs="*", help="the test split's own prefix(es)")
    g.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES,
                   help=d("tokenizer_type", "tokenizer (GPT2BPETokenizer when --vocab-file and --merge-file are given)"))
    g.add_argument("--vocab-file")
    g.add_argument("--merge-file")
    g.add_argument("--tokenizer-model", help="SentencePiece .model, tokenizer.json (HuggingFaceTokenizer) or "
                   "TikTokenizer's vocabulary .json")
    add_tokenizer_options(g)
    g.add_argument("--no-mmap-bin-files", action="store_true", help="read the .bin files into memory instead "
                   "of memory-mapping them")
    g.add_argument("--no-create-attention-mask-in-dataloader", action="store_true",
                   help="accepted for Megatron scripts: batches here never carry an attention mask (attention is "
                        "causal by construction), with or without this flag")
    g.add_argument("--eod-mask-loss", action="store_true", help="no loss on the token after each end-of-document")
    g.add_argument("--num-workers", type=int, help=d("num_workers", "data loader worker processes per rank"))
    g.add_argument("--data-cache-path", help="where sample indices are cached (default: ~/.cache/megatronish)")

    g = p.add_argument_group("evaluation, logging, checkpoints")
    g.add_argument("--eval-interval", type=int, help=d("eval_interval", "evaluate every this many iterations"))
    g.add_argument("--eval-iters", type=int, help=d("eval_iters", "validation batches per evaluation (0: none)"))
    g.add_argument("--eval-global-batch-size", type=int,
                   help="samples per validation batch (default: --global-batch-size)")
    g.add_argument("--log-interval", type=int, help=d("log_interval", "log every this many iterations"))
    g.add_argument("--tensorboard-dir", help="write TensorBoard scalars here (needs the tensorboard package)")
    g.add_argument("--wandb-project", help="log to Weights & Biases (needs the wandb package)")
    g.add_argument("--wandb-exp-name", help="run name on Weights & Biases")
    g.add_argument("--wandb-entity", help="team or user of the Weights & Biases run")
    g.add_argument("--wandb-save-dir", help="where Weights & Biases keeps its local files")
    g.add_argument("--log-throughput", action="store_true",
                   help="accepted for Megatron scripts: every training log line here has the throughput "
                        "(TFLOP/s per GPU and tokens/s)")
    g.add_argument("--log-params-norm", action="store_true", help="log the norm of all parameters (each once)")
    g.add_argument("--log-num-zeros-in-grad", action="store_true",
                   help="log how many gradient entries are exactly zero")
    g.add_argument("--log-timers-to-tensorboard", action="store_true",
                   help="write the timers of --timing-log-level to TensorBoard")
    g.add_argument("--log-memory-to-tensorboard", action="store_true",
                   help="write memory use (CUDA allocator, or the process's peak RSS on CPU) to TensorBoard")
    g.add_argument("--log-validation-ppl-to-tensorboard", action="store_true",
                   help="write the validation perplexity to TensorBoard beside the loss")
    g.add_argument("--log-batch-size-to-tensorboard", action="store_true", help="write the global batch size")
    g.add_argument("--log-world-size-to-tensorboard", action="store_true", help="write the number of ranks")
    g.add_argument("--no-log-learning-rate-to-tensorboard", dest="log_learning_rate_to_tensorboard",
                   action="store_false", help="leave the learning rate out of TensorBoard")
    g.add_argument("--no-log-loss-scale-to-tensorboard", dest="log_loss_scale_to_tensorboard",
                   action="store_false", help="leave the loss scale out of TensorBoard")
    g.add_argument("--profile", action="store_true",
                   help="record a torch.profiler trace of iterations --profile-step-start to --profile-step-end on "
                        "--profile-ranks (Chrome trace JSON in --tensorboard-dir, else ./profile)")
    g.add_argument("--profile-step-start", type=int, default=10)
    g.add_argument("--profile-step-end", type=int, default=12)
    g.add_argument("--profile-ranks", type=int, nargs="+", default=[0], help="global ranks to profile (default: 0)")
    g.add_argument("--timing-log-level", type=int, choices=(0, 1, 2), default=0,
                   help="0: iteration time only (Megatron's default); 1 and 2 add the time of the forward-backward "
                        "pass and of the optimizer step to each log line")
    g.add_argument("--save", help=d("save", "checkpoint folder"))
    g.add_argument("--save-interval", type=int, help=d("save_interval", "save every this many iterations"))
    g.add_argument("--load", help="resume from the newest checkpoint here (an empty folder starts fresh)")
    g.add_argument("--no-load-optim", action="store_true", help="load only the model weights")
    g.add_argument("--no-load-rng", action="store_true", help="do not restore the random streams")
    g.add_argument("--override-opt_param-scheduler", action="store_true",
                   help="the learning-rate schedule comes from the command line, only its sample count from the "
                        "checkpoint (what happens here without either flag)")
    g.add_argument("--use-checkpoint-opt_param-scheduler", action="store_true",
                   help="the learning-rate schedule (peak, minimum, warmup, decay, style) comes from the checkpoint")
    g.add_argument("--ckpt-format", choices=("torch_dist", "torch", "fsdp_dtensor"),
                   help="torch_dist: --save writes Megatron-LM's torch_dist layout (its keys, stacked layers, padded "
                        "vocabulary, common.pt with args, iteration, consumed samples and LR schedule; the Adam state "
                        "as optimizer.state.* tensors), from every rank, crash-safe; it resumes at any TP/PP/DP. "
                        "Unset: megatronish's own distributed format. torch (legacy per-rank files) is read by --load "
                        "but not written: --save then writes megatronish's format (one warning line). fsdp_dtensor is "
                        "rejected. --load reads all of them whatever this says")
    g.add_argument("--use-checkpoint-args", action="store_true",
                   help="take the model's shape flags (layers, sizes, heads, groups, positions, norm, activation, "
                        "biases, tying) from the --load checkpoint (megatronish or Megatron-LM) over the command line")
    g.add_argument("--auto-detect-ckpt-format", action="store_true",
                   help="accepted for Megatron scripts: --load always detects the checkpoint's format")
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
    add_compatibility_arguments(p)

    g = p.add_argument_group("elastic training (torchrun --nnodes MIN:MAX; see megatronish/training/elastic.py)")
    g.add_argument("--layout", choices=("given", "auto"), default="given",
                   help="given: --tp and --pp at every world size, DP follows the world; auto: the layout planner "
                        "chooses TP and PP for each world size (default: given)")
    g.add_argument("--wait-for-nodes-minutes", type=float, default=0.0,
                   help="when no layout fits the world, wait this long for torchrun to bring more nodes, then exit "
                        "with status 3 saying what is needed (default: 0, fail at once)")
    g.add_argument("--local-checkpoint-interval", type=int,
                   help="also checkpoint every this many iterations into --local-checkpoint-dir (node-local, in the "
                        "background, copied to a buddy node); a restart resumes from the newest checkpoint")
    g.add_argument("--local-checkpoint-dir", help="a folder on each node's own disk for the local checkpoints")
    g.add_argument("--fault-tolerant-dp", action="store_true",
                   help="each DP replica (one TP x PP group, its own torchrun) is a torchft replica group: replicas "
                        "die and join without stopping the others (megatronish/training/fault_tolerance.py; "
                        "pip install 'megatronish[ft]')")
    g.add_argument("--ft-lighthouse", default=os.environ.get("TORCHFT_LIGHTHOUSE"),
                   help="the torchft lighthouse, http://HOST:PORT (default: $TORCHFT_LIGHTHOUSE)")
    g.add_argument("--ft-replica-id", type=int, help="this replica's number (each replica its own)")
    g.add_argument("--ft-min-replicas", type=int, default=1, help="replicas needed to commit a step (default: 1)")
    g.add_argument("--ft-timeout-seconds", type=float, default=60.0,
                   help="torchft's timeout for a quorum, a collective or healing (default: 60)")
    g.add_argument("--ft-host", help="the address the other replicas reach this one at (default: the hostname)")
    return p


def parse_args(argv: list[str] | None = None, extra_args_provider=None) -> argparse.Namespace:
    """Parse and fill the defaults that depend on --data-path. Bad values and unknown flags are kept in
    `args.argument_errors` (with a suggestion for a misspelled flag) for validate_args to report
    together with everything else. `extra_args_provider(parser)` adds a tool's own flags (Megatron's hook of
    that name)."""
    parser = build_parser()
    if extra_args_provider is not None:
        extra_args_provider(parser)
    args, unknown = parser.parse_known_args(argv)
    args.argument_errors = parser.errors + [_unknown_flag_message(parser, flag) for flag in unknown
                                            if flag.startswith("-") or unknown.index(flag) == 0]
    args.demo = not (args.data_path or args.mock_data or args.train_data_path)
    warmup_iters_given = args.lr_warmup_iters is not None
    for dest, (megatron, demo) in DEFAULTS.items():
        if dest == "lr_warmup_fraction" and (warmup_iters_given or args.lr_warmup_samples):
            continue  # an explicit warmup in iterations replaces the demo's warmup fraction
        if dest == "train_iters" and args.train_samples is not None:
            continue  # derived from the samples once the batch size is known
        if getattr(args, dest) is None:
            setattr(args, dest, demo if args.demo else megatron)
    if args.tokenizer_type is None and args.vocab_file and args.merge_file:
        args.tokenizer_type = "GPT2BPETokenizer"
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.ffn_hidden_size is None and args.hidden_size is not None:
        # Megatron's rule: SwiGLU keeps the MLP's parameter count near that of a 4h GeLU MLP.
        args.ffn_hidden_size = int(4 * args.hidden_size * 2 / 3 / 64) * 64 if args.swiglu else 4 * args.hidden_size
    if args.lr_decay_iters is None and args.train_samples is None:
        args.lr_decay_iters = args.train_iters
    if args.use_checkpoint_args:
        _apply_checkpoint_args(args)
    return args


CHECKPOINT_MODEL_ARGS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "group_query_attention",
                         "num_query_groups", "kv_channels", "max_position_embeddings", "position_embedding_type",
                         "rotary_base", "rotary_percent", "normalization", "norm_epsilon", "swiglu",
                         "disable_bias_linear", "untie_embeddings_and_output_weights", "apply_layernorm_1p",
                         "make_vocab_size_divisible_by")


def _apply_checkpoint_args(args: argparse.Namespace) -> None:
    """--use-checkpoint-args: the model-shape flags of the --load checkpoint replace the command line's."""
    from megatronish.training import checkpointing, megatron_checkpoint
    if not args.load:
        args.argument_errors.append("--use-checkpoint-args needs --load (the checkpoint to take them from)")
        return
    try:
        saved = megatron_checkpoint.checkpoint_model_args(args.load)
        if saved is None:
            saved = checkpointing.read_checkpoint_args(args.load)
    except (OSError, ValueError) as error:
        args.argument_errors.append(f"--use-checkpoint-args: cannot read the arguments of --load {args.load}: {error}")
        return
    for name in CHECKPOINT_MODEL_ARGS:
        if name in saved:
            setattr(args, name, saved[name])


def _unknown_flag_message(parser: argparse.ArgumentParser, flag: str) -> str:
    flag = flag.split("=")[0]
    if not flag.startswith("-"):
        return f"unexpected argument {flag!r}: every option is a --flag (see --help)"
    known = [s for action in parser._actions for s in action.option_strings]
    close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else "; see --help for the supported flags"
    return f"unrecognized argument {flag}{hint}"


def validate_args(args: argparse.Namespace, world_size: int) -> list[str]:
    """Every check that needs no data and no model. Raises ArgumentError listing every problem of the command
    line, one per line; returns the warning lines (flags accepted without effect here)."""
    errors = list(getattr(args, "argument_errors", []))  # bad values, unknown flags
    fail = errors.append
    for dest in REQUIRED_WITH_DATA:
        if getattr(args, dest) is None and not (dest == "train_iters" and args.train_samples is not None):
            fail(f"{_flag(dest)} is required when --data-path is given (or omit --data-path to run the built-in demo)")
    for dest in ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "micro_batch_size", "train_iters",
                 "train_samples",
                 "ffn_hidden_size", "max_position_embeddings", "log_interval", "eval_interval",
                 "tensor_model_parallel_size", "pipeline_model_parallel_size"):
        if getattr(args, dest) is not None and getattr(args, dest) < 1:
            fail(f"{_flag(dest)} must be a positive integer, got {getattr(args, dest)}")
    if not errors:
        _validate_ranges(args, fail)
    warnings, rejected = compatibility_messages(args)
    errors += rejected
    _resolve_megatron_spellings(args, world_size, warnings, fail)
    if len(errors) > len(rejected):  # a value the checks below combine is missing or bad: report what is known
        raise ArgumentError("\n".join(errors))

    _derive_batch_schedule(args, fail)
    _check_layout(args, world_size, fail)
    _validate_local_checkpoint_args(args, fail)
    _validate_fault_tolerance_args(args, fail)
    _derive_sample_based_training(args, fail)
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
    if args.train_samples is None and args.lr_decay_iters < 1:
        fail(f"--lr-decay-iters {args.lr_decay_iters} must be positive")
    elif args.train_samples is None and args.lr_decay_style != "constant" and warmup_iters(args) >= args.lr_decay_iters:
        fail(f"the warmup ({warmup_iters(args)} iterations) must be shorter than --lr-decay-iters "
             f"{args.lr_decay_iters}: shorten the warmup or raise --lr-decay-iters")
    elif args.train_samples is not None and args.lr_decay_style != "constant" \
            and lr_schedule_samples(args)[0] >= lr_schedule_samples(args)[1]:
        warmup, decay = lr_schedule_samples(args)
        fail(f"the warmup ({warmup} samples) must be shorter than the decay ({decay} samples, --lr-decay-samples "
             "or --train-samples): shorten the warmup or raise --lr-decay-samples")
    if args.decoupled_min_lr is not None and args.decoupled_lr is None:
        fail("--decoupled-min-lr needs --decoupled-lr (the peak it decays from)")
    if args.overlap_param_gather and not args.use_distributed_optimizer:
        fail("--overlap-param-gather needs --use-distributed-optimizer (it overlaps that optimizer's parameter "
             "all-gather), as in Megatron")
    if args.overlap_param_gather and args.torch_compile:  # measured: losses drift from the second iteration
        fail("--overlap-param-gather cannot be combined with --torch-compile: the compiled model skips the waits for "
             "the overlapped parameter all-gathers; drop one of the two")
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
    if args.profile and not 0 <= args.profile_step_start < args.profile_step_end:
        fail(f"--profile-step-start {args.profile_step_start} must be >= 0 and before --profile-step-end "
             f"{args.profile_step_end}")
    if args.manual_gc_interval < 0:
        fail(f"--manual-gc-interval {args.manual_gc_interval} must be >= 0")
    if args.override_opt_param_scheduler and args.use_checkpoint_opt_param_scheduler:
        fail("--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler are both set: choose one "
             "(Megatron refuses both too)")
    _validate_data_args(args, fail)
    _validate_tiktoken_args(args, warnings, fail)
    _validate_save_folder(args, fail)
    if errors:
        raise ArgumentError("\n".join(errors))
    return warnings


def validate_layout_args(args: argparse.Namespace, world_size: int) -> None:
    """The rules of the model shape, precision, batch and TP x PP x DP layout (no data, no training schedule),
    every broken one reported in one ArgumentError.

    validate_args checks these too, and the layout planner (megatronish.planner) asks them of every
    layout it considers, so a layout it rejects is rejected here with the same message. Derives
    args.data_parallel_size, the default --global-batch-size and the virtual pipeline size.
    """
    errors = []
    for dest in MODEL_SHAPE_FLAGS + ("micro_batch_size",):
        if getattr(args, dest) is None:
            errors.append(f"{_flag(dest)} is required when --data-path is given (or omit --data-path to run the "
                          "built-in demo)")
    if not errors:
        _check_layout(args, world_size, errors.append)
    if errors:
        raise ArgumentError("\n".join(errors))


def _check_layout(args: argparse.Namespace, world_size: int, fail) -> None:
    for dest in ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "micro_batch_size",
                 "ffn_hidden_size", "max_position_embeddings", "tensor_model_parallel_size",
                 "pipeline_model_parallel_size"):
        if getattr(args, dest) < 1:
            fail(f"{_flag(dest)} must be a positive integer, got {getattr(args, dest)}")
            return
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if world_size % (tp * pp) != 0:
        fail(f"--tensor-model-parallel-size {tp} x --pipeline-model-parallel-size {pp} = {tp * pp} does not divide "
             f"the world size {world_size}: launch a multiple of {tp * pp} processes (torchrun --nproc_per_node) "
             f"or choose TP and PP sizes whose product divides {world_size}")
    _derive_virtual_pipeline_size(args, fail)
    dp = max(world_size // (tp * pp), 1)
    args.data_parallel_size = dp
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * dp
    names = ["global_batch_size"]
    if args.eval_global_batch_size is None:
        args.eval_global_batch_size = args.global_batch_size
    elif args.eval_global_batch_size != args.global_batch_size:
        names.append("eval_global_batch_size")
    for name in names:
        if getattr(args, name) < 1:
            fail(f"{_flag(name)} must be a positive integer, got {getattr(args, name)}")
        elif getattr(args, name) % (args.micro_batch_size * dp) != 0:
            fail(f"{_flag(name)} {getattr(args, name)} is not divisible by --micro-batch-size "
                 f"{args.micro_batch_size} x data-parallel size {dp}: use a multiple of {args.micro_batch_size * dp}")
    num_microbatches = args.global_batch_size // (args.micro_batch_size * dp)
    if args.virtual_pipeline_model_parallel_size and num_microbatches % pp != 0:
        fail(f"the interleaved pipeline schedule needs the micro-batches per step ({num_microbatches} = "
             f"--global-batch-size {args.global_batch_size} / (--micro-batch-size {args.micro_batch_size} x DP {dp}))"
             f" to be a multiple of --pipeline-model-parallel-size {pp}: change the batch sizes, or drop the "
             "virtual pipeline stages")
    if args.sequence_parallel and tp == 1:
        args.sequence_parallel = False  # nothing to split; Megatron turns it off the same way
    if args.fp16 and args.bf16:
        fail("--fp16 and --bf16 are both set: choose one")
    try:  # the model's own checks (the one place each model rule lives), before any data or model is built
        config = transformer_config_from_args(args, vocab_size=1)
    except ValueError as error:
        fail(str(error))
    else:
        for check in (lambda: config.validate(tp), lambda: config.validate_sequence_length(args.seq_length, tp),
                      lambda: validate_pipeline_split(config, pp, args.virtual_pipeline_model_parallel_size)):
            try:
                check()
            except ValueError as error:
                fail(str(error))


FLOAT_FLAGS = ("lr", "min_lr", "lr_warmup_init", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps", "clip_grad",
               "init_method_std", "hidden_dropout", "attention_dropout", "norm_epsilon", "rotary_base",
               "loss_scale", "initial_loss_scale", "min_loss_scale", "distributed_timeout_minutes",
               "exit_duration_in_mins", "lr_warmup_fraction", "wait_for_nodes_minutes")


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
    if args.wait_for_nodes_minutes < 0:
        fail(f"--wait-for-nodes-minutes {args.wait_for_nodes_minutes} must be >= 0")


def _validate_fault_tolerance_args(args, fail) -> None:
    if not args.fault_tolerant_dp:
        return
    if not args.ft_lighthouse:
        fail("--fault-tolerant-dp needs the lighthouse's address: --ft-lighthouse http://HOST:PORT (or "
             "$TORCHFT_LIGHTHOUSE)")
    if args.ft_replica_id is None or args.ft_replica_id < 0:
        fail("--fault-tolerant-dp needs --ft-replica-id N (N >= 0, each replica its own)")
    if args.ft_min_replicas < 1 or not 0 < args.ft_timeout_seconds < math.inf:
        fail(f"--ft-min-replicas {args.ft_min_replicas} must be >= 1 and --ft-timeout-seconds "
             f"{args.ft_timeout_seconds} positive")
    if args.calculate_per_token_loss:
        fail("--fault-tolerant-dp does not support --calculate-per-token-loss (the token count would have to cross "
             "replicas too): drop one of them")
    if args.data_parallel_size != 1:
        model_parallel = args.tensor_model_parallel_size * args.pipeline_model_parallel_size
        fail(f"--fault-tolerant-dp: each replica is one TP x PP group, but this one has DP {args.data_parallel_size}: "
             f"start TP x PP = {model_parallel} ranks per replica (torchrun --nproc_per_node), one torchrun each")


def _validate_local_checkpoint_args(args, fail) -> None:
    interval, directory = args.local_checkpoint_interval, args.local_checkpoint_dir
    if (interval is None) != (directory is None):
        fail("--local-checkpoint-interval and --local-checkpoint-dir go together: give both (or neither)")
    if interval is None or directory is None:
        return
    if interval < 1:
        fail(f"--local-checkpoint-interval {interval} must be positive")
    for flag, other in (("--save", args.save), ("--load", args.load)):
        if other and os.path.abspath(other) == os.path.abspath(directory):
            fail(f"--local-checkpoint-dir {directory} is also {flag}: give the local checkpoints a folder of their own "
                 "(on each node's local disk)")



# Megatron's --attention-backend names -> the two attention paths here.
ATTENTION_BACKENDS = {"auto": "sdpa", "flash": "sdpa", "fused": "sdpa", "sdpa": "sdpa",
                      "unfused": "explicit", "local": "explicit", "explicit": "explicit"}


def _resolve_megatron_spellings(args, world_size: int, warnings: list, fail) -> None:
    """Megatron's other names and fallbacks for what is implemented here, resolved once."""
    if distributed_backend(args) != args.distributed_backend:
        warnings.append("--distributed-backend nccl: no GPU is visible, using gloo on the CPU instead")
    if args.recompute_method is not None or args.recompute_num_layers is not None:
        if args.recompute_granularity != "full":
            warnings.append("--recompute-method / --recompute-num-layers without --recompute-granularity full: "
                            "nothing is recomputed (as in Megatron)")
        elif (args.recompute_method, args.recompute_num_layers) not in (("uniform", 1), ("uniform", None), (None, 1)):
            warnings.append(f"--recompute-method {args.recompute_method} --recompute-num-layers "
                            f"{args.recompute_num_layers}: each layer is recomputed on its own here (uniform, 1); "
                            "only the memory/time trade-off differs, the results are the same")
    if args.ckpt_format == "fsdp_dtensor":
        fail("--ckpt-format fsdp_dtensor: the FSDP DTensor format is not built: use torch_dist")
    elif args.ckpt_format == "torch" and args.save:
        warnings.append("--ckpt-format torch: the legacy per-rank format is not written; --save writes megatronish's "
                        "distributed format (it reshards to any TP/PP); --ckpt-format torch_dist writes Megatron's layout")
    if args.no_position_embedding and args.position_embedding_type != "rope":
        fail(f"--no-position-embedding with --position-embedding-type {args.position_embedding_type}: Megatron "
             "refuses this combination; use --position-embedding-type none for no positions")
    virtual = args.num_virtual_stages_per_pipeline_rank
    if virtual is not None:
        if args.virtual_pipeline_model_parallel_size not in (None, virtual):
            fail(f"--num-virtual-stages-per-pipeline-rank {virtual} and --virtual-pipeline-model-parallel-size "
                 f"{args.virtual_pipeline_model_parallel_size} disagree: give one")
        args.virtual_pipeline_model_parallel_size = virtual


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


def _check_training_split(args, prefixes: list[str], fail) -> None:
    sequences = {prefix: len(IndexedDataset(prefix)) for prefix in prefixes if dataset_exists(prefix)}
    train_share = split_matrix(parse_and_normalize_split(args.split))[0]
    train_ranges = [sequence_range(train_share, n) if train_share else (0, 0) for n in sequences.values()]
    if sequences and not args.skip_train and all(start == stop for start, stop in train_ranges):
        counts = ", ".join(f"{prefix}: {n} sequences" for prefix, n in sequences.items())
        fail(f"--split {args.split} leaves no training sequences ({counts}): give the training split a larger share")


DATA_PATH_FLAGS = ("data_path", "train_data_path", "valid_data_path", "test_data_path")


def _validate_data_args(args, fail) -> None:
    tokenizer_files = [f for f in ("vocab_file", "merge_file", "tokenizer_model") if getattr(args, f)]
    try:
        parse_and_normalize_split(args.split)
    except ValueError as error:
        fail(str(error))
    if args.demo:
        if args.tokenizer_type != "ByteTokenizer" or tokenizer_files:
            given = _flag(tokenizer_files[0]) if tokenizer_files else f"--tokenizer-type {args.tokenizer_type}"
            fail(f"--data-path is missing: {given} needs a dataset tokenized with it; give --data-path PREFIX "
                 "(from tools/preprocess_data.py), or drop the tokenizer flags to train the demo on the default corpus")
        return
    given = [dest for dest in DATA_PATH_FLAGS if getattr(args, dest)]
    if args.mock_data and given:
        fail(f"--mock-data and {_flag(given[0])} are both given: choose synthetic data or real data")
    if args.data_path and len(given) > 1:
        fail(f"--data-path and {_flag(given[1])} are both given: give --data-path (split by --split) or a path "
             "per split, not both")
    if not args.data_path and given and not args.train_data_path and not args.skip_train:
        fail("--valid-data-path/--test-data-path without --train-data-path: give the training data too")
    for dest in given:
        try:
            prefixes, _ = parse_data_path(getattr(args, dest))
        except ValueError as error:
            fail(str(error).replace("--data-path", _flag(dest)))
            continue
        for prefix in prefixes:
            if not dataset_exists(prefix):
                fail(f"{_flag(dest)} {prefix}: {prefix}.bin / {prefix}.idx not found; give the prefix without the "
                     "extension, as written by tools/preprocess_data.py")
        if dest == "data_path":
            _check_training_split(args, prefixes, fail)
    if args.tokenizer_type is None:
        fail("--tokenizer-type is required with --data-path (or give --vocab-file and --merge-file for GPT-2 BPE)")
    for dest in tokenizer_files:
        path = getattr(args, dest)
        if not os.path.exists(path):
            fail(f"{_flag(dest)} {path} does not exist: give the path of the tokenizer file")
    needs = {"GPT2BPETokenizer": ("vocab_file", "merge_file"), "SentencePieceTokenizer": ("tokenizer_model",),
             "GPTSentencePieceTokenizer": ("tokenizer_model",), "Llama2Tokenizer": ("tokenizer_model",),
             "HuggingFaceTokenizer": ("tokenizer_model",), "NullTokenizer": ("vocab_size",),
             "TikTokenizer": ("tokenizer_model",)}
    for dest in needs.get(args.tokenizer_type, ()):
        if not getattr(args, dest):
            fail(f"--tokenizer-type {args.tokenizer_type} needs {_flag(dest)}")


def _validate_tiktoken_args(args, warnings: list, fail) -> None:
    """TikTokenizer's options fit together (its vocabulary file is read when the tokenizer is built); elsewhere
    Megatron ignores --tiktoken-*, and --tokenizer-special-tokens would add tokens, which is not built here."""
    if args.tokenizer_type != "TikTokenizer":
        if args.tokenizer_special_tokens:
            fail(f"--tokenizer-special-tokens with --tokenizer-type {args.tokenizer_type}: adding special tokens is "
                 "built for TikTokenizer only; drop the flag, or add the tokens to the tokenizer's own files")
        warnings += [f"{_flag(dest)}: ignored, it configures --tokenizer-type TikTokenizer only"
                     for dest in ("tiktoken_pattern", "tiktoken_num_special_tokens") if getattr(args, dest) is not None]
        return
    try:
        import_tiktoken()  # a missing extra fails here, before any work
    except ImportError as error:
        fail(str(error))
    try:
        tiktoken_special_tokens(args.tiktoken_pattern, args.vocab_size, args.tiktoken_num_special_tokens,
                                args.tokenizer_special_tokens)
    except ValueError as error:
        fail(str(error))


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


def distributed_backend(args: argparse.Namespace) -> str | None:
    """--distributed-backend as it runs: nccl falls back to gloo where no GPU is visible (Megatron's scripts
    hard-code nccl; users debug them on CPU)."""
    if args.distributed_backend == "nccl" and not torch.cuda.is_available():
        return "gloo"
    return args.distributed_backend


def _derive_batch_schedule(args, fail) -> None:
    """--step-batch-size-schedule replaces --global-batch-size (Megatron refuses both): the largest batch."""
    if args.step_batch_size_schedule is None:
        return
    if args.global_batch_size is not None and not args.demo:
        fail("--step-batch-size-schedule and --global-batch-size are both given: the schedule sets the batch size "
             "(Megatron refuses both too); drop --global-batch-size")
    if args.rampup_batch_size:
        fail("--step-batch-size-schedule and --rampup-batch-size are both given: choose one")
    try:
        steps = parse_step_schedule(args.step_batch_size_schedule, args.seq_length)
    except ValueError as error:
        fail(str(error))
        return
    args.global_batch_size = steps[-1][1]


def batch_schedule(args: argparse.Namespace) -> BatchSchedule:
    """The run's global batch size over consumed samples (constant unless ramped or stepped)."""
    steps = parse_step_schedule(args.step_batch_size_schedule, args.seq_length) if args.step_batch_size_schedule \
        else None
    return BatchSchedule(args.global_batch_size, args.rampup_batch_size, steps)


def _derive_sample_based_training(args, fail) -> None:
    """Megatron's rules for --train-samples vs --train-iters; derives --train-iters from the samples, and
    checks every batch size of a ramp or step schedule against micro batch x DP."""
    if args.train_samples is None:
        if args.lr_decay_samples is not None or args.lr_warmup_samples:
            fail("--lr-decay-samples / --lr-warmup-samples need --train-samples (with --train-iters use "
                 "--lr-decay-iters / --lr-warmup-iters)")
        if args.rampup_batch_size:
            fail("--rampup-batch-size needs --train-samples: Megatron refuses a batch-size ramp-up with "
                 "--train-iters ('expected no batch-size rampup for iteration-based training')")
    else:
        if args.train_iters is not None and not getattr(args, "train_iters_from_samples", False):
            fail(f"--train-iters {args.train_iters} and --train-samples {args.train_samples} are both given: "
                 "give one")
        if args.lr_decay_iters is not None or args.lr_warmup_iters:
            fail("--lr-decay-iters / --lr-warmup-iters with --train-samples: use --lr-decay-samples / "
                 "--lr-warmup-samples (sample-based training)")
    if args.rampup_batch_size:
        start, increment, samples = args.rampup_batch_size
        if start < 1 or increment < 1 or samples < 0 or (args.global_batch_size - start) % increment \
                or start > args.global_batch_size:
            fail(f"--rampup-batch-size {start} {increment} {samples}: need 1 <= START <= --global-batch-size "
                 f"{args.global_batch_size}, INCREMENT > 0 dividing their difference, SAMPLES >= 0")
            return
    unit = args.micro_batch_size * args.data_parallel_size
    odd = sorted(b for b in batch_schedule(args).batches() if b % unit)
    if odd and (args.rampup_batch_size or args.step_batch_size_schedule):  # (a constant one is checked above)
        fail(f"the batch sizes {odd[:5]} of the ramp/schedule are not multiples of --micro-batch-size "
             f"{args.micro_batch_size} x data-parallel size {args.data_parallel_size}")
    elif args.train_samples is not None and args.train_iters is None:
        args.train_iters = batch_schedule(args).iterations_for(args.train_samples)
        args.train_iters_from_samples = True  # validating again (pretrain after main) keeps it


def lr_schedule_samples(args: argparse.Namespace) -> tuple[int, int]:
    """(warmup, warmup + decay) of the learning-rate schedule, in samples (what it counts, as Megatron's)."""
    if args.train_samples is None:
        return warmup_iters(args) * args.global_batch_size, args.lr_decay_iters * args.global_batch_size
    decay = args.lr_decay_samples or args.train_samples
    warmup = int(args.lr_warmup_fraction * decay) if args.lr_warmup_fraction is not None else args.lr_warmup_samples
    return warmup, decay


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
        rotary_percent=args.rotary_percent,
        num_query_groups=args.num_query_groups if args.group_query_attention else None,
        kv_channels=args.kv_channels,
        apply_layernorm_1p=args.apply_layernorm_1p,
        add_bias_linear=not args.disable_bias_linear,
        tie_word_embeddings=not args.untie_embeddings_and_output_weights,
        init_method_std=args.init_method_std,
        params_dtype=params_dtype(args),
        sequence_parallel=args.sequence_parallel,
        recompute_granularity=args.recompute_granularity,
        attention_backend=ATTENTION_BACKENDS[args.attention_backend],
        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
        num_layers_in_first_pipeline_stage=args.decoder_first_pipeline_num_layers,
        num_layers_in_last_pipeline_stage=args.decoder_last_pipeline_num_layers,
    )


def dry_run_world_size(args: argparse.Namespace) -> int:
    """The world a --dry-run checks: $WORLD_SIZE when set, else the smallest that holds one model (TP x PP)."""
    given = int(os.environ.get("WORLD_SIZE", 0))
    if given:
        return given
    return max(args.tensor_model_parallel_size or 1, 1) * max(args.pipeline_model_parallel_size or 1, 1)


def describe_configuration(args: argparse.Namespace, warnings: list[str]) -> str:
    """The resolved configuration of a validated command line, as --dry-run prints it (nothing is built)."""
    dp = args.data_parallel_size
    config = transformer_config_from_args(args, vocab_size=args.vocab_size or 1)
    if args.mock_data:
        data = f"--mock-data (synthetic), split {parse_and_normalize_split(args.split)}"
    elif args.demo:
        data = "the built-in demo corpus (no --data-path)"
    elif args.data_path:
        data = f"{' '.join(args.data_path)}, split {parse_and_normalize_split(args.split)}"
    else:
        data = f"train {args.train_data_path}, valid {args.valid_data_path}, test {args.test_data_path}"
    lines = [
        f"world: {args.tensor_model_parallel_size * args.pipeline_model_parallel_size * dp} ranks = TP "
        f"{args.tensor_model_parallel_size} x PP {args.pipeline_model_parallel_size} x DP {dp}"
        + (f" ({args.virtual_pipeline_model_parallel_size} virtual stages per rank)"
           if args.virtual_pipeline_model_parallel_size else "")
        + f"; sequence parallel {args.sequence_parallel}; backend {distributed_backend(args) or 'default'}",
        f"model: {config.num_layers} layers, hidden {config.hidden_size}, {config.num_attention_heads} heads, "
        f"ffn {config.ffn_hidden_size}, seq {args.seq_length}, positions {config.position_embedding_type}, "
        f"{config.normalization}, {config.activation}, dtype {config.params_dtype}, attention {config.attention_backend}",
        f"batches: global {args.global_batch_size} = micro {args.micro_batch_size} x DP {dp} x "
        f"{args.global_batch_size // (args.micro_batch_size * dp)} micro-batches; eval global "
        f"{args.eval_global_batch_size}",
        f"training: {args.train_iters} iterations"
        + (f" ({args.train_samples} samples)" if args.train_samples else "")
        + f", lr {args.lr} -> {args.min_lr} ({args.lr_decay_style}, warmup {lr_schedule_samples(args)[0]} of "
        f"{lr_schedule_samples(args)[1]} samples), weight decay {args.weight_decay}, clip {args.clip_grad}, "
        f"seed {args.seed}",
        f"data: {data}; tokenizer {args.tokenizer_type}",
        f"checkpoints: save {args.save or '-'} every {args.save_interval}, load {args.load or '-'}",
    ]
    lines += [f"WARNING: {line}" for line in warnings]
    return "\n".join(f"> {line}" if not line.startswith("WARNING") else line for line in lines)
