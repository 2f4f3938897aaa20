"""A stand-in for the compiled extension (kernels/binding.cpp) that runs on CPU tensors.

It follows the binding's contract (arguments, returned tensors, in-place cross-entropy backward)
and computes each backward with the formula its CUDA kernel uses, not with autograd. Tests install
it to run the CUDA path's Python (megatronish.ops.cuda_impl: custom ops, fake implementations,
registered autograd) without a GPU; `use_fake_extension` makes every tensor take that path.
"""

import contextlib
import math
from unittest import mock

import torch

from megatronish.ops import extension, torch_impl

GELU_ALPHA, GELU_BETA = math.sqrt(2 / math.pi), 0.044715


class FakeExtension:
    def __init__(self):
        self.calls = []  # the binding functions the glue called, to prove the CUDA path was taken

    def __getattribute__(self, name):
        if not name.startswith("_") and name != "calls":
            object.__getattribute__(self, "calls").append(name)
        return object.__getattribute__(self, name)

    def softmax_forward(self, scores, mask, scale, causal):
        assert scores.is_contiguous() and (causal or mask.shape == scores.shape)
        if causal:
            return torch_impl.scaled_causal_softmax(scores, scale)
        return torch_impl.scaled_masked_softmax(scores, mask, scale)

    def softmax_backward(self, grad, probs, scale, causal):
        g, p = grad.float(), probs.float()
        return (scale * p * (g - (g * p).sum(-1, keepdim=True))).to(probs.dtype)

    def norm_forward(self, x, weight, bias, eps, rms):
        assert x.dim() == 2 and x.is_contiguous()
        x32 = x.float()
        mean = torch.zeros(x.size(0)) if rms else x32.mean(-1)
        centered = x32 - mean[:, None]
        rstd = torch.rsqrt((centered**2).mean(-1) + eps)
        y = centered * rstd[:, None] * weight.float()
        if bias is not None:
            y = y + bias.float()
        return [y.to(x.dtype), torch.empty(0) if rms else mean, rstd]

    def norm_backward(self, grad, x, weight, mean, rstd, rms, has_bias):
        g, w = grad.float(), weight.float()
        xhat = (x.float() - (0 if rms else mean[:, None])) * rstd[:, None]
        mean_gw = torch.zeros_like(rstd)[:, None] if rms else (g * w).mean(-1, keepdim=True)
        grad_x = rstd[:, None] * (g * w - mean_gw - xhat * (g * w * xhat).mean(-1, keepdim=True))
        grad_bias = g.sum(0).to(weight.dtype) if has_bias else torch.empty(0)
        return [grad_x.to(x.dtype), (g * xhat).sum(0).to(weight.dtype), grad_bias]

    def _biased(self, x, bias):
        return x.float() if bias is None else x.float() + bias.float()

    def bias_gelu_forward(self, x, bias):
        return torch_impl.bias_gelu(x, bias)

    def bias_gelu_backward(self, grad, x, bias):
        y = self._biased(x, bias)
        t = torch.tanh(GELU_ALPHA * (y + GELU_BETA * y**3))
        slope = 0.5 * (1 + t) + 0.5 * y * (1 - t * t) * GELU_ALPHA * (1 + 3 * GELU_BETA * y * y)
        return (grad.float() * slope).to(x.dtype)

    def bias_swiglu_forward(self, x, bias):
        return torch_impl.bias_swiglu(x, bias)

    def bias_swiglu_backward(self, grad, x, bias):
        gate, up = self._biased(x, bias).chunk(2, dim=-1)
        s, g = torch.sigmoid(gate), grad.float()
        return torch.cat([g * up * s * (1 + gate * (1 - s)), g * gate * s], dim=-1).to(x.dtype)

    @staticmethod
    def _keep(shape, prob, seed):
        if seed is None:
            return torch.full(shape, prob < 1.0)
        generator = torch.Generator().manual_seed(int(seed.item()))
        return torch.rand(shape, generator=generator) >= prob

    def bias_dropout_add_forward(self, x, bias, residual, prob, seed):
        keep = self._keep(x.shape, prob, seed)
        return (residual.float() + keep * self._biased(x, bias) / (1 - prob)).to(x.dtype)

    def dropout_backward(self, grad, prob, seed):
        return (grad.float() * self._keep(grad.shape, prob, seed) / (1 - prob)).to(grad.dtype)

    def rotary(self, t, cos, sin, inverse):
        assert t.stride(-1) == 1
        rotated, _ = torch_impl.apply_rotary_pos_emb(t, t, cos, -sin if inverse else sin)
        return rotated.contiguous()

    def cross_entropy_stats(self, logits, target, vocab_start, vocab_size):
        return list(torch_impl.cross_entropy_stats(logits, target, vocab_start, vocab_size))

    def cross_entropy_backward_(self, logits, target, vocab_start, vocab_size, lse, grad_loss, smoothing):
        torch_impl.cross_entropy_backward_(logits, target, vocab_start, vocab_size, lse, grad_loss, smoothing)


@contextlib.contextmanager
def use_fake_extension():
    """Every tensor of a kernel dtype takes the CUDA path, served by a new FakeExtension (yielded)."""
    fake = FakeExtension()
    with mock.patch.object(extension, "cuda_module_for", lambda tensor: fake), \
            mock.patch.object(extension, "load", lambda: fake):
        yield fake
