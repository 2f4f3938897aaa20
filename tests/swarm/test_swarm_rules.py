"""The parts of SWARM that need no network: the rebalancing rule, the 8-bit compression, the
arguments of the SWARM tools and the launch files."""

import subprocess
from pathlib import Path

import pytest
import torch

from megatronish.swarm.arguments import parse_swarm_args
from megatronish.swarm.compression import BLOCK, dequantize_blockwise, quantize_blockwise, roundtrip
from megatronish.swarm.rebalancing import choose_move, choose_stage, stage_capacities
from megatronish.training.arguments import ArgumentError

REPO = Path(__file__).resolve().parents[2]


def test_the_slowest_peer_of_the_most_served_stage_moves_to_the_least_served():
    throughputs = {0: {"a": 30.0, "b": 10.0, "c": 30.0}, 1: {"d": 10.0}}
    move = choose_move(throughputs, 2, min_gain=0.2)
    assert (move.peer_id, move.from_stage, move.to_stage) == ("b", 0, 1)
    # b runs stage 1 as fast as the stage's peers do relative to stage 0's: 10 * (10 / (70 / 3))
    assert move.capacities == (70.0, 10.0) and move.after == pytest.approx((60.0, 10.0 + 10.0 * 10.0 / (70 / 3)))


def test_no_move_that_gains_too_little_empties_a_stage_or_rests_on_guesses():
    assert choose_move({0: {"a": 10.0, "b": 10.0}, 1: {"c": 18.0}}, 2, min_gain=0.2) is None  # min 18 -> 20: +11%
    assert choose_move({0: {"a": 10.0}, 1: {"c": 1.0}}, 2, min_gain=0.2) is None  # stage 0 would be left empty
    assert choose_move({0: {"a": 10.0, "b": None}, 1: {"c": 1.0}}, 2, min_gain=0.2) is None  # b unmeasured
    assert choose_move({0: {"a": 10.0, "b": 10.0}}, 1, min_gain=0.2) is None


def test_a_new_peer_joins_an_empty_stage_first_then_the_least_served():
    assert choose_stage({0: {"a": 5.0}, 2: {"b": 1.0}}, 3) == 1
    assert choose_stage({0: {"a": 5.0}, 1: {"b": 1.0, "c": None}}, 2) == 1  # c counts as the mean: 3 + 1 < 5
    assert choose_stage({}, 2) == 0
    assert stage_capacities({0: {"a": 4.0, "b": None}, 1: {"c": 2.0}}, 2) == [7.0, 2.0]


def test_blockwise_quantization_is_within_half_a_step_and_a_quarter_of_the_bytes():
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))
    tensor = torch.randn(3, 5000, generator=generator) * torch.logspace(-4, 2, 5000)  # blocks of very different scale
    codes, scales = quantize_blockwise(tensor)
    assert codes.dtype == torch.int8 and codes.shape == tensor.shape and scales.numel() == -(-tensor.numel() // BLOCK)
    assert codes.numel() + 4 * scales.numel() < 0.26 * 4 * tensor.numel()
    restored = dequantize_blockwise(codes, scales, tensor.dtype)
    flat, error = tensor.reshape(-1), (restored - tensor).abs().reshape(-1)
    for start in range(0, flat.numel(), BLOCK):
        block = slice(start, start + BLOCK)
        assert error[block].max() <= flat[block].abs().max() / 254 * (1 + 1e-6)
    assert torch.equal(roundtrip(tensor, "blockwise8"), restored)
    assert roundtrip(tensor, "none") is tensor
    ids = torch.arange(10)
    assert roundtrip(ids, "blockwise8") is ids  # token ids are never quantized
    assert torch.equal(roundtrip(torch.zeros(7), "blockwise8"), torch.zeros(7))


def _parse(role, *flags):
    return parse_swarm_args(role, ["--pp", "2", "--num-layers", "2", *flags])


@pytest.mark.parametrize("role, flags, message", [
    ("peer", ["--tp", "2"], r"--tensor-model-parallel-size 2: a SWARM peer holds its stage in one process"),
    ("peer", ["--fp16"], r"--fp16 needs a loss scale"),
    ("peer", ["--stage", "2"], r"--stage '2' must be 'auto' or a stage in 0..1"),
    ("peer", ["--throttle", "0.5"], r"--throttle \(0.5\) must be >= 1"),
    ("trainer", ["--num-trainers", "2", "--trainer-index", "2"], r"--trainer-index 2 must be in 0..1"),
    ("trainer", ["--num-layers", "3"], r"num_layers 3 is not divisible by the pipeline-model-parallel size 2"),
    ("trainer", ["--stage", "0"], r"unrecognized argument --stage"),
])
def test_bad_swarm_arguments_name_the_value_and_the_fix(role, flags, message):
    with pytest.raises(ArgumentError, match=message):
        _parse(role, *flags)


def test_swarm_arguments_default_to_the_demo_and_loopback():
    args = _parse("trainer")
    assert (args.host, args.compression, args.max_inflight, args.max_staleness) == ("127.0.0.1", "none", 4, 1)
    assert args.global_batch_size == 16 and args.pipeline_model_parallel_size == 2


def test_local_launch_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(REPO / "launch" / "swarm_local.sh")]).returncode == 0
