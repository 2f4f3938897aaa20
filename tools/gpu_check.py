"""One-run GPU check of the fused kernels (megatronish.ops / kernels/).

    python tools/gpu_check.py              # on a CUDA GPU, under 8 minutes; writes bench/gpu_check.{md,json}
    python tools/gpu_check.py --dry-run    # on CPU: every part except the CUDA ones, at tiny sizes

1. builds the extension (timed) and prints which path each op takes;
2. checks every kernel against its PyTorch path (megatronish.ops.torch_impl) on fresh random inputs,
   several shapes including odd sizes, fp32 / fp16 / bf16, forward and backward, tolerance by dtype;
   plus the dropout mask: keep rate, exact replay after restoring the RNG state, same mask in backward;
3. times each kernel against eager PyTorch and torch.compile of the same function (CUDA events,
   median after warm-up) and prints the forward's GB/s next to the card's measured copy bandwidth;
4. times a GPT-2 medium training step (24 layers, hidden 1024, seq 1024, bf16) with kernels on and off:
   tokens/s and model FLOP utilization against 989 TFLOP/s (H100 bf16 dense).
"""

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from megatronish import ops  # noqa: E402
from megatronish.ops import extension, torch_impl  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Max error divided by the largest reference magnitude: both paths compute in fp32, so this is the
# output dtype's rounding (and the order of fp32 sums).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
H100_BF16_DENSE_FLOPS = 989e12


# ---------------------------------------------------------------- the ops under test

@dataclass
class Case:
    """One op: how to make inputs of a shape, and how to call it on either implementation."""
    name: str  # the megatronish.ops function
    make: Callable  # (shape, dtype, device) -> list of tensors (the floating ones that need grads do)
    call: Callable  # (impl, tensors) -> tensor or tuple of tensors
    check_shapes: list  # compared with the PyTorch path at each of these
    bench_shape: tuple | None  # timed at this shape (None: not timed)
    differentiable: bool = True
    tiny_shapes: list = field(default_factory=list)  # --dry-run
    bench_call: Callable | None = None  # what is timed, if not `call`


def _randn(shape, dtype, device, scale=1.0, grad=True):
    return (torch.randn(shape, device=device) * scale).to(dtype).requires_grad_(grad)


def _make_causal(shape, dtype, device):
    return [_randn(shape, dtype, device, 4.0)]


def _make_masked(shape, dtype, device):
    b, h, sq, sk = shape
    mask = torch.rand(b, 1, sq, sk, device=device) < 0.3
    mask[0, 0, sq // 2, :] = True  # a fully masked row: zeros, not NaN
    return [_randn(shape, dtype, device, 4.0), mask]


def _make_norm(shape, dtype, device, bias=True, fp32_weight=False):
    rows, hidden = shape
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


def _rotary_on_qkv_views(impl, t):
    """q and k as strided slices of a fused qkv projection, as the model passes them."""
    d = t[0].size(-1) // 3
    return impl.apply_rotary_pos_emb(t[0][..., :d], t[0][..., d : 2 * d], t[1], t[2])


def _cross_entropy_layout(shape):
    """[n, v_local] on the last rank of TP 8 over a vocabulary that leaves it a partial slice."""
    n, v_local = shape
    vocab_start = 7 * v_local
    vocab_size = vocab_start + max(1, v_local - 77)  # the last 77 columns are padding
    return vocab_start, vocab_size


def _make_cross_entropy(shape, dtype, device):
    n, v_local = shape
    vocab_start, vocab_size = _cross_entropy_layout(shape)
    target = torch.randint(0, vocab_size, (n,), device=device)
    target[: n // 2] = torch.randint(vocab_start, vocab_size, (n // 2,), device=device)  # half owned here
    return [_randn(shape, dtype, device, 3.0, grad=False), target]


def _make_cross_entropy_backward(shape, dtype, device):
    logits, target = _make_cross_entropy(shape, dtype, device)
    n = shape[0]
    lse = logits.float().logsumexp(dim=-1) + torch.rand(n, device=device)  # as if other ranks added mass
    return [logits, target, lse, torch.rand(n, device=device)]


def _ce_stats(impl, t):
    vocab_start, vocab_size = _cross_entropy_layout(tuple(t[0].shape))
    return impl.cross_entropy_stats(t[0], t[1], vocab_start, vocab_size)


def _ce_stats_all_padding(impl, t):
    """A rank that holds only padding columns (vocab 65 padded to 1024 at TP 8 has such ranks)."""
    vocab_start = 7 * t[0].size(1)
    return impl.cross_entropy_stats(t[0], t[1] % vocab_start, vocab_start, vocab_start)


def _ce_backward(impl, t, in_place=False):
    vocab_start, vocab_size = _cross_entropy_layout(tuple(t[0].shape))
    logits = t[0] if in_place else t[0].clone()  # timing rewrites one buffer, as training does
    return impl.cross_entropy_backward_(logits, t[1], vocab_start, vocab_size, t[2], t[3], 0.1)


CASES = [
    Case("scaled_causal_softmax", _make_causal, lambda impl, t: impl.scaled_causal_softmax(t[0], 0.125),
         [(2, 3, 37, 37), (1, 2, 128, 128), (2, 4, 1024, 1024), (1, 1, 4100, 4100)], (8, 16, 1024, 1024),
         tiny_shapes=[(2, 3, 7, 7)]),
    Case("scaled_masked_softmax", _make_masked, lambda impl, t: impl.scaled_masked_softmax(t[0], t[1], 0.125),
         [(2, 3, 37, 53), (2, 4, 256, 256), (1, 2, 64, 2500)], (8, 16, 1024, 1024), tiny_shapes=[(2, 3, 5, 9)]),
    Case("layer_norm", _make_norm, lambda impl, t: impl.layer_norm(t[0], t[1], t[2], 1e-5),
         [(7, 33), (300, 1024), (64, 16384), (9, 12289)], (8192, 1024), tiny_shapes=[(5, 13)]),
    Case("layer_norm[fp32 weights]", lambda s, d, dev: _make_norm(s, d, dev, fp32_weight=True),
         lambda impl, t: impl.layer_norm(t[0], t[1], t[2], 1e-5), [(5, 77), (256, 4096)], (8192, 4096),
         tiny_shapes=[(3, 10)]),
    Case("rms_norm", lambda s, d, dev: _make_norm(s, d, dev, bias=False), lambda impl, t: impl.rms_norm(t[0], t[1], 1e-6),
         [(7, 33), (300, 4096), (64, 16384), (9, 8193)], (8192, 4096), tiny_shapes=[(5, 13)]),
    Case("bias_gelu", _make_rows_and_bias, lambda impl, t: impl.bias_gelu(t[0], t[1]),
         [(7, 33), (1000, 4096), (3, 5, 1001)], (8192, 4096), tiny_shapes=[(3, 11)]),
    Case("bias_swiglu", _make_rows_and_bias, lambda impl, t: impl.bias_swiglu(t[0], t[1]),
         [(7, 34), (1000, 2 * 2816), (3, 5, 2002)], (8192, 2 * 2816), tiny_shapes=[(3, 12)]),
    # Dropout values are compared at p = 0 (the masks of the two paths differ by design); the mask itself
    # is checked by check_dropout_mask, and the timing uses a real p.
    Case("bias_dropout_add[p=0]", _make_dropout_add, lambda impl, t: impl.bias_dropout_add(t[0], t[1], t[2], 0.0, True),
         [(7, 33), (1024, 8, 1024), (3, 1001)], None, tiny_shapes=[(3, 11)]),
    Case("bias_dropout_add[p=0.1]", _make_dropout_add, lambda impl, t: impl.bias_dropout_add(t[0], t[1], t[2], 0.1, True),
         [], (1024, 8, 1024), tiny_shapes=[(3, 11)]),
    Case("apply_rotary_pos_emb", _make_rotary, lambda impl, t: impl.apply_rotary_pos_emb(t[0], t[1], t[2], t[3]),
         [(5, 2, 3, 22), (128, 4, 16, 64), (33, 2, 8, 128)], (1024, 8, 16, 128), tiny_shapes=[(3, 2, 4, 6)]),
    Case("apply_rotary_pos_emb[qkv views]", _make_qkv, _rotary_on_qkv_views,
         [(5, 2, 3, 22), (64, 2, 8, 128)], None, tiny_shapes=[(3, 2, 2, 6)]),
    Case("cross_entropy_stats", _make_cross_entropy, _ce_stats,
         [(7, 129), (512, 6288), (33, 50304), (4, 10)], (8192, 50304 // 8 * 2), differentiable=False,
         tiny_shapes=[(3, 100)]),
    Case("cross_entropy_stats[all padding]", _make_cross_entropy, _ce_stats_all_padding,
         [(5, 128), (3, 37)], None, differentiable=False, tiny_shapes=[(3, 16)]),
    Case("cross_entropy_backward_", _make_cross_entropy_backward, _ce_backward,
         [(7, 129), (512, 6288), (33, 50304), (4, 10)], (8192, 50304 // 8 * 2), differentiable=False,
         tiny_shapes=[(3, 100)], bench_call=lambda impl, t: _ce_backward(impl, t, in_place=True)),
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
    scale = max(e.abs().max().item() if e.numel() else 0.0, 1e-6)
    return (a - e).abs().max().item() / scale if e.numel() else 0.0


def check_case(case: Case, shape, dtype, device) -> dict:
    """Kernel path vs PyTorch path: forward outputs and, if differentiable, input gradients."""
    torch.manual_seed(zlib.crc32(f"{case.name}{shape}{dtype}".encode()))  # fresh per case, same every run
    base = case.make(shape, dtype, device)
    kernel_in, reference_in = _clone_inputs(base), _clone_inputs(base)
    ops.set_kernels_enabled(True)
    kernel_out, reference_out = _as_tuple(case.call(ops, kernel_in)), _as_tuple(case.call(torch_impl, reference_in))
    errors = {f"out{i}": _max_error(k, r) for i, (k, r) in enumerate(zip(kernel_out, reference_out))}
    if case.differentiable:
        weights = [torch.randn(r.shape, device=device) for r in reference_out]
        for outputs, inputs in ((kernel_out, kernel_in), (reference_out, reference_in)):
            loss = sum((o.float() * w).sum() for o, w in zip(outputs, weights))
            loss.backward()
        for i, (k, r) in enumerate(zip(kernel_in, reference_in)):
            if r.grad is not None:
                errors[f"grad{i}"] = _max_error(k.grad, r.grad)
    worst = max(errors.values())
    return {"op": case.name, "shape": list(shape), "dtype": str(dtype).replace("torch.", ""), "max_error": worst,
            "tolerance": TOLERANCE[dtype], "passed": worst <= TOLERANCE[dtype], "errors": errors}


def check_dropout_mask(device, dry_run: bool) -> dict:
    """The kernel's mask: keep rate, exact replay from a restored RNG state, the same mask in backward."""
    (rows, cols), prob = ((256, 33) if dry_run else (4096, 1023)), 0.1
    torch.manual_seed(0)
    x = torch.randn(rows, cols, device=device, dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(cols, device=device, dtype=torch.bfloat16)
    residual = torch.randn(rows, cols, device=device, dtype=torch.bfloat16)
    get_state = torch.cuda.get_rng_state if device.type == "cuda" else torch.get_rng_state
    set_state = torch.cuda.set_rng_state if device.type == "cuda" else torch.set_rng_state
    state = get_state()
    out = ops.bias_dropout_add(x, bias, residual, prob, True)
    set_state(state)
    replay = ops.bias_dropout_add(x, bias, residual, prob, True)
    set_state(state)
    probe = ops.bias_dropout_add(torch.ones_like(x), None, torch.zeros_like(residual), prob, True)
    keep = probe != 0
    expected = residual.float() + keep * (x.float() + bias.float()) / (1 - prob)
    grad = torch.randn_like(out)
    out.backward(grad)
    grad_expected = grad.float() * keep / (1 - prob)
    keep_rate = keep.float().mean().item()
    results = {
        "replays_exactly": bool(torch.equal(out, replay)),
        "keep_rate": keep_rate,
        "keep_rate_ok": abs(keep_rate - (1 - prob)) < (0.02 if dry_run else 0.003),
        "forward_error": _max_error(out, expected),
        "backward_error": _max_error(x.grad, grad_expected),
        "backward_zero_where_dropped": bool((x.grad[~keep] == 0).all()),
    }
    results["passed"] = (results["replays_exactly"] and results["keep_rate_ok"] and results["backward_zero_where_dropped"]
                         and results["forward_error"] <= 1e-2 and results["backward_error"] <= 1e-2)
    return results


# ---------------------------------------------------------------- timing

def measure(fn, device, warmup=5, iters=30) -> float:
    """Median milliseconds of fn(): CUDA events around each call on a GPU, wall clock on CPU (a few calls)."""
    if device.type != "cuda":
        warmup, iters = 1, 3
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def copy_bandwidth_gbs(device, dry_run: bool) -> float:
    numel = (1 << 20) if dry_run else (1 << 28)  # 512 MiB of bf16 on a GPU
    src = torch.empty(numel, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = measure(lambda: dst.copy_(src), device, warmup=3, iters=20)
    return 2 * src.numel() * src.element_size() / ms / 1e6


def _bytes_of(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def time_case(case: Case, dtype, device, compile_ok: bool, dry_run: bool) -> dict:
    shape = (case.tiny_shapes or [case.bench_shape])[0] if dry_run else case.bench_shape
    tensors = case.make(shape, dtype, device)
    call = case.bench_call or case.call
    out = _as_tuple(call(torch_impl, tensors))
    forward_bytes = _bytes_of(tensors) + _bytes_of(out)
    row = {"op": case.name, "shape": list(shape), "dtype": str(dtype).replace("torch.", ""), "forward_bytes": forward_bytes}
    compiled = torch.compile(lambda impl, t: call(impl, t)) if compile_ok else None
    variants = {"kernel": lambda t: call(ops, t), "eager": lambda t: call(torch_impl, t)}
    if compiled is not None:
        variants["compile"] = lambda t: compiled(torch_impl, t)
    for label, fn in variants.items():
        ops.set_kernels_enabled(label == "kernel")
        try:
            # Forward timed with grad mode on (as in training), so torch.compile builds one graph pair per op.
            row[f"{label}_fwd_ms"] = measure(lambda: fn(tensors), device)
            if case.differentiable:
                grads = [torch.randn_like(o) for o in out]

                def forward_backward():
                    for t in tensors:
                        t.grad = None
                    torch.autograd.backward(_as_tuple(fn(tensors)), grads)

                row[f"{label}_fwd_bwd_ms"] = measure(forward_backward, device)
        except Exception as error:  # a compile failure is a result to report, not a reason to stop
            row[f"{label}_error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
    ops.set_kernels_enabled(True)
    if "kernel_fwd_ms" in row:
        row["kernel_fwd_gbs"] = forward_bytes / row["kernel_fwd_ms"] / 1e6
    return row


# ---------------------------------------------------------------- GPT-2 medium step

def model_step(device, dry_run: bool, attention_backend: str) -> dict:
    try:
        from megatronish import parallel_state
        from megatronish.model import GPTModel, TransformerConfig
        from megatronish.tensor_parallel import model_parallel_manual_seed
    except ImportError as error:
        return {"skipped": f"the GPT model is not importable ({error}); the model step needs megatronish.model"}
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_distributed("nccl" if device.type == "cuda" else "gloo")
        parallel_state.initialize_model_parallel(1)
    if dry_run:
        layers, hidden, heads, seq, batch, vocab, dtype = 2, 64, 4, 32, 2, 1000, torch.float32
    else:
        layers, hidden, heads, seq, batch, vocab, dtype = 24, 1024, 16, 1024, 8, 50257, torch.bfloat16
    config = TransformerConfig(num_layers=layers, hidden_size=hidden, num_attention_heads=heads, vocab_size=vocab,
                               max_position_embeddings=seq, params_dtype=dtype, attention_backend=attention_backend)
    model_parallel_manual_seed(1234)
    model = GPTModel(config).to(device)
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    tokens = torch.randint(0, vocab, (batch, seq + 1), device=device)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(inputs, labels=labels).mean().backward()
        optimizer.step()

    result = {"layers": layers, "hidden": hidden, "seq": seq, "batch": batch, "params": params,
              "dtype": str(dtype).replace("torch.", ""), "attention_backend": attention_backend}
    # Model FLOPs per token: 6 per parameter (forward + backward) plus attention's 12 * L * h * s.
    flops_per_step = (6 * params + 12 * layers * hidden * seq) * batch * seq
    for label, enabled in (("off", False), ("on", True)):
        ops.set_kernels_enabled(enabled)
        ms = measure(step, device, warmup=2 if dry_run else 3, iters=3 if dry_run else 10)
        result[f"kernels_{label}_ms"] = ms
        result[f"kernels_{label}_tokens_per_s"] = batch * seq / ms * 1e3
        result[f"kernels_{label}_mfu"] = flops_per_step / (ms / 1e3) / H100_BF16_DENSE_FLOPS
    ops.set_kernels_enabled(True)
    result["speedup"] = result["kernels_off_ms"] / result["kernels_on_ms"]
    del model, optimizer
    return result


# ---------------------------------------------------------------- report

def markdown_report(report: dict) -> str:
    lines = ["# GPU check of the fused kernels", "", f"`{report['command']}` on {report['device']} "
             f"(torch {report['torch']}, CUDA {report['cuda']}); build {report['build_s']:.1f} s; "
             f"copy bandwidth {report['copy_gbs']:.0f} GB/s.", ""]
    lines += ["## Correctness (kernel vs PyTorch path, max error / max magnitude)", "",
              "| op | dtype | shapes | worst error | tolerance | result |", "|---|---|---|---|---|---|"]
    grouped = {}
    for row in report["checks"]:
        grouped.setdefault((row["op"], row["dtype"]), []).append(row)
    for (op, dtype), rows in grouped.items():
        worst = max(r["max_error"] for r in rows)
        shapes = ", ".join("x".join(map(str, r["shape"])) for r in rows)
        result = "pass" if all(r["passed"] for r in rows) else "FAIL"
        lines.append(f"| {op} | {dtype} | {shapes} | {worst:.2e} | {rows[0]['tolerance']:.0e} | {result} |")
    for row in report["checks"]:
        if "error" in row:
            lines.append(f"\n{row['op']} {row['dtype']} {row['shape']} raised: `{row['error'][:300]}`")
    if report.get("aborted"):
        lines.append(f"\nStopped after a CUDA error: {report['aborted'][:300]}")
    mask = report["dropout_mask"]
    if mask:
        lines += ["", f"Dropout mask: replays exactly {mask['replays_exactly']}, keep rate {mask['keep_rate']:.4f} "
                  f"(0.9 expected), backward zero where dropped {mask['backward_zero_where_dropped']}: "
                  f"{'pass' if mask['passed'] else 'FAIL'}."]
    lines.append("")
    lines += ["## Timing (median ms; GB/s = forward input + output bytes / kernel time)", "",
              "The causal softmax kernel skips the upper triangle, so its GB/s counts bytes it never reads.", "",
              "| op | shape | dtype | kernel fwd | eager fwd | compile fwd | kernel GB/s | % of copy | kernel fwd+bwd | eager fwd+bwd | compile fwd+bwd |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]

    def ms(row, key):
        return f"{row[key]:.3f}" if key in row else "-"

    for row in report["timings"]:
        gbs = row.get("kernel_fwd_gbs")
        share = f"{100 * gbs / report['copy_gbs']:.0f}%" if gbs else "-"
        lines.append(f"| {row['op']} | {'x'.join(map(str, row['shape']))} | {row['dtype']} | {ms(row, 'kernel_fwd_ms')} | "
                     f"{ms(row, 'eager_fwd_ms')} | {ms(row, 'compile_fwd_ms')} | {f'{gbs:.0f}' if gbs else '-'} | {share} | "
                     f"{ms(row, 'kernel_fwd_bwd_ms')} | {ms(row, 'eager_fwd_bwd_ms')} | {ms(row, 'compile_fwd_bwd_ms')} |")
    lines += ["", "## GPT-2 medium training step, kernels on vs off", ""]
    for step in report["model"]:
        if "skipped" in step or "error" in step:
            lines.append(f"- {step.get('skipped') or step.get('error')}")
            continue
        lines.append(f"- {step['layers']} layers, hidden {step['hidden']}, seq {step['seq']}, batch {step['batch']}, "
                     f"{step['params'] / 1e6:.0f}M params, {step['dtype']}, attention {step['attention_backend']}: "
                     f"off {step['kernels_off_ms']:.1f} ms ({step['kernels_off_tokens_per_s']:.0f} tok/s, MFU "
                     f"{100 * step['kernels_off_mfu']:.1f}%), on {step['kernels_on_ms']:.1f} ms "
                     f"({step['kernels_on_tokens_per_s']:.0f} tok/s, MFU {100 * step['kernels_on_mfu']:.1f}%), "
                     f"speedup {step['speedup']:.3f}x")
    return "\n".join(lines) + "\n"


def short_table(report: dict) -> str:
    failed = [f"{r['op']} {r['dtype']} {r['shape']}" for r in report["checks"] if not r["passed"]]
    mask = report["dropout_mask"]
    lines = [f"correctness: {len(report['checks']) - len(failed)}/{len(report['checks'])} checks pass"
             + (f"; FAILED: {', '.join(failed)}" if failed else ""),
             f"dropout mask: {('pass' if mask['passed'] else 'FAIL') if mask else 'not checked'}",
             f"copy bandwidth: {report['copy_gbs']:.0f} GB/s",
             f"{'op':<34} {'dtype':<9} {'kernel':>8} {'eager':>8} {'compile':>8} {'GB/s':>6} {'%copy':>6}"]
    for row in report["timings"]:
        gbs = row.get("kernel_fwd_gbs") or 0.0
        lines.append(f"{row['op']:<34} {row['dtype']:<9} {row.get('kernel_fwd_ms', float('nan')):>8.3f} "
                     f"{row.get('eager_fwd_ms', float('nan')):>8.3f} {row.get('compile_fwd_ms', float('nan')):>8.3f} "
                     f"{gbs:>6.0f} {100 * gbs / report['copy_gbs']:>5.0f}%")
    for step in report["model"]:
        if "kernels_on_ms" in step:
            lines.append(f"GPT step ({step['attention_backend']}): off {step['kernels_off_tokens_per_s']:.0f} tok/s, "
                         f"on {step['kernels_on_tokens_per_s']:.0f} tok/s, MFU {100 * step['kernels_on_mfu']:.1f}%, "
                         f"speedup {step['speedup']:.3f}x")
        else:
            lines.append(f"GPT step: {step.get('skipped') or step.get('error')}")
    return "\n".join(lines)


def _selected_cases(only: str | None):
    if not only:
        return CASES
    wanted = [name.strip() for name in only.split(",") if name.strip()]
    chosen = [case for case in CASES if any(case.name.startswith(name) for name in wanted)]
    if not chosen:
        raise SystemExit(f"--only {only!r} matches no op; ops: {', '.join(case.name for case in CASES)}")
    return chosen


def run_checks(cases, device, dry_run: bool) -> tuple[list, str | None]:
    """Every case x dtype x shape; stops at the first CUDA error (the context is unusable after one)."""
    checks = []
    for case in cases:
        for dtype in DTYPES.values():
            for shape in (case.tiny_shapes if case.check_shapes else []) if dry_run else case.check_shapes:
                try:
                    row = check_case(case, shape, dtype, device)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                except Exception as error:
                    message = f"{type(error).__name__}: {error}"
                    checks.append({"op": case.name, "shape": list(shape), "dtype": str(dtype).replace("torch.", ""),
                                   "max_error": math.inf, "tolerance": TOLERANCE[dtype], "passed": False, "error": message})
                    print(f"check {case.name} {dtype} {shape}: {message}")
                    if "CUDA" in message or "cuda" in message:
                        return checks, f"{case.name} {dtype} {tuple(shape)}: {message}"
                    continue
                checks.append(row)
                print(f"check {row['op']:<34} {row['dtype']:<9} {str(tuple(shape)):<22} "
                      f"error {row['max_error']:.2e} (tol {row['tolerance']:.0e}) {'ok' if row['passed'] else 'FAIL'}")
    return checks, None


def write_report(report: dict, out_dir: Path, started: float) -> None:
    report["wall_s"] = time.time() - started
    (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    (out_dir / "gpu_check.md").write_text(markdown_report(report))
    print(f"\nwrote {out_dir / 'gpu_check.md'} and gpu_check.json ({report['wall_s']:.0f} s)\n")
    print(short_table(report))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, no CUDA parts: checks this script")
    parser.add_argument("--out-dir", default=None, help="where gpu_check.md / .json go (default bench/; a temp dir with --dry-run)")
    parser.add_argument("--only", default=None, help="comma-separated op names (or prefixes) to check and time")
    parser.add_argument("--no-timing", action="store_true", help="correctness only")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile timings")
    parser.add_argument("--no-model", action="store_true", help="skip the GPT-2 medium step")
    parser.add_argument("--budget-s", type=float, default=300.0,
                        help="stop starting torch.compile timings once this much time has passed (the model step still runs)")
    args = parser.parse_args(argv)
    started = time.time()
    dry_run = args.dry_run
    if not dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible; use --dry-run to check the script on CPU", file=sys.stderr)
        return 2
    device = torch.device("cpu") if dry_run else torch.device("cuda", torch.cuda.current_device())
    repo = Path(__file__).resolve().parents[1]
    out_dir = Path(args.out_dir) if args.out_dir else (Path(tempfile.mkdtemp()) if dry_run else repo / "bench")
    out_dir.mkdir(parents=True, exist_ok=True)
    cases = _selected_cases(args.only)

    build_start = time.time()
    module = extension.load() if device.type == "cuda" else None
    build_s = time.time() - build_start
    status = ops.kernel_status(build=False)
    print(f"build: {build_s:.1f} s, extension {'loaded' if module is not None else 'NOT loaded: ' + str(extension.build_failure())}")
    for op, backend in status.items():
        print(f"  {op:<24} {backend}")
    if device.type == "cuda" and module is None:  # nothing below would test a kernel: stop early, say why in full
        print(f"gpu_check: the extension did not build:\n{(extension.build_failure(full=True) or '')[-6000:]}", file=sys.stderr)
        return 3

    report = {"command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)",
              "torch": torch.__version__, "cuda": torch.version.cuda, "build_s": build_s, "kernel_status": status,
              "checks": [], "dropout_mask": {}, "copy_gbs": float("nan"), "timings": [], "model": []}
    report["checks"], cuda_error = run_checks(cases, device, dry_run)
    if cuda_error is not None:
        report["aborted"] = cuda_error
        write_report(report, out_dir, started)
        return 1
    if any(case.name.startswith("bias_dropout_add") for case in cases):
        report["dropout_mask"] = check_dropout_mask(device, dry_run)
        print("dropout mask:", report["dropout_mask"])

    if not args.no_timing:
        report["copy_gbs"] = copy_bandwidth_gbs(device, dry_run)
        print(f"copy bandwidth: {report['copy_gbs']:.0f} GB/s")
        for case in (c for c in cases if c.bench_shape is not None):
            for dtype in (torch.bfloat16, torch.float32):
                if dtype == torch.float32 and case.name not in ("layer_norm", "scaled_causal_softmax", "cross_entropy_stats"):
                    continue  # fp32 timings for a representative few; bf16 is what training runs
                compile_ok = not (args.no_compile or dry_run) and time.time() - started < args.budget_s
                report["timings"].append(time_case(case, dtype, device, compile_ok, dry_run))
                print("time", json.dumps(report["timings"][-1]))

    if not args.no_model:
        for backend in ("sdpa", "explicit"):
            try:
                report["model"].append(model_step(device, dry_run, backend))
            except Exception as error:  # e.g. out of memory: report it, keep the rest of the results
                report["model"].append({"error": f"model step ({backend}) failed: {type(error).__name__}: {error}"})
            if device.type == "cuda":
                torch.cuda.empty_cache()
            print("model", report["model"][-1])

    write_report(report, out_dir, started)
    all_passed = all(r["passed"] for r in report["checks"]) and report["dropout_mask"].get("passed", True)
    return 0 if all_passed else 1


if __name__ == "__main__":
    sys.exit(main())
