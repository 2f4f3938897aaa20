"""CUDA paths: the extension built from kernels/ (see extension.py) as torch.library custom ops.

Each op has a fake implementation (output shapes and dtypes without running anything) and, where it
is differentiable, a registered autograd formula whose backward is another custom op. So
torch.compile traces a model with these kernels inside as single ops, without graph breaks, and
eager mode runs the same code. The extension takes contiguous rows (or, where noted, a row stride)
and returns new tensors, except the cross-entropy backward, which works in place.
"""

import torch
from torch.library import custom_op

from megatronish.ops import extension


def _ext():
    return extension.load()


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as contiguous [rows, last dim]."""
    return t.reshape(-1, t.size(-1)).contiguous()


def _contiguous(t):
    return None if t is None else t.contiguous()


def _bias_grad(grad_x: torch.Tensor, bias):
    if bias is None or not bias.requires_grad:
        return None
    return grad_x.reshape(-1, grad_x.size(-1)).sum(dim=0, dtype=torch.float32).to(bias.dtype)


def _new_like(t: torch.Tensor, shape=None, dtype=None) -> torch.Tensor:
    """A fresh contiguous tensor like t (the fake implementations' outputs)."""
    return t.new_empty(t.shape if shape is None else shape, dtype=dtype or t.dtype)


# --- attention softmax ---

@custom_op("megatronish::scaled_softmax", mutates_args=())
def scaled_softmax(scores: torch.Tensor, mask: torch.Tensor | None, scale: float, causal: bool) -> torch.Tensor:
    # The mask is passed as a broadcast view: its zero strides let the kernel read it without a copy.
    mask_view = None if causal else mask.expand(scores.shape)
    return _ext().softmax_forward(scores.contiguous(), mask_view, scale, causal)


@custom_op("megatronish::scaled_softmax_backward", mutates_args=())
def scaled_softmax_backward(grad_probs: torch.Tensor, probs: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    return _ext().softmax_backward(grad_probs.contiguous(), probs, scale, causal)


@scaled_softmax.register_fake
def _(scores, mask, scale, causal):
    return _new_like(scores)


@scaled_softmax_backward.register_fake
def _(grad_probs, probs, scale, causal):
    return _new_like(probs)


def _softmax_setup(ctx, inputs, output):
    ctx.save_for_backward(output)
    ctx.scale, ctx.causal = inputs[2], inputs[3]


def _softmax_backward(ctx, grad_probs):
    (probs,) = ctx.saved_tensors
    return scaled_softmax_backward(grad_probs, probs, ctx.scale, ctx.causal), None, None, None


scaled_softmax.register_autograd(_softmax_backward, setup_context=_softmax_setup)


# --- LayerNorm (rms=False) and RMSNorm (rms=True) over the last dim ---

@custom_op("megatronish::norm", mutates_args=())
def norm_with_stats(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float,
                    rms: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, 1/std): the statistics per row are what the backward kernel needs (mean is empty for RMSNorm)."""
    y, mean, rstd = _ext().norm_forward(_rows(x), weight.contiguous(), _contiguous(bias), eps, rms)
    return y.view(x.shape), mean, rstd


@custom_op("megatronish::norm_backward", mutates_args=())
def norm_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                  rstd: torch.Tensor, rms: bool, has_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_x, grad_weight, grad_bias = _ext().norm_backward(_rows(grad_y), _rows(x), weight.contiguous(), mean, rstd,
                                                          rms, has_bias)
    return grad_x.view(x.shape), grad_weight, grad_bias


@norm_with_stats.register_fake
def _(x, weight, bias, eps, rms):
    rows = x.numel() // x.size(-1)
    return _new_like(x), _new_like(x, (0 if rms else rows,), torch.float32), _new_like(x, (rows,), torch.float32)


@norm_backward.register_fake
def _(grad_y, x, weight, mean, rstd, rms, has_bias):
    return _new_like(x), _new_like(weight), _new_like(weight, None if has_bias else (0,))


def _norm_setup(ctx, inputs, output):
    x, weight, bias, _, rms = inputs
    ctx.save_for_backward(x, weight, output[1], output[2])
    ctx.rms, ctx.has_bias = rms, bias is not None


def _norm_backward(ctx, grad_y, grad_mean, grad_rstd):
    x, weight, mean, rstd = ctx.saved_tensors
    grad_x, grad_weight, grad_bias = norm_backward(grad_y, x, weight, mean, rstd, ctx.rms, ctx.has_bias)
    return grad_x, grad_weight, grad_bias if ctx.has_bias else None, None, None


norm_with_stats.register_autograd(_norm_backward, setup_context=_norm_setup)


def norm(x, weight, bias, eps: float, rms: bool) -> torch.Tensor:
    return norm_with_stats(x, weight, bias, eps, rms)[0]


# --- activations: x [..., cols], bias [cols] or None ---

@custom_op("megatronish::bias_gelu", mutates_args=())
def bias_gelu(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _ext().bias_gelu_forward(_rows(x), _contiguous(bias)).view(x.shape)


@custom_op("megatronish::bias_gelu_backward", mutates_args=())
def bias_gelu_backward(grad_y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _ext().bias_gelu_backward(_rows(grad_y), _rows(x), _contiguous(bias)).view(x.shape)


@custom_op("megatronish::bias_swiglu", mutates_args=())
def bias_swiglu(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _ext().bias_swiglu_forward(_rows(x), _contiguous(bias)).view(*x.shape[:-1], x.size(-1) // 2)


@custom_op("megatronish::bias_swiglu_backward", mutates_args=())
def bias_swiglu_backward(grad_y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _ext().bias_swiglu_backward(_rows(grad_y), _rows(x), _contiguous(bias)).view(x.shape)


@bias_gelu.register_fake
def _(x, bias):
    return _new_like(x)


@bias_swiglu.register_fake
def _(x, bias):
    return _new_like(x, (*x.shape[:-1], x.size(-1) // 2))


@bias_gelu_backward.register_fake
@bias_swiglu_backward.register_fake
def _(grad_y, x, bias):
    return _new_like(x)


def _activation_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _activation_autograd(backward_op):
    def backward(ctx, grad_y):
        x, bias = ctx.saved_tensors
        grad_x = backward_op(grad_y, x, bias)
        return grad_x, _bias_grad(grad_x, bias)

    return backward


bias_gelu.register_autograd(_activation_autograd(bias_gelu_backward), setup_context=_activation_setup)
bias_swiglu.register_autograd(_activation_autograd(bias_swiglu_backward), setup_context=_activation_setup)


# --- residual + dropout(x + bias) ---

@custom_op("megatronish::bias_dropout_add", mutates_args=())
def bias_dropout_add(x: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor, prob: float,
                     seed: torch.Tensor | None) -> torch.Tensor:
    """The keep mask is a Philox function of (seed, element index): the same seed gives the same mask, and
    backward regenerates it from the seed instead of storing it. No seed when prob is 0 (or 1)."""
    return _ext().bias_dropout_add_forward(_rows(x), _contiguous(bias), _rows(residual), prob, seed).view(x.shape)


@custom_op("megatronish::dropout_backward", mutates_args=())
def dropout_backward(grad_out: torch.Tensor, prob: float, seed: torch.Tensor | None) -> torch.Tensor:
    return _ext().dropout_backward(_rows(grad_out), prob, seed).view(grad_out.shape)


@bias_dropout_add.register_fake
def _(x, bias, residual, prob, seed):
    return _new_like(x)


@dropout_backward.register_fake
def _(grad_out, prob, seed):
    return _new_like(grad_out)


def _dropout_setup(ctx, inputs, output):
    _, bias, _, prob, seed = inputs
    ctx.save_for_backward(bias, seed)
    ctx.prob = prob


def _dropout_backward(ctx, grad_out):
    bias, seed = ctx.saved_tensors
    grad_x = dropout_backward(grad_out, ctx.prob, seed)
    return grad_x, _bias_grad(grad_x, bias), grad_out, None, None


bias_dropout_add.register_autograd(_dropout_backward, setup_context=_dropout_setup)


# --- rotary embedding ---

@custom_op("megatronish::rotary", mutates_args=())
def rotary(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    """Rotation of t [s, b, n, d] by cos/sin [s, d/2] (by minus the angle if inverse); t may be a strided
    view (a slice of fused qkv) as long as its last dim is contiguous. Returns a contiguous tensor."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return _ext().rotary(t, cos.float().contiguous(), sin.float().contiguous(), inverse)


@rotary.register_fake
def _(t, cos, sin, inverse):
    return _new_like(t)


def _rotary_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], inputs[2])
    ctx.inverse = inputs[3]


def _rotary_backward(ctx, grad_out):
    cos, sin = ctx.saved_tensors
    return rotary(grad_out, cos, sin, not ctx.inverse), None, None, None  # the rotation by minus the angle


rotary.register_autograd(_rotary_backward, setup_context=_rotary_setup)


# --- vocab-parallel cross entropy, local part (no autograd: its caller is an autograd Function) ---

@custom_op("megatronish::cross_entropy_stats", mutates_args=())
def cross_entropy_stats(logits: torch.Tensor, target: torch.Tensor, vocab_start: int,
                        vocab_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    return tuple(_ext().cross_entropy_stats(logits, target.contiguous(), vocab_start, vocab_size))


@cross_entropy_stats.register_fake
def _(logits, target, vocab_start, vocab_size):
    return tuple(_new_like(logits, logits.shape[:1], torch.float32) for _ in range(4))


@custom_op("megatronish::cross_entropy_backward_", mutates_args=("logits",))
def cross_entropy_backward_(logits: torch.Tensor, target: torch.Tensor, vocab_start: int, vocab_size: int,
                            lse: torch.Tensor, grad_loss: torch.Tensor, label_smoothing: float) -> None:
    """Writes the gradient over logits (rows must be contiguous: logits.stride(1) == 1)."""
    _ext().cross_entropy_backward_(logits, target.contiguous(), vocab_start, vocab_size, lse.contiguous(),
                                   grad_loss.contiguous(), label_smoothing)


@cross_entropy_backward_.register_fake
def _(logits, target, vocab_start, vocab_size, lse, grad_loss, label_smoothing):
    return None
