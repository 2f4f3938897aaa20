"""The training loop end to end on a tiny GPT (CPU, gloo, fp32, dropout 0).

Losses of 10 iterations agree across layouts (TP 1/2/4, TP2 x DP2, distributed optimizer,
sequence parallelism, activation recompute) within 1e-5 relative; the logged grad norm equals a dense single-process reference; fp16
skips overflowing steps and recovers; bf16 runs; a run stopped and resumed from its
checkpoint continues exactly as an uninterrupted run; with --overlap-param-gather (its gathers
landing only when waited for) losses, checkpoints and the generated sample equal the synchronous
gather's exactly. Runs are grouped by world size so each group forks its ranks once.
"""

import numpy as np
import pytest
import torch
from param_gather_testing import slow_param_gathers
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from megatronish import parallel_state
from megatronish.data.indexed_dataset import IndexedDatasetBuilder
from megatronish.data.tokenizers import ByteTokenizer
from megatronish.model import GPTModel
from megatronish.testing import RankFailed, run_distributed
from megatronish.training.arguments import parse_args, transformer_config_from_args, validate_args
from megatronish.training.checkpointing import checkpoint_dir
from megatronish.training.training import build_datasets, forward_step, pretrain

ITERS = 10
REL = 1e-5  # fp32: only the order of additions differs between layouts


def tiny_argv(data_prefix: str, cache: str, *extra: str) -> list[str]:
    return ["--data-path", data_prefix, "--data-cache-path", cache, "--tokenizer-type", "ByteTokenizer",
            "--split", "90,10,0", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
            "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", str(ITERS),
            "--lr", "3e-3", "--min-lr", "3e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "2",
            "--clip-grad", "0.5", "--hidden-dropout", "0", "--attention-dropout", "0", "--log-interval", "5",
            "--eval-interval", "5", "--eval-iters", "1", "--num-workers", "0", *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A small byte-token corpus with structure (so the loss can fall): repeated phrases with noise."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    phrases = [rng.integers(32, 127, size=rng.integers(3, 9)) for _ in range(20)]
    builder = IndexedDatasetBuilder(str(root / "tiny_text_document"), dtype=np.uint16)
    for _ in range(60):
        doc = np.concatenate([phrases[i] for i in rng.integers(0, len(phrases), size=rng.integers(10, 30))])
        builder.add_document(np.append(doc, 256))  # 256: ByteTokenizer's end of document
    builder.finalize()
    return str(root / "tiny_text_document"), str(root / "cache")


def _run(argv: list[str]) -> dict:
    args = parse_args(argv)
    try:
        result = pretrain(args)
    finally:
        parallel_state.destroy_model_parallel()
    return {"losses": result.losses, "grad_norms": result.grad_norms, "lrs": result.learning_rates,
            "valid": result.validation_losses, "skipped": result.progress.skipped_iterations,
            "consumed": result.progress.consumed_train_samples, "sample": result.sample}


def _runs(argvs: list[list[str]]) -> list[dict]:
    return [_run(argv) for argv in argvs]


def _runs_with_slow_param_gathers(argvs: list[list[str]]) -> list[dict]:
    with slow_param_gathers():
        return _runs(argvs)


def _dense_first_grad_norm(argv: list[str]) -> float:
    """Reference: the full model in one process, the first global batch, plain autograd, norm of all grads."""
    args = parse_args(argv)
    validate_args(args, 1)
    parallel_state.initialize_model_parallel(1)
    try:
        torch.manual_seed(args.seed)
        model = GPTModel(transformer_config_from_args(args, vocab_size=258), seed=args.seed)
        train, _, _ = build_datasets(args, ByteTokenizer())
        micro_batches = args.global_batch_size // args.micro_batch_size
        loss = 0.0
        for m in range(micro_batches):
            rows = range(m * args.micro_batch_size, (m + 1) * args.micro_batch_size)
            batch = {k: torch.stack([train[i][k] for i in rows]) for k in ("tokens", "labels", "loss_mask")}
            output, loss_func = forward_step(iter([batch]), model)
            loss = loss + loss_func(output)[0] / micro_batches
        loss.backward()
        return torch.sqrt(sum(p.grad.double().square().sum() for p in model.parameters())).item()
    finally:
        parallel_state.destroy_model_parallel()


@pytest.fixture(scope="module")
def reference(data):
    argv = tiny_argv(*data)
    (result,) = run_distributed(_run, 1, args=(argv,))
    (dense_norm,) = run_distributed(_dense_first_grad_norm, 1, args=(argv,))
    return result, dense_norm


def _assert_same_run(result, reference, what):
    assert result["losses"] == pytest.approx(reference["losses"], rel=REL), what
    assert result["grad_norms"] == pytest.approx(reference["grad_norms"], rel=REL), what
    assert result["lrs"] == pytest.approx(reference["lrs"], rel=1e-12), what


def test_reference_run_learns_and_logged_grad_norm_matches_dense(reference):
    result, dense_norm = reference
    assert len(result["losses"]) == ITERS and result["consumed"] == ITERS * 8
    assert result["losses"][-1] < result["losses"][0] - 0.3  # it trains
    assert result["grad_norms"][0] == pytest.approx(dense_norm, rel=REL)
    assert result["grad_norms"][0] > 0.5  # the norm is taken before clipping (clip-grad 0.5)
    assert set(result["valid"]) == {5, 10}


def test_tp4_and_tp2_x_dp2_match_tp1(data, reference):
    distributed_sp = ["--tp", "2", "--use-distributed-optimizer", "--sequence-parallel", "--overlap-grad-reduce",
                      "--sample-tokens", "8"]  # the sample runs on a parameter-sharing twin without sequence parallelism
    argvs = [tiny_argv(*data, "--tp", "4"), tiny_argv(*data, "--tp", "2", "--overlap-grad-reduce"),
             tiny_argv(*data, *distributed_sp),
             # no evaluation: the sample is the first to read the weights after the last step
             tiny_argv(*data, *distributed_sp, "--overlap-param-gather", "--eval-iters", "0")]
    outs = run_distributed(_runs_with_slow_param_gathers, 4, args=(argvs,), timeout=300)
    ref, _ = reference
    for rank_out in outs:
        for result, what in zip(rank_out[:3], ("TP4", "TP2 x DP2 overlapped reduction",
                                               "TP2 x DP2 distributed optimizer, sequence parallel, overlap")):
            _assert_same_run(result, ref, what)
            assert result["valid"] == pytest.approx(ref["valid"], rel=REL), what
        synchronous, overlapped = rank_out[2:]
        for key in ("losses", "grad_norms", "lrs", "sample"):
            assert overlapped[key] == synchronous[key], f"{key} with overlapped parameter gather"
        assert overlapped["sample"]


def _checkpoint_tensors(folder: str) -> dict:
    """The weights and optimizer state a checkpoint folder holds, by name."""
    converted = folder + ".pt"
    dcp_to_torch_save(folder, converted)
    return {name: value for name, value in torch.load(converted, weights_only=False).items()
            if name.startswith(("model.", "optimizer."))}


def test_overlapped_param_gather_equals_the_synchronous_gather(data, reference, tmp_path):
    """DP=2: the gathers still run when step() returns and land only when waited for; losses, grad norms, the
    checkpoints saved mid-run (iteration 3: no log line or evaluation read the weights before) and at the end
    and the sample equal the synchronous gather's."""
    argvs = [tiny_argv(*data, "--use-distributed-optimizer", "--save", str(tmp_path / name), "--save-interval", "3",
                       "--log-params-norm", "--sample-tokens", "8", *extra)
             for name, extra in (("synchronous", []), ("overlapped", ["--overlap-param-gather"]))]
    synchronous, overlapped = run_distributed(_runs_with_slow_param_gathers, 2, args=(argvs,), timeout=300)[0]
    assert overlapped == synchronous and overlapped["sample"]
    _assert_same_run(overlapped, reference[0], "DP2, overlapped parameter gather")
    for iteration in (3, ITERS):
        saved, expected = (_checkpoint_tensors(checkpoint_dir(str(tmp_path / name), iteration))
                           for name in ("overlapped", "synchronous"))
        assert saved.keys() == expected.keys() and any(key.startswith("optimizer.") for key in saved), saved.keys()
        torch.testing.assert_close(saved, expected, rtol=0, atol=0, msg=f"iteration {iteration}")


def test_tp2_sequence_parallel_and_dp2_distributed_optimizer_match_tp1_and_mixed_precision(data, reference):
    argvs = [tiny_argv(*data, "--tp", "2", "--sequence-parallel", "--recompute-granularity", "full"),
             tiny_argv(*data, "--use-distributed-optimizer"),
             tiny_argv(*data, "--tp", "2", "--fp16", "--initial-loss-scale", str(2.0**20), "--hysteresis", "1"),
             tiny_argv(*data, "--tp", "2", "--bf16")]
    outs = run_distributed(_runs, 2, args=(argvs,), timeout=300)
    ref, _ = reference
    for tp2, dp2, fp16, bf16 in outs:
        _assert_same_run(tp2, ref, "TP2, sequence parallel, full recompute")
        _assert_same_run(dp2, ref, "TP1 x DP2 distributed optimizer")
        # fp16: a loss scale of 2^20 overflows the fp16 gradients; that step is skipped (no grad norm), the
        # scale halves, and training goes on with finite losses that fall.
        assert 1 <= fp16["skipped"] <= 3 and fp16["grad_norms"][0] is None and fp16["grad_norms"][-1] is not None
        assert all(np.isfinite(fp16["losses"]))
        assert fp16["losses"][-1] < fp16["losses"][0]
        assert all(np.isfinite(bf16["losses"])) and bf16["skipped"] == 0
        assert bf16["losses"] == pytest.approx(ref["losses"], rel=0.05)


@pytest.mark.slow
def test_torch_compile_at_tp2_matches_tp1(data, reference):
    """pretrain --torch-compile (Inductor): the training losses and grad norms of the eager TP=1 run."""
    # No evaluation: the eval-mode forward would be another compile (the training losses are what is compared).
    argv = tiny_argv(*data, "--tp", "2", "--torch-compile", "--eval-iters", "0")
    outs = run_distributed(_run_compiled, 2, args=(argv,), timeout=900)
    ref, _ = reference
    for result, graphs, graph_breaks in outs:
        assert graphs >= 1 and graph_breaks == 0, (graphs, graph_breaks)
        _assert_same_run(result, ref, "TP2, torch.compile")


def _run_compiled(argv: list[str]):
    """_run, and how many graphs Dynamo compiled and how many times it broke a graph."""
    torch._dynamo.utils.counters.clear()
    result = _run(argv)
    counters = torch._dynamo.utils.counters
    return result, counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def test_resume_from_checkpoint_continues_exactly(data, reference, tmp_path):
    save = str(tmp_path / "ckpt")
    argvs = [tiny_argv(*data, "--tp", "2", "--save", save, "--exit-interval", "4"),
             tiny_argv(*data, "--tp", "2", "--save", save, "--load", save, "--save-interval", "100")]
    first, resumed = run_distributed(_runs, 2, args=(argvs,), timeout=300)[0]
    ref, _ = reference
    assert len(first["losses"]) == 4 and len(resumed["losses"]) == ITERS - 4
    assert first["losses"] + resumed["losses"] == pytest.approx(ref["losses"], rel=REL)
    assert resumed["lrs"] == pytest.approx(ref["lrs"][4:], rel=1e-12)
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text() == str(ITERS)


def test_token_ids_past_the_vocabulary_fail_before_training(tmp_path):
    """GPT-2 BPE ids with the byte tokenizer: at TP=2 they used to train silently on the padding rows."""
    prefix = str(tmp_path / "gpt2_ids_text_document")
    builder = IndexedDatasetBuilder(prefix, dtype=np.uint16)
    for _ in range(40):
        builder.add_document(np.array([464, 50256, 318, 257, 256]))
    builder.finalize()
    with pytest.raises(RankFailed) as failure:
        run_distributed(_run, 2, args=(tiny_argv(prefix, str(tmp_path / "cache"), "--tp", "2"),), timeout=300)
    assert (f"ValueError: --data-path {prefix} holds token id 50256, but --tokenizer-type ByteTokenizer has a "
            "vocabulary of 258 (ids 0-257)") in str(failure.value)
