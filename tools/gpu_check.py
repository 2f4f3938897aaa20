"""One device call that checks and measures the fused kernels (megatronish.ops, kernels/) on a GPU.

    python tools/gpu_check.py                     # on a CUDA GPU: every section, under 8 minutes with the build
    python tools/gpu_check.py --no-checks --no-timing --no-model --pretrain-iters 30   # pretrain_gpt.py only
    python tools/gpu_check.py --dry-run           # on CPU at tiny sizes: the same code, without the CUDA parts

Sections, in this order (what matters most first); after each one, and after each op and model variant,
the results so far are written to <out-dir>/gpu_check.json and gpu_check.md (a run cut short keeps what it
measured); an error in one section is recorded and the next one runs:
  environment  the card, torch, CUDA, L2 size, the extension's build time and the path each op takes
  checks       every kernel against its PyTorch path (megatronish.ops.torch_impl): fresh random inputs,
               several shapes including odd sizes, fp32 / fp16 / bf16, forward and backward, tolerance by
               dtype; the dropout mask (keep rate, replay from a restored RNG state, the same mask in
               backward); -inf logits in the cross entropy
  bandwidth    copy GB/s of the card, and bf16 GEMM TFLOP/s
  ops          device time of each op, forward and forward + backward: our kernel; PyTorch as a user writes
               it (F.layer_norm in the model's dtype, F.gelu(approximate="tanh"), r + F.dropout(x + b),
               F.cross_entropy, ...); and our fp32 reference path. Each is timed over many back-to-back calls
               between two CUDA events, cycling through input sets that together exceed the L2 cache; GB/s
               next to the copy bandwidth
  model        a GPT-2 medium training step (24 layers, hidden 1024, 16 heads, seq 1024, vocab 50257, micro-batch
               8, bf16 with fp32 master weights: megatronish's DDP, optimizer and train_step on random tokens),
               with the kernels off, on, and with torch.compile; tokens/s, model FLOP utilization, and
               Megatron's log line
  ops compile  the ops' torch.compile column: the user's PyTorch compiled for each op on its own
               (torch._dynamo.reset(), dynamic=False, fullgraph=True), timed as above
  pretrain     (--pretrain-iters N) pretrain_gpt.py under torchrun at the same shape on the built-in demo
               corpus (byte tokens), kernels off / on / --torch-compile: its log lines
Every section after the checks watches a deadline (--budget-s) and skips what would not finish in time.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from megatronish import ops  # noqa: E402
from megatronish.ops import extension, torch_impl  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Max error divided by the largest reference magnitude: both paths compute in fp32, so this is the
# output dtype's rounding (and the order of fp32 sums).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# Dense bf16 tensor-core peak by card (spec sheets); the model step reports MFU against it and against
# the GEMM throughput measured here.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12}
DROPOUT = 0.1


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ---------------------------------------------------------------- the ops: inputs, and how each path calls them

def _randn(shape, dtype, device, scale=1.0, grad=True):
    return (torch.randn(shape, device=device) * scale).to(dtype).requires_grad_(grad)


def _make_scores(shape, dtype, device):
    return [_randn(shape, dtype, device, 4.0)]


def _make_masked(shape, dtype, device):
    b, _, sq, sk = shape
    mask = torch.rand(b, 1, sq, sk, device=device) < 0.3
    mask[0, 0, sq // 2, :] = True  # a fully masked row: zeros, not NaN
    return [_randn(shape, dtype, device, 4.0), mask]


def _make_norm(shape, dtype, device, bias=True, fp32_weight=False):
    hidden = shape[-1]
    wdtype = torch.float32 if fp32_weight else dtype
    tensors = [_randn(shape, dtype, device, 2.0), (1 + 0.1 * torch.randn(hidden, device=device)).to(wdtype).requires_grad_()]
    if bias:
        tensors.append(_randn((hidden,), wdtype, device, 0.1))
    return tensors


def _make_rows_and_bias(shape, dtype, device):
    return [_randn(shape, dtype, device, 2.0), _randn(shape[-1:], dtype, device, 0.5)]


def _make_dropout_add(shape, dtype, device):
    return [_randn(shape, dtype, device), _randn(shape[-1:], dtype, device), _randn(shape, dtype, device)]


def _make_rotary(shape, dtype, device):
    s, b, n, d = shape
    angles = torch.rand(s, d // 2, device=device) * 100
    return [_randn(shape, dtype, device), _randn((s, b, max(1, n // 4), d), dtype, device),
            torch.cos(angles), torch.sin(angles)]


def _make_qkv(shape, dtype, device):
    s, b, n, d = shape
    angles = torch.rand(s, d // 2, device=device) * 100
    return [_randn((s, b, n, 3 * d), dtype, device), torch.cos(angles), torch.sin(angles)]


def _cross_entropy_layout(shape):
    """[n, v_local] on the last rank of TP 8 over a vocabulary that leaves it a partial slice."""
    _, v_local = shape
    vocab_start = 7 * v_local
    return vocab_start, vocab_start + max(1, v_local - 77)  # the last 77 columns are padding


def _make_cross_entropy(shape, dtype, device, minus_inf=False):
    n, _ = shape
    vocab_start, vocab_size = _cross_entropy_layout(shape)
    target = torch.randint(0, vocab_size, (n,), device=device)
    target[: n // 2] = torch.randint(vocab_start, vocab_size, (n // 2,), device=device)  # half owned here
    logits = _randn(shape, dtype, device, 3.0, grad=False)
    if minus_inf:  # masked-out tokens: a few columns everywhere, and whole rows of this shard
        logits[:, 1::7] = float("-inf")
        logits[: max(1, n // 4)] = float("-inf")
        target[: max(1, n // 4)] = 0  # owned elsewhere: this shard adds nothing to those rows
    return [logits, target]


def _make_cross_entropy_backward(shape, dtype, device):
    logits, target = _make_cross_entropy(shape, dtype, device)
    n = shape[0]
    lse = logits.float().logsumexp(dim=-1) + torch.rand(n, device=device)  # as if other ranks added mass
    return [logits, target, lse, torch.rand(n, device=device)]


def _rotary_on_qkv_views(impl, t):
    """q and k as strided slices of a fused qkv projection, as the model passes them."""
    d = t[0].size(-1) // 3
    return impl.apply_rotary_pos_emb(t[0][..., :d], t[0][..., d : 2 * d], t[1], t[2])


def _ce_stats(impl, t):
    return impl.cross_entropy_stats(t[0], t[1], *_cross_entropy_layout(tuple(t[0].shape)))


def _ce_stats_all_padding(impl, t):
    """A rank that holds only padding columns (vocab 65 padded to 1024 at TP 8 has such ranks)."""
    vocab_start = 7 * t[0].size(1)
    return impl.cross_entropy_stats(t[0], t[1] % vocab_start, vocab_start, vocab_start)


def _ce_backward(impl, t):
    logits = t[0].clone()  # both paths write over their logits
    return impl.cross_entropy_backward_(logits, t[1], *_cross_entropy_layout(tuple(t[0].shape)), t[2], t[3], 0.1)


@dataclass
class Check:
    """One op checked against its PyTorch path: inputs of a shape, and the call on either implementation."""
    name: str
    make: Callable  # (shape, dtype, device) -> list of tensors (the floating ones that need grads do)
    call: Callable  # (impl, tensors) -> tensor or tuple; impl is megatronish.ops or megatronish.ops.torch_impl
    shapes: list
    tiny_shapes: list  # --dry-run
    differentiable: bool = True


CHECKS = [
    Check("scaled_causal_softmax", _make_scores, lambda impl, t: impl.scaled_causal_softmax(t[0], 0.125),
          [(2, 3, 37, 37), (1, 2, 128, 128), (2, 4, 1024, 1024), (1, 1, 4100, 4100)], [(2, 3, 7, 7)]),
    Check("scaled_masked_softmax", _make_masked, lambda impl, t: impl.scaled_masked_softmax(t[0], t[1], 0.125),
          [(2, 3, 37, 53), (2, 4, 256, 256), (1, 2, 64, 2500)], [(2, 3, 5, 9)]),
    Check("layer_norm", _make_norm, lambda impl, t: impl.layer_norm(t[0], t[1], t[2], 1e-5),
          [(7, 33), (300, 1024), (64, 16384), (9, 12289)], [(5, 13)]),
    Check("layer_norm[fp32 weights]", lambda s, d, dev: _make_norm(s, d, dev, fp32_weight=True),
          lambda impl, t: impl.layer_norm(t[0], t[1], t[2], 1e-5), [(5, 77), (256, 4096)], [(3, 10)]),
    Check("rms_norm", lambda s, d, dev: _make_norm(s, d, dev, bias=False), lambda impl, t: impl.rms_norm(t[0], t[1], 1e-6),
          [(7, 33), (300, 4096), (64, 16384), (9, 8193)], [(5, 13)]),
    Check("bias_gelu", _make_rows_and_bias, lambda impl, t: impl.bias_gelu(t[0], t[1]),
          [(7, 33), (1000, 4096), (3, 5, 1001)], [(3, 11)]),
    Check("bias_swiglu", _make_rows_and_bias, lambda impl, t: impl.bias_swiglu(t[0], t[1]),
          [(7, 34), (1000, 2 * 2816), (3, 5, 2002)], [(3, 12)]),
    # Values are compared at p = 0 (the two paths draw their masks differently, by design); the mask
    # itself is checked by check_dropout_mask.
    Check("bias_dropout_add[p=0]", _make_dropout_add, lambda impl, t: impl.bias_dropout_add(t[0], t[1], t[2], 0.0, None)
          if impl is torch_impl else impl.bias_dropout_add(t[0], t[1], t[2], 0.0, True),
          [(7, 33), (1024, 8, 1024), (3, 1001)], [(3, 11)]),
    Check("apply_rotary_pos_emb", _make_rotary, lambda impl, t: impl.apply_rotary_pos_emb(*t),
          [(5, 2, 3, 22), (128, 4, 16, 64), (33, 2, 8, 128)], [(3, 2, 4, 6)]),
    Check("apply_rotary_pos_emb[qkv views]", _make_qkv, _rotary_on_qkv_views, [(5, 2, 3, 22), (64, 2, 8, 128)],
          [(3, 2, 2, 6)]),
    Check("cross_entropy_stats", _make_cross_entropy, _ce_stats, [(7, 129), (512, 6288), (33, 50304), (4, 10)],
          [(3, 100)], differentiable=False),
    Check("cross_entropy_stats[-inf logits]", lambda s, d, dev: _make_cross_entropy(s, d, dev, minus_inf=True),
          _ce_stats, [(8, 129), (64, 6288)], [(4, 100)], differentiable=False),
    Check("cross_entropy_stats[all padding]", _make_cross_entropy, _ce_stats_all_padding, [(5, 128), (3, 37)],
          [(3, 16)], differentiable=False),
    Check("cross_entropy_backward_", _make_cross_entropy_backward, _ce_backward,
          [(7, 129), (512, 6288), (33, 50304), (4, 10)], [(3, 100)], differentiable=False),
]


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def _clone_inputs(tensors):
    return [t.detach().clone().requires_grad_(t.requires_grad) for t in tensors]


def _max_error(actual, expected) -> float:
    """Max |actual - expected| over the largest |expected| (positions where both are -inf agree)."""
    a, e = actual.double(), expected.double()
    both_inf = torch.isinf(a) & torch.isinf(e) & (torch.sign(a) == torch.sign(e))
    a, e = torch.where(both_inf, 0.0, a), torch.where(both_inf, 0.0, e)
    if torch.isnan(a).any() or torch.isnan(e).any():
        return math.inf
    if not e.numel():
        return 0.0
    return (a - e).abs().max().item() / max(e.abs().max().item(), 1e-6)


def check_case(check: Check, shape, dtype, device) -> dict:
    """Kernel path vs PyTorch path: forward outputs and, if differentiable, input gradients."""
    torch.manual_seed(zlib.crc32(f"{check.name}{shape}{dtype}".encode()))  # fresh per case, same every run
    base = check.make(shape, dtype, device)
    kernel_in, reference_in = _clone_inputs(base), _clone_inputs(base)
    ops.set_kernels_enabled(True)
    kernel_out, reference_out = _as_tuple(check.call(ops, kernel_in)), _as_tuple(check.call(torch_impl, reference_in))
    errors = {f"out{i}": _max_error(k, r) for i, (k, r) in enumerate(zip(kernel_out, reference_out))}
    if check.differentiable:
        weights = [torch.randn(r.shape, device=device) for r in reference_out]
        for outputs, inputs in ((kernel_out, kernel_in), (reference_out, reference_in)):
            sum((o.float() * w).sum() for o, w in zip(outputs, weights)).backward()
        for i, (k, r) in enumerate(zip(kernel_in, reference_in)):
            if r.grad is not None:
                errors[f"grad{i}"] = _max_error(k.grad, r.grad)
    worst = max(errors.values())
    return {"op": check.name, "shape": list(shape), "dtype": _name(dtype), "max_error": worst,
            "tolerance": TOLERANCE[dtype], "passed": worst <= TOLERANCE[dtype], "errors": errors}


def check_dropout_mask(device, dry_run: bool) -> dict:
    """The kernel's mask: keep rate, exact replay from a restored RNG state, the same mask in backward."""
    rows, cols = (256, 33) if dry_run else (4096, 1023)
    torch.manual_seed(0)
    x = torch.randn(rows, cols, device=device, dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(cols, device=device, dtype=torch.bfloat16)
    residual = torch.randn(rows, cols, device=device, dtype=torch.bfloat16)
    get_state = torch.cuda.get_rng_state if device.type == "cuda" else torch.get_rng_state
    set_state = torch.cuda.set_rng_state if device.type == "cuda" else torch.set_rng_state
    state = get_state()
    out = ops.bias_dropout_add(x, bias, residual, DROPOUT, True)
    set_state(state)
    replay = ops.bias_dropout_add(x, bias, residual, DROPOUT, True)
    set_state(state)
    keep = ops.bias_dropout_add(torch.ones_like(x), None, torch.zeros_like(residual), DROPOUT, True) != 0
    expected = residual.float() + keep * (x.float() + bias.float()) / (1 - DROPOUT)
    grad = torch.randn_like(out)
    out.backward(grad)
    keep_rate = keep.float().mean().item()
    result = {"replays_exactly": bool(torch.equal(out, replay)), "keep_rate": keep_rate,
              "keep_rate_ok": abs(keep_rate - (1 - DROPOUT)) < (0.02 if dry_run else 0.003),
              "forward_error": _max_error(out, expected),
              "backward_error": _max_error(x.grad, grad.float() * keep / (1 - DROPOUT)),
              "backward_zero_where_dropped": bool((x.grad[~keep] == 0).all())}
    result["passed"] = (result["replays_exactly"] and result["keep_rate_ok"] and result["backward_zero_where_dropped"]
                        and result["forward_error"] <= 1e-2 and result["backward_error"] <= 1e-2)
    return result


def run_checks(device, dry_run: bool, only) -> dict:
    """Every check x dtype x shape; stops at the first CUDA error (the context is unusable after one)."""
    rows = []
    for check in _selected(CHECKS, only):
        for dtype in DTYPES.values():
            for shape in check.tiny_shapes if dry_run else check.shapes:
                try:
                    row = check_case(check, shape, dtype, device)
                    _synchronize(device)
                except Exception as error:
                    message = f"{type(error).__name__}: {error}"
                    rows.append({"op": check.name, "shape": list(shape), "dtype": _name(dtype), "max_error": math.inf,
                                 "tolerance": TOLERANCE[dtype], "passed": False, "error": message[:2000]})
                    print(f"check {check.name} {dtype} {shape}: {message}", flush=True)
                    if "CUDA" in message or "cuda" in message:
                        return {"rows": rows, "aborted": f"{check.name} {_name(dtype)} {tuple(shape)}: {message[:500]}"}
                    continue
                rows.append(row)
                print(f"check {row['op']:<34} {row['dtype']:<9} {str(tuple(shape)):<22} "
                      f"error {row['max_error']:.2e} (tol {row['tolerance']:.0e}) {'ok' if row['passed'] else 'FAIL'}",
                      flush=True)
    result = {"rows": rows}
    if only is None or any(name.startswith("bias_dropout_add") for name in only):
        result["dropout_mask"] = check_dropout_mask(device, dry_run)
    return result


# ---------------------------------------------------------------- timing on the device

def _synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_ms(fn, input_sets, device, target_ms: float) -> float:
    """Milliseconds per call of fn(inputs), over back-to-back calls cycling through input_sets.

    On a GPU the calls are queued without waiting and two CUDA events around the loop give the device
    time per call (the host only has to keep ahead of the GPU); on CPU, wall-clock time around the loop.
    The number of calls is chosen so that the loop lasts about target_ms.
    """
    for inputs in input_sets[:2]:  # warm-up (and first-call work: allocations, autotuning)
        fn(inputs)
    _synchronize(device)
    start = time.perf_counter()
    fn(input_sets[0])
    _synchronize(device)
    once_ms = (time.perf_counter() - start) * 1e3
    calls = max(3, min(500, int(target_ms / max(once_ms, 1e-3))))
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for i in range(calls):
            fn(input_sets[i % len(input_sets)])
        end.record()
        torch.cuda.synchronize(device)
        return begin.elapsed_time(end) / calls
    start = time.perf_counter()
    for i in range(calls):
        fn(input_sets[i % len(input_sets)])
    return (time.perf_counter() - start) * 1e3 / calls


def l2_bytes(device) -> int:
    if device.type != "cuda":
        return 1 << 20
    return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20) or (50 << 20)


def _bytes_of(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def copy_bandwidth_gbs(device, dry_run: bool) -> float:
    numel = (1 << 20) if dry_run else (1 << 28)  # 512 MiB of bf16 on a GPU: far past L2
    pairs = [(torch.empty(numel, dtype=torch.bfloat16, device=device).normal_(),
              torch.empty(numel, dtype=torch.bfloat16, device=device)) for _ in range(2)]
    ms = device_ms(lambda pair: pair[1].copy_(pair[0]), pairs, device, target_ms=50 if dry_run else 300)
    return 2 * numel * 2 / ms / 1e6


def gemm_tflops(device, dry_run: bool) -> float:
    n = 256 if dry_run else 8192
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    ms = device_ms(lambda ab: ab[0] @ ab[1], [(a, b)], device, target_ms=50 if dry_run else 300)
    return 2 * n**3 / ms / 1e9


# ---------------------------------------------------------------- what the ops section times

def _causal_softmax_pytorch(t):
    scores = t[0]
    future = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).triu(1)
    return torch.softmax((scores * 0.125).masked_fill(future, float("-inf")), dim=-1)


def _rotary_pytorch(t):
    """Hugging Face Llama's apply_rotary_pos_emb: tables repeated to the head dim, in the input's dtype."""
    q, k, cos, sin = t
    cos, sin = (torch.cat([c, c], dim=-1)[:, None, None, :].to(q.dtype) for c in (cos, sin))

    def rotate_half(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([-x2, x1], dim=-1)

    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def _swiglu_pytorch(t):
    gate, up = (t[0] + t[1]).chunk(2, dim=-1)
    return F.silu(gate) * up


def _ce_loss_and_grad(t):
    """Loss and gradient of [n, v] logits through the two local cross-entropy ops (as one TP rank does
    at TP = 1): the gradient is written over the logits."""
    logits, target = t[0].detach(), t[1]
    vocab = logits.size(1)
    local_max, sum_exp, target_logit, _ = ops.cross_entropy_stats(logits, target, 0, vocab)
    lse = local_max + sum_exp.log()
    ops.cross_entropy_backward_(logits, target, 0, vocab, lse, torch.full_like(lse, 1.0 / len(lse)), 0.0)
    return (lse - target_logit).mean()


def _make_logits(shape, dtype, device):
    return [_randn(shape, dtype, device, 3.0), torch.randint(0, shape[1], (shape[0],), device=device)]


@dataclass
class Timed:
    """One op timed four ways. `ours(t)` calls megatronish.ops: with the kernels on it is the kernel, with
    them off our fp32 reference path; `pytorch(t)` is the op as a user writes it in plain PyTorch; with
    `loss_and_grad` ours already computes the gradient (the row times loss + gradient)."""
    name: str
    make: Callable
    shape: tuple
    tiny_shape: tuple
    ours: Callable
    pytorch: Callable | None
    loss_and_grad: bool = False
    fp32_too: bool = False  # also time fp32 (bf16 is what training runs)


TIMED = [
    Timed("scaled_causal_softmax", _make_scores, (8, 16, 1024, 1024), (2, 3, 16, 16),
          lambda t: ops.scaled_causal_softmax(t[0], 0.125), _causal_softmax_pytorch, fp32_too=True),
    Timed("scaled_masked_softmax", _make_masked, (8, 16, 1024, 1024), (2, 3, 16, 16),
          lambda t: ops.scaled_masked_softmax(t[0], t[1], 0.125),
          lambda t: torch.softmax((t[0] * 0.125).masked_fill(t[1], float("-inf")), dim=-1)),
    Timed("layer_norm", _make_norm, (8192, 1024), (64, 32), lambda t: ops.layer_norm(t[0], t[1], t[2], 1e-5),
          lambda t: F.layer_norm(t[0], t[0].shape[-1:], t[1], t[2], 1e-5), fp32_too=True),
    Timed("layer_norm[fp32 weights]", lambda s, d, dev: _make_norm(s, d, dev, fp32_weight=True), (8192, 4096), (64, 32),
          lambda t: ops.layer_norm(t[0], t[1], t[2], 1e-5),
          lambda t: F.layer_norm(t[0], t[0].shape[-1:], t[1], t[2], 1e-5)),
    Timed("rms_norm", lambda s, d, dev: _make_norm(s, d, dev, bias=False), (8192, 4096), (64, 32),
          lambda t: ops.rms_norm(t[0], t[1], 1e-6), lambda t: F.rms_norm(t[0], t[0].shape[-1:], t[1], 1e-6)),
    Timed("bias_gelu", _make_rows_and_bias, (8192, 4096), (64, 32), lambda t: ops.bias_gelu(t[0], t[1]),
          lambda t: F.gelu(t[0] + t[1], approximate="tanh")),
    Timed("bias_swiglu", _make_rows_and_bias, (8192, 2 * 2816), (64, 32), lambda t: ops.bias_swiglu(t[0], t[1]),
          _swiglu_pytorch),
    Timed(f"bias_dropout_add[p={DROPOUT}]", _make_dropout_add, (1024, 8, 1024), (16, 2, 32),
          lambda t: ops.bias_dropout_add(t[0], t[1], t[2], DROPOUT, True),
          lambda t: t[2] + F.dropout(t[0] + t[1], DROPOUT)),
    Timed("apply_rotary_pos_emb", _make_rotary, (1024, 8, 16, 128), (8, 2, 4, 8),
          lambda t: ops.apply_rotary_pos_emb(*t), _rotary_pytorch),
    Timed("cross_entropy (loss and grad)", _make_logits, (8192, 50304), (64, 1000), _ce_loss_and_grad,
          lambda t: F.cross_entropy(t[0].float(), t[1]), loss_and_grad=True, fp32_too=True),
]


def _input_sets(timed: Timed, shape, dtype, device, l2: int) -> list:
    """Enough independent input sets that cycling through them reads past the L2 cache."""
    first = timed.make(shape, dtype, device)
    count = max(2, min(8, math.ceil(2 * l2 / max(1, _bytes_of(first)))))
    return [first] + [timed.make(shape, dtype, device) for _ in range(count - 1)]


def _forward_backward(forward, grads_by_set):
    def run(t):
        for x in t:
            if isinstance(x, torch.Tensor) and x.requires_grad:
                x.grad = None
        outputs = _as_tuple(forward(t))
        torch.autograd.backward(outputs, grads_by_set[id(t)] if grads_by_set else None)

    return run


def _compiled(fn):
    """torch.compile of fn alone: no cache of an earlier op's graphs, one static-shape graph, no breaks."""
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False, fullgraph=True)


EAGER_VARIANTS = ("kernel", "pytorch", "reference")


def time_op(timed: Timed, dtype, device, labels, dry_run: bool) -> dict:
    """The timings of `labels` (EAGER_VARIANTS and/or "compile") of one op at one dtype."""
    shape = timed.tiny_shape if dry_run else timed.shape
    sets = _input_sets(timed, shape, dtype, device, l2_bytes(device))
    sample_out = _as_tuple(timed.pytorch(_clone_inputs(sets[0])))
    row = {"op": timed.name, "shape": list(shape), "dtype": _name(dtype), "input_sets": len(sets),
           "bytes": _bytes_of(sets[0]) + _bytes_of(sample_out)}
    grads = None if timed.loss_and_grad else {id(t): [torch.randn_like(o) for o in _as_tuple(timed.pytorch(t))]
                                              for t in sets}
    target = 20 if dry_run else 200
    for label in labels:
        ops.set_kernels_enabled(label == "kernel")  # "reference": the same ops, on their PyTorch paths
        combined = timed.loss_and_grad and label in ("kernel", "reference")  # the op computes its own gradient
        graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        try:
            forward = {"kernel": timed.ours, "reference": timed.ours, "pytorch": timed.pytorch}.get(label)
            forward = forward or _compiled(timed.pytorch)
            if not timed.loss_and_grad:
                row[f"{label}_fwd_ms"] = device_ms(forward, sets, device, target)
            row[f"{label}_fwd_bwd_ms"] = device_ms(forward if combined else _forward_backward(forward, grads),
                                                   sets, device, target)
            if label == "compile":  # 1: every call ran the one graph compiled for this op, none fell back
                row["compile_graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before
        except Exception as error:  # a failed variant is a result to report, not a reason to stop
            row[f"{label}_error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
    ops.set_kernels_enabled(True)
    time_key = "kernel_fwd_bwd_ms" if timed.loss_and_grad else "kernel_fwd_ms"
    if time_key in row:
        row["kernel_gbs"] = row["bytes"] / row[time_key] / 1e6
    return row


def _timed_cases(only, device, dry_run: bool):
    for timed in _selected(TIMED, only):
        for dtype in (torch.bfloat16, torch.float32) if timed.fp32_too else (torch.bfloat16,):
            if dry_run or device.type == "cuda":
                yield timed, dtype


def run_eager_timings(device, dry_run: bool, only, deadline: float, report: dict, save) -> None:
    rows = report["ops"]["rows"]
    for timed, dtype in _timed_cases(only, device, dry_run):
        if time.time() > deadline:
            rows.append({"op": timed.name, "dtype": _name(dtype), "skipped": "past the deadline (--budget-s)"})
            continue
        rows.append(time_op(timed, dtype, device, EAGER_VARIANTS, dry_run))
        print("time", json.dumps(rows[-1]), flush=True)
        save()


def run_compile_timings(device, dry_run: bool, only, deadline: float, report: dict, save) -> None:
    """The compile column of the ops table, op by op while time is left (each compiles for ~10-30 s)."""
    rows = {(row["op"], row["dtype"]): row for row in report["ops"]["rows"] if "skipped" not in row}
    for timed, dtype in _timed_cases(only, device, dry_run):
        row = rows.get((timed.name, _name(dtype)))
        if row is None:
            continue
        if time.time() > deadline - 45:
            row["compile_error"] = "skipped: not enough time left (--budget-s)"
            continue
        row.update({k: v for k, v in time_op(timed, dtype, device, ("compile",), dry_run).items() if "compile" in k})
        print("compile", timed.name, _name(dtype), {k: v for k, v in row.items() if "compile" in k}, flush=True)
        save()


# ---------------------------------------------------------------- the GPT-2 medium training step

GPT2_MEDIUM = ["--num-layers", "24", "--hidden-size", "1024", "--num-attention-heads", "16", "--seq-length", "1024",
               "--max-position-embeddings", "1024", "--micro-batch-size", "8", "--global-batch-size", "8", "--bf16",
               "--hidden-dropout", str(DROPOUT), "--attention-dropout", "0"]
TINY_MODEL = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
              "--max-position-embeddings", "32", "--micro-batch-size", "2", "--global-batch-size", "2",
              "--hidden-dropout", str(DROPOUT), "--attention-dropout", "0"]
MODEL_VOCAB = 50257


def peak_flops(device, measured_gemm_tflops: float) -> tuple[float, str]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for card, flops in PEAK_BF16_FLOPS.items():
            if card in name:
                return flops, f"{card} bf16 dense spec"
    return measured_gemm_tflops * 1e12, "the GEMM throughput measured here"


def model_step(variant: str, device, dry_run: bool, steps: int, peak: float) -> dict:
    """`variant`: "kernels off", "kernels on" or "torch.compile" (kernels on, model.compile())."""
    from megatronish.model import GPTModel
    from megatronish.optimizer import DistributedDataParallel, OptimizerConfig, get_megatron_optimizer
    from megatronish.tensor_parallel import model_parallel_manual_seed
    from megatronish.training.arguments import parse_args, transformer_config_from_args
    from megatronish.training.training import train_step
    from megatronish.training.training_log import num_floating_point_operations, training_log_line

    args = parse_args((TINY_MODEL if dry_run else GPT2_MEDIUM) + ["--lr", "1e-4", "--train-iters", str(steps)])
    vocab = 1000 if dry_run else MODEL_VOCAB
    ops.set_kernels_enabled(variant != "kernels off")
    model_parallel_manual_seed(args.seed)
    config = transformer_config_from_args(args, vocab)
    model = GPTModel(config, seed=args.seed)
    if variant == "torch.compile":
        torch._dynamo.reset()
        model.compile()
    ddp = DistributedDataParallel(model)
    optimizer = get_megatron_optimizer(ddp, OptimizerConfig(lr=args.lr, clip_grad=1.0))
    tokens = torch.randint(0, vocab, (args.micro_batch_size, args.seq_length + 1), device=device)
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:],
             "loss_mask": torch.ones(args.micro_batch_size, args.seq_length, device=device)}
    started = time.perf_counter()
    loss, _, _ = train_step([batch], [ddp], optimizer)  # the first step compiles (torch.compile) and warms up
    _synchronize(device)
    first_s = time.perf_counter() - started
    for _ in range(2):
        train_step([batch], [ddp], optimizer)
    _synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        loss, _, grad_norm = train_step([batch], [ddp], optimizer)
    _synchronize(device)
    ms = (time.perf_counter() - started) * 1e3 / steps
    flops = num_floating_point_operations(args, config.padded_vocab_size(1))
    tokens_per_s = args.global_batch_size * args.seq_length / ms * 1e3
    result = {"variant": variant, "ms": ms, "first_step_s": first_s, "tokens_per_s": tokens_per_s,
              "tflops": flops / ms / 1e9, "mfu": flops / (ms / 1e3) / peak, "loss": loss,
              "params": sum(p.numel() for p in model.parameters()), "kernel_status": ops.kernel_status(build=False)}
    result["log_line"] = training_log_line(
        iteration=steps + 3, train_iters=steps + 3, consumed_samples=(steps + 3) * args.global_batch_size,
        ms_per_iteration=ms, tflops_per_gpu=result["tflops"], learning_rate=args.lr,
        global_batch_size=args.global_batch_size, lm_loss=loss, loss_scale=1.0, grad_norm=grad_norm, skipped=0,
        nan=0, tokens_per_second=tokens_per_s)
    ops.set_kernels_enabled(True)
    return result


def run_model(device, dry_run: bool, deadline: float, report: dict, save) -> None:
    section = report["model"]
    peak, source = peak_flops(device, report["bandwidth"].get("gemm_tflops") or float("nan"))
    section.update({"shape": "tiny (dry run)" if dry_run else "GPT-2 medium, vocab 50257, micro-batch 8, bf16 + fp32 "
                    "master weights, hidden dropout 0.1, attention dropout 0 (SDPA)", "peak_flops": peak,
                    "peak_source": source, "variants": []})
    # kernels off first: the model with the least machinery, so a failure later still leaves a baseline
    for variant, needs_s in (("kernels off", 30), ("kernels on", 30), ("torch.compile", 150)):
        if time.time() > deadline - needs_s:
            section["variants"].append({"variant": variant, "skipped": "not enough time left (--budget-s)"})
            continue
        try:
            result = model_step(variant, device, dry_run, steps=2 if dry_run else 10, peak=peak)
        except Exception as error:  # e.g. out of memory, or a compile failure: report it, keep the rest
            result = {"variant": variant, "error": f"{type(error).__name__}: {error}"[:2000],
                      "traceback": traceback.format_exc()[-4000:]}
        section["variants"].append(result)
        print("model", json.dumps({k: v for k, v in result.items() if k != "kernel_status"}, default=str), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        save()


# ---------------------------------------------------------------- pretrain_gpt.py itself

def run_pretrain(iters: int, dry_run: bool, deadline: float, report: dict, save) -> None:
    section = report["pretrain"]
    shape = TINY_MODEL if dry_run else GPT2_MEDIUM
    common = shape + ["--train-iters", str(iters), "--log-interval", str(max(1, iters // 3)), "--eval-iters", "0",
                      "--sample-tokens", "0", "--save", "", "--lr", "1e-4", "--min-lr", "1e-5", "--lr-warmup-iters", "0"]
    variants = (("kernels off", [], {extension.ENV_SWITCH: "0"}), ("kernels on", [], {}),
                ("torch.compile", ["--torch-compile"], {}))
    for variant, flags, env in variants:
        remaining = deadline - time.time()
        if remaining < 60:
            section.append({"variant": variant, "skipped": "not enough time left (--budget-s)"})
            continue
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                   str(REPO / "pretrain_gpt.py"), *common, *flags]
        started = time.time()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=remaining, cwd=tempfile.gettempdir(),
                                  env={**os.environ, "PYTHONPATH": str(REPO), **env})
            output, code = done.stdout + done.stderr, done.returncode
        except subprocess.TimeoutExpired as expired:
            output, code = f"{expired.stdout or ''}{expired.stderr or ''}", "timeout"
        output = output if isinstance(output, str) else output.decode(errors="replace")
        log_lines = [line.strip() for line in output.splitlines() if "iteration" in line and "elapsed time" in line]
        errors = [line for line in output.splitlines() if "error" in line.lower()][:5]  # the cause, before torchrun's echo
        section.append({"variant": variant, "command": " ".join(command[2:]), "exit": code,
                        "seconds": time.time() - started, "log_lines": log_lines,
                        "tail": "" if code == 0 else "\n".join(errors + [output[-2000:]])})
        print(f"pretrain ({variant}): exit {code}, {len(log_lines)} log lines", flush=True)
        save()


# ---------------------------------------------------------------- report

def _fmt(value, spec=".3f"):
    return format(value, spec) if isinstance(value, (int, float)) and math.isfinite(value) else "-"


def markdown_report(report: dict) -> str:
    env = report["environment"]
    lines = ["# GPU check of the fused kernels", "", f"`{report['command']}` on {env.get('device', '?')} "
             f"(torch {env.get('torch')}, CUDA {env.get('cuda')}, L2 {env.get('l2_mb', '-')} MB), "
             f"{report.get('date', '')}; extension build {_fmt(env.get('build_s'), '.1f')} s; "
             f"total {_fmt(report.get('wall_s'), '.0f')} s.", ""]
    for name, error in report["errors"].items():
        lines.append(f"**Section {name} failed:** `{error[:500]}`\n")
    checks = report["checks"]
    lines += ["## Correctness (kernel vs PyTorch path, max error / max magnitude)", "",
              "| op | dtype | shapes | worst error | tolerance | result |", "|---|---|---|---|---|---|"]
    grouped = {}
    for row in checks.get("rows", []):
        grouped.setdefault((row["op"], row["dtype"]), []).append(row)
    for (op, dtype), rows in grouped.items():
        shapes = ", ".join("x".join(map(str, r["shape"])) for r in rows)
        result = "pass" if all(r["passed"] for r in rows) else "FAIL"
        lines.append(f"| {op} | {dtype} | {shapes} | {max(r['max_error'] for r in rows):.2e} | "
                     f"{rows[0]['tolerance']:.0e} | {result} |")
    lines += [f"\n{r['op']} {r['dtype']} {r['shape']} raised: `{r['error'][:300]}`" for r in checks.get("rows", []) if "error" in r]
    if checks.get("aborted"):
        lines.append(f"\nStopped after a CUDA error: {checks['aborted'][:300]}")
    mask = checks.get("dropout_mask")
    if mask:
        lines += ["", f"Dropout mask: replays exactly {mask['replays_exactly']}, keep rate {mask['keep_rate']:.4f} "
                  f"({1 - DROPOUT} expected), backward zero where dropped {mask['backward_zero_where_dropped']}: "
                  f"{'pass' if mask['passed'] else 'FAIL'}."]
    bandwidth = report["bandwidth"]
    copy = bandwidth.get("copy_gbs") or float("nan")
    lines += ["", "## Ops: device time (ms per call, back-to-back, inputs cycling past L2)", "",
              f"Copy bandwidth {_fmt(copy, '.0f')} GB/s; bf16 GEMM {_fmt(bandwidth.get('gemm_tflops'), '.0f')} TFLOP/s. "
              "kernel = megatronish.ops; pytorch = plain PyTorch as a user writes it; reference = our fp32 PyTorch "
              "path (where it differs); compile = torch.compile of the plain PyTorch, per op. GB/s = (inputs + "
              "outputs) / kernel time (forward; for the cross entropy, loss + grad). The causal softmax kernel skips "
              "the upper triangle, so its GB/s counts bytes it never reads.", "",
              "| op | shape | dtype | kernel fwd | pytorch fwd | reference fwd | compile fwd | kernel fwd+bwd | "
              "pytorch fwd+bwd | reference fwd+bwd | compile fwd+bwd | kernel GB/s | % of copy | vs pytorch | vs compile |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["ops"]["rows"]:
        if "skipped" in row:
            lines.append(f"| {row['op']} | - | {row['dtype']} | {row['skipped']} |" + " |" * 12)
            continue
        gbs = row.get("kernel_gbs")
        key = "fwd_bwd_ms" if "kernel_fwd_ms" not in row else "fwd_ms"
        speedups = [_fmt(row.get(f"{other}_{key}", math.nan) / row.get(f"kernel_{key}", math.nan), ".2f")
                    for other in ("pytorch", "compile")]
        cells = [_fmt(row.get(f"{label}_{kind}_ms")) for kind in ("fwd", "fwd_bwd")
                 for label in ("kernel", "pytorch", "reference", "compile")]
        lines.append(f"| {row['op']} | {'x'.join(map(str, row['shape']))} | {row['dtype']} | {' | '.join(cells)} | "
                     f"{_fmt(gbs, '.0f')} | {_fmt(100 * gbs / copy if gbs else math.nan, '.0f')}% | "
                     f"{speedups[0]}x | {speedups[1]}x |")
    lines += [f"\n{row['op']} {row['dtype']}: {label} {row[label]}" for row in report["ops"]["rows"]
              for label in row if label.endswith("_error")]
    model = report["model"]
    lines += ["", "## Training step", "", f"{model.get('shape', '')}; MFU against {_fmt(model.get('peak_flops', 0) / 1e12, '.0f')} "
              f"TFLOP/s ({model.get('peak_source', '')}).", "",
              "| variant | ms / step | tokens/s | TFLOP/s | MFU | first step (s) |", "|---|---|---|---|---|---|"]
    for v in model.get("variants", []):
        if "ms" in v:
            lines.append(f"| {v['variant']} | {v['ms']:.1f} | {v['tokens_per_s']:.0f} | {v['tflops']:.1f} | "
                         f"{100 * v['mfu']:.1f}% | {v['first_step_s']:.1f} |")
        else:
            lines.append(f"| {v['variant']} | {v.get('skipped') or v.get('error', '')[:200]} | | | | |")
    lines += ["", "```"] + [v["log_line"] for v in model.get("variants", []) if "log_line" in v] + ["```"]
    if report["pretrain"]:
        lines += ["", "## pretrain_gpt.py", ""]
        for run in report["pretrain"]:
            lines += [f"{run['variant']}: `{run.get('command', '')}` exit {run.get('exit', run.get('skipped'))}", "```"]
            lines += run.get("log_lines", []) + ([run["tail"][-1500:]] if run.get("tail") else []) + ["```"]
    return "\n".join(lines) + "\n"


def _selected(items, only):
    if only is None:
        return items
    return [item for item in items if any(item.name.startswith(name) for name in only)]


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, no CUDA parts: checks this script")
    parser.add_argument("--out-dir", default=None,
                        help="where gpu_check.md / .json go (default: $OUT if set, which the GPU machine's output "
                             "carries back, else bench/gpu_check; a temporary folder with --dry-run)")
    parser.add_argument("--only", default=None, help="comma-separated op names (or prefixes) to check and time")
    parser.add_argument("--no-checks", action="store_true", help="no correctness section")
    parser.add_argument("--no-timing", action="store_true", help="no ops section")
    parser.add_argument("--no-compile", action="store_true", help="no torch.compile timings of the ops")
    parser.add_argument("--no-model", action="store_true", help="no training-step section")
    parser.add_argument("--pretrain-iters", type=int, default=0, help="run pretrain_gpt.py for this many iterations "
                        "per variant (0: not at all)")
    parser.add_argument("--budget-s", type=float, default=450.0,
                        help="deadline for the whole run, build included: later sections skip what would not fit")
    args = parser.parse_args(argv)
    if args.budget_s <= 0 or args.pretrain_iters < 0:
        parser.error(f"--budget-s {args.budget_s} must be > 0 and --pretrain-iters {args.pretrain_iters} >= 0")
    args.only = [name.strip() for name in args.only.split(",") if name.strip()] if args.only else None
    if args.only and not _selected(CHECKS, args.only) + _selected(TIMED, args.only):
        parser.error(f"--only {','.join(args.only)} matches no op; ops: {', '.join(c.name for c in CHECKS)}")
    return args


def main(argv=None) -> int:
    started = time.time()
    args = _parse(argv)
    deadline = started + args.budget_s
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible; use --dry-run to check the script on CPU", file=sys.stderr)
        return 2
    device = torch.device("cpu") if args.dry_run else torch.device("cuda", torch.cuda.current_device())
    out_dir = Path(args.out_dir or os.environ.get("OUT") or (tempfile.mkdtemp() if args.dry_run else REPO / "bench" / "gpu_check"))
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"command": " ".join(["tools/gpu_check.py"] + (argv if argv is not None else sys.argv[1:])),
              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "environment": {}, "checks": {}, "bandwidth": {},
              "ops": {"rows": []}, "model": {}, "pretrain": [], "errors": {}}

    def save():
        report["wall_s"] = time.time() - started
        (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
        (out_dir / "gpu_check.md").write_text(markdown_report(report))

    def section(name, fn):
        try:
            fn()
        except Exception as error:  # recorded; the next section still runs
            report["errors"][name] = f"{type(error).__name__}: {error}\n{traceback.format_exc()[-3000:]}"
            print(f"section {name} failed: {report['errors'][name]}", file=sys.stderr, flush=True)
        save()
        print(f"== {name} done at {time.time() - started:.0f} s; written to {out_dir}", flush=True)

    section("environment", lambda: report["environment"].update(_environment(device)))
    if device.type == "cuda" and extension.load() is None:  # nothing below would test a kernel
        print(f"gpu_check: the extension did not build:\n{(extension.build_failure(full=True) or '')[-6000:]}",
              file=sys.stderr)
        return 3
    if not args.no_checks:
        section("checks", lambda: report["checks"].update(run_checks(device, args.dry_run, args.only)))
        if report["checks"].get("aborted"):
            return 1
    if not args.no_timing or not args.no_model:
        section("bandwidth", lambda: report["bandwidth"].update(
            copy_gbs=copy_bandwidth_gbs(device, args.dry_run), gemm_tflops=gemm_tflops(device, args.dry_run)))
    # What matters most first: eager op timings, then the training step, then compile timings of the ops.
    if not args.no_timing:
        section("ops", lambda: run_eager_timings(device, args.dry_run, args.only, deadline, report, save))
    if not args.no_model:
        section("model", lambda: _with_distributed(device, lambda: run_model(device, args.dry_run, deadline, report, save)))
    if not args.no_timing and not args.no_compile:
        section("ops compile", lambda: run_compile_timings(device, args.dry_run, args.only, deadline, report, save))
    if args.pretrain_iters:
        section("pretrain", lambda: run_pretrain(args.pretrain_iters, args.dry_run, deadline, report, save))
    print(f"\nwrote {out_dir / 'gpu_check.md'} and gpu_check.json ({time.time() - started:.0f} s)")
    checks = report["checks"]
    passed = all(r["passed"] for r in checks.get("rows", [])) and checks.get("dropout_mask", {}).get("passed", True)
    return 0 if passed and not report["errors"] else 1


def _environment(device) -> dict:
    build_start = time.time()
    built = extension.load() if device.type == "cuda" else None
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)",
           "torch": torch.__version__, "cuda": torch.version.cuda, "build_s": time.time() - build_start,
           "extension": "loaded" if built is not None else extension.build_failure() or "not built (CPU)",
           "l2_mb": l2_bytes(device) / 2**20, "kernel_status": ops.kernel_status(build=False)}
    print(json.dumps(env, indent=1), flush=True)
    return env


def _with_distributed(device, fn):
    """Run fn in a one-rank torch.distributed world (what DDP and the optimizer expect), then tear it down."""
    import torch.distributed as dist

    from megatronish import parallel_state

    parallel_state.initialize_distributed("nccl" if device.type == "cuda" else "gloo")
    parallel_state.initialize_model_parallel(1)
    try:
        fn()
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
