"""The optimizer against a dense float64 reference: DP/TP layouts, distributed optimizer,
overlapped bucket reduction, clipping (global norm, each parameter once), state by name, fp16 loss scaling, bf16,
overlapped parameter all-gather (waited for by the forward pre-hooks and by every reader outside a forward)."""

import contextlib
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from megatronish import parallel_state
from megatronish.model import GPTModel, TransformerConfig
from megatronish.optimizer import (
    DistributedDataParallel,
    DynamicGradScaler,
    OptimizerConfig,
    get_megatron_optimizer,
)
from megatronish.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    gather_full,
    shard_of_full,
    vocab_parallel_cross_entropy,
)
from megatronish.parallel_layout import ParallelLayout
from megatronish.testing import run_distributed

# A tiny TP model with every kind of parameter the optimizer handles: vocabulary-parallel
# embedding, column/row-parallel weights, a TP-sharded bias, a replicated bias and a
# replicated 1-D "norm" weight. Its init is TP-invariant (full values drawn from the default
# generator, each rank keeps its slice), and `dense_loss` is its float64 single-process twin.

VOCAB, HIDDEN, FFN = 16, 8, 16


class ToyTPModel(nn.Module):
    def __init__(self, seed: int = 0, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(seed)
        self.embedding = VocabParallelEmbedding(VOCAB, HIDDEN, init_method=nn.init.normal_)
        self.fc1 = ColumnParallelLinear(HIDDEN, FFN, init_method=lambda w: nn.init.normal_(w, std=0.3))
        self.fc2 = RowParallelLinear(FFN, HIDDEN, input_is_parallel=True, init_method=lambda w: nn.init.normal_(w, std=0.3))
        self.norm_weight = nn.Parameter(torch.ones(HIDDEN))
        self.head = ColumnParallelLinear(HIDDEN, VOCAB, bias=False, init_method=lambda w: nn.init.normal_(w, std=0.3))
        with torch.no_grad():  # non-zero biases so their gradients and updates are exercised too
            self.fc1.bias.copy_(shard_of_full(torch.linspace(-0.1, 0.1, FFN), self.fc1.bias))
            self.fc2.bias.copy_(torch.linspace(0.1, -0.1, HIDDEN))
        self.to(dtype)

    def forward(self, tokens, labels):
        x = self.embedding(tokens)
        h, _ = self.fc1(x)
        y, _ = self.fc2(F.gelu(h))
        logits, _ = self.head((x + y) * self.norm_weight)
        return vocab_parallel_cross_entropy(logits.float(), labels)


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's full value in float64 (collective: call on all TP ranks)."""
    return {name: gather_full(p).double() for name, p in model.named_parameters()}


def dense_loss(params: dict[str, torch.Tensor], tokens, labels) -> torch.Tensor:
    """The same network in one process: mean per-token loss."""
    x = F.embedding(tokens, params["embedding.weight"])
    h = F.linear(x, params["fc1.weight"], params["fc1.bias"])
    y = F.linear(F.gelu(h), params["fc2.weight"], params["fc2.bias"])
    logits = F.linear((x + y) * params["norm_weight"], params["head.weight"])
    return F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))


def portable(obj) -> bytes:
    """Tensors returned from a rank go through shared memory that vanishes when the rank exits;
    serialize them to bytes instead (load with `unpack`)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def unpack(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=False)


GLOBAL_BATCH, MICRO_BATCH, SEQ, STEPS = 8, 2, 5, 3
CONFIG = OptimizerConfig(lr=0.05, weight_decay=0.1, adam_beta1=0.8, adam_beta2=0.9, adam_eps=1e-8, clip_grad=0.5)
TOL = dict(rtol=1e-5, atol=1e-6)  # fp32 ranks against a float64 reference


def make_batches(seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g),
             torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)) for _ in range(STEPS)]


def build(tp, distributed, dtype=torch.float32, fp16=False, bucket_size=40, overlap=False, overlap_param_gather=False):
    parallel_state.initialize_model_parallel(tp)
    model = DistributedDataParallel(ToyTPModel(dtype=dtype), use_distributed_optimizer=distributed,
                                    bucket_size=bucket_size,  # small buckets: several per model
                                    overlap_grad_reduce=overlap, overlap_param_gather=overlap_param_gather)
    optimizer = get_megatron_optimizer(model, CONFIG, fp16=fp16, initial_loss_scale=2.0**10)
    return model, optimizer


def train_step(model, optimizer, tokens, labels):
    """One iteration of the training loop's arithmetic: this DP rank's rows in micro-batches."""
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    rows = GLOBAL_BATCH // dp
    tokens, labels = tokens[dp_rank * rows:(dp_rank + 1) * rows], labels[dp_rank * rows:(dp_rank + 1) * rows]
    num_micro = rows // MICRO_BATCH
    optimizer.zero_grad()
    for i in range(num_micro):
        mb = slice(i * MICRO_BATCH, (i + 1) * MICRO_BATCH)
        with model.no_sync() if i < num_micro - 1 else contextlib.nullcontext():
            loss = model(tokens[mb], labels[mb]).mean() / num_micro
            (loss * optimizer.get_loss_scale()).backward()
    model.finish_grad_sync()
    return optimizer.step()


def dense_reference(batches):
    """Float64, one process: AdamW with the same hyperparameters, clipping and no-decay groups."""
    torch.manual_seed(0)
    params = {k: v.clone().requires_grad_(True) for k, v in full_params(ToyTPModel()).items()}
    decay = [p for k, p in params.items() if p.dim() > 1]
    no_decay = [p for k, p in params.items() if p.dim() == 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": CONFIG.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=CONFIG.lr, betas=(CONFIG.adam_beta1, CONFIG.adam_beta2), eps=CONFIG.adam_eps)
    norms = []
    for tokens, labels in batches:
        opt.zero_grad()
        dense_loss(params, tokens, labels).backward()
        norms.append(torch.nn.utils.clip_grad_norm_(list(params.values()), CONFIG.clip_grad).item())
        opt.step()
    return {k: v.detach() for k, v in params.items()}, norms


def _layouts_match_reference(tp):
    batches = make_batches()
    out = {}
    for distributed in (False, True):
        for overlap in (False, True):
            model, optimizer = build(tp, distributed, overlap=overlap)
            norms = [train_step(model, optimizer, *b)[1] for b in batches]
            out[distributed, overlap] = (full_params(model.module), norms)
            parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(1)  # any layout: the reference runs in this process alone
    out["reference"] = dense_reference(batches)
    return portable(out)


@pytest.mark.parametrize("world_size,tp", [(4, 2), (2, 1)])
def test_plain_and_distributed_optimizer_match_dense_reference(world_size, tp):
    # (4, 2) is TP=2 x DP=2, (2, 1) is DP=2 alone; both see the same global batch as the reference.
    for rank_out in map(unpack, run_distributed(_layouts_match_reference, world_size, args=(tp,))):
        ref_params, ref_norms = rank_out["reference"]
        for (distributed, overlap), (params, norms) in ((k, v) for k, v in rank_out.items() if k != "reference"):
            assert norms == pytest.approx(ref_norms, rel=1e-5)
            assert ref_norms[0] > CONFIG.clip_grad  # clipping was active
            for name, ref in ref_params.items():
                torch.testing.assert_close(params[name], ref, **TOL,
                                           msg=f"{name} (distributed={distributed}, overlap={overlap})")


def _state_round_trip():
    batches = make_batches(seed=2)
    results = {}
    for save_distributed in (False, True):
        for load_distributed in (False, True):
            model, optimizer = build(2, save_distributed)
            train_step(model, optimizer, *batches[0])
            saved = optimizer.sharded_state_by_name()
            train_step(model, optimizer, *batches[1])
            expected = full_params(model.module)
            parallel_state.destroy_model_parallel()

            model, optimizer = build(2, load_distributed)  # a fresh model at its initial values
            optimizer.load_state_by_name(saved)
            reloaded = optimizer.sharded_state_by_name()
            train_step(model, optimizer, *batches[1])
            results[save_distributed, load_distributed] = (saved, reloaded, expected, full_params(model.module))
            parallel_state.destroy_model_parallel()
    return portable(results)


def test_state_by_name_round_trips_between_plain_and_distributed():
    for rank_out in map(unpack, run_distributed(_state_round_trip, 4)):  # TP=2 x DP=2
        for (save_d, load_d), (saved, reloaded, expected, resumed) in rank_out.items():
            assert saved["step"] == 1 and reloaded["step"] == 1
            for name, entry in saved["params"].items():
                for key in ("master", "exp_avg", "exp_avg_sq"):
                    torch.testing.assert_close(reloaded["params"][name][key], entry[key], rtol=0, atol=0)
                assert entry["exp_avg_sq"].abs().sum() > 0  # the state is real, not zeros
            # Same optimizer: bitwise. Across plain and distributed the fused AdamW meets a parameter's
            # values at other vector offsets (whole tensors vs DP shards), which may round ~1 ulp apart.
            tolerance = dict(rtol=0, atol=0) if save_d == load_d else dict(rtol=1e-6, atol=1e-7)
            for name in expected:
                torch.testing.assert_close(resumed[name], expected[name], **tolerance,
                                           msg=f"{name}: saved distributed={save_d}, loaded distributed={load_d}")


def test_state_by_name_has_tp_shard_shapes():
    def check():
        model, optimizer = build(2, True)
        state = optimizer.sharded_state_by_name()
        return {n: (tuple(e["master"].shape), tuple(p.shape)) for n, p in model.module.named_parameters()
                for e in [state["params"][n]]}
    for shapes in run_distributed(check, 4):
        for name, (state_shape, param_shape) in shapes.items():
            assert state_shape == param_shape, name
        assert shapes["fc1.weight"][1] == (8, 8)  # FFN 16 / TP 2 rows


def _fp16_overflow():
    parallel_state.initialize_model_parallel(2)
    model = DistributedDataParallel(ToyTPModel(dtype=torch.float16))
    optimizer = get_megatron_optimizer(model, CONFIG, fp16=True, initial_loss_scale=2.0**10, hysteresis=1)
    tokens, labels = make_batches()[0]
    log = []
    for step in range(3):
        optimizer.zero_grad()
        loss = model(tokens, labels).mean()
        (loss * optimizer.get_loss_scale()).backward()
        model.finish_grad_sync()
        if step == 1 and parallel_state.get_tensor_model_parallel_rank() == 1:
            model.module.fc1.weight.main_grad[0, 0] = float("inf")  # one rank overflows: all must skip
        before = model.module.fc2.weight.detach().clone()
        scale = optimizer.get_loss_scale().item()
        ok, norm = optimizer.step()
        changed = not torch.equal(before, model.module.fc2.weight)
        log.append((ok, norm is None, scale, optimizer.get_loss_scale().item(), changed,
                    model.module.fc2.weight.dtype, all(torch.isfinite(e.main).all() for e in optimizer.main_params)))
    return log


def test_fp16_overflow_is_skipped_scale_halves_and_training_continues():
    for log in run_distributed(_fp16_overflow, 2):
        (ok0, _, s0, s0_after, changed0, dtype, finite0), (ok1, none1, s1, s1_after, changed1, _, _), \
            (ok2, _, _, _, changed2, _, finite2) = log
        assert dtype == torch.float16
        assert ok0 and changed0 and finite0 and s0_after == s0
        assert not ok1 and none1 and not changed1 and s1_after == s1 / 2
        assert ok2 and changed2 and finite2


def test_dynamic_scaler_hysteresis_and_growth():
    scaler = DynamicGradScaler(initial_scale=1024.0, growth_interval=3, hysteresis=2)
    scaler.update(found_inf=True)
    assert scaler.scale.item() == 1024.0  # the first overflow is tolerated (hysteresis 2)
    scaler.update(found_inf=True)
    assert scaler.scale.item() == 512.0
    for _ in range(3):
        scaler.update(found_inf=False)
    assert scaler.scale.item() == 1024.0
    restored = DynamicGradScaler()
    restored.load_state_dict(scaler.state_dict())
    assert restored.state_dict() == scaler.state_dict()


def _bf16_matches_fp32_closely():
    batches = make_batches()
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        model, optimizer = build(2, False, dtype=dtype)
        for b in batches:
            train_step(model, optimizer, *b)
        masters = optimizer.sharded_state_by_name()["params"]
        out[dtype] = ({n: e["master"] for n, e in masters.items()},
                      {n: p.dtype for n, p in model.module.named_parameters()},
                      {n: p.main_grad.dtype for n, p in model.module.named_parameters()})
        parallel_state.destroy_model_parallel()
    return portable(out)


def test_bf16_keeps_fp32_master_weights_and_grads():
    for out in map(unpack, run_distributed(_bf16_matches_fp32_closely, 2)):
        fp32_masters = out[torch.float32][0]
        bf16_masters, bf16_dtypes, grad_dtypes = out[torch.bfloat16]
        assert set(bf16_dtypes.values()) == {torch.bfloat16} and set(grad_dtypes.values()) == {torch.float32}
        for name, master in bf16_masters.items():
            assert master.dtype == torch.float32
            # bf16 activations perturb the path; the fp32 masters must still track the fp32 run closely
            torch.testing.assert_close(master, fp32_masters[name], rtol=0.05, atol=0.05)


def test_no_weight_decay_on_biases_and_1d_weights():
    def check():
        _, optimizer = build(1, False)
        return [sorted(e.name for e in optimizer.main_params if any(e.main is t for t in g["params"]))
                + [g["weight_decay"]] for g in optimizer.param_groups]
    decayed, not_decayed = run_distributed(check, 1)[0]
    assert decayed == ["embedding.weight", "fc1.weight", "fc2.weight", "head.weight", CONFIG.weight_decay]
    assert not_decayed == ["fc1.bias", "fc2.bias", "norm_weight", 0.0]
    assert math.isclose(CONFIG.weight_decay, 0.1)


def _buckets_started_during_backward():
    model, optimizer = build(1, True, overlap=True)  # DP=2, several buckets
    tokens, labels = make_batches()[0]
    optimizer.zero_grad()
    with model.no_sync():
        model(tokens[:2], labels[:2]).mean().backward()
    during_no_sync = [b.started for b in model.buckets]
    model(tokens[2:4], labels[2:4]).mean().backward()
    after_last_backward = [b.started for b in model.buckets]
    model.finish_grad_sync()
    return during_no_sync, after_last_backward, [b.started for b in model.buckets]


def test_overlap_starts_each_bucket_in_the_last_backward():
    for no_sync, last, finished in run_distributed(_buckets_started_during_backward, 2):
        assert len(last) > 2 and not any(no_sync)
        assert all(last)  # every parameter is used, so every bucket started from the backward hooks
        assert not any(finished)  # reset for the next iteration


class _WatchedGather:
    """A running parameter all-gather that records whether anyone waited for it."""

    def __init__(self, work):
        self.work, self.waited = work, False

    def wait(self):
        self.waited = True
        return self.work.wait()


def _watch_gathers(model) -> list[_WatchedGather]:
    watched = []
    for bucket in model.buckets:
        assert bucket.param_gather is not None, "step() returned with a bucket's parameter all-gather not running"
        bucket.param_gather = _WatchedGather(bucket.param_gather)
        watched.append(bucket.param_gather)
    return watched


def _overlapped_param_gather_waits():
    model, optimizer = build(1, True, overlap_param_gather=True)  # DP=2, several buckets
    tokens, labels = make_batches()[0]
    train_step(model, optimizer, tokens, labels)
    watched = _watch_gathers(model)
    model.module.embedding(tokens)  # a forward that reaches the embedding only
    embedding_bucket = model.bucket_of[model.module.embedding.weight]
    waits = {"embedding forward": [w.waited for w in watched],
             "expected": [bucket is embedding_bucket for bucket in model.buckets]}
    model(tokens, labels)
    waits["whole forward"] = [w.waited for w in watched]
    state = optimizer.sharded_state_by_name()
    for name, read in (("step", optimizer.step), ("state", optimizer.sharded_state_by_name),
                       ("params norm", optimizer.params_norm), ("load", lambda: optimizer.load_state_by_name(state)),
                       ("reload", optimizer.reload_model_params)):
        optimizer.step()  # gathers running again
        watched = _watch_gathers(model)
        read()
        waits[name] = [w.waited for w in watched]
    return waits


def test_overlapped_param_gather_is_waited_for_where_parameters_are_read():
    for waits in run_distributed(_overlapped_param_gather_waits, 2):
        assert len(waits["expected"]) > 2 and sum(waits["expected"]) == 1
        assert waits["embedding forward"] == waits["expected"]  # each module waits for its own buckets only
        for reader in ("whole forward", "step", "state", "params norm", "load", "reload"):
            assert all(waits[reader]), reader


def _overlapped_param_gather_trains_identically():
    batches = make_batches()
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        for overlap in (False, True):
            model, optimizer = build(1, True, dtype=dtype, overlap_param_gather=overlap)
            norms = [train_step(model, optimizer, *b)[1] for b in batches]
            optimizer.finish_param_sync()
            out[dtype, overlap] = (full_params(model.module), norms)
            parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(1)
    out["reference"] = dense_reference(batches)
    return portable(out)


def test_overlapped_param_gather_trains_like_the_synchronous_gather_in_fp32_and_bf16():
    for out in map(unpack, run_distributed(_overlapped_param_gather_trains_identically, 2)):  # DP=2
        ref_params, _ = out["reference"]
        for dtype in (torch.float32, torch.bfloat16):
            (sync_params, sync_norms), (params, norms) = out[dtype, False], out[dtype, True]
            assert norms == sync_norms, dtype
            for name, value in params.items():
                torch.testing.assert_close(value, sync_params[name], rtol=0, atol=0, msg=f"{name} ({dtype})")
        for name, value in out[torch.float32, True][0].items():
            torch.testing.assert_close(value, ref_params[name], **TOL, msg=name)


def _gpt_stage_forward_waits():
    layout = ParallelLayout.build(pp=2)  # PP=2 x DP=2
    config = TransformerConfig(num_layers=2, hidden_size=HIDDEN, num_attention_heads=2, vocab_size=VOCAB,
                               max_position_embeddings=SEQ, hidden_dropout=0.0, attention_dropout=0.0)
    model = DistributedDataParallel(GPTModel(config, seed=3, layout=layout), layout=layout, bucket_size=1,
                                    use_distributed_optimizer=True, overlap_param_gather=True)  # a bucket per parameter
    model.all_gather_params()
    watched = _watch_gathers(model)
    tokens = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ))
    model.set_input_tensor(torch.randn(SEQ, MICRO_BATCH, HIDDEN))  # read by the last stage only
    model(tokens, labels=tokens)
    names = {param: name for name, param in model.module.named_parameters()}
    return layout.is_last_stage, [names[p] for bucket, w in zip(model.buckets, watched) if not w.waited
                                  for p in bucket.params]


def test_overlapped_param_gather_waits_for_parameters_a_module_is_handed():
    """The last stage's output layer reads the tied embedding copy, whose module it never calls: one forward of
    each stage still waits for every bucket (one per parameter here)."""
    results = run_distributed(_gpt_stage_forward_waits, 4)
    assert sorted(last for last, _ in results) == [False, False, True, True]
    for _, not_waited in results:
        assert not_waited == []
