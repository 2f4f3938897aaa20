"""Megatron-core's API, not only its names: a module written for megatron.core.tensor_parallel /
parallel_state runs with only its import lines changed, at TP 2 equal to the same module at TP 1 (the
dense reference: the full weights are drawn from one seed at any TP size), outputs and input gradients
within fp32 rounding (1e-5)."""

import torch
import torch.nn.functional as F

from megatronish.testing import run_distributed

# ---- a Megatron-core style module; only these two import lines differ from megatron.core's ----
from megatronish import ModelParallelConfig  # was: from megatron.core import ModelParallelConfig
from megatronish import parallel_state, tensor_parallel  # was: from megatron.core import parallel_state, tensor_parallel


class TwoLayerMLP(torch.nn.Module):
    def __init__(self, config: ModelParallelConfig, hidden: int, ffn: int):
        super().__init__()
        init = torch.nn.init.xavier_normal_
        self.fc1 = tensor_parallel.ColumnParallelLinear(hidden, ffn, config=config, init_method=init, bias=True,
                                                        gather_output=False, skip_bias_add=False)
        self.fc2 = tensor_parallel.RowParallelLinear(ffn, hidden, config=config, init_method=init, bias=True,
                                                     input_is_parallel=True, skip_bias_add=True)

    def _block(self, x):
        h, _ = self.fc1(x)
        out, bias = self.fc2(F.gelu(h))
        return out + bias

    def forward(self, x):
        return tensor_parallel.checkpoint(self._block, False, x)  # recompute, Megatron-core's signature


def _megatron_style_run(tp: int):
    """Runs in each rank, as a Megatron-core user's script would."""
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=1)
    assert parallel_state.get_tensor_model_parallel_world_size() == tp
    assert parallel_state.is_pipeline_first_stage() and parallel_state.is_pipeline_last_stage()
    assert parallel_state.get_tensor_model_parallel_src_rank() == 0
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    torch.manual_seed(0)
    config = ModelParallelConfig(tensor_model_parallel_size=tp, params_dtype=torch.float32)
    model = TwoLayerMLP(config, hidden=16, ffn=64)
    x = torch.randn(4, 8, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
    y = model(x)
    y.square().sum().backward()
    chunk = tensor_parallel.split_tensor_into_1d_equal_chunks(y.detach())
    assert torch.equal(tensor_parallel.gather_split_1d_tensor(chunk), y.detach().reshape(-1))
    assert all(tensor_parallel.param_is_not_tensor_parallel_duplicate(p) for p in model.fc1.parameters())
    full = tensor_parallel.gather_from_tensor_model_parallel_region(model.fc1.weight.detach().t()).t()
    return y.detach(), x.grad, full.std().item()


def test_megatron_core_style_module_at_tp2_equals_tp1():
    reference, reference_grad, std = run_distributed(_megatron_style_run, world_size=1, args=(1,))[0]
    assert abs(std - (2 / (16 + 64)) ** 0.5) < 0.02  # init_method (xavier) was used, not a default N(0, 0.02)
    for output, grad, _ in run_distributed(_megatron_style_run, world_size=2, args=(2,)):
        torch.testing.assert_close(output, reference, rtol=0, atol=1e-5)
        torch.testing.assert_close(grad, reference_grad, rtol=0, atol=1e-5)
    assert reference.abs().max() > 0.1  # not trivially zero


def test_megatron_core_signatures_refuse_what_they_cannot_do():
    import pytest
    with pytest.raises(ValueError, match="context_parallel_size 2 is not supported"):
        ModelParallelConfig(context_parallel_size=2)
    with pytest.raises(TypeError, match="second argument must be a bool"):
        tensor_parallel.checkpoint(lambda x: x, torch.ones(1))  # the pre-Megatron form checkpoint(fn, x)


def _label_smoothing(eps):
    """Runs in each TP rank: Megatron's label-smoothed loss and logit gradient on this rank's columns, from
    vocab_parallel_cross_entropy(megatron_label_smoothing=True) and from Megatron-core's formula by hand."""
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=torch.distributed.get_world_size())
    tp, rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    generator = torch.Generator().manual_seed(3)
    full = torch.randn(6, 40, generator=generator, dtype=torch.float64)
    target = torch.randint(0, 40, (6,), generator=generator)
    local = full.chunk(tp, dim=1)[rank].clone().requires_grad_()
    ours = tensor_parallel.vocab_parallel_cross_entropy(local.clone(), target, label_smoothing=eps,
                                                        megatron_label_smoothing=True)
    ours_grad, = torch.autograd.grad(ours.sum(), local)
    # Megatron-core: smoothing = eps * V_r / (V_r - 1); loss = (1 - smoothing) * CE - smoothing * mean_{rank} log p
    reference_input = local.detach().clone().requires_grad_()
    others = full.clone()
    others[:, rank * 40 // tp:(rank + 1) * 40 // tp] = reference_input
    log_probs = torch.log_softmax(others, dim=-1)
    v_local = 40 // tp
    smoothing = eps * v_local / (v_local - 1)
    mean_local = log_probs[:, rank * v_local:(rank + 1) * v_local].mean(dim=-1)
    reference = (1 - smoothing) * -log_probs.gather(1, target[:, None])[:, 0] - smoothing * mean_local
    reference_grad, = torch.autograd.grad(reference.sum(), reference_input)
    default = tensor_parallel.vocab_parallel_cross_entropy(local.detach().clone(), target, label_smoothing=eps)
    return ours.detach(), reference.detach(), ours_grad, reference_grad, default


def test_megatron_label_smoothing_formula_on_request():
    for tp in (1, 2):
        for ours, reference, ours_grad, reference_grad, default in run_distributed(_label_smoothing, world_size=tp,
                                                                                   args=(0.1,)):
            torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(ours_grad, reference_grad, rtol=1e-10, atol=1e-10)
            if tp == 2:  # the default stays TP-invariant, so it differs from Megatron's per-rank formula
                assert (default - ours).abs().max() > 1e-4
