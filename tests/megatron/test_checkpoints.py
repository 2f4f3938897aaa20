"""Megatron-LM checkpoints in and out, against what megatron-core 0.19.2 itself wrote and computed
(tests/megatron/fixtures): every format reads to the same weights; the models built from them give
Megatron's logits (fp32, within 1e-5, on the 553 real vocabulary columns) at TP 1 and 2; a checkpoint
written here in torch_dist has Megatron's keys, shapes and dtypes and reads back identically; and
pretrain_gpt.py --load continues training from one at TP 2 and at PP 2."""

import io
import os
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from megatronish import parallel_state
from megatronish.model import GPTModel
from megatronish.model.full_state import full_state_dict, load_full_state_dict
from megatronish.tensor_parallel import gather_from_tensor_model_parallel_region
from megatronish.testing import run_distributed
from megatronish.training import megatron_checkpoint
from megatronish.training.arguments import parse_args
from megatronish.training.training import pretrain

FIXTURES = Path(__file__).parent / "fixtures"
DATA = Path(__file__).parents[1] / "data" / "fixtures"
VOCAB = 553  # the entries of tests/data/fixtures/vocab.json; Megatron padded them to 768 rows
CHECKPOINTS = {"gpt": ("gpt_tp2_torch_dist", "gpt_tp2_torch", "gpt_tp2_torch_dist_mcore0.18.2"),
               "llama": ("llama_tp2_torch_dist", "llama_tp2_torch")}
LOGIT_TOL = 1e-5


def _read(name):
    return megatron_checkpoint.read(str(FIXTURES / name))


def test_every_format_reads_the_same_weights():
    for model, folders in CHECKPOINTS.items():
        first = _read(folders[0])
        assert first.iteration == 10 and first.args.num_layers == 2 and first.args.padded_vocab_size == 768
        for other in folders[1:]:
            checkpoint = _read(other)
            assert checkpoint.format == ("torch" if other.endswith("_torch") else "torch_dist")
            assert sorted(checkpoint.state) == sorted(first.state)
            assert all(torch.equal(checkpoint.state[k], first.state[k]) for k in first.state), other
    llama = _read("llama_tp2_torch_dist")
    config = megatron_checkpoint.transformer_config(llama.args, VOCAB)
    assert (config.query_groups, config.activation, config.normalization, config.position_embedding_type,
            config.tie_word_embeddings, config.add_bias_linear) == (2, "swiglu", "RMSNorm", "rope", False, False)


def _megatron_logits(tp):
    """Runs in each rank: every fixture checkpoint as a model at this TP size; its gathered logits."""
    expected = torch.load(FIXTURES / "expected.pt", weights_only=False)
    parallel_state.initialize_model_parallel(tp)
    errors = {}
    for model_name, folders in CHECKPOINTS.items():
        for folder in folders:
            checkpoint = _read(folder)
            model = GPTModel(megatron_checkpoint.transformer_config(checkpoint.args, VOCAB)).eval()
            load_full_state_dict(model, megatron_checkpoint.model_state(checkpoint, VOCAB))
            with torch.no_grad():
                logits = gather_from_tensor_model_parallel_region(model(expected[model_name]["tokens"]))
            errors[folder] = (logits[..., :VOCAB] - expected[model_name]["logits"][..., :VOCAB]).abs().max().item()
    return errors


@pytest.mark.parametrize("tp", [1, 2])
def test_megatron_checkpoints_reproduce_megatrons_logits(tp):
    for rank_errors in run_distributed(_megatron_logits, world_size=tp, args=(tp,), timeout=300):
        assert all(error <= LOGIT_TOL for error in rank_errors.values()), rank_errors


def _metadata(folder):
    metadata = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    return {key: (tuple(meta.size), meta.properties.dtype) if hasattr(meta, "size") else "bytes"
            for key, meta in metadata.items() if key != megatron_checkpoint.COMMON_STATE_ITEM}


def _byte_items(folder) -> dict:
    """The unpickled byte items (sharded objects) of a torch_dist folder, but its common state."""
    keys = [key for key, value in _metadata(folder).items() if value == "bytes"]
    planner = megatron_checkpoint._RawBytesPlanner()
    megatron_checkpoint._load_one_process(dict.fromkeys(keys), str(folder), planner)
    return {key: megatron_checkpoint.torch_load(io.BytesIO(raw)) for key, raw in planner.raw.items()}


def _what_megatrons_loader_reads(folder) -> tuple:
    """What megatron-core's load_checkpoint decides by, besides the tensors: whether it asks for its optimizer,
    scheduler and RNG items, and how it builds the model's sharded state dict."""
    common = megatron_checkpoint.read_common_state(str(folder))
    return common["args"].no_save_optim, common["args"].no_save_rng, common["content_metadata"]


@pytest.mark.parametrize("model", ["gpt", "llama"])
def test_written_torch_dist_has_megatrons_layout_and_reads_back(tmp_path, model):
    original = _read(CHECKPOINTS[model][0])
    config = megatron_checkpoint.transformer_config(original.args, VOCAB)
    state = megatron_checkpoint.model_state(original, VOCAB)
    args = megatron_checkpoint.megatron_args(config, tp=2, iteration=10, seq_length=32)
    folder = megatron_checkpoint.save_torch_dist(str(tmp_path), config, state, iteration=10, args=args)
    fixture = FIXTURES / CHECKPOINTS[model][0] / "iter_0000010"
    assert _metadata(folder) == _metadata(fixture)  # keys, shapes, dtypes
    assert _byte_items(folder) == _byte_items(fixture)  # the _extra_state objects as megatron-core stores them: [None]
    assert _what_megatrons_loader_reads(folder) == _what_megatrons_loader_reads(fixture)
    again = megatron_checkpoint.read(str(tmp_path))
    assert again.iteration == 10 and again.args.padded_vocab_size == 768
    assert megatron_checkpoint.transformer_config(again.args, VOCAB) == config
    reread = megatron_checkpoint.model_state(again, VOCAB)
    assert sorted(reread) == sorted(state) and all(torch.equal(reread[k], state[k]) for k in state)
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if name in again.state:  # Megatron's padded rows, zero here
            assert again.state[name].shape[0] == 768 and not again.state[name][VOCAB:].any()


def _continue_training(argv, save):
    """Runs in each rank: pretrain_gpt.py's flags through pretrain(); the losses and where it ended."""
    args = parse_args(argv + ["--save", save])
    result = pretrain(args)
    return {"losses": result.losses, "iteration": result.progress.iteration,
            "consumed": result.progress.consumed_train_samples}


TRAIN = ["--data-path", str(DATA / "meg_text_document"), "--vocab-file", str(DATA / "vocab.json"),
         "--merge-file", str(DATA / "merges.txt"), "--seq-length", "32", "--micro-batch-size", "2",
         "--global-batch-size", "4", "--train-iters", "12", "--lr", "1e-4", "--min-lr", "1e-5", "--eval-iters", "0",
         "--hidden-dropout", "0", "--attention-dropout", "0", "--split", "949,50,1", "--num-workers", "0",
         "--log-interval", "1", "--sample-tokens", "0"]


def test_pretrain_continues_from_a_megatron_checkpoint_at_any_layout(tmp_path):
    load = ["--load", str(FIXTURES / "gpt_tp2_torch_dist"), "--use-checkpoint-args"]
    runs = {}
    for name, layout in (("tp2", ["--tp", "2"]), ("pp2", ["--pp", "2"])):
        results = run_distributed(_continue_training, world_size=2, timeout=300,
                                  args=(TRAIN + load + layout, str(tmp_path / name)),
                                  env={"MEGATRONISH_CACHE": str(tmp_path / "cache")})
        runs[name] = results[0]
    for run in runs.values():
        assert run["iteration"] == 12 and run["consumed"] == 2 * 4  # resumed at Megatron's iteration 10
        assert len(run["losses"]) == 2
    assert runs["tp2"]["losses"] == pytest.approx(runs["pp2"]["losses"], abs=2e-5)  # the same weights either way
    fresh = run_distributed(_continue_training, world_size=2, timeout=300, env={"MEGATRONISH_CACHE": str(tmp_path / "c")},
                            args=(TRAIN + ["--tp", "2", "--num-layers", "2", "--hidden-size", "64",
                                           "--num-attention-heads", "4", "--ffn-hidden-size", "256",
                                           "--train-iters", "2"], str(tmp_path / "fresh")))[0]
    assert abs(fresh["losses"][0] - runs["tp2"]["losses"][0]) > 0.1  # the loaded weights made the difference
    assert os.path.isdir(tmp_path / "tp2" / "iter_0000012")  # and it saved on in its own format


def test_convert_tool_megatron_to_training_and_back(tmp_path):
    from megatronish.testing import load_tool
    convert = load_tool("convert_checkpoint")
    for model, folders in CHECKPOINTS.items():
        for folder in folders[:2]:  # torch_dist and legacy torch in
            assert convert.main(["--input-format", "megatron", "--input", str(FIXTURES / folder), "--vocab-size",
                                 str(VOCAB), "--output-format", "training", "--output", str(tmp_path / folder)]) == 0
            out = tmp_path / f"{folder}_megatron"
            assert convert.main(["--input-format", "training", "--input", str(tmp_path / folder), "--output-format",
                                 "megatron", "--output", str(out), "--tp", "2"]) == 0
            back = megatron_checkpoint.read(str(out))
            original = _read(folder)
            assert back.iteration == original.iteration == 10
            for name, value in megatron_checkpoint.model_state(original, VOCAB).items():
                assert torch.equal(megatron_checkpoint.model_state(back, VOCAB)[name], value), (folder, name)
            assert _metadata(out / "iter_0000010") == _metadata(FIXTURES / folders[0] / "iter_0000010")
