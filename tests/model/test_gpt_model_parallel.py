"""GPTModel at TP = 1, 2, 4: same initial weights, logits, losses and gradients; exact recompute.

One forked run per TP size does every check (forking ranks costs more than these tiny
models) and returns numbers; the tests compare them with the TP = 1 run, which is the
dense single-process reference. Tolerance (fp32, 2 layers): logits and losses within
2e-5, gradients within 1e-5 absolute + 1e-4 relative: only the order of additions differs.
Dropout is off for the cross-TP comparisons (per-TP-rank streams draw different masks at
different TP sizes by design) and on for the recompute comparisons. bf16 and fp16 models
must train with finite gradients and losses within 0.05 of fp32.
"""

from unittest import mock

import numpy as np
import pytest
import torch

from megatronish import parallel_state
from megatronish.inference import Request, SamplingParams, generate, without_sequence_parallel
from megatronish.model import gpt_model
from megatronish.model import (
    GPTModel,
    TransformerConfig,
    allreduce_sequence_parallel_grads,
    full_grad_dict,
    full_state_dict,
    load_full_state_dict,
)
from megatronish.tensor_parallel import (
    gather_from_tensor_model_parallel_region,
    model_parallel_manual_seed,
)
from megatronish.testing import run_distributed

TP_SIZES = (1, 2, 4)
BATCH, SEQ, VOCAB, SEED = 2, 16, 100, 1234
TINY = dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=32,
            hidden_dropout=0.0, attention_dropout=0.0)
LLAMA = dict(TINY, ffn_hidden_size=48, activation="swiglu", normalization="RMSNorm", position_embedding_type="rope",
             add_bias_linear=False, tie_word_embeddings=False)
CASES = {
    "gpt2": TINY,
    "gpt2_explicit_attention": dict(TINY, attention_backend="explicit"),
    "gpt2_sequence_parallel": dict(TINY, sequence_parallel=True),
    "llama": LLAMA,
    "llama_sequence_parallel": dict(LLAMA, sequence_parallel=True, attention_backend="explicit"),
    # Megatron's GQA (TP splits the 4 key/value groups), --kv-channels 8 (query width 64 != hidden 32),
    # --rotary-percent 0.5, --apply-layernorm-1p, and no positions at all
    "llama_gqa": dict(LLAMA, num_attention_heads=8, num_query_groups=4, kv_channels=8, rotary_percent=0.5,
                      apply_layernorm_1p=True),
    "gpt2_no_positions": dict(TINY, position_embedding_type="none"),
}
DROPOUT = dict(hidden_dropout=0.2, attention_dropout=0.2)
RECOMPUTE_CASES = {
    "gpt2": dict(TINY, **DROPOUT),
    "gpt2_sequence_parallel_explicit_attention": dict(TINY, **DROPOUT, sequence_parallel=True,
                                                      attention_backend="explicit"),
    "llama_sequence_parallel": dict(LLAMA, **DROPOUT, sequence_parallel=True),
}
GRANULARITIES = (None, "full", "selective")
LOGIT_TOL = dict(rtol=0, atol=2e-5)
GRAD_TOL = dict(rtol=1e-4, atol=1e-5)


def _numpy(tensors: dict) -> dict:
    # Plain arrays: tensors sent back from a forked rank would be shared through file descriptors.
    return {name: t.detach().float().numpy() for name, t in tensors.items()}


def _batch():
    g = torch.Generator().manual_seed(7)  # the same data on every rank
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    loss_weights = torch.rand(BATCH, SEQ, generator=g)  # so that every token's loss matters differently
    return ids, labels, loss_weights


def _full_logits(model, ids, position_ids=None):
    logits = gather_from_tensor_model_parallel_region(model(ids, position_ids=position_ids))
    return logits[..., :VOCAB].detach()


def _train_step(config: TransformerConfig, full: bool = True):
    """The model, its initial weights, losses and gradients after one forward/backward.

    Weights and gradients are gathered to full shape, or with full=False left as this
    rank's slices (enough to compare runs at the same TP size, and cheaper).
    """
    model_parallel_manual_seed(SEED)
    model = GPTModel(config, seed=SEED)
    initial = _numpy(full_state_dict(model)) if full else None
    ids, labels, weights = _batch()
    losses = model(ids, labels=labels)
    (losses * weights).sum().backward()
    allreduce_sequence_parallel_grads(model)
    grads = full_grad_dict(model) if full else {name: p.grad for name, p in model.named_parameters()}
    return model, initial, losses.detach().numpy(), _numpy(grads)


def _equality_checks():
    out = {}
    for case, options in CASES.items():
        model, initial, losses, grads = _train_step(TransformerConfig(**options))
        model.eval()
        with torch.no_grad():
            logits = _full_logits(model, _batch()[0]).numpy()
            tokens = _generated(without_sequence_parallel(model), 5, 6, SamplingParams(temperature=0))
        out[case] = dict(initial=initial, losses=losses, grads=grads, logits=logits, tokens=tokens)
        if model.config.position_embedding_type == "learned_absolute":
            with torch.no_grad():
                ids = _batch()[0]
                positions = torch.arange(SEQ).expand(BATCH, SEQ)
                out[case]["explicit_positions"] = _full_logits(model, ids, positions).numpy()
                out[case]["shifted_positions"] = _full_logits(model, ids, positions + 3).numpy()
    return out


def _recompute_checks():
    out = {}
    for case, options in RECOMPUTE_CASES.items():
        for granularity in GRANULARITIES:
            config = TransformerConfig(**options, recompute_granularity=granularity)
            model, _, losses, grads = _train_step(config, full=False)
            out[case, granularity] = dict(losses=losses, grads=grads)
        # Dropout must really be on, or the comparison above proves nothing: a second draw differs.
        out[case, "second_draw"] = model(_batch()[0], labels=_batch()[1]).detach().numpy()
    return out


def _padding_never_generated():
    """Make every real logit -h while padding logits stay 0: decoding must still pick a real token."""
    model_parallel_manual_seed(SEED)
    model = GPTModel(TransformerConfig(**dict(TINY, tie_word_embeddings=False)))
    with torch.no_grad():
        model.decoder.final_layernorm.weight.zero_()
        model.decoder.final_layernorm.bias.fill_(1.0)
        state = full_state_dict(model)
        state["output_layer.weight"].fill_(-1.0)
        load_full_state_dict(model, state)
    return _generated(model, 4, 3, SamplingParams(temperature=0)), _generated(model, 4, 20, SamplingParams(1.0))


def _generated(model, prompt_length: int, new_tokens: int, sampling: SamplingParams) -> np.ndarray:
    """[b, new_tokens] continuations of the batch's first prompt_length tokens."""
    requests = [Request(row[:prompt_length].tolist(), new_tokens, sampling) for row in _batch()[0]]
    return np.array([c.tokens for c in generate(model, requests).completions])


def _padded_vocab_loss_path():
    """Losses, gradients and logit widths with the output GEMM over the padded vocabulary (the CUDA choice of
    gpt_model.loss_vocab_rows, forced here on CPU) and over the real rows only (the CPU choice)."""
    out = {}
    for case in ("gpt2", "llama"):  # tied and untied output weights
        for choice in ("real", "padded"):
            widths = []
            forced = (lambda real, padded, device: padded) if choice == "padded" else gpt_model.loss_vocab_rows
            with mock.patch.object(gpt_model, "loss_vocab_rows", forced):
                model_parallel_manual_seed(SEED)
                model = GPTModel(TransformerConfig(**CASES[case]), seed=SEED)
                model.output_layer.register_forward_hook(lambda module, inputs, output: widths.append(output[0].size(-1)))
                ids, labels, weights = _batch()
                losses = model(ids, labels=labels)
                (losses * weights).sum().backward()
            out[case, choice] = dict(losses=losses.detach().numpy(), width=widths[0],
                                     grads=_numpy({name: p.grad for name, p in model.named_parameters()}))
    return out


def _load_reference(reference_state):
    """Load the TP = 1 run's weights (full, unpadded) into a model built at this TP size with another seed."""
    model = GPTModel(TransformerConfig(**CASES["llama"]), seed=SEED + 1)
    load_full_state_dict(model, {name: torch.from_numpy(value) for name, value in reference_state.items()})
    with torch.no_grad():
        return _full_logits(model.eval(), _batch()[0]).numpy()


def _half_precision_losses():
    """fp32, bf16 and fp16 losses of the same weights, and whether the gradients are finite."""
    losses = {}
    for dtype in ("float32", "bfloat16", "float16"):
        model_parallel_manual_seed(SEED)
        model = GPTModel(TransformerConfig(**dict(CASES["gpt2_sequence_parallel"], params_dtype=dtype)), seed=SEED)
        ids, labels, _ = _batch()
        loss = model(ids, labels=labels).mean()
        loss.backward()
        allreduce_sequence_parallel_grads(model)
        finite = all(torch.isfinite(p.grad).all().item() for p in model.parameters())
        losses[dtype] = (loss.item(), finite, loss.dtype == torch.float32)
    return losses


def _all_checks(tp: int, reference_state):
    parallel_state.initialize_model_parallel(tp)
    results = dict(equality=_equality_checks(), recompute=_recompute_checks(), padding=_padding_never_generated(),
                   half=_half_precision_losses(), padded_vocab=_padded_vocab_loss_path())
    if reference_state is not None:
        results["loaded_logits"] = _load_reference(reference_state)
    return results


@pytest.fixture(scope="module")
def results():
    """{tp: [rank 0 results, rank 1 results, ...]}; TP = 1 runs first and hands its weights to the others."""
    by_tp = {1: run_distributed(_all_checks, 1, args=(1, None))}
    reference_state = by_tp[1][0]["equality"]["llama"]["initial"]
    for tp in TP_SIZES[1:]:
        by_tp[tp] = run_distributed(_all_checks, tp, args=(tp, reference_state))
    return by_tp


@pytest.mark.parametrize("tp", TP_SIZES[1:])
@pytest.mark.parametrize("case", CASES)
def test_initial_weights_do_not_depend_on_tp(results, case, tp):
    reference = results[1][0]["equality"][case]["initial"]
    for rank_results in results[tp]:
        initial = rank_results["equality"][case]["initial"]
        assert initial.keys() == reference.keys()
        for name in reference:
            np.testing.assert_array_equal(initial[name], reference[name], err_msg=name)


@pytest.mark.parametrize("tp", TP_SIZES[1:])
@pytest.mark.parametrize("case", CASES)
def test_logits_losses_and_grads_match_tp1(results, case, tp):
    reference = results[1][0]["equality"][case]
    for rank, rank_results in enumerate(results[tp]):
        got = rank_results["equality"][case]
        np.testing.assert_allclose(got["logits"], reference["logits"], **LOGIT_TOL, err_msg=f"rank {rank} logits")
        np.testing.assert_allclose(got["losses"], reference["losses"], **LOGIT_TOL, err_msg=f"rank {rank} losses")
        for name in reference["grads"]:
            np.testing.assert_allclose(got["grads"][name], reference["grads"][name], **GRAD_TOL,
                                       err_msg=f"rank {rank} grad of {name}")
        np.testing.assert_array_equal(got["tokens"], reference["tokens"], err_msg=f"rank {rank} greedy tokens")


@pytest.mark.parametrize("tp", TP_SIZES)
@pytest.mark.parametrize("case", [case for case, options in CASES.items() if "position_embedding_type" not in options])
def test_position_ids(results, case, tp):
    """Explicit positions 0..s-1 equal the default; shifted positions change the logits alike at every TP."""
    reference = results[1][0]["equality"][case]
    got = results[tp][0]["equality"][case]
    np.testing.assert_allclose(got["explicit_positions"], reference["logits"], **LOGIT_TOL)
    np.testing.assert_allclose(got["shifted_positions"], reference["shifted_positions"], **LOGIT_TOL)
    assert not np.allclose(got["shifted_positions"], got["logits"], atol=1e-3)


def test_grads_are_not_trivially_equal(results):
    grads = results[1][0]["equality"]["gpt2"]["grads"]
    assert all(np.abs(g).max() > 0 for g in grads.values()), "a parameter got no gradient"


@pytest.mark.parametrize("tp", TP_SIZES)
@pytest.mark.parametrize("case", RECOMPUTE_CASES)
def test_recompute_replays_dropout_exactly(results, case, tp):
    recompute = results[tp][0]["recompute"]
    reference = recompute[case, None]
    assert not np.allclose(recompute[case, "second_draw"], reference["losses"]), "dropout is not active"
    for granularity in GRANULARITIES[1:]:
        got = recompute[case, granularity]
        np.testing.assert_allclose(got["losses"], reference["losses"], rtol=0, atol=1e-6, err_msg=granularity)
        for name in reference["grads"]:
            np.testing.assert_allclose(got["grads"][name], reference["grads"][name], rtol=1e-5, atol=1e-6,
                                       err_msg=f"{granularity}: grad of {name}")


@pytest.mark.parametrize("tp", TP_SIZES)
@pytest.mark.parametrize("case", ["gpt2", "llama"])
def test_loss_over_the_padded_vocabulary_equals_the_loss_over_real_rows(results, case, tp):
    """Both choices of loss_vocab_rows give the same losses and gradients (padding never reaches the loss);
    the padded one really computes the padded width (a multiple of 128 per rank here), the other only
    the real rows (none on the ranks that hold only padding at TP = 4)."""
    for rank, rank_results in enumerate(results[tp]):
        real, padded = rank_results["padded_vocab"][case, "real"], rank_results["padded_vocab"][case, "padded"]
        assert padded["width"] == 128 and real["width"] == min(128, max(0, VOCAB - 128 * rank))
        np.testing.assert_allclose(padded["losses"], real["losses"], **LOGIT_TOL, err_msg=f"rank {rank} losses")
        for name in real["grads"]:
            np.testing.assert_allclose(padded["grads"][name], real["grads"][name], **GRAD_TOL,
                                       err_msg=f"rank {rank} grad of {name}")
    np.testing.assert_allclose(results[tp][0]["padded_vocab"][case, "padded"]["losses"],
                               results[1][0]["equality"][case]["losses"], **LOGIT_TOL)


@pytest.mark.parametrize("tp", TP_SIZES[1:])
def test_full_state_loads_at_any_tp(results, tp):
    """TP = 1 weights (unpadded) loaded at TP = 2 / 4 (re-padded) give the TP = 1 logits."""
    for rank_results in results[tp]:
        np.testing.assert_allclose(rank_results["loaded_logits"], results[1][0]["equality"]["llama"]["logits"],
                                   **LOGIT_TOL)


@pytest.mark.parametrize("tp", TP_SIZES)
def test_generate_never_picks_padding_columns(results, tp):
    for tokens in results[tp][0]["padding"]:
        assert tokens.max() < VOCAB


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("tp", TP_SIZES)
def test_half_precision_model_trains(results, tp, dtype):
    losses = results[tp][0]["half"]
    fp32_loss, _, _ = losses["float32"]
    loss, finite, loss_is_fp32 = losses[dtype]
    assert finite and loss_is_fp32
    assert abs(loss - fp32_loss) < 0.05, (loss, fp32_loss)  # bf16 keeps ~3 significant digits, fp16 ~4
