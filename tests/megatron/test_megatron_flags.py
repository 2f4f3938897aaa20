"""Megatron-LM's command lines, unchanged: every flag its GPT examples and GPT functional-test configs pass is
handled (implemented, accepted with a warning, or rejected with a reason, as --help says); every gpt3_* config
passes --dry-run or fails with its documented reasons; and Megatron's own launch flag sets, shrunk only in
sizes, ranks, ports and paths, train on 2-4 CPU ranks (or, where Megatron itself refuses them, fail the same way
before any work).

The flag lists are facts of Megatron's interface, copied into tests/megatron/data with their origin."""

import importlib.util
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch

from megatronish.training.arguments import ArgumentError, build_parser, parse_args, validate_args
from megatronish.training.megatron_flags import REJECTED, WARNED

HERE = Path(__file__).parent
DATA = HERE.parent / "data" / "fixtures"
CONFIGS = json.loads((HERE / "data" / "gpt3_functional_configs.json").read_text())
EXAMPLE_FLAGS = [line.strip() for line in (HERE / "data" / "example_flags.txt").read_text().splitlines()
                 if line.startswith("--")]
ISSUE_FLAGS = ["--no-position-embedding", "--profile-ranks", "--train-data-path", "--valid-data-path",
               "--test-data-path", "--use-checkpoint-args"]  # named in the issue, in neither list
INTERLEAVED_LIMIT = "to be a multiple of --pipeline-model-parallel-size"  # micro-batch groups are not built


def _config_flags() -> set[str]:
    return {arg for argv in CONFIGS["configs"].values() for arg in argv if arg.startswith("--")}


def test_every_flag_megatron_passes_is_handled_as_help_says():
    parser = build_parser()
    known = {s for action in parser._actions for s in action.option_strings}
    flags = _config_flags() | set(EXAMPLE_FLAGS) | set(ISSUE_FLAGS)
    assert sorted(flags - known) == []
    help_text = parser.format_help()
    for flag in flags:  # --help lists each, under its group, with what it does here
        assert re.search(rf"\s{re.escape(flag)}[\s,=]", help_text), flag
    assert "accepted with a warning" in help_text and "rejected (Megatron flags for features not built here)" in help_text
    implemented = flags - set(WARNED) - set(REJECTED)
    counts = (len(flags), len(implemented), len(flags & set(WARNED)), len(flags & set(REJECTED)))
    print(f"{counts[0]} flags: {counts[1]} implemented, {counts[2]} accepted with a warning, {counts[3]} rejected "
          f"({len(EXAMPLE_FLAGS)} from the examples, {len(_config_flags())} from the configs)")
    assert counts[1] + counts[2] + counts[3] == counts[0]


def _link(source: Path, target: str) -> None:
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if not os.path.lexists(target):
        os.symlink(source, target)


def _runner_paths(argv: list[str], root: Path) -> list[str]:
    """The functional-test runner's paths, made to exist: its data and tokenizer files are the fixture's."""
    values = {"${DATA_PATH}": f"{root}/data", "${CHECKPOINT_SAVE_PATH}": f"{root}/save",
              "${CHECKPOINT_LOAD_PATH}": f"{root}/load", "${DATA_CACHE_PATH}": f"{root}/cache",
              "${TENSORBOARD_PATH}": f"{root}/tb", "${REPEAT}": "1234", "${WANDB_EXPERIMENT}": "run",
              "${WANDB_SAVE_PATH}": f"{root}/wandb"}
    out = []
    for arg in argv:
        if arg == "$DATA_BLEND":
            out += ["0.3", f"{root}/data/blend_a_text_document", "0.7", f"{root}/data/blend_b_text_document"]
            continue
        for key, value in values.items():
            arg = arg.replace(key, value)
        out.append(arg)
    for i, arg in enumerate(out):
        if arg.startswith(f"{root}/data") and arg.endswith("_document"):
            for ext in (".bin", ".idx"):
                _link(DATA / f"meg_text_document{ext}", arg + ext)
        elif i and out[i - 1] in ("--vocab-file", "--tokenizer-model"):
            _link(DATA / "vocab.json", arg)
        elif i and out[i - 1] == "--merge-file":
            _link(DATA / "merges.txt", arg)
    return out


def _entry_point():
    """pretrain_gpt.py of this checkout, imported as a module (it is a script, not a package)."""
    spec = importlib.util.spec_from_file_location("pretrain_gpt", HERE.parents[1] / "pretrain_gpt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _dry_run(argv: list[str], world_size: int) -> tuple[int, str]:
    """pretrain_gpt.py --dry-run in this process: (exit status, what it printed)."""
    pretrain_gpt = _entry_point()
    out = io.StringIO()
    os.environ["WORLD_SIZE"] = str(world_size)
    try:
        with redirect_stdout(out), redirect_stderr(out):
            pretrain_gpt.main(argv + ["--dry-run"])
        return 0, out.getvalue()
    except SystemExit as exit_:
        return exit_.code, out.getvalue()
    finally:
        del os.environ["WORLD_SIZE"]


def test_every_gpt3_config_passes_dry_run_or_fails_with_its_documented_reasons(tmp_path):
    outcomes = {"passed": 0, "rejected": 0, "interleaved": 0}
    for name, argv in CONFIGS["configs"].items():
        status, output = _dry_run(_runner_paths(argv, tmp_path), CONFIGS["world_size"][name])
        assert "unrecognized argument" not in output, name
        rejected = [flag for flag in REJECTED if flag in argv
                    and (REJECTED[flag][0] == 0 or argv[argv.index(flag) + 1] not in REJECTED[flag][2])]
        errors = [line for line in output.splitlines() if line.startswith("pretrain_gpt.py: error: ")]
        if not rejected and status == 0:
            outcomes["passed"] += 1
            assert "> world:" in output and "> model:" in output, name  # the resolved configuration
            continue
        assert status == 2, (name, output[-2000:])
        if rejected:
            outcomes["rejected"] += 1
            for flag in rejected:  # one line each, naming the flag, why and what to use instead
                assert any(line[len("pretrain_gpt.py: error: "):].startswith(flag) for line in errors), (name, flag)
        else:
            outcomes["interleaved"] += 1
            assert len(errors) == 1 and INTERLEAVED_LIMIT in errors[0], (name, errors)
    print(f"{len(CONFIGS['configs'])} gpt3_* configs: {outcomes}")
    assert sum(outcomes.values()) == len(CONFIGS["configs"]) == 161


def test_quoted_split_and_dry_run_output():
    status, output = _dry_run(["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "1000",
                               "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
                               "--seq-length", "32", "--micro-batch-size", "1", "--train-iters", "3", "--lr", "1e-3",
                               "--split", "'99,1,0'", "--distributed-backend", "nccl"], 1)
    assert status == 0 and "split [0.99, 0.01, 0.0]" in output, output
    assert "WARNING: --distributed-backend nccl: no GPU is visible, using gloo" in output or "backend nccl" in output


# -- Megatron's launch scripts, shrunk only in sizes, ranks, ports and paths --------------------------------

def _files(tmp_path: Path) -> dict:
    """The script's path arguments: the fixture data and tokenizer, and folders under tmp_path."""
    from tokenizers import ByteLevelBPETokenizer
    tokenizer_dir = tmp_path / "tokenizer"
    tokenizer_dir.mkdir(exist_ok=True)
    ByteLevelBPETokenizer(str(DATA / "vocab.json"), str(DATA / "merges.txt")).save(str(tokenizer_dir / "tokenizer.json"))
    return {"data": str(DATA / "meg_text_document"), "vocab": str(DATA / "vocab.json"),
            "merges": str(DATA / "merges.txt"), "tokenizer": str(tokenizer_dir), "ckpt": str(tmp_path / "ckpt"),
            "tb": str(tmp_path / "tb"), "cache": str(tmp_path / "cache")}


def gpt3_175b(f: dict) -> list[str]:
    """examples/gpt3/train_gpt3_175b_distributed.sh (tag core_v0.15.3, with --rampup-batch-size): its flags in its
    order; 96 layers -> 4, hidden 12288 -> 64, 96 heads -> 4, seq 2048 -> 32, global batch 1536 -> 8, ramp-up
    16 16 5859375 -> 2 2 16, 500000 iterations -> 4, decay 430000 -> 4, TP 8 x PP 16 -> 2 x 2, intervals to 1-2."""
    return ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
            "--max-position-embeddings", "32", "--attention-backend", "auto",
            "--micro-batch-size", "1", "--global-batch-size", "8", "--rampup-batch-size", "2", "2", "16",
            "--train-iters", "4", "--weight-decay", "0.1", "--adam-beta1", "0.9", "--adam-beta2", "0.95",
            "--init-method-std", "0.006", "--clip-grad", "1.0", "--fp16", "--lr", "6.0e-5", "--lr-decay-style",
            "cosine", "--min-lr", "6.0e-6", "--lr-warmup-fraction", ".001", "--lr-decay-iters", "4",
            "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
            "--data-path", f["data"], "--vocab-file", f["vocab"], "--merge-file", f["merges"], "--split", "949,50,1",
            "--log-interval", "1", "--save-interval", "2", "--eval-interval", "2", "--save", f["ckpt"], "--load",
            f["ckpt"], "--eval-iters", "1", "--tensorboard-dir", f["tb"]]


def llama3_8b(f: dict, mock: bool) -> list[str]:
    """examples/llama/train_llama3_8b_h100_fp8.sh with DTYPE bf16 (no fp8 block), its real-data or --mock-data
    branch, its flags in its order; 32 layers -> 2, hidden 4096 -> 64, ffn 14336 -> 128, 32 heads / 8 groups ->
    4 / 2, kv channels 128 -> 16, seq 8192 -> 32, global batch 128 -> 4, samples 1953125000 / 1949218748 / 3906252
    -> 16 / 14 / 4, vocab 128256 -> 1024 (mock), 8 GPUs -> 2 ranks, eval 32 iterations -> 1, profile steps 4-6 ->
    1-2, intervals to 1-2. "--split '99,1,0'" keeps its quotes, as the script's unquoted array passes them."""
    model = ["--use-mcore-models", "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128",
             "--num-attention-heads", "4", "--group-query-attention", "--num-query-groups", "2", "--kv-channels", "16",
             "--seq-length", "32", "--max-position-embeddings", "32", "--position-embedding-type", "rope",
             "--rotary-base", "1000000", "--rotary-percent", "1.0", "--attention-dropout", "0.0", "--hidden-dropout",
             "0.0", "--swiglu", "--normalization", "RMSNorm", "--init-method-std", "0.0134", "--attention-backend",
             "fused", "--apply-layernorm-1p", "--untie-embeddings-and-output-weights", "--disable-bias-linear"]
    training = ["--micro-batch-size", "1", "--global-batch-size", "4", "--train-samples", "16", "--lr-decay-samples",
                "14", "--lr-warmup-samples", "4", "--lr", "0.00015", "--min-lr", "0.00001", "--decoupled-lr", "5.0e-4",
                "--decoupled-min-lr", "4.5e-5", "--lr-decay-style", "cosine", "--clip-grad", "1.0", "--weight-decay",
                "0.1", "--adam-beta1", "0.9", "--adam-beta2", "0.95", "--bf16", "--grad-reduce-in-bf16",
                "--cross-entropy-loss-fusion", "--calculate-per-token-loss", "--manual-gc",
                "--empty-unused-memory-level", "1", "--exit-duration-in-mins", "235",
                "--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather"]
    parallel = ["--tensor-model-parallel-size", "1", "--context-parallel-size", "1", "--sequence-parallel"]
    if mock:
        data = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "1024", "--data-cache-path",
                f["cache"], "--tiktoken-pattern", "v2", "--split", "'99,1,0'", "--no-create-attention-mask-in-dataloader",
                "--no-mmap-bin-files", "--num-workers", "1"]
    else:
        data = ["--data-path", f["data"], "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                f["tokenizer"], "--data-cache-path", f["cache"], "--split", "'99,1,0'",
                "--no-create-attention-mask-in-dataloader", "--no-mmap-bin-files", "--num-workers", "1",
                "--vocab-size", "128256"]
    logging = ["--log-interval", "1", "--eval-iters", "1", "--eval-interval", "2", "--save-interval", "2",
               "--log-throughput", "--profile", "--profile-step-start", "1", "--profile-step-end", "2", "--ckpt-format",
               "torch_dist", "--distributed-timeout-minutes", "60", "--save", f["ckpt"], "--load", f["ckpt"],
               "--tensorboard-dir", f["tb"]]
    return model + training + parallel + data + logging


def gpt_345m_with_mp(f: dict) -> list[str]:
    """examples/pretrain_gpt_distributed_with_mp.sh (last at Megatron-LM f2e72c8a16^): its flags in its order;
    24 layers -> 4, hidden 1024 -> 64, 16 heads -> 4, seq 1024 -> 32, micro/global batch 4/16 -> 2/8,
    500000 / 320000 iterations -> 4 / 4, intervals to 1-2; TP 2 x PP 2 as written; --distributed-backend nccl."""
    return ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--sequence-parallel",
            "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
            "--max-position-embeddings", "32", "--micro-batch-size", "2", "--global-batch-size", "8",
            "--lr", "0.00015", "--train-iters", "4", "--lr-decay-iters", "4", "--lr-decay-style", "cosine",
            "--min-lr", "1.0e-5", "--weight-decay", "1e-2", "--lr-warmup-fraction", ".01", "--clip-grad", "1.0",
            "--fp16", "--data-path", f["data"], "--vocab-file", f["vocab"], "--merge-file", f["merges"],
            "--split", "949,50,1", "--log-interval", "1", "--save-interval", "2", "--eval-interval", "2",
            "--eval-iters", "1", "--distributed-backend", "nccl", "--save", f["ckpt"], "--load", f["ckpt"]]


def _run_launch(argv, world_size, tmp_path) -> dict:
    """torchrun --nproc_per_node N pretrain_gpt.py <the script's flags>, as the script runs it (standalone:
    localhost, a free port); what the last rank logged."""
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    env = dict(os.environ, OMP_NUM_THREADS="1", MEGATRONISH_CACHE=str(tmp_path / "megatronish-cache"),
               HF_HUB_OFFLINE="1", PYTHONPATH=str(HERE.parents[1]))
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node", str(world_size),
                           str(HERE.parents[1] / "pretrain_gpt.py"), *argv],
                          capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    logged = re.findall(r"iteration\s+(\d+)/\s*\d+ \| consumed samples:\s+(\d+) .*?global batch size:\s+(\d+) \|"
                        r"(?: lm loss: (\S+) \|)?", out)  # no lm loss where fp16 skipped the step (loss scale)
    return {"output": out, "iterations": [int(i) for i, _, _, _ in logged],
            "consumed": [int(c) for _, c, _, _ in logged], "batches": [int(b) for _, _, b, _ in logged],
            "losses": [float(loss) for *_, loss in logged if loss]}


def test_gpt3_175b_is_refused_as_megatron_refuses_it_and_trains_with_train_samples(tmp_path):
    f = _files(tmp_path)
    argv = gpt3_175b(f)
    with pytest.raises(ArgumentError, match="--rampup-batch-size needs --train-samples: Megatron refuses"):
        validate_args(parse_args(argv), 4)  # Megatron: "expected no batch-size rampup for iteration-based training"
    i = argv.index("--train-iters")
    fixed = argv[:i] + ["--train-samples", "40"] + argv[i + 2:]
    i = fixed.index("--lr-decay-iters")
    fixed = fixed[:i] + fixed[i + 2:]
    run = _run_launch(fixed, 4, tmp_path)
    # ramp 2 -> 8 in steps of 2 over 16 samples, 16/3 samples per step (by hand: consumed 0, 2, 4 -> 2; 6, 10
    # -> 4; 14 -> 6; past 16 -> 8): batches 2, 2, 2, 4, 4, 6, 8, 8, 8 = 44 >= 40
    assert run["batches"] == [2, 2, 2, 4, 4, 6, 8, 8, 8] and run["consumed"][-1] == 44
    assert run["iterations"] == list(range(1, 10)) and all(math.isfinite(loss) for loss in run["losses"])
    assert "skipped iterations" in run["output"]  # fp16: the dynamic loss scale starts at 2^32 and skips steps
    assert os.path.isfile(f["ckpt"] + "/latest_checkpointed_iteration.txt")


@pytest.mark.parametrize("mock", [False, True], ids=["real_data", "mock_data"])
def test_llama3_8b_bf16_trains(tmp_path, mock):
    f = _files(tmp_path)
    run = _run_launch(llama3_8b(f, mock), 2, tmp_path)
    assert run["iterations"] == [1, 2, 3, 4] and run["consumed"][-1] == 16
    assert all(math.isfinite(loss) for loss in run["losses"])
    assert "WARNING: --use-mcore-models: ignored" in run["output"]
    assert any(name.startswith("profile_rank0") for name in os.listdir(f["tb"]))


def test_classic_gpt_345m_with_model_parallelism_trains_with_nccl_falling_back_to_gloo(tmp_path):
    f = _files(tmp_path)
    run = _run_launch(gpt_345m_with_mp(f), 4, tmp_path)
    assert run["iterations"] == [1, 2, 3, 4] and run["consumed"][-1] == 32
    if not torch.cuda.is_available():
        assert "WARNING: --distributed-backend nccl: no GPU is visible, using gloo on the CPU instead" in run["output"]
