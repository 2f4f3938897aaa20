"""Megatron-format training and validation log lines, model FLOPs, TensorBoard and W&B.

Model FLOPs per iteration (what "throughput per GPU" divides by time and GPU count):
matrix multiplies only, 2 FLOPs per multiply-add, with B = global batch, s = sequence,
L = layers, h = hidden, f = MLP hidden, V = padded vocabulary. Per token, forward:
    attention projections  2 * 4 h^2        (QKV 3h^2, output h^2; with query width q = heads x head dim and
                                             key/value width k = groups x head dim: 2 (h (q + 2k) + q h))
    attention scores       2 * 2 s h        (Q K^T and P V, counted as full (non-causal), as Megatron does; s q)
    MLP                    2 * 2 h f        (GeLU: h->f->h)   or 2 * 3 h f (SwiGLU: gate and up h->f, f->h)
    logits                 2 h V            (once, not per layer)
Backward costs twice the forward; full activation recompute adds one more forward of the layers:
    FLOPs = B s * (passes * L * (8 h^2 + 4 s h + mlp) + 3 * 2 h V),   passes = 3, or 4 with recompute
For GPT-2 shapes (f = 4h, GeLU, no recompute) this is Megatron's 72 B s L h^2 (1 + s/(6h) + V/(12 L h)).
"""

import math
import resource

import torch

from megatronish.training.utils import is_last_rank, print_rank_last


def num_floating_point_operations(args, padded_vocab_size: int) -> float:
    layers, output_layer = flops_per_token(args, padded_vocab_size)
    return float(args.global_batch_size * args.seq_length * (layers + output_layer))


def flops_per_token(args, padded_vocab_size: int) -> tuple[float, float]:
    """(all transformer layers, the output layer): FLOPs per token of one training iteration, as above."""
    h, s, L, f = args.hidden_size, args.seq_length, args.num_layers, args.ffn_hidden_size
    head_dim = args.kv_channels or h // args.num_attention_heads
    q = args.num_attention_heads * head_dim  # query (and attention output) width; h without --kv-channels
    kv = (args.num_query_groups if args.group_query_attention else args.num_attention_heads) * head_dim
    attention = 2 * (h * (q + 2 * kv) + q * h) + 2 * 2 * s * q
    mlp = 2 * (3 if args.swiglu else 2) * h * f
    passes = 4 if args.recompute_granularity == "full" else 3
    return float(passes * L * (attention + mlp)), float(3 * 2 * h * padded_vocab_size)


def training_log_line(*, iteration, train_iters, consumed_samples, ms_per_iteration, tflops_per_gpu, learning_rate,
                      global_batch_size, lm_loss, loss_scale, grad_norm, skipped, nan, tokens_per_second,
                      num_zeros=None, params_norm=None) -> str:
    line = (f" iteration {iteration:8d}/{train_iters:8d} |"
            f" consumed samples: {consumed_samples:12d} |"
            f" elapsed time per iteration (ms): {ms_per_iteration:.1f} |"
            f" throughput per GPU (TFLOP/s/GPU): {tflops_per_gpu:.{1 if tflops_per_gpu >= 1 else 4}f} |"
            f" learning rate: {learning_rate:.6E} |"
            f" global batch size: {global_batch_size:5d} |")
    if lm_loss is not None:
        line += f" lm loss: {lm_loss:.6E} |"
    line += f" loss scale: {loss_scale:.1f} |"
    if grad_norm is not None:
        line += f" grad norm: {grad_norm:.3f} |"
    if num_zeros is not None:
        line += f" num zeros: {num_zeros} |"
    if params_norm is not None:
        line += f" params norm: {params_norm:.3f} |"
    line += (f" number of skipped iterations: {skipped:3d} |"
             f" number of nan iterations: {nan:3d} |"
             f" tokens per second: {tokens_per_second:.1f} |")
    return line


def validation_log_lines(label: str, loss: float) -> str:
    """Megatron's block: a dashed line, ' validation loss at <label> | lm loss value: ... | lm loss PPL: ... |'."""
    ppl = math.exp(min(20.0, loss))
    text = f" validation loss at {label} | lm loss value: {loss:.6E} | lm loss PPL: {ppl:.6E} | "
    dashes = "-" * len(text)
    return f"{dashes}\n{text}\n{dashes}"


def memory_scalars() -> dict:
    """--log-memory-to-tensorboard: the CUDA allocator's bytes (Megatron's names), or on CPU the process's peak
    resident memory."""
    if torch.cuda.is_available():
        return {"mem-allocated-bytes": torch.cuda.memory_allocated(),
                "mem-max-allocated-bytes": torch.cuda.max_memory_allocated(),
                "mem-reserved-bytes": torch.cuda.memory_reserved()}
    return {"mem-max-rss-bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


class MetricWriters:
    """TensorBoard (--tensorboard-dir) and Weights & Biases (--wandb-project), on the last rank only.

    Both are optional: a missing package gives one warning and the run goes on without it.
    """

    def __init__(self, args):
        self.tensorboard = self.wandb = None
        if not is_last_rank():
            return
        if args.tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tensorboard = SummaryWriter(log_dir=args.tensorboard_dir, max_queue=1000)
            except ImportError:
                print_rank_last("WARNING: --tensorboard-dir given but the tensorboard package is not installed "
                                "(pip install tensorboard): not writing TensorBoard scalars")
        if args.wandb_project:
            try:
                import wandb
                self.wandb = wandb
                wandb.init(project=args.wandb_project, name=args.wandb_exp_name, entity=args.wandb_entity,
                           dir=args.wandb_save_dir or args.tensorboard_dir or args.save, config=vars(args))
            except ImportError:
                print_rank_last("WARNING: --wandb-project given but the wandb package is not installed "
                                "(pip install wandb): not logging to Weights & Biases")

    def scalars(self, values: dict, step: int) -> None:
        if self.tensorboard is not None:
            for key, value in values.items():
                self.tensorboard.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
