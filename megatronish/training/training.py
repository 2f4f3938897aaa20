"""The pretraining loop: everything is built in `pretrain`, in this order, in one place.

    arguments checked -> distributed + TP/DP groups + seeds -> tokenizer -> model -> DDP wrapper
    -> optimizer -> LR schedule -> checkpoint (--load) -> datasets and loaders -> train
    (log, evaluate, save) -> final evaluation -> save -> a generated sample

One iteration consumes a global batch: each DP rank runs global_batch / (micro_batch x DP)
micro-batches (forward, backward, gradients accumulated in fp32), then the gradients are
averaged over DP, the optimizer steps and the LR schedule advances by the global batch (in
samples). TP ranks of one DP group read the same micro-batches (same DP rank in the loader).
"""

import argparse
import contextlib
import math
import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatronish import ops, parallel_state
from megatronish.data.default_corpus import default_corpus_prefix
from megatronish.data.gpt_dataset import build_gpt_datasets
from megatronish.data.samplers import build_pretraining_data_loader
from megatronish.data.tokenizers import build_tokenizer
from megatronish.inference import Request, SamplingParams, generate, without_sequence_parallel
from megatronish.model import GPTModel
from megatronish.optimizer import (
    DistributedDataParallel,
    OptimizerConfig,
    OptimizerParamScheduler,
    get_megatron_optimizer,
)
from megatronish.tensor_parallel import model_parallel_manual_seed
from megatronish.training.arguments import transformer_config_from_args, validate_args, warmup_iters
from megatronish.training.checkpointing import load_checkpoint, save_checkpoint, wait_for_async_save
from megatronish.training.collective_errors import named_collective
from megatronish.training.preemption import ExitConditions
from megatronish.training.progress import TrainingProgress
from megatronish.training.training_log import (
    MetricWriters,
    num_floating_point_operations,
    training_log_line,
    validation_log_lines,
)
from megatronish.training.utils import prepare_process_for_training_loop, print_rank_0, print_rank_last


@dataclass
class TrainingResult:
    """What a run returns (tests compare these across layouts); every rank returns the same numbers."""
    losses: list[float] = field(default_factory=list)        # lm loss of each iteration run, averaged over DP
    grad_norms: list[float | None] = field(default_factory=list)  # before clipping; None for skipped steps
    learning_rates: list[float] = field(default_factory=list)
    validation_losses: dict[int, float] = field(default_factory=dict)  # iteration -> loss
    final_valid_loss: float | None = None
    final_test_loss: float | None = None
    progress: TrainingProgress | None = None
    sample: str | None = None


def pretrain(args: argparse.Namespace) -> TrainingResult:
    """Train a GPT as the (already parsed) arguments say. Call in every rank (torchrun)."""
    validate_args(args, int(os.environ.get("WORLD_SIZE", 1)))  # before anything is built
    parallel_state.initialize_distributed(args.distributed_backend, args.distributed_timeout_minutes)
    parallel_state.initialize_model_parallel(args.tensor_model_parallel_size)
    print_rank_0(f"> ops: {ops.initialize_kernels()}")  # every rank agrees on the op path before the first op
    model_parallel_manual_seed(args.seed)
    device = parallel_state.get_device()
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    num_microbatches = args.global_batch_size // (args.micro_batch_size * dp)

    tokenizer = build_tokenizer(args.tokenizer_type, args.vocab_file, args.merge_file, args.tokenizer_model)
    config = transformer_config_from_args(args, tokenizer.vocab_size)
    model = GPTModel(config, seed=args.seed)
    ddp_model = DistributedDataParallel(model, use_distributed_optimizer=args.use_distributed_optimizer,
                                        overlap_grad_reduce=args.overlap_grad_reduce)
    optimizer = get_megatron_optimizer(
        ddp_model,
        OptimizerConfig(lr=args.lr, weight_decay=args.weight_decay, adam_beta1=args.adam_beta1,
                        adam_beta2=args.adam_beta2, adam_eps=args.adam_eps, clip_grad=args.clip_grad),
        fp16=args.fp16, loss_scale=args.loss_scale, initial_loss_scale=args.initial_loss_scale,
        min_loss_scale=args.min_loss_scale, loss_scale_window=args.loss_scale_window, hysteresis=args.hysteresis)
    scheduler = OptimizerParamScheduler(
        optimizer, max_lr=args.lr, min_lr=args.min_lr, init_lr=args.lr_warmup_init,
        lr_warmup_steps=warmup_iters(args) * args.global_batch_size,
        lr_decay_steps=args.lr_decay_iters * args.global_batch_size, lr_decay_style=args.lr_decay_style)
    _print_setup(args, config, model, num_microbatches, dp)

    progress = TrainingProgress()
    if args.load:
        loaded = load_checkpoint(args.load, model, optimizer, scheduler, load_optim=not args.no_load_optim,
                                 load_rng=not args.no_load_rng, finetune=args.finetune)
        progress = loaded or progress

    train_data, valid_data, test_data = build_datasets(args, tokenizer.eod)
    loader_args = dict(micro_batch_size=args.micro_batch_size, data_parallel_rank=dp_rank, data_parallel_size=dp,
                       num_workers=args.num_workers)
    train_iter = None  # a run restarted after its last iteration has no training data left to read
    if progress.iteration < args.train_iters and not args.skip_train:
        train_iter = _iterate(build_pretraining_data_loader(train_data, progress.consumed_train_samples, **loader_args))
    valid_iter = _iterate(build_pretraining_data_loader(valid_data, progress.consumed_valid_samples, **loader_args))

    result = TrainingResult()
    writers = MetricWriters(args)
    flops_per_iteration = num_floating_point_operations(args, model.padded_vocab_size)
    interval = _LogInterval()
    saved_at = progress.iteration if args.load and progress.iteration else None  # resumed: that one is on disk
    exit_conditions = ExitConditions(args.exit_interval, args.exit_duration_in_mins)  # SIGTERM/SIGUSR1 from here on
    exit_reason = None
    ddp_model.train()
    prepare_process_for_training_loop()
    while progress.iteration < args.train_iters and not args.skip_train:
        batches = [_to_device(next(train_iter), device) for _ in range(num_microbatches)]
        with named_collective(f"at iteration {progress.iteration + 1}"):
            loss, update_successful, grad_norm = train_step(batches, ddp_model, optimizer)
        if update_successful:
            scheduler.step(args.global_batch_size)
        progress.iteration += 1
        progress.consumed_train_samples += args.global_batch_size
        is_nan = not math.isfinite(loss)
        progress.skipped_iterations += not update_successful
        progress.nan_iterations += is_nan
        lr = optimizer.param_groups[0]["lr"]
        result.losses.append(loss)
        result.grad_norms.append(grad_norm)
        result.learning_rates.append(lr)
        interval.add(loss, not update_successful, is_nan)

        if progress.iteration % args.log_interval == 0:
            _log_training(args, progress, interval, lr, optimizer, grad_norm, flops_per_iteration, writers)
            interval = _LogInterval()
        pause_start = time.perf_counter()  # evaluation and saving do not count as iteration time
        if args.eval_iters and valid_iter and progress.iteration % args.eval_interval == 0:
            valid_loss = evaluate(valid_iter, ddp_model, args, num_microbatches, device, progress)
            result.validation_losses[progress.iteration] = valid_loss
            print_rank_last(validation_log_lines(f"iteration {progress.iteration}", valid_loss))
            writers.scalars({"lm-loss-validation/lm loss": valid_loss}, progress.iteration)
        with named_collective(f"the agreement on stopping after iteration {progress.iteration}"):
            exit_reason = exit_conditions.check(progress.iteration)
        if args.save and (exit_reason or (args.save_interval and progress.iteration % args.save_interval == 0)):
            save_checkpoint(args.save, progress, model, optimizer, scheduler, args, keep_last=args.keep_last,
                            async_save=args.async_save)
            saved_at = progress.iteration
        interval.start += time.perf_counter() - pause_start
        if exit_reason:
            print_rank_0(f"exiting after iteration {progress.iteration}: {exit_reason}"
                         + ("" if args.save else " (no --save: nothing saved)"))
            break
    exit_conditions.close()

    if args.save and saved_at != progress.iteration:
        save_checkpoint(args.save, progress, model, optimizer, scheduler, args, keep_last=args.keep_last,
                        async_save=args.async_save)
    wait_for_async_save()
    if exit_reason:  # preempted or told to stop: leave now, the rest of the grace period is not ours
        writers.close()
        result.progress = progress
        return result
    if args.eval_iters:
        for name, data in (("validation", valid_data), ("test", test_data)):
            if data is None:
                continue
            loader = build_pretraining_data_loader(data, 0, **loader_args)
            loss = evaluate(_iterate(loader), ddp_model, args, num_microbatches, device)
            print_rank_last(validation_log_lines(f"the end of training for {name} data", loss))
            setattr(result, "final_valid_loss" if name == "validation" else "final_test_loss", loss)
    if args.sample_tokens:
        result.sample = generate_sample(model, tokenizer, args)
    writers.close()
    result.progress = progress
    return result


def build_datasets(args, eod_id: int):
    """Train/valid/test datasets sized for the whole run (the default corpus when no --data-path)."""
    data_path = args.data_path or [default_corpus_prefix()]
    evaluations = args.train_iters // args.eval_interval + 1
    num_samples = (args.train_iters * args.global_batch_size,
                   evaluations * args.eval_iters * args.global_batch_size,
                   args.eval_iters * args.global_batch_size)
    return build_gpt_datasets(data_path, args.split, args.seq_length, args.seed, num_samples, eod_id,
                              eod_mask_loss=args.eod_mask_loss, cache_dir=args.data_cache_path)


def micro_batch_loss(model, batch: dict) -> torch.Tensor:
    """Mean of the per-token losses over the tokens the loss mask keeps."""
    losses = model(batch["tokens"], labels=batch["labels"])  # positions are 0..s-1 (no --reset-position-ids)
    mask = batch["loss_mask"]
    return (losses * mask).sum() / mask.sum().clamp(min=1.0)


def train_step(batches: list[dict], model: DistributedDataParallel, optimizer):
    """Forward and backward over the micro-batches, reduce gradients, step. Returns (loss, stepped, grad norm)."""
    optimizer.zero_grad()
    losses = []
    with named_collective("the tensor-parallel collectives of forward/backward"):
        for i, batch in enumerate(batches):
            # Gradients only accumulate until the last micro-batch, whose backward may start the DP reduction.
            with model.no_sync() if i < len(batches) - 1 else contextlib.nullcontext():
                loss = micro_batch_loss(model, batch)
                losses.append(loss.detach())
                (loss / len(batches) * optimizer.get_loss_scale().to(loss.device)).backward()
    with named_collective("the all-reduce of gradients over data-parallel ranks"):
        model.finish_grad_sync()
    with named_collective("the optimizer step (gradient-norm all-reduce, parameter all-gather)"):
        update_successful, grad_norm = optimizer.step()
    with named_collective("the all-reduce of the loss over data-parallel ranks"):
        return _average_over_dp(torch.stack(losses).mean()), update_successful, grad_norm


@torch.no_grad()
def evaluate(data_iter, model, args, num_microbatches: int, device, progress: TrainingProgress | None = None) -> float:
    """Mean lm loss over --eval-iters global batches."""
    model.eval()
    losses = []
    for _ in range(args.eval_iters):
        for _ in range(num_microbatches):
            losses.append(micro_batch_loss(model, _to_device(next(data_iter), device)))
        if progress is not None:
            progress.consumed_valid_samples += args.global_batch_size
    model.train()
    return _average_over_dp(torch.stack(losses).mean())


def generate_sample(model: GPTModel, tokenizer, args) -> str:
    """Continue --sample-prompt by --sample-tokens tokens (temperature 0.8, top 40; at most what the
    model's positions leave after the prompt) and print it."""
    prompt = tokenizer.tokenize(args.sample_prompt) or [tokenizer.eod]
    count = max(0, min(args.sample_tokens, model.config.max_position_embeddings - len(prompt)))
    request = Request(prompt, count, SamplingParams(temperature=0.8, top_k=40), seed=args.seed)
    tokens = generate(without_sequence_parallel(model), [request]).completions[0].tokens
    text = tokenizer.detokenize(prompt + tokens)
    print_rank_0(f"generated sample ({len(tokens)} tokens after the prompt {args.sample_prompt!r}):\n"
                 f"{'-' * 60}\n{text}\n{'-' * 60}")
    return text


class _LogInterval:
    """Sums since the last log line."""

    def __init__(self):
        self.start = time.perf_counter()
        self.iterations = self.skipped = self.nan = 0
        self.loss_sum, self.loss_count = 0.0, 0

    def add(self, loss: float, skipped: bool, is_nan: bool) -> None:
        self.iterations += 1
        self.skipped += skipped
        self.nan += is_nan
        if not skipped and not is_nan:
            self.loss_sum += loss
            self.loss_count += 1


def _log_training(args, progress, interval, lr, optimizer, grad_norm, flops_per_iteration, writers) -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - interval.start) / interval.iterations
    world = dist.get_world_size()
    lm_loss = interval.loss_sum / interval.loss_count if interval.loss_count else None
    tokens_per_second = args.global_batch_size * args.seq_length / seconds
    loss_scale = optimizer.get_loss_scale().item()
    print_rank_last(training_log_line(
        iteration=progress.iteration, train_iters=args.train_iters, consumed_samples=progress.consumed_train_samples,
        ms_per_iteration=seconds * 1000.0, tflops_per_gpu=flops_per_iteration / seconds / world / 1e12,
        learning_rate=lr, global_batch_size=args.global_batch_size, lm_loss=lm_loss, loss_scale=loss_scale,
        grad_norm=grad_norm, skipped=interval.skipped, nan=interval.nan, tokens_per_second=tokens_per_second))
    scalars = {"learning-rate": lr, "loss-scale": loss_scale, "iteration-time": seconds,
               "tokens-per-second": tokens_per_second}
    if lm_loss is not None:
        scalars["lm loss"] = lm_loss
    if grad_norm is not None:
        scalars["grad-norm"] = grad_norm
    writers.scalars(scalars, progress.iteration)


def _print_setup(args, config, model, num_microbatches: int, dp: int) -> None:
    numel = sum(p.numel() for p in model.parameters())
    total = torch.tensor([numel], dtype=torch.long, device=parallel_state.get_device())
    dist.all_reduce(total, group=parallel_state.get_tensor_model_parallel_group())
    if args.demo:
        print_rank_0("no --data-path: training the built-in demo (a small GPT on the embedded default corpus of "
                     "Python standard-library sources, byte tokens); flags given explicitly override its defaults")
    print_rank_0(f"> GPT: {config.num_layers} layers, hidden {config.hidden_size}, {config.num_attention_heads} heads, "
                 f"ffn {config.ffn_hidden_size}, seq {args.seq_length}, vocab {config.vocab_size} (padded "
                 f"{model.padded_vocab_size}), {total.item():,} parameters, dtype {config.params_dtype}")
    print_rank_0(f"> parallelism: TP {args.tensor_model_parallel_size} x DP {dp}; global batch "
                 f"{args.global_batch_size} = micro-batch {args.micro_batch_size} x DP {dp} x {num_microbatches} "
                 f"accumulation steps; distributed optimizer: {args.use_distributed_optimizer}")
    if args.save:
        print_rank_0(f"> checkpoints go to {os.path.abspath(args.save)} (every {args.save_interval} iterations "
                     "and at the end)")


def _average_over_dp(value: torch.Tensor) -> float:
    value = value.detach().float().clone()
    parallel_state.all_reduce_in_group(value, parallel_state.get_data_parallel_group())
    return value.item() / parallel_state.get_data_parallel_world_size()


def _to_device(batch: dict, device) -> dict:
    return {key: tensor.to(device, non_blocking=True) for key, tensor in batch.items()}


def _iterate(loader):
    if loader is None:
        return None
    # Starting a DataLoader iterator draws a worker seed from the global torch generator; keep the
    # global stream untouched so that a resumed run (its RNG restored before the loaders are built)
    # draws exactly the dropout masks the uninterrupted run drew.
    with torch.random.fork_rng(devices=[]):
        return iter(loader)
