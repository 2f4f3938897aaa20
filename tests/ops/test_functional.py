"""The PyTorch paths of megatronish.ops against straightforward float64 autograd references.

Each test draws fresh random inputs (odd sizes included), runs the op in the given dtype and the
reference in float64 on the same (rounded) input values, and compares outputs and gradients with a
tolerance set by the dtype (TOLERANCE below).
"""

import math

import pytest
import torch

from megatronish import ops

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (rtol, atol): fp32 math inside every op, so the error is the rounding of the output dtype.
TOLERANCE = {torch.float32: (1e-4, 1e-5), torch.float16: (5e-3, 5e-3), torch.bfloat16: (3e-2, 3e-2)}


def _close(actual, expected, dtype, scale=1.0):
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol * scale)


def _inputs(*shapes, dtype, scale=1.0):
    """Leaf tensors in `dtype` and their float64 twins holding the same values."""
    made = [(torch.randn(*shape) * scale).to(dtype).requires_grad_() for shape in shapes]
    twins = [t.detach().double().requires_grad_() for t in made]
    return made, twins


def _check_forward_backward(op, reference, made, twins, dtype, grad_scale=1.0):
    out = op(*made)
    expected = reference(*twins)
    assert out.dtype == made[0].dtype
    _close(out, expected, dtype)
    weight = torch.randn(expected.shape, dtype=torch.float64)
    (out.double() * weight).sum().backward()
    (expected * weight).sum().backward()
    for tensor, twin in zip(made, twins):
        assert tensor.grad.dtype == tensor.dtype
        _close(tensor.grad, twin.grad, dtype, grad_scale)


# --- softmax ---

def _reference_masked_softmax(x, mask):
    full = mask.all(dim=-1, keepdim=True)
    probs = torch.softmax(x.masked_fill(mask & ~full, float("-inf")), dim=-1)
    return torch.where(full, torch.zeros_like(probs), probs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 3, 5, 5), (1, 1, 1, 1), (1, 2, 33, 33)])
def test_scaled_causal_softmax(dtype, shape):
    scale = 0.37
    (scores,), (twin,) = _inputs(shape, dtype=dtype, scale=3.0)
    future = torch.ones(shape[-2:], dtype=torch.bool).triu(1)
    _check_forward_backward(
        lambda s: ops.scaled_causal_softmax(s, scale),
        lambda s: torch.softmax((s * scale).masked_fill(future, float("-inf")), dim=-1),
        [scores], [twin], dtype,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_shape", [(2, 1, 7, 9), (1, 1, 7, 9), (2, 3, 1, 9), (9,)])
def test_scaled_masked_softmax_with_fully_masked_rows(dtype, mask_shape):
    shape, scale = (2, 3, 7, 9), 1.3
    mask = torch.rand(mask_shape) < 0.4
    if len(mask_shape) == 4 and mask_shape[2] > 1:
        mask[0, 0, 2, :] = True  # a fully masked row must give zeros, not NaN
    (scores,), (twin,) = _inputs(shape, dtype=dtype, scale=2.0)
    _check_forward_backward(
        lambda s: ops.scaled_masked_softmax(s, mask, scale),
        lambda s: _reference_masked_softmax(s * scale, mask.expand(shape)),
        [scores], [twin], dtype,
    )


def test_fully_masked_softmax_is_zero_with_zero_gradient():
    scores = torch.randn(1, 2, 3, 4, requires_grad=True)
    probs = ops.scaled_masked_softmax(scores, torch.ones(1, 1, 3, 4, dtype=torch.bool), 1.0)
    probs.sum().backward()
    assert torch.equal(probs, torch.zeros_like(probs))
    assert torch.equal(scores.grad, torch.zeros_like(scores))


# --- norms ---

def _reference_layer_norm(x, weight, bias, eps):
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    out = (x - mean) / torch.sqrt(var + eps) * weight
    return out if bias is None else out + bias


def _reference_rms_norm(x, weight, eps):
    return x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps) * weight


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [7, 33, 97])  # tiny rows can have near-zero variance: ill-conditioned
@pytest.mark.parametrize("fp32_weight", [False, True])
def test_layer_norm(dtype, hidden, fp32_weight):
    eps = 1e-5
    wdtype = torch.float32 if fp32_weight else dtype
    x = (torch.randn(3, 5, hidden) * 2 + 0.5).to(dtype).requires_grad_()
    weight = (1 + 0.2 * torch.randn(hidden)).to(wdtype).requires_grad_()
    bias = (0.2 * torch.randn(hidden)).to(wdtype).requires_grad_()
    twins = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    _check_forward_backward(
        lambda *a: ops.layer_norm(*a, eps), lambda *a: _reference_layer_norm(*a, eps), [x, weight, bias], twins, dtype,
        grad_scale=4.0,  # weight/bias grads sum 15 rows of rounded terms
    )


def test_layer_norm_without_bias():
    (x, weight), twins = _inputs((4, 11), (11,), dtype=torch.float32)
    _check_forward_backward(
        lambda x, w: ops.layer_norm(x, w, None, 1e-6), lambda x, w: _reference_layer_norm(x, w, None, 1e-6),
        [x, weight], twins, torch.float32,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [1, 13, 130])
@pytest.mark.parametrize("fp32_weight", [False, True])
def test_rms_norm(dtype, hidden, fp32_weight):
    eps = 1e-6
    x = torch.randn(6, hidden).to(dtype).requires_grad_()
    weight = (1 + 0.2 * torch.randn(hidden)).to(torch.float32 if fp32_weight else dtype).requires_grad_()
    twins = [t.detach().double().requires_grad_() for t in (x, weight)]
    _check_forward_backward(
        lambda *a: ops.rms_norm(*a, eps), lambda *a: _reference_rms_norm(*a, eps), [x, weight], twins, dtype, grad_scale=4.0,
    )


# --- activations ---

def _reference_gelu_tanh(y):
    return 0.5 * y * (1 + torch.tanh(math.sqrt(2 / math.pi) * (y + 0.044715 * y**3)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_bias_gelu(dtype, with_bias):
    if with_bias:
        made, twins = _inputs((3, 4, 37), (37,), dtype=dtype, scale=2.0)
        reference = lambda x, b: _reference_gelu_tanh(x + b)
    else:
        made, twins = _inputs((5, 37), dtype=dtype, scale=2.0)
        reference = _reference_gelu_tanh
    op = (lambda x, b: ops.bias_gelu(x, b)) if with_bias else (lambda x: ops.bias_gelu(x, None))
    _check_forward_backward(op, reference, made, twins, dtype, grad_scale=4.0)


def test_bias_gelu_at_zero_tiny_and_large_inputs():
    # The PyTorch path takes the gate back as output / input in backward: 0 / 0 at zero, and the
    # sigmoid saturates to exactly 0 or 1 for large |x|. Values and gradients must still match.
    special = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-40, 20.0, -20.0, 200.0, -200.0, 3.0, -3.0])
    x = torch.cat([special, torch.randn(21) * 4]).requires_grad_()
    twin = x.detach().double().requires_grad_()
    weight = torch.randn(x.shape, dtype=torch.float64)
    out = ops.bias_gelu(x, None)
    (out.double() * weight).sum().backward()
    (_reference_gelu_tanh(twin) * weight).sum().backward()
    assert torch.isfinite(x.grad).all()
    _close(out, _reference_gelu_tanh(twin), torch.float32)
    _close(x.grad, twin.grad, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_bias_swiglu(dtype, with_bias):
    def reference(x, b=None):
        y = x if b is None else x + b
        gate, up = y[..., :21], y[..., 21:]
        return gate * torch.sigmoid(gate) * up

    if with_bias:
        made, twins = _inputs((3, 2, 42), (42,), dtype=dtype, scale=2.0)
        op = lambda x, b: ops.bias_swiglu(x, b)
    else:
        made, twins = _inputs((5, 42), dtype=dtype, scale=2.0)
        op = lambda x: ops.bias_swiglu(x, None)
    _check_forward_backward(op, reference, made, twins, dtype, grad_scale=4.0)


# --- bias + dropout + residual ---

@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_dropout_add_without_dropout_is_exact_sum(dtype):
    made, twins = _inputs((5, 3, 19), (19,), (5, 3, 19), dtype=dtype)
    for prob, training in ((0.0, True), (0.5, False)):
        for t in made + twins:
            t.grad = None
        _check_forward_backward(
            lambda x, b, r: ops.bias_dropout_add(x, b, r, prob, training), lambda x, b, r: r + (x + b), made, twins, dtype,
            grad_scale=4.0,
        )


@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_dropout_add_training(dtype):
    prob, shape = 0.3, (64, 3, 101)
    (x, bias, residual), _ = _inputs(shape, shape[-1:], shape, dtype=dtype)
    state = torch.get_rng_state()
    out = ops.bias_dropout_add(x, bias, residual, prob, True)
    # The mask depends only on the generator state and the shape: replaying it on ones reveals it.
    torch.set_rng_state(state)
    is_kept = ops.bias_dropout_add(torch.ones(shape), None, torch.zeros(shape), prob, True) != 0
    expected = residual.double() + is_kept * (x.double() + bias.double()) / (1 - prob)
    _close(out, expected, dtype, scale=4.0)
    assert abs(is_kept.double().mean().item() - (1 - prob)) < 0.02  # 19k draws: std of the mean is 0.003

    grad = torch.randn(shape, dtype=torch.float64)
    (out.double() * grad).sum().backward()
    _close(x.grad, grad * is_kept / (1 - prob), dtype, scale=4.0)
    _close(residual.grad, grad, dtype)
    _close(bias.grad, (grad * is_kept / (1 - prob)).sum(dim=(0, 1)), dtype, scale=40.0)


def test_bias_dropout_add_mask_replays_from_rng_state():
    x, residual = torch.randn(7, 33), torch.randn(7, 33)
    state = torch.get_rng_state()
    first = ops.bias_dropout_add(x, None, residual, 0.5, True)
    second = ops.bias_dropout_add(x, None, residual, 0.5, True)
    torch.set_rng_state(state)
    replay = ops.bias_dropout_add(x, None, residual, 0.5, True)
    assert torch.equal(first, replay)
    assert not torch.equal(first, second)


def test_bias_dropout_add_drops_everything_at_prob_one():
    x, residual = torch.randn(3, 5), torch.randn(3, 5)
    assert torch.equal(ops.bias_dropout_add(x, torch.randn(5), residual, 1.0, True), residual)


# --- rotary ---

def _reference_rotary(t, cos, sin):
    # Hugging Face Llama form: t * cos + rotate_half(t) * sin with the half-size tables repeated.
    half = t.size(-1) // 2
    cos_full = torch.cat([cos, cos], dim=-1)[:, None, None, :]
    sin_full = torch.cat([sin, sin], dim=-1)[:, None, None, :]
    rotated_half = torch.cat([-t[..., half:], t[..., :half]], dim=-1)
    return t * cos_full + rotated_half * sin_full


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("s,b,nq,nk,d", [(5, 2, 3, 1, 8), (1, 1, 1, 1, 2), (7, 3, 4, 2, 22)])
def test_apply_rotary_pos_emb(dtype, s, b, nq, nk, d):
    angles = torch.rand(s, d // 2) * 10
    cos, sin = torch.cos(angles), torch.sin(angles)
    (q, k), (q64, k64) = _inputs((s, b, nq, d), (s, b, nk, d), dtype=dtype)
    q_out, k_out = ops.apply_rotary_pos_emb(q, k, cos, sin)
    q_ref, k_ref = _reference_rotary(q64, cos.double(), sin.double()), _reference_rotary(k64, cos.double(), sin.double())
    _close(q_out, q_ref, dtype)
    _close(k_out, k_ref, dtype)
    gq, gk = torch.randn(q_ref.shape, dtype=torch.float64), torch.randn(k_ref.shape, dtype=torch.float64)
    ((q_out.double() * gq).sum() + (k_out.double() * gk).sum()).backward()
    ((q_ref * gq).sum() + (k_ref * gk).sum()).backward()
    _close(q.grad, q64.grad, dtype)
    _close(k.grad, k64.grad, dtype)


def test_rotary_accepts_a_strided_view_of_fused_qkv():
    s, b, n, d = 4, 2, 3, 6
    qkv = torch.randn(s, b, n, 3 * d)
    q, k = qkv[..., :d], qkv[..., d : 2 * d]
    angles = torch.rand(s, d // 2)
    q_out, k_out = ops.apply_rotary_pos_emb(q, k, torch.cos(angles), torch.sin(angles))
    torch.testing.assert_close(q_out, _reference_rotary(q.contiguous(), torch.cos(angles), torch.sin(angles)))
    torch.testing.assert_close(k_out, _reference_rotary(k.contiguous(), torch.cos(angles), torch.sin(angles)))


def test_rotary_with_per_sample_tables_rotates_each_sample_by_its_own_angles():
    s, b, n, d = 3, 4, 2, 6
    q, k = torch.randn(s, b, n, d), torch.randn(s, b, 1, d)
    angles = torch.rand(s, b, d // 2) * 10
    q_out, k_out = ops.apply_rotary_pos_emb(q, k, torch.cos(angles), torch.sin(angles))
    for row in range(b):
        cos, sin = torch.cos(angles[:, row]), torch.sin(angles[:, row])
        torch.testing.assert_close(q_out[:, row:row + 1], _reference_rotary(q[:, row:row + 1], cos, sin))
        torch.testing.assert_close(k_out[:, row:row + 1], _reference_rotary(k[:, row:row + 1], cos, sin))
    with pytest.raises(ValueError, match=r"cos must be \[s, d/2\] = \[3, 3\] or \[s, b, d/2\] = \[3, 4, 3\]"):
        ops.apply_rotary_pos_emb(q, k, torch.cos(angles[:, :2]), torch.sin(angles[:, :2]))
