"""The CUDA path's Python glue (cuda_impl's custom ops and their autograd) on CPU, against the PyTorch path.

A fake extension (fake_extension.py) stands in for the compiled one. So this checks, without a GPU,
that the glue saves and passes the right tensors and returns the right gradients, and that the
kernels' backward formulas are the derivatives of the forward. The kernels themselves are checked on
a GPU by tools/gpu_check.py.
"""

import pytest
import torch
from fake_extension import FakeExtension, use_fake_extension

from megatronish import ops
from megatronish.ops import extension, torch_impl

@pytest.fixture
def fake_cuda():
    """Every tensor takes the CUDA path, served by the fake extension."""
    with use_fake_extension() as fake:
        yield fake


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors], [t.detach().clone().requires_grad_() for t in tensors]


def _compare(glue_fn, reference_fn, inputs, rtol=1e-5, atol=1e-6):
    glue_in, reference_in = _leaves(*inputs)
    glue_out, reference_out = glue_fn(*glue_in), reference_fn(*reference_in)
    glue_out = glue_out if isinstance(glue_out, tuple) else (glue_out,)
    reference_out = reference_out if isinstance(reference_out, tuple) else (reference_out,)
    weights = [torch.randn(o.shape) for o in reference_out]
    for g, r in zip(glue_out, reference_out):
        assert g.dtype == r.dtype and g.shape == r.shape
        torch.testing.assert_close(g, r, rtol=rtol, atol=atol)
    sum((o.float() * w).sum() for o, w in zip(glue_out, weights)).backward()
    sum((o.float() * w).sum() for o, w in zip(reference_out, weights)).backward()
    for g, r in zip(glue_in, reference_in):
        assert g.grad is not None and g.grad.dtype == r.dtype
        torch.testing.assert_close(g.grad, r.grad, rtol=rtol, atol=atol)


def test_softmax_glue(fake_cuda):
    scores = torch.randn(2, 3, 9, 9)
    _compare(lambda s: ops.scaled_causal_softmax(s, 0.3), lambda s: torch_impl.scaled_causal_softmax(s, 0.3), [scores])
    mask = torch.rand(2, 1, 9, 9) < 0.4
    mask[1, 0, 3] = True
    _compare(lambda s: ops.scaled_masked_softmax(s, mask, 0.3), lambda s: torch_impl.scaled_masked_softmax(s, mask, 0.3), [scores])
    assert fake_cuda.calls.count("softmax_forward") == 2 and fake_cuda.calls.count("softmax_backward") == 2


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("x_dtype,weight_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                  (torch.bfloat16, torch.bfloat16)])
def test_norm_glue(fake_cuda, with_bias, x_dtype, weight_dtype):
    x = torch.randn(3, 4, 21).to(x_dtype)
    weight = (1 + 0.1 * torch.randn(21)).to(weight_dtype)
    tolerance = {} if x_dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    if with_bias:
        bias = torch.randn(21).to(weight_dtype)
        _compare(lambda *a: ops.layer_norm(*a, 1e-5), lambda *a: torch_impl.layer_norm(*a, 1e-5), [x, weight, bias], **tolerance)
    else:
        _compare(lambda *a: ops.layer_norm(*a, None, 1e-5), lambda *a: torch_impl.layer_norm(*a, None, 1e-5), [x, weight], **tolerance)
    _compare(lambda *a: ops.rms_norm(*a, 1e-6), lambda *a: torch_impl.rms_norm(*a, 1e-6), [x, weight], **tolerance)
    assert fake_cuda.calls.count("norm_forward") == 2 and fake_cuda.calls.count("norm_backward") == 2


def test_activation_glue(fake_cuda):
    x, bias = torch.randn(2, 5, 14) * 3, torch.randn(14)
    # The kernels' closed-form derivatives and autograd's chain round differently: fp32 ulps of values up to ~30.
    tolerance = {"rtol": 1e-5, "atol": 2e-5}
    _compare(ops.bias_gelu, torch_impl.bias_gelu, [x, bias], **tolerance)
    _compare(lambda x: ops.bias_gelu(x, None), lambda x: torch_impl.bias_gelu(x, None), [x], **tolerance)
    _compare(ops.bias_swiglu, torch_impl.bias_swiglu, [x, bias], **tolerance)
    assert {"bias_gelu_backward", "bias_swiglu_backward"} <= set(fake_cuda.calls)


def test_bias_dropout_add_glue_uses_one_mask_for_forward_and_backward(fake_cuda):
    x, bias, residual = torch.randn(6, 17, requires_grad=True), torch.randn(17, requires_grad=True), torch.randn(6, 17, requires_grad=True)
    out = ops.bias_dropout_add(x, bias, residual, 0.4, True)
    kept = (out - residual).abs() > 1e-6
    out.backward(torch.ones_like(out))
    torch.testing.assert_close(x.grad, kept.float() / 0.6)
    torch.testing.assert_close(bias.grad, (kept.float() / 0.6).sum(0))
    torch.testing.assert_close(residual.grad, torch.ones_like(residual))
    _compare(lambda *a: ops.bias_dropout_add(*a, 0.4, False), lambda *a: torch_impl.bias_dropout_add(*a, 0.0, None), [x, bias, residual])
    assert fake_cuda.calls.count("dropout_backward") == 2


def test_rotary_glue_backward_is_the_inverse_rotation(fake_cuda):
    s, d = 5, 8
    angles = torch.rand(s, d // 2) * 6
    qkv = torch.randn(s, 2, 3, 3 * d)
    q, k = qkv[..., :d], qkv[..., d : 2 * d]
    _compare(lambda q, k: ops.apply_rotary_pos_emb(q, k, torch.cos(angles), torch.sin(angles)),
             lambda q, k: torch_impl.apply_rotary_pos_emb(q, k, torch.cos(angles), torch.sin(angles)), [q, k])
    assert fake_cuda.calls.count("rotary") == 4  # q and k, forward and backward


def test_cross_entropy_glue_writes_in_place(fake_cuda):
    logits, target = torch.randn(5, 16), torch.randint(0, 20, (5,))
    stats = ops.cross_entropy_stats(logits, target, 16, 20)
    for got, expected in zip(stats, torch_impl.cross_entropy_stats(logits, target, 16, 20)):
        torch.testing.assert_close(got, expected)
    expected = torch_impl.cross_entropy_backward_(logits.clone(), target, 16, 20, torch.ones(5), torch.ones(5), 0.1)
    assert ops.cross_entropy_backward_(logits, target, 16, 20, torch.ones(5), torch.ones(5), 0.1) is logits
    torch.testing.assert_close(logits, expected)
    assert {"cross_entropy_stats", "cross_entropy_backward_"} <= set(fake_cuda.calls)


def test_fake_extension_mirrors_the_binding_signatures():
    """The fake must take the same arguments as each function binding.cpp exposes, or this file tests nothing."""
    import inspect
    import re

    source = (extension.KERNEL_DIR / "binding.cpp").read_text()
    exposed = re.findall(r'm\.def\("(\w+)", &(\w+)\)', source)
    assert len(exposed) == 13
    for python_name, cpp_name in exposed:
        match = re.search(rf"\n\S[^\n]*?\b{cpp_name}\(([^)]*)\)\s*{{", source)
        assert match, f"definition of {cpp_name} not found in binding.cpp"
        cpp_params = [p.split()[-1].lstrip("&*") for p in match.group(1).replace("\n", " ").split(",")]
        fake_params = list(inspect.signature(getattr(FakeExtension, python_name)).parameters)[1:]
        assert len(cpp_params) == len(fake_params), f"{python_name}: binding {cpp_params} vs fake {fake_params}"
