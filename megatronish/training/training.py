"""Pretraining in three parts: `setup` builds everything, `train` runs the loop, `finish` evaluates and saves.

    setup:  arguments checked -> distributed + layout (TP x PP x DP) + seeds -> tokenizer -> model chunks
            -> DDP wrappers -> optimizer -> LR schedule -> checkpoint (--load) -> datasets and loaders
    train:  one step (train_step), then the once-in-a-while work: log, evaluate, agree on stopping, save
    finish: final save, final evaluation, a generated sample

One iteration consumes a global batch: each DP rank runs global_batch / (micro_batch x DP)
micro-batches through `train_step`, which hands them to the forward-backward schedule of the
layout (megatronish.pipeline_parallel: no pipelining, 1F1B or interleaved 1F1B; the loop does not
know which), then averages the gradients over DP, steps the optimizer and advances the LR
schedule by the global batch (in samples). All ranks of one DP replica (its TP and PP ranks) read
the same micro-batches.
"""

import argparse
import functools
import gc
import math
import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatronish import ops, parallel_state
from megatronish.data.default_corpus import default_corpus_prefix
from megatronish.data.gpt_dataset import GPTDatasetConfig, build_gpt_datasets, parse_data_path
from megatronish.data.samplers import build_pretraining_data_loader
from megatronish.data.token_range import check_token_ids
from megatronish.data.tokenizers import tokenizer_from_args
from megatronish.inference import Request, SamplingParams, generate, without_sequence_parallel
from megatronish.model import GPTModel, TransformerConfig
from megatronish.optimizer import (
    DistributedDataParallel,
    OptimizerConfig,
    OptimizerParamScheduler,
    get_megatron_optimizer,
)
from megatronish.parallel_layout import ParallelLayout
from megatronish.pipeline_parallel import get_forward_backward_func
from megatronish.tensor_parallel import model_parallel_manual_seed
from megatronish.training.arguments import (
    ATTENTION_BACKENDS,
    batch_schedule,
    distributed_backend,
    lr_schedule_samples,
    transformer_config_from_args,
    validate_args,
)
from megatronish.training.batch_schedule import BatchSchedule
from megatronish.training.checkpointing import raise_if_async_save_failed, save_checkpoint, wait_for_async_save
from megatronish.training.collective_errors import named_collective
from megatronish.training.elastic import RestartReport, resolve_layout_or_wait
from megatronish.training.fault_tolerance import FaultTolerantReplicas
from megatronish.training.local_checkpoint import LocalCheckpoints, resume
from megatronish.training.memory_report import MeasuredMemory, MemoryMonitor
from megatronish.training.nonfinite import NonFiniteGuard, parameters_are_finite
from megatronish.training.preemption import ExitConditions
from megatronish.training.profiling import StepProfiler
from megatronish.training.progress import TrainingProgress
from megatronish.training.save_lock import claim_save_folder
from megatronish.training.training_log import (
    MetricWriters,
    memory_scalars,
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
    exit_reason: str | None = None           # why the loop stopped early (None: it ran to --train-iters)
    stopped_by_peers: bool = False           # ... and only because other ranks got a stop signal or lost their agent
    sample: str | None = None
    memory: MeasuredMemory | None = None  # this rank's, measured over the first log interval


@dataclass
class TrainingRun:
    """Everything `setup` builds for the loop, in one place."""
    args: argparse.Namespace
    layout: ParallelLayout
    tokenizer: object
    config: TransformerConfig
    model: list[GPTModel]                   # this rank's model chunks (one, or v with virtual pipeline stages)
    ddp_model: list[DistributedDataParallel]
    optimizer: object
    scheduler: OptimizerParamScheduler
    progress: TrainingProgress
    datasets: tuple                         # train, valid, test (None where empty)
    num_microbatches: int                   # per iteration at the full global batch size
    batch_schedule: BatchSchedule           # the global batch size over consumed samples (ramps, steps)
    writers: MetricWriters
    device: torch.device
    loaded: bool                            # resumed from a durable checkpoint (--load) at progress.iteration
    local: LocalCheckpoints | None          # --local-checkpoint-interval
    replicas: FaultTolerantReplicas | None  # --fault-tolerant-dp
    report: RestartReport                   # logs what an elastic restart cost, after its first step
    saved_at: int | None = None             # the iteration of the newest checkpoint on disk from this run
    finite: bool = True                     # the newest iteration's loss and gradients were finite (may be saved)


def pretrain(args: argparse.Namespace) -> TrainingResult:
    """Train a GPT as the (already parsed) arguments say. Call in every rank (torchrun)."""
    run = setup(args)
    result = TrainingResult()
    exit_reason = train(run, result)
    return finish(run, result, exit_reason)


def setup(args: argparse.Namespace) -> TrainingRun:
    """Check the arguments, then build the layout, model, optimizer, schedule and data, and resume from the
    newest checkpoint (--load, or a local one)."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    resolve_layout_or_wait(args, world_size)  # elastic: the layout for this world (--layout auto: the planner's)
    warnings = validate_args(args, world_size)  # before anything is built
    for line in warnings:
        print_rank_0(f"WARNING: {line}")
    if args.deterministic_mode:
        torch.use_deterministic_algorithms(True)
    parallel_state.initialize_distributed(distributed_backend(args), args.distributed_timeout_minutes)
    report = RestartReport()
    layout = parallel_state.initialize_model_parallel(args.tensor_model_parallel_size,
                                                      args.pipeline_model_parallel_size,
                                                      args.virtual_pipeline_model_parallel_size)
    print_rank_0(f"> ops: {ops.initialize_kernels()}")  # every rank agrees on the op path before the first op
    model_parallel_manual_seed(args.seed, layout)
    num_microbatches = args.global_batch_size // (args.micro_batch_size * layout.dp)

    tokenizer = tokenizer_from_args(args)
    if args.data_path:  # ids past the vocabulary would train silently on the padding rows
        check_token_ids(parse_data_path(args.data_path)[0], tokenizer.vocab_size, args.tokenizer_type)
    config = transformer_config_from_args(args, tokenizer.vocab_size)
    model = [GPTModel(config, seed=args.seed, layout=layout, vp_stage=chunk)
             for chunk in range(layout.dims.num_model_chunks)]
    if args.torch_compile:
        for chunk in model:
            chunk.compile()  # in place: DDP, the optimizer and checkpoints see the same modules and names
    ddp_model = [DistributedDataParallel(chunk, use_distributed_optimizer=args.use_distributed_optimizer,
                                         overlap_grad_reduce=args.overlap_grad_reduce,
                                         overlap_param_gather=args.overlap_param_gather,
                                         grad_reduce_in_bf16=args.grad_reduce_in_bf16, layout=layout)
                 for chunk in model]
    optimizer, scheduler = build_optimizer(args, ddp_model)
    _print_setup(args, config, model, layout, num_microbatches)

    if args.save:
        claim_save_folder(args.save)  # one writer per folder
    local = (LocalCheckpoints(args.local_checkpoint_dir, args.local_checkpoint_interval)
             if args.local_checkpoint_interval else None)
    loaded = resume(local, args, model, optimizer, scheduler)
    report.resumed(loaded)
    progress = loaded.progress if loaded else TrainingProgress()
    replicas = FaultTolerantReplicas(args, optimizer, scheduler, progress) if args.fault_tolerant_dp else None
    return TrainingRun(args=args, layout=layout, tokenizer=tokenizer, config=config, model=model,
                       ddp_model=ddp_model, optimizer=optimizer, scheduler=scheduler, progress=progress,
                       datasets=build_datasets(args, tokenizer, progress), num_microbatches=num_microbatches,
                       batch_schedule=batch_schedule(args),
                       writers=MetricWriters(args), device=parallel_state.get_device(),
                       loaded=bool(loaded and progress.iteration and not loaded.node_local), local=local,
                       replicas=replicas, report=report)


def build_optimizer(args: argparse.Namespace, ddp_model, clip_grad: float | None = None):
    """(optimizer, LR schedule) as the arguments say, over DDP-wrapped model chunks. `clip_grad` overrides
    --clip-grad (a SWARM stage clips by the norm of the whole model, summed over stages, itself)."""
    optimizer = get_megatron_optimizer(
        ddp_model,
        OptimizerConfig(lr=args.lr, weight_decay=args.weight_decay, adam_beta1=args.adam_beta1,
                        adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
                        clip_grad=args.clip_grad if clip_grad is None else clip_grad,
                        decoupled_lr=args.decoupled_lr, decoupled_min_lr=args.decoupled_min_lr),
        fp16=args.fp16, loss_scale=args.loss_scale, initial_loss_scale=args.initial_loss_scale,
        min_loss_scale=args.min_loss_scale, loss_scale_window=args.loss_scale_window, hysteresis=args.hysteresis)
    warmup_samples, decay_samples = lr_schedule_samples(args)
    scheduler = OptimizerParamScheduler(
        optimizer, max_lr=args.lr, min_lr=args.min_lr, init_lr=args.lr_warmup_init, lr_warmup_steps=warmup_samples,
        lr_decay_steps=decay_samples, lr_decay_style=args.lr_decay_style,
        use_checkpoint_opt_param_scheduler=args.use_checkpoint_opt_param_scheduler)
    return optimizer, scheduler


def train(run: TrainingRun, result: TrainingResult) -> str | None:
    """The loop: a step, then logging, evaluation, the stop agreement and saving. Returns why it stopped early."""
    args, progress = run.args, run.progress
    train_data, valid_data, _ = run.datasets
    train_iter = None  # a run restarted after its last iteration has no training data left to read
    if progress.iteration < args.train_iters and not args.skip_train and not run.replicas:
        train_iter = _iterate(_loader(run, train_data, progress.consumed_train_samples))
    valid_iter = _iterate(_loader(run, valid_data, progress.consumed_valid_samples))
    flops_per_iteration = num_floating_point_operations(args, run.config.padded_vocab_size(run.layout.tp))
    interval = _LogInterval()
    run.saved_at = progress.iteration if run.loaded else None  # resumed: that one is on disk
    exit_conditions = ExitConditions(args.exit_interval, args.exit_duration_in_mins)  # SIGTERM/SIGUSR1 from here on
    exit_reason = None
    nan_guard = NonFiniteGuard(args.max_nan_iterations, args.fp16)
    for chunk in run.ddp_model:
        chunk.train()
    memory = MemoryMonitor(run.model, run.ddp_model, run.optimizer)
    prepare_process_for_training_loop()
    if args.manual_gc:
        gc.disable()
        gc.collect()
    profiler = StepProfiler(args, dist.get_rank())
    while progress.iteration < args.train_iters and not args.skip_train:
        run.report.step_starts()
        with named_collective(f"at iteration {progress.iteration + 1}"), memory.watch():
            if run.replicas:  # fault-tolerant DP: run the iteration until the live replicas commit it
                outcome = None
                while outcome is None:
                    batches = run.replicas.start_step(train_data, run.batch_schedule)
                    outcome = train_step([_to_device(batch, run.device) for batch in batches], run.ddp_model,
                                         run.optimizer, args.calculate_per_token_loss, interval.timers, run.replicas)
                loss, update_successful, grad_norm = outcome
                global_batch = run.replicas.global_batch
            else:
                global_batch = run.batch_schedule.global_batch(progress.consumed_train_samples)
                microbatches = global_batch // (args.micro_batch_size * run.layout.dp)
                batches = [_to_device(next(train_iter), run.device) for _ in range(microbatches)]
                loss, update_successful, grad_norm = train_step(batches, run.ddp_model, run.optimizer,
                                                                args.calculate_per_token_loss, interval.timers)
        _empty_unused_memory(args, 1)
        if update_successful:
            run.scheduler.step(global_batch)
        progress.iteration += 1
        progress.consumed_train_samples += global_batch
        raise_if_async_save_failed()
        is_nan = not math.isfinite(loss)
        progress.skipped_iterations += not update_successful
        progress.nan_iterations += is_nan
        lr = run.scheduler.get_lr()
        result.losses.append(loss)
        result.grad_norms.append(grad_norm)
        result.learning_rates.append(lr)
        interval.add(loss, not update_successful, is_nan, global_batch)
        run.report.step_done(progress.iteration, run.layout.describe())
        profiler.step(progress.iteration)

        if progress.iteration % args.log_interval == 0:
            _log_training(args, progress, interval, lr, run.optimizer, grad_norm, flops_per_iteration, run.writers)
            interval = _LogInterval()
            result.memory = memory.report(progress.iteration, run.layout)
        nan_guard.update(progress.iteration, loss, grad_norm)
        run.finite = nan_guard.healthy
        if nan_guard.exhausted:
            wait_for_async_save()  # a healthy checkpoint may still be on its way to disk
            raise nan_guard.error()
        pause_start = time.perf_counter()  # evaluation and saving do not count as iteration time
        _collect_garbage(args, progress.iteration)
        if args.eval_iters and valid_iter and progress.iteration % args.eval_interval == 0:
            _collect_garbage(args)
            valid_loss = evaluate(valid_iter, run.ddp_model, args, _eval_microbatches(run), run.device, progress)
            result.validation_losses[progress.iteration] = valid_loss
            print_rank_last(validation_log_lines(f"iteration {progress.iteration}", valid_loss))
            run.writers.scalars(_validation_scalars(args, valid_loss), progress.iteration)
        with named_collective(f"the agreement on stopping after iteration {progress.iteration}"):
            exit_reason = exit_conditions.check(progress.iteration)
        if run.local and (exit_reason or run.local.due(progress.iteration)):
            _save_local(run, wait=bool(exit_reason))
        if args.save and (exit_reason or (args.save_interval and progress.iteration % args.save_interval == 0)):
            _save(run)
        interval.start += time.perf_counter() - pause_start
        if exit_reason:
            saved = "" if args.save else " (a local checkpoint only)" if run.local else " (no --save: nothing saved)"
            print_rank_0(f"exiting after iteration {progress.iteration}: {exit_reason}{saved}")
            break
    exit_conditions.close()
    result.exit_reason, result.stopped_by_peers = exit_reason, bool(exit_reason) and exit_conditions.stopped_by_peers
    if result.losses:  # a run shorter than one log interval reports its memory at the end
        result.memory = memory.report(progress.iteration, run.layout)
    profiler.stop()
    if args.manual_gc:
        gc.enable()
    return exit_reason


def finish(run: TrainingRun, result: TrainingResult, exit_reason: str | None) -> TrainingResult:
    """Save what the loop has not saved yet; unless stopped early, evaluate on valid/test and print a sample."""
    args = run.args
    run.optimizer.finish_param_sync()  # no gather outlives the loop (the sample's model twin has no forward hooks)
    if args.save and run.saved_at != run.progress.iteration:
        _save(run)
    wait_for_async_save()
    if run.local:
        run.local.wait()
        if not exit_reason and run.saved_at == run.progress.iteration:
            run.local.clean_up()  # the run is over and its durable checkpoint holds everything
    if run.replicas:
        run.replicas.shutdown()
    result.progress = run.progress
    if exit_reason:  # preempted or told to stop: leave now, the rest of the grace period is not ours
        run.writers.close()
        return result
    if args.eval_iters:
        _, valid_data, test_data = run.datasets
        for name, data in (("validation", valid_data), ("test", test_data)):
            if data is None:
                continue
            loss = evaluate(_iterate(_loader(run, data, 0)), run.ddp_model, args, _eval_microbatches(run), run.device)
            print_rank_last(validation_log_lines(f"the end of training for {name} data", loss))
            setattr(result, "final_valid_loss" if name == "validation" else "final_test_loss", loss)
    if args.sample_tokens:
        if run.layout.pp == 1:
            result.sample = generate_sample(run.model[0], run.tokenizer, args)
        else:
            print_rank_0("no generated sample at pipeline size > 1: run tools/generate.py on the checkpoint")
    run.writers.close()
    return result


def _eval_microbatches(run: TrainingRun) -> int:
    return run.args.eval_global_batch_size // (run.args.micro_batch_size * run.layout.dp)


def _collect_garbage(args, iteration: int | None = None) -> None:
    """--manual-gc: every rank collects at the same iterations (automatic collection is off), so that no rank
    waits in a collective for another one's pause."""
    if args.manual_gc and (iteration is None or (args.manual_gc_interval and iteration % args.manual_gc_interval == 0)):
        gc.collect()


def _empty_unused_memory(args, level: int) -> None:
    """--empty-unused-memory-level: hand cached GPU memory back (1: after each step, 2: also after forward-backward)."""
    if args.empty_unused_memory_level >= level and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _healthy(run: TrainingRun) -> bool:
    """Whether this iteration may be saved: never replace a healthy checkpoint by a broken one. Collective."""
    run.optimizer.finish_param_sync()  # the weights are read here, before the forward hooks would wait
    if run.finite and parameters_are_finite(run.model):
        return True
    print_rank_0(f"not saving iteration {run.progress.iteration}: its loss, gradient norm or weights are not finite")
    return False


def _save_local(run: TrainingRun, wait: bool) -> None:
    """A local checkpoint of this iteration (in the background; `wait`: until it is on disk, before an exit)."""
    if _healthy(run):
        run.local.save(run.progress, run.model, run.optimizer, run.scheduler, run.args)
    if wait:
        run.local.wait()


def _save(run: TrainingRun) -> None:
    args = run.args
    if not _healthy(run):
        return
    save_checkpoint(args.save, run.progress, run.model, run.optimizer, run.scheduler, args,
                    keep_last=args.keep_last, async_save=args.async_save)
    run.saved_at = run.progress.iteration


def _loader(run: TrainingRun, dataset, consumed_samples: int):
    return build_pretraining_data_loader(dataset, consumed_samples, micro_batch_size=run.args.micro_batch_size,
                                         data_parallel_rank=run.layout.dp_rank, data_parallel_size=run.layout.dp,
                                         num_workers=run.args.num_workers)


def build_datasets(args, tokenizer, progress: TrainingProgress | None = None):
    """Train/valid/test datasets sized for the whole run, as Megatron sizes them (the default corpus when no
    --data-path). A resumed run's validation set also covers what it consumed before (under another
    --eval-interval)."""
    progress = progress or TrainingProgress()
    per_evaluation = args.eval_iters * args.eval_global_batch_size
    evaluations_left = (args.train_iters - progress.iteration) // args.eval_interval + 1
    num_samples = (args.train_samples or args.train_iters * args.global_batch_size,  # Megatron's sizes
                   max((args.train_iters // args.eval_interval + 1) * per_evaluation,
                       progress.consumed_valid_samples + evaluations_left * per_evaluation),
                   per_evaluation)
    config = GPTDatasetConfig(random_seed=args.seed, sequence_length=args.seq_length, split=args.split,
                              eod_id=tokenizer.eod, eod_mask_loss=args.eod_mask_loss, path_to_cache=args.data_cache_path,
                              mmap_bin_files=not args.no_mmap_bin_files,
                              mock_vocab_size=tokenizer.vocab_size if args.mock_data else None)
    if args.train_data_path or args.valid_data_path or args.test_data_path:
        per_split = (args.train_data_path, args.valid_data_path, args.test_data_path)
        return build_gpt_datasets(None, config, num_samples, data_path_per_split=per_split)
    return build_gpt_datasets(args.data_path or [default_corpus_prefix()], config, num_samples)


def forward_step(data_iterator, model, tokens_per_microbatch: float | None = None):
    """Megatron's forward-step contract: run the model on the next micro-batch, return (output, loss_func).

    Every stage calls the model with the tokens (stages after the first take their hidden states
    from the previous stage, set by the schedule); only the last stage's output is per-token losses.
    `tokens_per_microbatch` (--calculate-per-token-loss) is the global batch's loss-mask tokens / (micro-batches
    x DP): each micro-batch then contributes its loss sum over that, so that the schedule's mean over
    micro-batches and the DP average give the global batch's sum over its tokens.
    """
    batch = next(data_iterator)
    output = model(batch["tokens"], labels=batch["labels"])  # positions are 0..s-1 (no --reset-position-ids)
    if tokens_per_microbatch is not None:
        return output, functools.partial(token_weighted_loss, batch["loss_mask"], tokens_per_microbatch)
    return output, functools.partial(masked_mean_loss, batch["loss_mask"])


def masked_mean_loss(loss_mask: torch.Tensor, losses: torch.Tensor):
    """Mean of the per-token losses over the tokens the loss mask keeps; (loss, what to report)."""
    loss = (losses * loss_mask).sum() / loss_mask.sum().clamp(min=1.0)
    return loss, {"lm loss": loss.detach()}


def token_weighted_loss(loss_mask: torch.Tensor, tokens_per_microbatch: float, losses: torch.Tensor):
    """--calculate-per-token-loss: the micro-batch's loss sum over the step's mean tokens per micro-batch."""
    loss = (losses * loss_mask).sum() / tokens_per_microbatch
    return loss, {"lm loss": loss.detach()}


def _tokens_per_microbatch(batches: list[dict], layout: ParallelLayout) -> float:
    """The loss-mask tokens of the whole global batch (all micro-batches, all DP ranks) / (micro-batches x DP)."""
    tokens = torch.stack([b["loss_mask"].sum() for b in batches]).sum().double()
    parallel_state.all_reduce_in_group(tokens, layout.dp_group)
    return max(tokens.item(), 1.0) / (len(batches) * layout.dp)


def _as_chunks(model) -> list:
    return model if isinstance(model, list) else [model]


def _run_schedule(batches: list[dict], chunks: list, forward_only: bool, grad_scale_func=None,
                  per_token_loss: bool = False) -> list:
    layout = chunks[0].layout
    tokens = batches[0]["tokens"]
    iterators = [iter(batches) for _ in chunks] if len(chunks) > 1 else iter(batches)
    step = forward_step
    if per_token_loss:
        step = functools.partial(forward_step, tokens_per_microbatch=_tokens_per_microbatch(batches, layout))
    return get_forward_backward_func(layout)(
        forward_step_func=step, data_iterator=iterators, model=chunks, num_microbatches=len(batches),
        seq_length=tokens.size(1), micro_batch_size=tokens.size(0), forward_only=forward_only,
        grad_scale_func=grad_scale_func, layout=layout)


def train_step(batches: list[dict], model, optimizer, per_token_loss: bool = False, timers: dict | None = None,
               replicas=None):
    """Forward and backward over the micro-batches (the layout's schedule), reduce gradients, step.

    `model` is a DDP-wrapped model or the list of this stage's DDP-wrapped chunks. Returns (loss,
    stepped, grad norm), the loss averaged over the micro-batches and DP (over the global batch's tokens with
    `per_token_loss`), the same on every rank. `timers` (if given) gets the seconds of "forward-backward"
    (with the gradient reduction) and "optimizer" added. `replicas` (fault-tolerant DP, fault_tolerance.py)
    then sums gradients and loss over the live replicas; when it says the step failed, nothing is applied
    and the result is None.
    """
    chunks = _as_chunks(model)
    optimizer.zero_grad()
    start = time.perf_counter()
    reported = []
    if batches:  # a fault-tolerant replica has none in a step with more live replicas than micro-batches
        with named_collective("the tensor-parallel collectives and pipeline transfers of forward/backward"):
            reported = _run_schedule(batches, chunks, forward_only=False,
                                     grad_scale_func=lambda loss: optimizer.get_loss_scale().to(loss.device),
                                     per_token_loss=per_token_loss)
    with named_collective("the all-reduce of gradients over data-parallel ranks"):
        for chunk in chunks:
            chunk.finish_grad_sync()
    with named_collective("the all-reduce of the loss over data-parallel ranks"):
        loss = _average_loss(reported, chunks[0].layout)
    if replicas is not None:
        loss = replicas.reduce(chunks, loss, len(batches))
        if loss is None:
            return None
    middle = time.perf_counter()
    with named_collective("the optimizer step (gradient-norm all-reduce, parameter all-gather)"):
        update_successful, grad_norm = optimizer.step()
    if timers is not None:
        timers["forward-backward"] = timers.get("forward-backward", 0.0) + middle - start
        timers["optimizer"] = timers.get("optimizer", 0.0) + time.perf_counter() - middle
    return loss, update_successful, grad_norm


@torch.no_grad()
def evaluate(data_iter, model, args, num_microbatches: int, device, progress: TrainingProgress | None = None) -> float:
    """Mean lm loss over --eval-iters global batches."""
    chunks = _as_chunks(model)
    for chunk in chunks:
        chunk.eval()
    reported = []
    for _ in range(args.eval_iters):
        batches = [_to_device(next(data_iter), device) for _ in range(num_microbatches)]
        reported += _run_schedule(batches, chunks, forward_only=True, per_token_loss=args.calculate_per_token_loss)
        if progress is not None:
            progress.consumed_valid_samples += args.eval_global_batch_size
    for chunk in chunks:
        chunk.train()
    return _average_loss(reported, chunks[0].layout)


def _average_loss(reported: list[dict], layout: ParallelLayout) -> float:
    """The mean reported lm loss: computed on the last pipeline stage, sent to every stage, averaged over DP."""
    if reported:
        value = torch.stack([r["lm loss"] for r in reported]).mean().float()
    else:  # not the last stage: the all-reduce over the pipeline brings the last stage's value
        value = torch.zeros((), dtype=torch.float32, device=parallel_state.get_device())
    parallel_state.all_reduce_in_group(value, layout.pp_group)
    parallel_state.all_reduce_in_group(value, layout.dp_group)
    return value.item() / layout.dp


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
        self.timers: dict[str, float] = {}  # train_step's phases, summed
        self.global_batch = None  # of the last iteration

    def add(self, loss: float, skipped: bool, is_nan: bool, global_batch: int) -> None:
        self.iterations += 1
        self.global_batch = global_batch
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
    batch_fraction = interval.global_batch / args.global_batch_size  # below 1 while a batch ramp-up runs
    tokens_per_second = interval.global_batch * args.seq_length / seconds
    loss_scale = optimizer.get_loss_scale().item()
    params_norm = optimizer.params_norm() if args.log_params_norm else None
    zeros = optimizer.count_zeros_in_grads() if args.log_num_zeros_in_grad else None
    print_rank_last(training_log_line(
        iteration=progress.iteration, train_iters=args.train_iters, consumed_samples=progress.consumed_train_samples,
        ms_per_iteration=seconds * 1000.0,
        tflops_per_gpu=flops_per_iteration * batch_fraction / seconds / world / 1e12,
        learning_rate=lr, global_batch_size=interval.global_batch, lm_loss=lm_loss, loss_scale=loss_scale,
        grad_norm=grad_norm, skipped=interval.skipped, nan=interval.nan, tokens_per_second=tokens_per_second,
        num_zeros=zeros, params_norm=params_norm))
    timers = {name: total / interval.iterations for name, total in interval.timers.items()}
    if args.timing_log_level:
        print_rank_last(" time per iteration (ms): " + " | ".join(f"{n}: {t * 1000:.1f}" for n, t in timers.items()))
    scalars = {"iteration-time": seconds, "tokens-per-second": tokens_per_second}
    for name, value, wanted in (("learning-rate", lr, args.log_learning_rate_to_tensorboard),
                                ("loss-scale", loss_scale, args.log_loss_scale_to_tensorboard),
                                ("batch-size", interval.global_batch, args.log_batch_size_to_tensorboard),
                                ("world-size", world, args.log_world_size_to_tensorboard)):
        if wanted:
            scalars[name] = value
    for name, value in (("lm loss", lm_loss), ("grad-norm", grad_norm), ("params-norm", params_norm),
                        ("num-zeros", zeros)):
        if value is not None:
            scalars[name] = value
    if args.log_timers_to_tensorboard:
        scalars.update({f"{name}-time": value for name, value in timers.items()})
    if args.log_memory_to_tensorboard:
        scalars.update(memory_scalars())
    writers.scalars(scalars, progress.iteration)


def _validation_scalars(args, loss: float) -> dict:
    scalars = {"lm-loss-validation/lm loss": loss}
    if args.log_validation_ppl_to_tensorboard:
        scalars["lm-loss-validation/lm loss ppl"] = math.exp(min(20.0, loss))
    return scalars


def count_parameters(model: list[GPTModel], layout: ParallelLayout) -> int:
    """Parameters of the whole model (padding rows included), each once: TP shards summed over TP, replicated
    ones counted on TP rank 0, stages summed over PP, the last stage's copy of tied embeddings left out."""
    numel = sum(p.numel() for chunk in model for p in chunk.parameters()
                if (getattr(p, "tensor_model_parallel", False) or layout.tp_rank == 0)
                and not (getattr(p, "shared_embedding", False) and not layout.is_first_stage))
    total = torch.tensor([numel], dtype=torch.long, device=parallel_state.get_device())
    parallel_state.all_reduce_in_group(total, layout.model_parallel_group)
    return int(total.item())


def _print_setup(args, config, model: list[GPTModel], layout: ParallelLayout, num_microbatches: int) -> None:
    total = count_parameters(model, layout)
    if args.demo:
        print_rank_0("no --data-path: training the built-in demo (a small GPT on the embedded default corpus of "
                     "Python standard-library sources, byte tokens); flags given explicitly override its defaults")
    print_rank_0(f"> GPT: {config.num_layers} layers, hidden {config.hidden_size}, {config.num_attention_heads} heads, "
                 f"ffn {config.ffn_hidden_size}, seq {args.seq_length}, vocab {config.vocab_size} (padded "
                 f"{config.padded_vocab_size(layout.tp)}), {total:,} parameters, dtype {config.params_dtype}")
    print_rank_0(f"> parallelism: {layout.describe()}; global batch {args.global_batch_size} = micro-batch "
                 f"{args.micro_batch_size} x DP {layout.dp} x {num_microbatches} micro-batches; distributed optimizer: "
                 f"{args.use_distributed_optimizer}")
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", layout.dims.world_size))
    if layout.tp > local_ranks:
        print_rank_0(f"warning: --tp {layout.tp} is larger than the {local_ranks} ranks of a node: tensor-parallel "
                     "collectives (several per layer) cross the network, which is slow; keep --tp <= the GPUs of a node")
    print_rank_0(f"> layers: megatronish's own (--transformer-impl {args.transformer_impl} names the same "
                 f"computation), attention: {ATTENTION_BACKENDS[args.attention_backend]} (--attention-backend "
                 f"{args.attention_backend}), cross entropy: fused vocabulary-parallel")
    if args.save:
        print_rank_0(f"> checkpoints go to {os.path.abspath(args.save)} (every {args.save_interval} iterations "
                     "and at the end)")


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
