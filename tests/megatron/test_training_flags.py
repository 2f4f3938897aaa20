"""Megatron training flags implemented with Megatron's meaning: batch ramp-up and step schedules, sample-based
training, decoupled learning rates, per-token loss, bf16 gradient reduction, logging and profiling."""

import re

import pytest
import torch

from megatronish import parallel_state
from megatronish.model import GPTModel, TransformerConfig
from megatronish.optimizer import DistributedDataParallel, OptimizerConfig, OptimizerParamScheduler, get_megatron_optimizer
from megatronish.testing import run_distributed
from megatronish.training.arguments import ArgumentError, lr_schedule_samples, parse_args, validate_args
from megatronish.training.batch_schedule import BatchSchedule, parse_step_schedule
from megatronish.training.training import train_step

TINY = dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=64, max_position_embeddings=16,
            hidden_dropout=0.0, attention_dropout=0.0)


def test_batch_ramp_up_and_step_schedule_follow_megatron():
    ramp = BatchSchedule(32, rampup=[8, 8, 300])  # 8 -> 32 in steps of 8 over 300 samples: 100 samples per step
    assert [ramp.global_batch(n) for n in (0, 99, 100, 200, 299, 300, 301, 10_000)] == [8, 8, 16, 24, 24, 32, 32, 32]
    assert ramp.batches() == {8, 16, 24, 32}
    # by hand: 13 x 8 = 104 samples, then 6 x 16 (to 200), then 5 x 24 (to 320, past the ramp), then 32 each
    assert ramp.iterations_for(320) == ramp.iterations_for(310) == 13 + 6 + 5 and ramp.samples_for(24) == 320
    assert ramp.iterations_for(320 + 64) == 26 and ramp.samples_for(26) == 384
    steps = parse_step_schedule("0:16 2.4K:320, 4.8K:624", seq_length=8)  # thresholds in tokens
    assert steps == [(0, 16), (300, 320), (600, 624)]
    stepped = BatchSchedule(624, steps=steps)
    assert [stepped.global_batch(n) for n in (0, 299, 300, 599, 600)] == [16, 16, 320, 320, 624]
    with pytest.raises(ValueError, match="must start at threshold 0"):
        parse_step_schedule("10:16", 8)


DATA = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "64", "--num-layers", "2",
        "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16", "--micro-batch-size", "2",
        "--lr", "1e-3"]


def test_sample_based_training_derives_iterations_and_the_schedule():
    args = parse_args(DATA + ["--train-samples", "384", "--rampup-batch-size", "8", "8", "300", "--global-batch-size",
                              "32", "--lr-warmup-samples", "40", "--lr-decay-samples", "350"])
    validate_args(args, 2)
    assert args.train_iters == 26 and lr_schedule_samples(args) == (40, 350)
    args = parse_args(DATA + ["--train-iters", "10", "--global-batch-size", "8", "--lr-decay-iters", "8",
                              "--lr-warmup-iters", "2"])
    validate_args(args, 1)
    assert lr_schedule_samples(args) == (16, 64)
    for argv, message in (
            (["--train-iters", "10", "--rampup-batch-size", "8", "8", "300", "--global-batch-size", "32"],
             "--rampup-batch-size needs --train-samples"),
            (["--train-iters", "10", "--step-batch-size-schedule", "0:8 1K:16", "--global-batch-size", "16"],
             "--step-batch-size-schedule and --global-batch-size are both given"),
            (["--train-samples", "100", "--lr-decay-iters", "5"], "use --lr-decay-samples"),
            (["--train-samples", "100", "--rampup-batch-size", "6", "2", "50", "--global-batch-size", "8"],
             "the batch sizes [6] of the ramp/schedule are not multiples of --micro-batch-size 2 x data-parallel "
             "size 2")):
        with pytest.raises(ArgumentError, match=re.escape(message)):
            validate_args(parse_args(DATA + argv), 2)


def _decoupled_learning_rates():
    """Runs in one rank: each optimizer group's parameter names and learning rate half way through the decay."""
    parallel_state.initialize_model_parallel(1)
    model = DistributedDataParallel(GPTModel(TransformerConfig(**TINY, tie_word_embeddings=False)))
    optimizer = get_megatron_optimizer(model, OptimizerConfig(lr=1e-3, decoupled_lr=5e-3, decoupled_min_lr=5e-4))
    scheduler = OptimizerParamScheduler(optimizer, max_lr=1e-3, min_lr=1e-4, lr_warmup_steps=10,
                                        lr_decay_steps=110, lr_decay_style="linear")
    names = {id(e.main): e.name for e in optimizer.main_params}
    scheduler.step(60)
    return [({names[id(t)] for t in group["params"]}, group["lr"]) for group in optimizer.param_groups]


def test_decoupled_learning_rate_of_embeddings_and_output_layer():
    decoupled = {"embedding.word_embeddings.weight", "output_layer.weight"}
    groups = run_distributed(_decoupled_learning_rates, world_size=1)[0]
    assert set().union(*(names for names, _ in groups)) >= decoupled
    for names, lr in groups:
        if names & decoupled:
            assert names == decoupled and lr == pytest.approx(5e-4 + 0.5 * (5e-3 - 5e-4))
        else:
            assert lr == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4))


def _batches(seed, count, eod_every):
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for m in range(count):
        tokens = torch.randint(0, 64, (2, 16), generator=generator)
        mask = torch.ones(2, 16)
        mask[:, :: eod_every + m] = 0.0  # micro-batches hold different numbers of loss tokens
        batches.append({"tokens": tokens, "labels": torch.roll(tokens, -1, 1), "loss_mask": mask})
    return batches


def _per_token_step(per_token, grad_reduce_in_bf16, all_batches):
    """Runs in each rank (DP ranks): one train_step on this rank's share; the loss and full gradients."""
    layout = parallel_state.initialize_model_parallel(1)
    torch.manual_seed(0)
    model = DistributedDataParallel(GPTModel(TransformerConfig(**TINY), seed=7), grad_reduce_in_bf16=grad_reduce_in_bf16)
    optimizer = get_megatron_optimizer(model, OptimizerConfig(lr=0.0, clip_grad=0.0))
    mine = all_batches[layout.dp_rank::layout.dp]
    loss, _, _ = train_step(mine, model, optimizer, per_token_loss=per_token)
    return loss, {name: p.main_grad.clone() for name, p in model.module.named_parameters()}


def _reference_losses(batches):
    """Runs in one rank: the token-weighted loss of all micro-batches together, and the mean of their means."""
    parallel_state.initialize_model_parallel(1)
    model = GPTModel(TransformerConfig(**TINY), seed=7)
    with torch.no_grad():
        sums = [(model(b["tokens"], labels=b["labels"]) * b["loss_mask"]).sum() for b in batches]
    tokens = [b["loss_mask"].sum() for b in batches]
    return (sum(sums) / sum(tokens)).item(), sum(s / t for s, t in zip(sums, tokens)).item() / len(batches)


def test_per_token_loss_weighs_every_token_of_the_global_batch_alike():
    batches = _batches(3, 4, eod_every=3)  # 4 micro-batches: DP 2 x 2 each, or 4 in one process
    expected, mean_of_means = run_distributed(_reference_losses, world_size=1, args=(batches,))[0]
    assert abs(expected - mean_of_means) > 1e-4  # the two definitions differ on these batches
    dense_loss, dense_grads = run_distributed(_per_token_step, world_size=1, args=(True, False, batches))[0]
    assert dense_loss == pytest.approx(expected, rel=1e-5)
    for dp_loss, dp_grads in run_distributed(_per_token_step, world_size=2, args=(True, False, batches)):
        assert dp_loss == pytest.approx(dense_loss, rel=1e-5)
        for name, grad in dense_grads.items():
            torch.testing.assert_close(dp_grads[name], grad, rtol=1e-4, atol=1e-6)


def test_gradient_reduction_in_bf16_is_bf16_and_close_to_fp32():
    batches = _batches(5, 4, eod_every=4)
    fp32 = run_distributed(_per_token_step, world_size=2, args=(False, False, batches))[0][1]
    bf16 = run_distributed(_per_token_step, world_size=2, args=(False, True, batches))[0][1]
    differ = 0
    for name, grad in fp32.items():
        # each rank's half rounded to bf16 (8 significant bits) before the sum: off by ~2^-8 of the largest entry
        torch.testing.assert_close(bf16[name], grad, rtol=2e-2, atol=1e-2 * grad.abs().max().item())
        differ += not torch.equal(bf16[name], grad)
        assert torch.equal(bf16[name], bf16[name].to(torch.bfloat16).float())  # values that bf16 can hold
    assert differ  # rounding to bf16 happened


class _Scalars:
    def scalars(self, values, step):
        self.values, self.step = values, step


def _logged_scalars(argv):
    """Runs in one rank: what one training log line sends to TensorBoard/W&B under these flags."""
    from megatronish.training import training
    args = parse_args(DATA + ["--train-iters", "4", "--global-batch-size", "2", "--fp16"] + argv)
    validate_args(args, 1)
    parallel_state.initialize_model_parallel(1)
    model = DistributedDataParallel(GPTModel(TransformerConfig(**TINY)))
    optimizer = get_megatron_optimizer(model, OptimizerConfig(lr=1e-3), fp16=True)
    interval = training._LogInterval()
    interval.timers = {"forward-backward": 0.5, "optimizer": 0.1}
    interval.add(3.0, False, False, 2)
    writers = _Scalars()
    training._log_training(args, training.TrainingProgress(iteration=1, consumed_train_samples=2), interval, 1e-3,
                           optimizer, 1.5, 1e9, writers)
    return writers.values


def test_tensorboard_scalars_follow_megatrons_log_flags():
    default = run_distributed(_logged_scalars, world_size=1, args=([],))[0]
    assert {"learning-rate", "loss-scale", "lm loss", "grad-norm"} <= set(default)
    assert not {"batch-size", "world-size", "forward-backward-time", "params-norm", "num-zeros"} & set(default)
    flags = ["--log-batch-size-to-tensorboard", "--log-world-size-to-tensorboard", "--no-log-learning-rate-to-tensorboard",
             "--no-log-loss-scale-to-tensorboard", "--log-timers-to-tensorboard", "--log-memory-to-tensorboard",
             "--log-params-norm", "--log-num-zeros-in-grad"]
    logged = run_distributed(_logged_scalars, world_size=1, args=(flags,))[0]
    assert not {"learning-rate", "loss-scale"} & set(logged)
    assert logged["batch-size"] == 2 and logged["world-size"] == 1 and logged["forward-backward-time"] == 0.5
    assert logged["params-norm"] > 0 and logged["num-zeros"] >= 0 and any(k.startswith("mem-") for k in logged)
