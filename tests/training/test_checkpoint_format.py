"""The checkpoint format without the training loop: a model and its AdamW state saved at TP=2 x DP=2
come back bit for bit at other layouts; replicas are written once; inference loading and the
converter read the same files.

The model has every kind of parameter the format maps: replicated (norms, biases), split by rows
and by columns, SwiGLU's stride-2 [gate; up] weight, and two padded vocabulary weights (untied
output layer), padded to 384 rows at TP=1, 512 at TP=2 and TP=4 (true vocabulary 300).
"""

import os

import pytest
import torch

from megatronish import parallel_state
from megatronish.model import GPTModel, TransformerConfig
from megatronish.model.full_state import full_state_dict
from megatronish.optimizer import (
    DistributedDataParallel,
    OptimizerConfig,
    OptimizerParamScheduler,
    get_megatron_optimizer,
)
from megatronish.tensor_parallel import gather_from_tensor_model_parallel_region, gather_full
from megatronish.testing import load_tool, run_distributed
from megatronish.training.checkpoint_format import read_metadata
from megatronish.training.checkpointing import (
    checkpoint_dir,
    load_checkpoint,
    load_model_for_inference,
    read_checkpoint_config,
    read_full_model_state,
    save_checkpoint,
)
from megatronish.training.progress import TrainingProgress

VOCAB = 300
CONFIG = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "vocab_size": VOCAB, "ffn_hidden_size": 64,
          "activation": "swiglu", "tie_word_embeddings": False, "max_position_embeddings": 16,
          "hidden_dropout": 0.0, "attention_dropout": 0.0}


class Args:  # the argparse Namespace a checkpoint records
    seed = 5


def _build(tp: int, distributed_optimizer: bool):
    parallel_state.initialize_model_parallel(tp)
    model = GPTModel(TransformerConfig(**CONFIG), seed=Args.seed)
    ddp = DistributedDataParallel(model, use_distributed_optimizer=distributed_optimizer)
    optimizer = get_megatron_optimizer(ddp, OptimizerConfig(lr=1e-2))
    scheduler = OptimizerParamScheduler(optimizer, max_lr=1e-2, min_lr=1e-3, lr_warmup_steps=0, lr_decay_steps=100,
                                        lr_decay_style="cosine")
    return model, ddp, optimizer, scheduler


def _train(ddp, optimizer, scheduler, steps: int) -> None:
    generator = torch.Generator().manual_seed(parallel_state.get_data_parallel_rank())
    for _ in range(steps):
        tokens = torch.randint(0, VOCAB, (2, 16), generator=generator)
        optimizer.zero_grad()
        ddp(tokens, labels=tokens).mean().backward()
        ddp.finish_grad_sync()
        optimizer.step()
        scheduler.step(8)


def _full(tensor, param):
    full = gather_full(tensor, like=param)
    rows = getattr(param, "unpadded_rows", None)
    return full if rows is None else full[:rows]


def _everything(model, optimizer, scheduler) -> dict:
    """Full (TP-gathered, unpadded) weights and AdamW state, plus the scalars."""
    state = optimizer.sharded_state_by_name()
    out = {"model." + name: value for name, value in full_state_dict(model).items()}
    for name, param in model.named_parameters():
        for key, value in state["params"][name].items():
            out[f"optimizer.{name}.{key}"] = _full(value, param)
        rows = getattr(param, "unpadded_rows", None)
        if rows is not None:  # padding rows stay zero in the weights and in the optimizer state
            local = torch.stack([param.data] + [state["params"][name][k] for k in ("master", "exp_avg", "exp_avg_sq")])
            real = min(max(rows - parallel_state.get_tensor_model_parallel_rank() * param.size(0), 0), param.size(0))
            out[f"padding of {name} is zero"] = bool((local[:, real:] == 0).all())
    out["adam step"], out["lr steps"] = state["step"], scheduler.num_steps
    return out


def _save(directory: str):
    model, ddp, optimizer, scheduler = _build(2, distributed_optimizer=True)
    _train(ddp, optimizer, scheduler, steps=2)
    save_checkpoint(directory, TrainingProgress(iteration=2, consumed_train_samples=16), model, optimizer,
                    scheduler, Args())
    tokens = torch.arange(32).reshape(2, 16) * 7 % VOCAB
    with torch.no_grad():
        logits = gather_from_tensor_model_parallel_region(model(tokens))  # [b, s, padded vocab]
    return _everything(model, optimizer, scheduler), logits[..., :VOCAB]


def _load(directory: str, tp: int, distributed_optimizer: bool, save_again_to: str | None = None):
    model, _, optimizer, scheduler = _build(tp, distributed_optimizer)
    progress = load_checkpoint(directory, model, optimizer, scheduler)
    if save_again_to:
        save_checkpoint(save_again_to, progress, model, optimizer, scheduler, Args())
    return _everything(model, optimizer, scheduler), progress


def _inference_logits(directory: str, tp: int):
    parallel_state.initialize_model_parallel(tp)
    model = load_model_for_inference(directory)
    tokens = torch.arange(32).reshape(2, 16) * 7 % VOCAB
    with torch.no_grad():
        logits = gather_from_tensor_model_parallel_region(model(tokens))
    return logits[..., :VOCAB], model.training, model.config.vocab_size


def _load_weights_only(directory: str):
    """A weights-only checkpoint (at its own layout, TP=1 x DP=1): refused for a full resume, accepted
    with --no-load-optim (it has no RNG states either) and with --finetune."""
    model, _, optimizer, scheduler = _build(1, distributed_optimizer=False)
    try:
        load_checkpoint(directory, model, optimizer, scheduler)
        refusal = None
    except ValueError as error:
        refusal = str(error)
    without_optimizer = load_checkpoint(directory, model, optimizer, scheduler, load_optim=False)
    finetune = load_checkpoint(directory, model, optimizer, scheduler, finetune=True)
    return refusal, (without_optimizer, finetune), full_state_dict(model), optimizer.sharded_state_by_name()["step"]


def _assert_same(loaded: dict, saved: dict, where: str) -> None:
    assert loaded.keys() == saved.keys(), where
    for key, value in saved.items():
        if torch.is_tensor(value):
            assert torch.equal(loaded[key], value), (where, key)
        else:
            assert loaded[key] == value, (where, key)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(folder, full state at save time, logits at save time) of a save at TP=2 x DP=2."""
    directory = str(tmp_path_factory.mktemp("saved") / "ckpt")
    saved, logits = run_distributed(_save, 4, args=(directory,))[0]
    return directory, saved, logits


def test_model_and_optimizer_state_reshard_exactly(checkpoint, tmp_path):
    directory, saved, _ = checkpoint
    assert all(v for k, v in saved.items() if k.startswith("padding")) and saved["adam step"] == 2
    at_tp4 = str(tmp_path / "saved_again_at_tp4")  # TP rank 3 holds only vocabulary padding there
    for source, tp, world, distributed_optimizer, save_again_to in (
            (directory, 4, 4, True, at_tp4), (directory, 1, 4, True, None), (directory, 2, 4, False, None),
            (at_tp4, 1, 1, False, None)):
        results = run_distributed(_load, world, args=(source, tp, distributed_optimizer, save_again_to))
        for loaded, progress in results:
            _assert_same(loaded, saved, f"TP={tp} x DP={world // tp} from {os.path.basename(source)}")
            assert progress == TrainingProgress(iteration=2, consumed_train_samples=16)


def test_replicated_chunks_are_written_once(checkpoint):
    folder = checkpoint_dir(checkpoint[0], 2)
    chunks = read_metadata(folder).state_dict_metadata
    assert len(chunks["model.decoder.final_layernorm.weight"].chunks) == 1                   # TP and DP replicas
    assert len(chunks["model.decoder.layers.0.self_attention.linear_qkv.weight"].chunks) == 2  # one per TP rank
    fc1 = chunks["optimizer.decoder.layers.0.mlp.linear_fc1.weight.exp_avg"]
    assert list(fc1.size) == [2, 64, 32]                                                      # [stride, ffn, h]
    assert list(chunks["model.embedding.word_embeddings.weight"].size) == [VOCAB, 32]          # padding stripped
    # Every byte of the data files belongs to one indexed (name, offsets) chunk: no replica was written twice.
    indexed = sum(info.length for info in read_metadata(folder).storage_data.values())
    data_bytes = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".distcp"))
    assert data_bytes == indexed


def test_inference_loading_and_converter_round_trip(checkpoint, tmp_path):
    directory, _, trained_logits = checkpoint
    for tp in (1, 2):
        logits, training_mode, vocab_size = run_distributed(_inference_logits, tp, args=(directory, tp))[0]
        assert torch.allclose(logits, trained_logits, rtol=1e-5, atol=1e-5), tp  # TP changes summation order only
        assert not training_mode and vocab_size == VOCAB
    assert read_checkpoint_config(directory) == TransformerConfig(**CONFIG)

    tool = load_tool("convert_checkpoint")
    tool.main(["--input-format", "training", "--input", directory, "--output-format", "megatronish",
               "--output", str(tmp_path / "full"), "--tp", "4"])
    tool.main(["--input-format", "megatronish", "--input", str(tmp_path / "full"), "--output-format", "training",
               "--output", str(tmp_path / "weights_only")])
    config, original, _ = read_full_model_state(directory)
    config_back, converted, common = read_full_model_state(str(tmp_path / "weights_only"))
    assert config_back == config and common["optimizer"] is None and common["iteration"] == 0
    assert original.keys() == converted.keys()
    assert all(torch.equal(original[name], converted[name]) for name in original)
    logits, _, _ = run_distributed(_inference_logits, 2, args=(str(tmp_path / "weights_only"), 2))[0]
    assert torch.allclose(logits, trained_logits, rtol=1e-5, atol=1e-5)

    refusal, progresses, weights, adam_step = run_distributed(_load_weights_only, 1,
                                                              args=(str(tmp_path / "weights_only"),))[0]
    assert "holds no optimizer state" in refusal and "--no-load-optim or --finetune" in refusal
    assert progresses == (TrainingProgress(), TrainingProgress()) and adam_step == 0
    assert all(torch.equal(weights[name], original[name]) for name in original)
