"""CUDA paths: autograd Functions over the extension built from kernels/ (see extension.py).

Each forward saves what its backward kernel needs; the extension takes contiguous rows (or, where
noted, a row stride) and returns new tensors, except the cross-entropy backward which works in place.
"""

import torch

from megatronish.ops import extension, torch_impl


def _ext():
    return extension.load()


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as contiguous [rows, last dim]."""
    return t.reshape(-1, t.size(-1)).contiguous()


def _contiguous(t):
    return None if t is None else t.contiguous()


def _bias_grad(grad_x_rows: torch.Tensor, bias):
    if bias is None or not bias.requires_grad:
        return None
    return grad_x_rows.sum(dim=0, dtype=torch.float32).to(bias.dtype)


class ScaledSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, mask, scale, causal):
        # The mask is passed as a broadcast view: its zero strides let the kernel read it without a copy.
        mask_view = None if causal else mask.expand(scores.shape)
        probs = _ext().softmax_forward(scores.contiguous(), mask_view, scale, causal)
        ctx.save_for_backward(probs)
        ctx.scale, ctx.causal = scale, causal
        return probs

    @staticmethod
    def backward(ctx, grad_probs):
        (probs,) = ctx.saved_tensors
        return _ext().softmax_backward(grad_probs.contiguous(), probs, ctx.scale, ctx.causal), None, None, None


class Norm(torch.autograd.Function):
    """LayerNorm (rms=False) or RMSNorm (rms=True) over the last dim; saves mean (LayerNorm) and 1/std."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, rms):
        x_rows = _rows(x)
        y, mean, rstd = _ext().norm_forward(x_rows, weight.contiguous(), _contiguous(bias), eps, rms)
        ctx.save_for_backward(x_rows, weight, mean, rstd)
        ctx.rms, ctx.has_bias = rms, bias is not None
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, grad_y):
        x_rows, weight, mean, rstd = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = _ext().norm_backward(_rows(grad_y), x_rows, weight.contiguous(), mean, rstd, ctx.rms, ctx.has_bias)
        return grad_x.view(grad_y.shape), grad_weight, grad_bias if ctx.has_bias else None, None, None


class BiasGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias):
        x_rows, bias = _rows(x), _contiguous(bias)
        ctx.save_for_backward(x_rows, bias)
        return _ext().bias_gelu_forward(x_rows, bias).view(x.shape)

    @staticmethod
    def backward(ctx, grad_y):
        x_rows, bias = ctx.saved_tensors
        grad_x = _ext().bias_gelu_backward(_rows(grad_y), x_rows, bias)
        return grad_x.view(grad_y.shape), _bias_grad(grad_x, bias)


class BiasSwiglu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias):
        x_rows, bias = _rows(x), _contiguous(bias)
        ctx.save_for_backward(x_rows, bias)
        return _ext().bias_swiglu_forward(x_rows, bias).view(*x.shape[:-1], x.size(-1) // 2)

    @staticmethod
    def backward(ctx, grad_y):
        x_rows, bias = ctx.saved_tensors
        grad_x = _ext().bias_swiglu_backward(_rows(grad_y), x_rows, bias)
        return grad_x.view(*grad_y.shape[:-1], x_rows.size(-1)), _bias_grad(grad_x, bias)


class BiasDropoutAdd(torch.autograd.Function):
    """The keep mask is a Philox function of (seed, element index); the seed is drawn from the default
    generator of x's device, so a restored generator state replays the mask, and backward regenerates
    it from the saved seed instead of storing a mask."""

    @staticmethod
    def forward(ctx, x, bias, residual, prob):
        seed = None
        if 0.0 < prob < 1.0:
            seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=x.device)
        out = _ext().bias_dropout_add_forward(_rows(x), _contiguous(bias), _rows(residual), prob, seed)
        ctx.save_for_backward(seed, bias)
        ctx.prob = prob
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, grad_out):
        seed, bias = ctx.saved_tensors
        grad_rows = _rows(grad_out)
        grad_x = _ext().dropout_backward(grad_rows, ctx.prob, seed)
        return grad_x.view(grad_out.shape), _bias_grad(grad_x, bias), grad_out, None


class Rotary(torch.autograd.Function):
    """Rotation of t [s, b, n, d] by cos/sin [s, d/2]; the backward is the rotation by minus the angle.
    t may be a strided view (e.g. a slice of fused qkv) as long as its last dim is contiguous."""

    @staticmethod
    def forward(ctx, t, cos, sin):
        if t.stride(-1) != 1:
            t = t.contiguous()
        cos, sin = cos.float().contiguous(), sin.float().contiguous()
        ctx.save_for_backward(cos, sin)
        return _ext().rotary(t, cos, sin, False)

    @staticmethod
    def backward(ctx, grad_out):
        cos, sin = ctx.saved_tensors
        if grad_out.stride(-1) != 1:
            grad_out = grad_out.contiguous()
        return _ext().rotary(grad_out, cos, sin, True), None, None


def cross_entropy_stats(ext, logits, target, vocab_start, vocab_size):
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    return tuple(ext.cross_entropy_stats(logits, target.contiguous(), vocab_start, vocab_size))


def cross_entropy_backward_(ext, logits, target, vocab_start, vocab_size, lse, grad_loss, label_smoothing):
    if logits.stride(1) != 1:  # the kernel writes rows in place; a column-strided view takes the PyTorch path
        return torch_impl.cross_entropy_backward_(logits, target, vocab_start, vocab_size, lse, grad_loss, label_smoothing)
    ext.cross_entropy_backward_(logits, target.contiguous(), vocab_start, vocab_size, lse.contiguous(), grad_loss.contiguous(), label_smoothing)
    return logits
