"""The layout planner without training: its checks are pretrain_gpt.py's, its FLOPs the training log's, its
parameter inventory the model's, its pipeline peaks the schedules' and Megatron's, and its entry points
(tools/plan.py, pretrain_gpt.py --dry-run, the goodput profile) work end to end."""

import dataclasses
import json
import math
import os
import sys

import pytest
import torch

import pretrain_gpt
from megatronish import parallel_state
from megatronish.model import GPTModel, TransformerConfig
from megatronish.parallel_layout import ParallelDims
from megatronish.planner import PRESETS, Cluster, plan_layouts
from megatronish.planner.activations import ActivationBytes, peak_activations
from megatronish.planner.calibration import (
    GoodputProfile,
    MeasuredPoint,
    cpu_cluster,
    fit_constants,
    load_profile,
    predicted_seconds,
)
from megatronish.planner.cluster import SpeedConstants, cpu_accelerator
from megatronish.planner.parameters import chunk_parameters, state_bytes, total_parameters
from megatronish.planner.search import Layout, plan_layout
from megatronish.testing import run_distributed
from megatronish.training.arguments import parse_args
from megatronish.training.training import count_parameters
from megatronish.training.training_log import num_floating_point_operations

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
import plan as plan_tool  # noqa: E402

# 3 layers and 6 heads: PP 2 and 4, TP 4 and uneven batches are rejected, for several reasons.
ODD = ["--num-layers", "3", "--hidden-size", "48", "--num-attention-heads", "6", "--seq-length", "30",
       "--micro-batch-size", "2", "--global-batch-size", "12"]
SMALL = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "64",
         "--micro-batch-size", "4", "--global-batch-size", "16"]
CONSTANTS = SpeedConstants(flops_per_s=3e9, intra_node_bytes_per_s=0.5e9, inter_node_bytes_per_s=1e9, latency_s=3e-4,
                           optimizer_s_per_element=2e-8, overhead_s_per_layer_microbatch=1e-3, scheduling_wait_s=2e-3)
GPT2_345M = ["--num-layers", "24", "--hidden-size", "1024", "--num-attention-heads", "16", "--seq-length", "1024",
             "--max-position-embeddings", "1024", "--micro-batch-size", "4", "--global-batch-size", "512", "--bf16",
             "--tokenizer-type", "GPT2BPETokenizer", "--vocab-size", "50257"]


def test_every_rejected_layout_is_rejected_by_pretrain_gpt_with_the_same_reason(monkeypatch, capsys):
    args = parse_args(ODD)
    plans = plan_layouts(args, cpu_cluster(4), vocab_size=258)
    rejected = [p for p in plans if not p.valid]
    reasons = {p.rejected.split(" ")[0] for p in rejected}
    assert len(rejected) >= 10 and len(reasons) >= 3, reasons  # several rules, not one
    assert any(p.valid for p in plans)
    monkeypatch.setenv("WORLD_SIZE", "4")
    for plan in rejected:
        with pytest.raises(SystemExit) as exit_info:
            pretrain_gpt.main(ODD + plan.layout.flags())
        assert exit_info.value.code == 2
        expected = "\n".join(f"pretrain_gpt.py: error: {line}" for line in plan.rejected.splitlines())
        assert capsys.readouterr().err.strip() == expected  # every problem of the layout, one line each


def test_flops_are_the_training_logs_and_split_over_the_stages():
    args = parse_args(GPT2_345M[:-2])
    cluster = Cluster(PRESETS["H100"], 1, 8)
    layout = Layout(2, 2, 2, 2, 4, None, True, True)
    plan = plan_layout(args, layout, cluster, 50257)
    padded = 50432  # 50257 padded to a multiple of 128 x TP 2
    megatron = 72 * 512 * 1024 * 24 * 1024**2 * (1 + 1024 / (6 * 1024) + padded / (12 * 24 * 1024))
    assert plan.flops_per_iteration == pytest.approx(megatron, rel=1e-12)  # the closed form in training_log.py
    validated = parse_args(GPT2_345M[:-2] + layout.flags())
    validated.global_batch_size = 512
    assert plan.flops_per_iteration == num_floating_point_operations(validated, padded)
    assert sum(plan.stage_flops) * layout.tp * layout.dp == pytest.approx(plan.flops_per_iteration, rel=1e-12)


def _inventory(tp, pp, virtual_pp, options):
    layout = parallel_state.initialize_model_parallel(tp, pp, virtual_pp)
    config = TransformerConfig(num_layers=4, hidden_size=32, num_attention_heads=4, vocab_size=250,
                               max_position_embeddings=16, **options)
    chunks = [GPTModel(config, seed=0, vp_stage=c) for c in range(layout.dims.num_model_chunks)]
    for chunk, model in enumerate(chunks):
        real = [(name, tuple(p.shape)) for name, p in model.named_parameters()]
        assert real == chunk_parameters(config, layout.dims, layout.pp_rank, chunk)
    return count_parameters(chunks, layout) == total_parameters(config, layout.dims)


@pytest.mark.parametrize("tp,pp,virtual_pp,options", [
    (2, 1, None, {"activation": "swiglu"}), (1, 2, 2, {"normalization": "RMSNorm", "add_bias_linear": False}),
    (2, 2, None, {"tie_word_embeddings": False, "position_embedding_type": "rope"})])
def test_parameter_inventory_is_the_models(tp, pp, virtual_pp, options):
    assert all(run_distributed(_inventory, tp * pp, args=(tp, pp, virtual_pp, options)))


def test_bucket_padding_and_distributed_optimizer_shards():
    config = TransformerConfig(num_layers=2, hidden_size=30, num_attention_heads=3, vocab_size=100)
    dims = ParallelDims(dp=4)
    plain = state_bytes(config, dims, 0)
    assert plain.gradients == -(-plain.numel // 4) * 4 * 4  # one bucket, padded to a multiple of DP
    shards = [state_bytes(config, dims, 0, r, distributed_optimizer=True) for r in range(4)]
    assert sum(s.main_elements for s in shards) == plain.numel  # the padding belongs to no one
    assert all(s.parameters == plain.gradients for s in shards)  # fp32 params in the padded flat buffer
    assert shards[0].optimizer > shards[-1].optimizer  # the last shard holds the padding


def test_in_flight_micro_batches_follow_the_schedules():
    one = ActivationBytes(layers=1000)
    for r in range(4):  # 1F1B: stage r holds p - r micro-batches (fewer if there are fewer)
        assert peak_activations([one], 4, r, 8).in_flight == 4 - r
        assert peak_activations([one], 4, r, 2).in_flight == min(2, 4 - r)
    p, v, m = 4, 2, 8  # interleaved: stage 0 holds p (1 + (p - 1) / (p v)) micro-batches' worth (Megatron)
    chunks = [ActivationBytes(layers=500)] * v
    peak = peak_activations(chunks, p, 0, m)
    assert peak.total == 1000 * p * (1 + (p - 1) / (p * v))
    assert peak_activations(chunks, p, 0, p).in_flight == p * v  # m = p: every forward runs first
    recomputing = ActivationBytes(layers=100, output=300, transient=700)  # backward frees the loss first
    assert peak_activations([recomputing], 1, 0, 3).total == 100 + 700


def test_plan_tool_table_json_cluster_file_and_price(tmp_path, capsys):
    plan_tool.main(GPT2_345M + ["--accelerator", "H100", "--top", "5", "--no-goodput-profile",
                                "--search-micro-batch-sizes", "4"])
    out = capsys.readouterr().out
    assert "354,871,296 parameters" in out and "1 x 8 H100" in out
    assert out.strip().splitlines()[-1].startswith("recommended: --tensor-model-parallel-size")
    cluster = tmp_path / "cluster.json"
    cluster.write_text(json.dumps({"accelerator": "A100-40GB", "nodes": 2, "devices_per_node": 8}))
    plan_tool.main(GPT2_345M + ["--cluster", str(cluster), "--price", "1.5", "--json", "--no-goodput-profile",
                                "--search-micro-batch-sizes", "4", "32"])
    result = json.loads(capsys.readouterr().out)
    fitting = [p for p in result["plans"] if p.get("fits")]
    assert result["cluster"].startswith("2 x 8 A100-40GB") and fitting
    best = fitting[0]
    assert best["tokens_per_dollar"] == pytest.approx(best["tokens_per_s"] * 3600 / (1.5 * 16))
    assert best["memory_per_rank"] == max(s["total"] for s in best["stages"])
    assert any(not p["valid"] for p in result["plans"]) and any(p["valid"] and not p["fits"] for p in result["plans"])


def test_bad_cluster_description_is_a_clear_error(tmp_path, capsys):
    cluster = tmp_path / "cluster.json"
    cluster.write_text(json.dumps({"accelerator": "H1000", "nodes": 2}))
    with pytest.raises(SystemExit):
        plan_tool.main(GPT2_345M + ["--cluster", str(cluster)])
    assert "unknown accelerator 'H1000'" in capsys.readouterr().err


def test_dry_run_prints_the_plan_and_builds_nothing(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "4")
    pretrain_gpt.main(["--dry-run", "--tp", "2", "--pp", "2", "--recompute-granularity", "full"])
    out = capsys.readouterr().out
    assert "layout TP2 PP2 DP1 mb8 full" in out and "stage 1:" in out and "time per iteration" in out
    assert not torch.distributed.is_initialized()


def test_overlapped_param_gather_hides_the_gather_behind_a_forward():
    argv = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "64",
            "--micro-batch-size", "4", "--global-batch-size", "16", "--use-distributed-optimizer"]
    layout = Layout(1, 1, 2, None, 4, None, True, False)
    synchronous, overlapped = (plan_layout(parse_args(argv + extra), layout, cpu_cluster(2), 258, CONSTANTS).time
                               for extra in ([], ["--overlap-param-gather"]))
    assert 0 < overlapped.data_parallel < synchronous.data_parallel  # the reduce-scatter stays exposed
    assert dataclasses.replace(overlapped, data_parallel=synchronous.data_parallel) == synchronous


def test_scheduling_wait_only_when_cpu_ranks_outnumber_the_cores():
    args = parse_args(SMALL)
    tp2 = Layout(2, 1, 1, None, 4, None, False, False)

    def estimate(cluster, layout=tp2, constants=CONSTANTS):
        return plan_layout(args, layout, cluster, 258, constants).time

    cpu = cpu_accelerator(4)
    shared = estimate(Cluster(cpu, devices_per_node=2, cores_per_node=1))
    # 2 ranks on 1 core: one extra rank per core; every blocking message waits: 4 micro-batches x (4 layers x 4
    # all-reduces + the embedding's + the output layer's + the loss's 3) + the gradient norm's 2
    assert shared.scheduling_wait == pytest.approx((4 * (4 * 4 + 1 + 1 + 3) + 2) * 2e-3)
    without = dataclasses.replace(CONSTANTS, scheduling_wait_s=0.0)
    assert dataclasses.replace(shared, scheduling_wait=0.0) == estimate(Cluster(cpu, devices_per_node=2,
                                                                                cores_per_node=1), constants=without)
    assert estimate(Cluster(cpu, devices_per_node=2, cores_per_node=2)).scheduling_wait == 0.0  # a core each
    assert estimate(Cluster(PRESETS["H100"], devices_per_node=8)).scheduling_wait == 0.0  # GPUs: no cores to share
    # 4 ranks on 1 core: 3 extra ranks per core wait 3 times as long per message as 2 ranks on 1 core do
    dp2 = Layout(2, 1, 2, None, 4, None, False, False)
    per_message = [estimate(Cluster(cpu, devices_per_node=4, cores_per_node=cores), dp2).scheduling_wait
                   for cores in (1, 2)]
    assert per_message[0] == pytest.approx(3 * per_message[1]) and per_message[1] > 0


def test_fit_recovers_the_constants_that_made_the_times(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})  # 2 cores: the 4-rank layouts share them
    args = parse_args(SMALL)
    start = cpu_cluster(1).speed("fp32")
    layouts = [Layout(tp, pp, dp, None, 4, None, False, False)
               for tp, pp, dp in [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 1), (2, 1, 2), (1, 2, 2)]]
    points = [MeasuredPoint(lay, predicted_seconds(args, lay, CONSTANTS, 258), {}) for lay in layouts]
    fitted = fit_constants(args, points, start, 258, prior_weight=0.002)
    for point in points:
        assert predicted_seconds(args, point.layout, fitted, 258) == pytest.approx(point.seconds, rel=0.02)
    assert predicted_seconds(args, layouts[0], start, 258) != pytest.approx(points[0].seconds, rel=0.2)
    assert fitted.scheduling_wait_s == pytest.approx(CONSTANTS.scheduling_wait_s, rel=0.1)
    # a cost this machine does not have stays 0, and the others still fit
    no_overhead = fit_constants(args, points, dataclasses.replace(start, overhead_s_per_layer_microbatch=0.0), 258)
    assert no_overhead.overhead_s_per_layer_microbatch == 0.0
    for point in points:
        assert predicted_seconds(args, point.layout, no_overhead, 258) == pytest.approx(point.seconds, rel=0.25)


def test_goodput_profile_round_trip_and_best_point(tmp_path, capsys):
    profile = GoodputProfile(constants={"cpu": {"fp32": cpu_cluster(1).speed("fp32").to_dict()}},
                             points=[{"accelerator": "cpu", "devices": 2, "tokens_per_s": t, "measured": m,
                                      "layout": {"tp": tp}} for t, m, tp in [(10.0, True, 1), (12.0, False, 2)]])
    path = profile.save(str(tmp_path / "profile.json"))
    loaded = load_profile(path)
    assert loaded.best_point("cpu", 2)["layout"] == {"tp": 2} and loaded.best_point("cpu", 4) is None
    plan_tool.main(["--accelerator", "cpu", "--devices-per-node", "2", "--goodput-profile", path, "--top", "1"])
    assert "speed constants: calibrated" in capsys.readouterr().out
    assert math.isclose(loaded.speed_constants("cpu", "fp32").flops_per_s, cpu_cluster(1).speed("fp32").flops_per_s)


@pytest.mark.slow
def test_profile_measures_fits_and_writes_a_profile_the_planner_then_uses(tmp_path, capsys):
    path = str(tmp_path / "profile.json")
    tiny = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "2", "--seq-length", "16",
            "--micro-batch-size", "2", "--global-batch-size", "4"]
    plan_tool.main(tiny + ["--profile", "--max-ranks", "2", "--iterations", "1", "--rounds", "1",
                           "--goodput-profile", path])
    out = capsys.readouterr().out
    assert "goodput profile written to" in out and "2 ranks: measured best" in out
    profile = load_profile(path)
    measured = [p for p in profile.points if p["measured"]]
    assert {(p["layout"]["tp"], p["layout"]["pp"], p["layout"]["dp"]) for p in measured} == {
        (1, 1, 1), (1, 1, 2), (1, 2, 1), (2, 1, 1)}
    assert all(p["memory"]["rank_0"]["activations"] > 0 for p in measured)
    assert any(not p["measured"] and p["devices"] == 4 for p in profile.points)
    assert profile.best_point("cpu", 2)["devices"] == 2
    plan_tool.main(tiny + ["--accelerator", "cpu", "--devices-per-node", "2", "--goodput-profile", path])
    assert "speed constants: calibrated" in capsys.readouterr().out


@pytest.mark.slow
def test_scheduling_wait_micro_benchmark_runs_pairs_and_an_odd_rank():
    from megatronish.planner.calibration import measure_scheduling_wait

    wait = measure_scheduling_wait(parse_args(SMALL), 258, CONSTANTS, ranks=3, cores=2, repeats=2, iterations=4)
    assert 0 < wait < 1.0  # seconds per message: a time slice is milliseconds


def test_choose_layout_for_a_new_world_size_keeps_the_other_choices(tmp_path):
    from megatronish.planner import choose_layout

    args = parse_args(["--micro-batch-size", "2", "--recompute-granularity", "full"])
    no_profile = str(tmp_path / "none.json")
    for world_size in (4, 2, 1):
        plan = choose_layout(args, world_size, profile_path=no_profile)
        layout = plan.layout
        assert plan.fits and layout.world_size == world_size and layout.virtual_pp is None
        assert (layout.micro_batch_size, layout.recompute) == (2, "full")
    # 3 ranks: 8 heads, 4 layers and a global batch of 16 = 2 x DP leave no layout
    assert choose_layout(args, 3, profile_path=no_profile) is None
