"""torch.compile(GPTModel) on CPU: one graph, the eager numbers, at TP = 1 and 2.

Each case trains one step of a tiny model eagerly and compiled, from the same weights and random
streams, and compares losses and every gradient within 1e-5 (fp32; only the order of additions
differs). Dropout is on, so equal numbers also say that the compiled model drew the same masks
from the same streams (the default one and the per-TP-rank one), and, with activation recompute,
that backward reused them. Graph breaks are counted by Dynamo's counters and must be 0.

The fused ops run on their PyTorch paths (what CPU training uses) and on the kernel path, whose
custom ops (fake implementations, registered autograd, the in-place cross-entropy backward) are
served here by the fake extension: the Python that a GPU run compiles, without the CUDA kernels.
Compiling is slow on 2 cores, so the models have one layer, and two cases use Inductor (the real
backend, C++ on CPU) while the others stop after AOTAutograd ("aot_eager": the same tracing,
partitioning and fake tensors, no code generation). One forked run per TP size does every case.
"""

import contextlib
import warnings

import numpy as np
import pytest
import torch
from fake_extension import use_fake_extension

from megatronish import parallel_state
from megatronish.model import GPTModel, TransformerConfig, allreduce_sequence_parallel_grads
from megatronish.tensor_parallel import model_parallel_manual_seed
from megatronish.testing import run_distributed

VOCAB = 200  # padded to 256: at TP = 2 both ranks hold real vocabulary (see GPTModel.compile)
TINY = dict(num_layers=1, hidden_size=32, num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=16,
            hidden_dropout=0.2, attention_dropout=0.2, attention_backend="explicit")
LLAMA = dict(TINY, ffn_hidden_size=48, activation="swiglu", normalization="RMSNorm", position_embedding_type="rope",
             add_bias_linear=False, tie_word_embeddings=False, attention_dropout=0.0, attention_backend="sdpa")
# name: (model options, compiler backend, kernel path)
CASES = {
    "gpt2_full_recompute": (dict(TINY, recompute_granularity="full"), "inductor", False),
    "gpt2_kernels_full_recompute": (dict(TINY, recompute_granularity="full"), "inductor", True),
    "gpt2_selective_recompute": (dict(TINY, recompute_granularity="selective"), "aot_eager", False),
    "llama_sequence_parallel": (dict(LLAMA, sequence_parallel=True), "aot_eager", False),
}
TOLERANCE = dict(rtol=0, atol=1e-5)


def _batch():
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, VOCAB, (2, 8), generator=g), torch.randint(0, VOCAB, (2, 8), generator=g)


def _step(options: dict, backend: str | None):
    """Loss and gradients of one forward/backward, compiled with `backend` (None: eager)."""
    model_parallel_manual_seed(1234)
    model = GPTModel(TransformerConfig(**options), seed=1234)
    if backend is not None:
        model.compile(backend=backend)
    ids, labels = _batch()
    losses = model(ids, labels=labels)
    losses.mean().backward()
    allreduce_sequence_parallel_grads(model)
    second_draw = model(ids, labels=labels).detach().numpy()  # another dropout mask: must differ
    grads = {name: p.grad.detach().numpy().copy() for name, p in model.named_parameters()}
    return losses.detach().numpy(), grads, second_draw


def _all_cases(tp: int):
    parallel_state.initialize_model_parallel(tp)
    torch._dynamo.reset()
    out = {}
    for name, (options, backend, kernels) in CASES.items():
        with use_fake_extension() if kernels else contextlib.nullcontext() as fake:
            eager = _step(options, None)
            torch._dynamo.utils.counters.clear()
            compiled = _step(options, backend)
            breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
            kernel_calls = sorted(set(fake.calls)) if kernels else []
        out[name] = dict(eager=eager, compiled=compiled, graph_breaks=breaks, kernel_calls=kernel_calls)
    return out


@pytest.fixture(scope="module")
def results():
    return {tp: run_distributed(_all_cases, tp, args=(tp,), timeout=900) for tp in (1, 2)}


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("case", CASES)
def test_compiled_model_matches_eager_without_graph_breaks(results, case, tp):
    for rank, rank_results in enumerate(results[tp]):
        got = rank_results[case]
        assert got["graph_breaks"] == 0, f"rank {rank}: {got['graph_breaks']} graph breaks"
        (eager_loss, eager_grads, eager_second), (loss, grads, _) = got["eager"], got["compiled"]
        assert not np.allclose(eager_second, eager_loss), "dropout is not active: the test would prove nothing"
        np.testing.assert_allclose(loss, eager_loss, **TOLERANCE, err_msg=f"rank {rank} losses")
        assert grads.keys() == eager_grads.keys()
        for name in grads:
            np.testing.assert_allclose(grads[name], eager_grads[name], **TOLERANCE, err_msg=f"rank {rank} grad of {name}")


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
def test_kernel_path_ran_inside_the_compiled_graph(results, tp):
    calls = results[tp][0]["gpt2_kernels_full_recompute"]["kernel_calls"]
    for op in ("norm_forward", "norm_backward", "bias_gelu_forward", "bias_gelu_backward", "softmax_forward",
               "softmax_backward", "bias_dropout_add_forward", "dropout_backward", "cross_entropy_stats",
               "cross_entropy_backward_"):
        assert op in calls, f"{op} was not called: the kernel path did not run"


def _compile_with_padding_only_rank():
    parallel_state.initialize_model_parallel(2)
    model_parallel_manual_seed(1)
    model = GPTModel(TransformerConfig(**dict(TINY, vocab_size=100)))  # 100 padded to 256: rank 1 is all padding
    with pytest.raises(ValueError, match="needs real vocabulary on every tensor-parallel rank"):
        model.compile()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        GPTModel(TransformerConfig(**dict(TINY, attention_backend="sdpa"))).compile()
    return [str(w.message) for w in caught]


def test_compile_refuses_a_rank_with_only_vocabulary_padding_and_warns_about_sdpa_dropout():
    for messages in run_distributed(_compile_with_padding_only_rank, 2):
        assert any("attention_backend='explicit'" in message for message in messages)


def _opcheck_cases():
    x, bias = torch.randn(3, 5, 8, requires_grad=True), torch.randn(8, requires_grad=True)
    scores = torch.randn(2, 2, 5, 5, requires_grad=True)
    logits, target = torch.randn(6, 16), torch.randint(0, 20, (6,))
    angles = torch.rand(5, 4)
    ops = torch.ops.megatronish
    return {
        "scaled_softmax": (ops.scaled_softmax, (scores, None, 0.5, True)),
        "scaled_softmax[mask]": (ops.scaled_softmax, (scores, torch.rand(2, 1, 5, 5) < 0.3, 0.5, False)),
        "norm": (ops.norm, (x, 1 + torch.randn(8, requires_grad=True), bias, 1e-5, False)),
        "norm[rms]": (ops.norm, (x, 1 + torch.randn(8, requires_grad=True), None, 1e-5, True)),
        "bias_gelu": (ops.bias_gelu, (x, bias)),
        "bias_swiglu": (ops.bias_swiglu, (x, None)),
        "bias_dropout_add": (ops.bias_dropout_add, (x, bias, torch.randn(3, 5, 8, requires_grad=True), 0.3,
                                                    torch.tensor([7]))),
        "rotary": (ops.rotary, (torch.randn(5, 2, 3, 8, requires_grad=True), torch.cos(angles), torch.sin(angles), False)),
        "cross_entropy_stats": (ops.cross_entropy_stats, (logits, target, 16, 20)),
        "cross_entropy_backward_": (ops.cross_entropy_backward_, (logits.clone(), target, 16, 20, torch.rand(6),
                                                                  torch.rand(6), 0.1)),
    }


@pytest.mark.parametrize("case", list(_opcheck_cases()))
def test_kernel_custom_ops_pass_opcheck(case):
    """Schema, fake implementation (shapes, dtypes, strides against the real outputs) and autograd
    registration of every kernel op, with the fake extension producing the real outputs."""
    op, args = _opcheck_cases()[case]
    with use_fake_extension():
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
