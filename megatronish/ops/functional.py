"""The fused ops as the model calls them: check the inputs, then run the CUDA kernel or the PyTorch path.

All take fp32 / fp16 / bf16 inputs, compute in fp32 and return the input dtype. A CPU tensor always
takes the PyTorch path (torch_impl); a CUDA tensor takes the kernel unless the kernels are switched
off or could not be built (see extension.py). Both paths have the same semantics and gradients.

Under torch.compile both paths trace without graph breaks: the kernels are custom ops (cuda_impl), the
PyTorch paths are plain PyTorch that Inductor fuses, and dropout masks come from the random custom ops
of tensor_parallel.random, so that compiled and eager runs draw the same masks from the same streams.
"""

import torch

from megatronish.ops import cuda_impl, extension, torch_impl
from megatronish.tensor_parallel.random import dropout_keep_mask, dropout_seed

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# The checks run on every call of every op, so each message is only formatted once a check has failed.

def _require_float(name: str, tensor: torch.Tensor) -> None:
    if not tensor.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")


def _require_vector(name: str, tensor, size: int) -> None:
    if tensor is not None:
        if tensor.shape != (size,):
            raise ValueError(f"{name} must have shape [{size}] (the last dim of the input), got {list(tensor.shape)}")
        _require_float(name, tensor)


def _kernel_for(x: torch.Tensor, *others) -> bool:
    """Whether x is a CUDA tensor, every given tensor has a kernel dtype and the kernels are available."""
    if extension.cuda_module_for(x) is None:  # None at once for CPU tensors: the common CPU case stays cheap
        return False
    return all(t is None or t.dtype in KERNEL_DTYPES for t in (x, *others))  # float64 and friends: PyTorch only


def _same_dtype(x: torch.Tensor, *others) -> bool:
    """The kernels take bias / residual in the input's dtype; other mixes take the PyTorch path."""
    return all(t is None or t.dtype == x.dtype for t in others)


def _norm_params_fit_kernel(x: torch.Tensor, weight: torch.Tensor, bias) -> bool:
    """The norm kernels take weight (and bias) in x's dtype or in fp32, bias in the weight's dtype."""
    return weight.dtype in (x.dtype, torch.float32) and (bias is None or bias.dtype == weight.dtype)


# --- attention softmax ---

def scaled_causal_softmax(scores: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(scale * scores) over the last dim of scores [b, np, s, s], entries j > i (the future) excluded."""
    if scores.dim() != 4:
        raise ValueError(f"scores must be [b, np, sq, sk], got shape {list(scores.shape)}")
    if scores.size(2) != scores.size(3):
        raise ValueError(f"the causal softmax needs sq == sk, got scores shape {list(scores.shape)}; use scaled_masked_softmax with an explicit mask")
    _require_float("scores", scores)
    if not _kernel_for(scores):
        return torch_impl.scaled_causal_softmax(scores, scale)
    return cuda_impl.scaled_softmax(scores, None, float(scale), True)


def scaled_masked_softmax(scores: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(scale * scores) with mask (bool, broadcastable to scores, True = excluded); a fully masked row gives 0."""
    if scores.dim() != 4:
        raise ValueError(f"scores must be [b, np, sq, sk], got shape {list(scores.shape)}")
    _require_float("scores", scores)
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor (True = excluded), got dtype {mask.dtype}; convert with mask.bool()")
    try:
        broadcast = torch.broadcast_shapes(mask.shape, scores.shape)
    except RuntimeError:
        broadcast = None
    if broadcast != scores.shape:
        raise ValueError(f"mask of shape {list(mask.shape)} does not broadcast to scores of shape {list(scores.shape)}")
    if not _kernel_for(scores):
        return torch_impl.scaled_masked_softmax(scores, mask, scale)
    return cuda_impl.scaled_softmax(scores, mask, float(scale), False)


# --- normalization ---

def _check_norm(x, weight, bias, eps) -> None:
    if x.dim() == 0 or x.size(-1) == 0:
        raise ValueError(f"x must have a non-empty last dim to normalize, got shape {list(x.shape)}")
    _require_float("x", x)
    _require_vector("weight", weight, x.size(-1))
    _require_vector("bias", bias, x.size(-1))
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim of x; weight/bias [h] in x's dtype or fp32; bias may be None."""
    _check_norm(x, weight, bias, eps)
    if _kernel_for(x, weight, bias) and _norm_params_fit_kernel(x, weight, bias):
        return cuda_impl.norm(x, weight, bias, float(eps), False)
    apex_norms = extension.apex_norms_for(x)
    if apex_norms is not None and bias is not None and weight.dtype == x.dtype == bias.dtype:
        return apex_norms.fused_layer_norm_affine(x, weight, bias, (x.size(-1),), eps)
    return torch_impl.layer_norm(x, weight, bias, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of x: x / sqrt(mean(x^2) + eps) * weight."""
    _check_norm(x, weight, None, eps)
    if _kernel_for(x, weight) and _norm_params_fit_kernel(x, weight, None):
        return cuda_impl.norm(x, weight, None, float(eps), True)
    apex_norms = extension.apex_norms_for(x)
    if apex_norms is not None and weight.dtype == x.dtype:
        return apex_norms.fused_rms_norm_affine(x, weight, (x.size(-1),), eps)
    return torch_impl.rms_norm(x, weight, eps)


# --- activations ---

def bias_gelu(x: torch.Tensor, bias) -> torch.Tensor:
    """GeLU (tanh form) of x + bias; bias [h] or None."""
    _require_float("x", x)
    _require_vector("bias", bias, x.size(-1))
    if not (_kernel_for(x, bias) and _same_dtype(x, bias)):
        return torch_impl.bias_gelu(x, bias)
    return cuda_impl.bias_gelu(x, bias)


def bias_swiglu(x: torch.Tensor, bias) -> torch.Tensor:
    """With y = x + bias and (a, b) = y.chunk(2, dim=-1): silu(a) * b; the last dim halves."""
    _require_float("x", x)
    if x.dim() == 0 or x.size(-1) % 2:
        raise ValueError(f"bias_swiglu needs an even last dim (gate and up halves), got shape {list(x.shape)}")
    _require_vector("bias", bias, x.size(-1))
    if not (_kernel_for(x, bias) and _same_dtype(x, bias)):
        return torch_impl.bias_swiglu(x, bias)
    return cuda_impl.bias_swiglu(x, bias)


# --- residual ---

def bias_dropout_add(x: torch.Tensor, bias, residual: torch.Tensor, prob: float, training: bool,
                     rng_stream: str | None = None) -> torch.Tensor:
    """residual + dropout(x + bias, prob) (dropout only when training). The mask is drawn at call time from
    rng_stream (a stream of the RNG tracker, e.g. tensor_parallel.TP_RNG_STREAM), or from the default
    generator of x's device when None; restoring that stream's state replays it exactly."""
    _require_float("x", x)
    _require_float("residual", residual)
    if residual.shape != x.shape:
        raise ValueError(f"residual shape {list(residual.shape)} must equal x shape {list(x.shape)}")
    _require_vector("bias", bias, x.size(-1))
    _check_prob(prob)
    prob = float(prob) if training else 0.0
    random = 0.0 < prob < 1.0
    if not (_kernel_for(x, bias, residual) and _same_dtype(x, bias, residual)):
        keep = dropout_keep_mask(x, 1.0 - prob, rng_stream) if random else None
        return torch_impl.bias_dropout_add(x, bias, residual, prob, keep)
    return cuda_impl.bias_dropout_add(x, bias, residual, prob, dropout_seed(x, rng_stream) if random else None)


def dropout(x: torch.Tensor, prob: float, training: bool, rng_stream: str | None = None) -> torch.Tensor:
    """F.dropout(x, prob, training) with its mask drawn as in bias_dropout_add: from rng_stream (None: the
    default generator of x's device), also under torch.compile."""
    _require_float("x", x)
    _check_prob(prob)
    if not training or prob == 0:
        return x
    if prob == 1:
        return torch.zeros_like(x)
    return x * dropout_keep_mask(x, 1.0 - prob, rng_stream) * (1.0 / (1.0 - prob))


def _check_prob(prob: float) -> None:
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"dropout prob must be in [0, 1], got {prob}")


# --- rotary embedding ---

def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate q [s, b, nq, d] and k [s, b, nk, d] by angles with cos/sin [s, d/2] (rotate-half convention,
    as Hugging Face Llama): with x = [x1, x2], out = [x1*cos - x2*sin, x2*cos + x1*sin].

    cos/sin [s, b, d/2] give each sample its own positions (KV-cached decoding of a batch whose rows
    have different lengths); that form takes the PyTorch path."""
    for name, t in (("q", q), ("k", k)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be [s, b, heads, d], got shape {list(t.shape)}")
        _require_float(name, t)
    s, b, _, d = q.shape
    if k.size(0) != s or k.size(1) != b or k.size(3) != d:
        raise ValueError(f"k shape {list(k.shape)} must match q shape {list(q.shape)} except in heads")
    if d % 2:
        raise ValueError(f"rotary head dim must be even, got {d}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.shape not in ((s, d // 2), (s, b, d // 2)):
            raise ValueError(f"{name} must be [s, d/2] = [{s}, {d // 2}] or [s, b, d/2] = [{s}, {b}, {d // 2}], "
                             f"got {list(t.shape)}; slice the table to the sequence")
        _require_float(name, t)
    if not (cos.dim() == 2 and _kernel_for(q, k)):
        return torch_impl.apply_rotary_pos_emb(q, k, cos, sin)
    return cuda_impl.rotary(q, cos, sin, False), cuda_impl.rotary(k, cos, sin, False)


# --- vocab-parallel cross entropy, local part ---

def _check_cross_entropy(logits, target, vocab_start, vocab_size) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be [n, v_local], got shape {list(logits.shape)}")
    _require_float("logits", logits)
    if target.shape != logits.shape[:1]:
        raise ValueError(f"target must be [n] = [{logits.size(0)}], got {list(target.shape)}")
    if target.dtype != torch.int64:
        raise ValueError(f"target must be int64 token ids, got dtype {target.dtype}")
    if vocab_start < 0:
        raise ValueError(f"vocab_start must be >= 0, got {vocab_start}")
    if vocab_size <= 0:
        raise ValueError(f"vocab_size (the true, unpadded vocabulary) must be > 0, got {vocab_size}")


def cross_entropy_stats(logits: torch.Tensor, target: torch.Tensor, vocab_start: int, vocab_size: int):
    """One pass over this rank's logits [n, v_local] (global column vocab_start + j; columns >= vocab_size
    are padding and excluded). Returns fp32 [n] tensors (float64 for float64 logits) (local_max, sum_exp, target_logit, sum_logits):
    max over valid columns (-inf if none), sum of exp(x - local_max) (0 if none), the target's logit if
    this rank owns it (else 0), and the sum of the valid logits."""
    _check_cross_entropy(logits, target, vocab_start, vocab_size)
    if not _kernel_for(logits):
        return torch_impl.cross_entropy_stats(logits, target, vocab_start, vocab_size)
    return cuda_impl.cross_entropy_stats(logits, target, vocab_start, vocab_size)


def cross_entropy_backward_(logits, target, vocab_start, vocab_size, lse, grad_loss, label_smoothing: float):
    """Write in place into logits the gradient grad_loss[i] * (softmax - (1-eps)*onehot - eps/vocab_size)
    for valid columns and 0 for padding columns; lse and grad_loss are fp32 [n]. Returns logits."""
    _check_cross_entropy(logits, target, vocab_start, vocab_size)
    n = logits.size(0)
    # fp32, or float64 alongside float64 logits (the dtype cross_entropy_stats returned)
    accumulate = torch.promote_types(logits.dtype, torch.float32)
    for name, t in (("lse", lse), ("grad_loss", grad_loss)):
        if t.shape != (n,) or t.dtype != accumulate:
            raise ValueError(f"{name} must be {accumulate} [{n}], got {t.dtype} {list(t.shape)}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    # The kernel writes rows in place; a column-strided view takes the PyTorch path.
    if not _kernel_for(logits) or logits.stride(1) != 1:
        return torch_impl.cross_entropy_backward_(logits, target, vocab_start, vocab_size, lse, grad_loss, label_smoothing)
    cuda_impl.cross_entropy_backward_(logits, target, vocab_start, vocab_size, lse, grad_loss, label_smoothing)
    return logits
