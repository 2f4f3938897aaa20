"""pretrain --ckpt-format torch_dist --save writes Megatron-LM's torch_dist layout from the ranks, and --load resumes it.

The models have the shapes of the fixture checkpoints that megatron-core 0.19.2 wrote (tests/megatron/fixtures:
2 layers, hidden 64, 4 heads, the 553-entry vocabulary padded to 768 at TP 2), trained on the fixture corpus:
- a Llama-style one (GQA with 2 groups, SwiGLU, RMSNorm, RoPE, untied, no biases) saved at PP=2 x TP=2 in the
  background (--async-save) resumes at TP=1 x PP=1 (another vocabulary padding) and at DP=2 with the distributed
  optimizer on the uninterrupted run's trajectory (fp32, 1e-5): weights, Adam state, step, LR schedule, iteration
  and consumed samples all come back;
- the written folder holds the fixture's keys, shapes and dtypes (plus the optimizer state and RNG items), equals
  what tools/convert_checkpoint.py writes for the same weights (values included), and Megatron's reader reads it;
- a GPT one (tied embeddings, held by both pipeline stages; LayerNorm, biases, learned positions) saved at
  PP=2 x TP=2 has the fixture GPT's layout;
- a save is published as our own format's are: manifest, tracker last, and --load falls back past a damaged one.
"""

import os
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from megatronish.testing import load_tool, run_distributed, run_pretrain
from megatronish.training import megatron_checkpoint
from megatronish.training.checkpoint_manifest import MANIFEST_FILENAME, why_incomplete
from megatronish.training.checkpointing import newest_complete_checkpoint

FIXTURES = Path(__file__).parent / "fixtures"
DATA = Path(__file__).parents[1] / "data" / "fixtures"
ITERS = 6
REL = 1e-5  # fp32: only the order of additions differs between layouts
VOCAB = 553
FIXTURE_SHAPE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--ffn-hidden-size", "256",
                 "--seq-length", "32", "--max-position-embeddings", "32"]
LLAMA = ["--group-query-attention", "--num-query-groups", "2", "--swiglu", "--normalization", "RMSNorm",
         "--position-embedding-type", "rope", "--untie-embeddings-and-output-weights", "--disable-bias-linear"]


def _argv(tmp_path, *extra: str) -> list[str]:
    return ["--data-path", str(DATA / "meg_text_document"), "--vocab-file", str(DATA / "vocab.json"),
            "--merge-file", str(DATA / "merges.txt"), "--data-cache-path", str(tmp_path / "cache"),
            *FIXTURE_SHAPE, "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", str(ITERS),
            "--lr", "3e-3", "--min-lr", "3e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "2",
            "--clip-grad", "0.5", "--hidden-dropout", "0", "--attention-dropout", "0", "--split", "949,50,1",
            "--eval-interval", "1000", "--eval-iters", "1", "--num-workers", "0", "--log-interval", "1000", *extra]


def _metadata(folder, keep=lambda key: True) -> dict:
    metadata = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    return {key: (tuple(meta.size), meta.properties.dtype) if hasattr(meta, "size") else "bytes"
            for key, meta in metadata.items() if keep(key)}


def _megatron_keys(key: str) -> bool:
    """The keys a megatron-core checkpoint of model weights holds (not its common state; not our additions)."""
    return key != megatron_checkpoint.COMMON_STATE_ITEM and not key.startswith(("optimizer.", "rng."))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """The uninterrupted run (TP=1 x PP=1) and the run saved at PP=2 x TP=2 halfway."""
    tmp = tmp_path_factory.mktemp("llama")
    (reference,) = run_distributed(run_pretrain, 1, args=(_argv(tmp, *LLAMA),), timeout=300)
    assert reference["losses"][-1] < reference["losses"][0] - 0.2  # it trains
    save = tmp / "ckpt"
    saved = run_distributed(run_pretrain, 4, timeout=300, args=(_argv(
        tmp, *LLAMA, "--pp", "2", "--tp", "2", "--ckpt-format", "torch_dist", "--save", str(save), "--save-interval",
        "1", "--exit-interval", str(ITERS // 2), "--async-save"),))[0]
    assert saved["iteration"] == ITERS // 2
    assert saved["losses"] == pytest.approx(reference["losses"][:ITERS // 2], rel=REL)
    return {"reference": reference, "save": save, "tmp": tmp}


@pytest.mark.parametrize("world_size,layout", [(1, []), (2, ["--use-distributed-optimizer"])],
                         ids=["TP=1 x PP=1", "DP=2 distributed optimizer"])
def test_torch_dist_save_at_pp2_tp2_resumes_on_the_trajectory(llama, world_size, layout):
    reference = llama["reference"]
    resumed = run_distributed(run_pretrain, world_size, timeout=300,
                              args=(_argv(llama["tmp"], *LLAMA, *layout, "--load", str(llama["save"])),))[0]
    assert resumed["iteration"] == ITERS and resumed["consumed"] == ITERS * 4
    assert resumed["losses"] == pytest.approx(reference["losses"][ITERS // 2:], rel=REL)
    assert resumed["grad_norms"] == pytest.approx(reference["grad_norms"][ITERS // 2:], rel=REL)
    assert resumed["final_valid"] == pytest.approx(reference["final_valid"], rel=REL)


def test_torch_dist_save_has_megatrons_layout_and_equals_the_converter(llama, tmp_path):
    root = llama["save"]
    folder = root / f"iter_{ITERS // 2:07d}"
    written = _metadata(folder)
    assert _metadata(folder, _megatron_keys) == _metadata(FIXTURES / "llama_tp2_torch_dist" / "iter_0000010",
                                                          _megatron_keys)  # keys, shapes, dtypes
    model_keys = [key for key, meta in written.items() if meta != "bytes" and not key.startswith(("optimizer.",))]
    for state in ("fp32_param", "exp_avg", "exp_avg_sq"):  # Adam's state, at each weight's global shape
        assert all(written[f"optimizer.state.{state}.{key}"] == (written[key][0], torch.float32) for key in model_keys)
    assert sorted(key for key in written if key.startswith("rng.")) == [f"rng.rank{r:05d}" for r in range(4)]

    checkpoint = megatron_checkpoint.read(str(root))  # the reader of Megatron's own checkpoints
    assert checkpoint.iteration == ITERS // 2 and checkpoint.format == "torch_dist"
    args = checkpoint.args
    assert (args.padded_vocab_size, args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
            args.consumed_train_samples, args.no_save_optim, args.tokenizer_type) == (768, 2, 2, 12, True,
                                                                                      "GPT2BPETokenizer")
    assert checkpoint.scheduler["num_steps"] == ITERS // 2 * 4
    config = megatron_checkpoint.transformer_config(args, VOCAB)
    assert megatron_checkpoint.checkpoint_vocab_size(args) == VOCAB

    converted = tmp_path / "converted"  # the same weights through tools/convert_checkpoint.py's writer
    training = tmp_path / "as-training"
    convert = load_tool("convert_checkpoint")
    assert convert.main(["--input-format", "megatron", "--input", str(root), "--output-format", "training",
                         "--output", str(training)]) == 0
    assert convert.main(["--input-format", "training", "--input", str(training), "--output-format", "megatron",
                         "--output", str(converted), "--tp", "2"]) == 0
    other = converted / f"iter_{ITERS // 2:07d}"
    assert _metadata(other) == _metadata(folder, lambda key: not key.startswith(("optimizer.", "rng.")))
    again = megatron_checkpoint.read(str(converted))
    assert sorted(again.state) == sorted(checkpoint.state)
    for name, value in checkpoint.state.items():  # every value, the vocabulary's padding rows (zero) included
        assert torch.equal(again.state[name], value), name
    assert megatron_checkpoint.transformer_config(again.args, VOCAB) == config
    resaved = tmp_path / "resaved"  # Megatron in, Megatron out: the iteration and consumed samples are kept
    assert convert.main(["--input-format", "megatron", "--input", str(root), "--output-format", "megatron",
                         "--output", str(resaved), "--tp", "2"]) == 0
    resaved_args = megatron_checkpoint.read(str(resaved)).args
    assert (resaved_args.iteration, resaved_args.consumed_train_samples, resaved_args.no_save_optim,
            resaved_args.no_save_rng) == (ITERS // 2, 12, True, True)


def test_torch_dist_save_is_published_like_ours(llama, tmp_path):
    root = llama["save"]
    assert newest_complete_checkpoint(str(root))[0] == ITERS // 2
    with open(root / megatron_checkpoint.TRACKER) as f:
        assert f.read() == str(ITERS // 2)
    folder = root / f"iter_{ITERS // 2:07d}"
    assert why_incomplete(str(folder)) is None and os.path.isfile(folder / MANIFEST_FILENAME)
    listed = (folder / MANIFEST_FILENAME).read_text()
    assert '"common.pt"' in listed and '"metadata.json"' in listed
    assert not any(name.endswith(".tmp") for name in os.listdir(root))
    damaged = tmp_path / "damaged"  # a copy whose newest data file lost its end: the one before is loaded
    os.makedirs(damaged)
    for name in os.listdir(root):
        os.symlink(root / name, damaged / name) if name != folder.name else None
    os.makedirs(damaged / folder.name)
    for name in os.listdir(folder):
        data = (folder / name).read_bytes()
        (damaged / folder.name / name).write_bytes(data[:len(data) // 2] if name.endswith(".distcp") else data)
    iteration, notes = newest_complete_checkpoint(str(damaged))
    assert iteration == ITERS // 2 - 1 and "truncated" in notes[-1]


def test_tied_gpt_saved_at_pp2_tp2_has_megatrons_layout(tmp_path):
    save = tmp_path / "ckpt"
    run_distributed(run_pretrain, 4, timeout=300, args=(_argv(tmp_path, "--pp", "2", "--tp", "2", "--train-iters", "1",
                                                      "--lr-warmup-iters", "0", "--ckpt-format", "torch_dist", "--save", str(save)),))
    folder = save / "iter_0000001"
    assert _metadata(folder, _megatron_keys) == _metadata(FIXTURES / "gpt_tp2_torch_dist" / "iter_0000010",
                                                          _megatron_keys)
    checkpoint = megatron_checkpoint.read(str(save))
    assert "output_layer.weight" not in checkpoint.state  # tied: the last stage's copy is the embedding's
    assert not checkpoint.state["embedding.word_embeddings.weight"][VOCAB:].any()  # padding rows are zero here
