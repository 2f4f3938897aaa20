"""pretrain_gpt.py's arguments: Megatron names, demo vs Megatron defaults, and one-line errors
raised before any work (checked in-process, and once through the real script for the exit code)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatronish.data.indexed_dataset import IndexedDatasetBuilder
from megatronish.training.arguments import (
    ArgumentError,
    distributed_backend,
    parse_args,
    transformer_config_from_args,
    validate_args,
)

REPO = Path(__file__).resolve().parents[2]
MODEL = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
         "--micro-batch-size", "2", "--train-iters", "5", "--lr", "1e-3"]


@pytest.fixture(scope="module")
def prefix(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("data") / "doc_text_document")
    builder = IndexedDatasetBuilder(path, dtype=np.uint16)
    builder.add_document(np.arange(100) % 250)
    builder.finalize()
    return path


def error_of(argv, world_size=1) -> str:
    with pytest.raises(ArgumentError) as info:
        validate_args(parse_args(argv), world_size)
    message = str(info.value)
    lines = message.splitlines()
    assert len(set(lines)) == len(lines)  # every problem once
    return message


def test_megatron_gpt2_flags_parse_and_map_to_the_model_config(prefix):
    args = parse_args(["--tensor-model-parallel-size", "2", "--num-layers", "24", "--hidden-size", "1024",
                       "--num-attention-heads", "16", "--seq-length", "1024", "--max-position-embeddings", "1024",
                       "--micro-batch-size", "4", "--global-batch-size", "16", "--lr", "0.00015", "--train-iters",
                       "500000", "--lr-decay-iters", "320000", "--lr-decay-style", "cosine", "--min-lr", "1.0e-5",
                       "--weight-decay", "1e-2", "--lr-warmup-fraction", ".01", "--clip-grad", "1.0", "--fp16",
                       "--data-path", prefix, "--vocab-file", __file__, "--merge-file", __file__,
                       "--split", "949,50,1", "--log-interval", "100", "--save-interval", "10000",
                       "--eval-interval", "1000", "--eval-iters", "10", "--distributed-backend", "gloo",
                       "--data-impl", "mmap", "--pipeline-model-parallel-size", "1"])
    validate_args(args, world_size=8)
    assert not args.demo and args.tokenizer_type == "GPT2BPETokenizer"
    assert (args.data_parallel_size, args.ffn_hidden_size, args.hidden_dropout, args.adam_beta2) == (4, 4096, 0.1, 0.999)
    config = transformer_config_from_args(args, vocab_size=50257)
    assert (config.num_layers, config.hidden_size, config.params_dtype, config.tie_word_embeddings) == \
        (24, 1024, torch.float16, True)


def test_llama_switches_and_tp_alias():
    args = parse_args(["--tp", "2", "--normalization", "RMSNorm", "--position-embedding-type", "rope", "--swiglu",
                       "--disable-bias-linear", "--untie-embeddings-and-output-weights", "--hidden-size", "256"])
    validate_args(args, world_size=2)
    config = transformer_config_from_args(args, vocab_size=258)
    assert args.tensor_model_parallel_size == 2
    assert (config.normalization, config.position_embedding_type, config.activation) == ("RMSNorm", "rope", "swiglu")
    assert not config.add_bias_linear and not config.tie_word_embeddings
    assert config.ffn_hidden_size == 640  # Megatron's SwiGLU size: int(4 * 256 * 2/3 / 64) * 64


def test_no_data_flags_give_the_demo_and_explicit_flags_win():
    args = parse_args([])
    validate_args(args, world_size=2)
    assert args.demo and args.tokenizer_type == "ByteTokenizer" and args.save == "checkpoints/default"
    assert args.num_layers == 4 and args.global_batch_size == 16 and args.lr_warmup_fraction == 0.05
    args = parse_args(["--num-layers", "2", "--lr-warmup-iters", "3", "--train-iters", "5"])
    validate_args(args, world_size=1)
    assert args.num_layers == 2 and args.lr_warmup_iters == 3 and args.lr_warmup_fraction is None


@pytest.mark.parametrize("argv,world_size,expected", [
    (["--tp", "3"], 2, "--tensor-model-parallel-size 3 x --pipeline-model-parallel-size 1 = 3 does not divide the "
                       "world size 2"),
    (["--tp", "2", "--pp", "2"], 2, "--tensor-model-parallel-size 2 x --pipeline-model-parallel-size 2 = 4 does not "
                                    "divide the world size 2"),
    (["--global-batch-size", "20"], 2, "--global-batch-size 20 is not divisible by --micro-batch-size 8 x "
                                       "data-parallel size 2: use a multiple of 16"),
    (["--num-attention-heads", "6", "--hidden-size", "96", "--tp", "4"], 4,
     "num_attention_heads 6 is not divisible by the tensor-parallel size 4"),
    (["--vocab-file", "vocab.json", "--merge-file", "merges.txt"], 1, "--data-path is missing"),
    (["--fp16", "--bf16"], 1, "--fp16 and --bf16 are both set"),
    (["--seq-length", "256", "--max-position-embeddings", "128"], 1,
     "sequence length 256 is longer than max_position_embeddings 128"),
    (["--pp", "3"], 3, "num_layers 4 is not divisible by the pipeline-model-parallel size 3: choose a multiple of 3, "
                       "or give --decoder-first-pipeline-num-layers"),
    (["--pp", "2", "--virtual-pipeline-model-parallel-size", "2", "--global-batch-size", "24"], 2,
     "needs the micro-batches per step (3 = --global-batch-size 24 / (--micro-batch-size 8 x DP 1)) to be a multiple "
     "of --pipeline-model-parallel-size 2"),
    (["--pp", "2", "--num-layers", "6", "--virtual-pipeline-model-parallel-size", "2"], 2,
     "num_layers 6 is not divisible by pipeline size 2 x virtual stages 2 = 4"),
    (["--pp", "2", "--num-layers-per-virtual-pipeline-stage", "3"], 2,
     "--num-layers-per-virtual-pipeline-stage 3 x --pipeline-model-parallel-size 2 must divide --num-layers 4"),
    (["--virtual-pipeline-model-parallel-size", "2"], 1,
     "--virtual-pipeline-model-parallel-size 2 needs --pipeline-model-parallel-size > 1"),
    (["--pp", "2", "--num-layers-per-virtual-pipeline-stage", "1", "--virtual-pipeline-model-parallel-size", "3"], 2,
     "--num-layers-per-virtual-pipeline-stage 1 means 2 virtual stages, but --virtual-pipeline-model-parallel-size is 3"),
    (["--decoder-first-pipeline-num-layers", "1"], 1, "need a pipeline-model-parallel size > 1"),
    (["--pp", "3", "--num-layers", "6", "--decoder-first-pipeline-num-layers", "1"], 3,
     "5 of num_layers 6 remain for 2 middle stage(s), which must split them evenly"),
    (["--pp", "2", "--decoder-first-pipeline-num-layers", "1", "--decoder-last-pipeline-num-layers", "2"], 2,
     "the first (1) and last (2) pipeline stages hold 3 layers, but num_layers is 4"),
    (["--pp", "2", "--decoder-first-pipeline-num-layers", "1", "--num-layers-per-virtual-pipeline-stage", "1"], 2,
     "an uneven pipeline split (--decoder-first/last-pipeline-num-layers) and virtual stages cannot be combined"),
    (["--lr-warmup-iters", "300"], 1, "the warmup (300 iterations) must be shorter than --lr-decay-iters 200"),
    (["--use-distributed-optimizer", "--overlap-param-gather", "--torch-compile"], 2,
     "--overlap-param-gather cannot be combined with --torch-compile"),

    # Values that used to fail late, blaming something else, or never:
    (["--global-batch-size", "0"], 1, "--global-batch-size must be a positive integer, got 0"),
    (["--adam-beta1", "1.0"], 1, "--adam-beta1 1.0 must be in [0, 1)"),
    (["--adam-beta2", "-0.1"], 1, "--adam-beta2 -0.1 must be in [0, 1)"),
    (["--adam-eps", "0"], 1, "--adam-eps 0.0 must be positive"),
    (["--seed", "-1"], 1, "--seed -1 must be in [0, 2**32)"),
    (["--distributed-timeout-minutes", "0"], 1, "--distributed-timeout-minutes 0.0 must be positive"),
    (["--split", "90,x,5"], 1, "--split '90,x,5' must be up to three comma-separated numbers"),
    (["--split", "1,2,3,4"], 1, "--split '1,2,3,4' must be up to three non-negative numbers"),
    (["--lr", "inf"], 1, "--lr inf must be a finite number"),
    (["--min-lr", "nan"], 1, "--min-lr nan must be a finite number"),
    (["--lr-warmup-iters", "-5"], 1, "--lr-warmup-iters -5 must be >= 0"),
    (["--weight-decay", "-0.1"], 1, "--weight-decay -0.1 must be >= 0"),
    (["--exit-interval", "-1"], 1, "--exit-interval -1 must be positive"),
    (["--max-nan-iterations", "-1"], 1, "--max-nan-iterations -1 must be >= 0"),
    (["--num-workers", "-2"], 1, "--num-workers -2 must be >= 0"),
])
def test_argument_errors_name_the_value_and_fix(argv, world_size, expected):
    assert expected in error_of(argv, world_size)


def test_data_and_tokenizer_file_errors(prefix):
    assert "--data-path /no/such/prefix: /no/such/prefix.bin / /no/such/prefix.idx not found" in error_of(
        ["--data-path", "/no/such/prefix", "--tokenizer-type", "ByteTokenizer", *MODEL])
    assert "--vocab-file /no/vocab.json does not exist" in error_of(
        ["--data-path", prefix, "--vocab-file", "/no/vocab.json", "--merge-file", __file__, *MODEL])
    assert "--tokenizer-type GPT2BPETokenizer needs --merge-file" in error_of(
        ["--data-path", prefix, "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", __file__, *MODEL])
    assert "--num-layers is required when --data-path is given" in error_of(["--data-path", prefix])


def test_tiktokenizer_options_are_checked_before_any_work(prefix, monkeypatch):
    """Megatron's TikTokenizer flags: their combinations fail together, before the vocabulary file is read; the
    --tiktoken-* flags that Megatron's scripts pass with other tokenizers are ignored with a warning, as Megatron
    ignores them; the missing tiktoken package is named with the extra that installs it."""
    tiktoken = ["--data-path", prefix, "--tokenizer-type", "TikTokenizer", *MODEL]
    assert "--tokenizer-type TikTokenizer needs --tokenizer-model" in error_of(tiktoken)
    message = error_of(tiktoken + ["--tokenizer-model", __file__, "--tiktoken-pattern", "v3",
                                   "--tiktoken-special-tokens", "<s>", "</s>", "<unk>"])
    assert "--tiktoken-pattern v3: choose one of v1, v2 (default v2)" in message
    assert "--tokenizer-special-tokens lacks <mask> <pad> <cls> <sep>: TikTokenizer needs" in message
    assert "--tiktoken-num-special-tokens 5000 must be at least the 7 special tokens and below --vocab-size 4096" in \
        error_of(tiktoken + ["--tokenizer-model", __file__, "--vocab-size", "4096", "--tiktoken-num-special-tokens",
                             "5000"])
    args = parse_args(tiktoken + ["--tokenizer-model", __file__, "--tiktoken-pattern", "v1", "--vocab-size", "4096",
                                  "--tokenizer-special-tokens", "<pad>", "<s>", "</s>", "<unk>", "<mask>", "<cls>",
                                  "<sep>"])
    if importlib.util.find_spec("tiktoken") is not None:
        assert validate_args(args, 1) == []
    assert args.tokenizer_special_tokens[0] == "<pad>" and args.vocab_size == 4096
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # as where it is not installed
    assert "--tokenizer-type TikTokenizer needs the tiktoken package: pip install 'megatronish[tiktoken]'" in \
        error_of(tiktoken + ["--tokenizer-model", __file__])

    mock = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "1024", *MODEL]
    warnings = validate_args(parse_args(mock + ["--tiktoken-pattern", "v2", "--tiktoken-num-special-tokens", "9"]), 1)
    assert warnings == ["--tiktoken-pattern: ignored, it configures --tokenizer-type TikTokenizer only",
                        "--tiktoken-num-special-tokens: ignored, it configures --tokenizer-type TikTokenizer only"]
    assert "--tokenizer-special-tokens with --tokenizer-type NullTokenizer: adding special tokens is built for " \
           "TikTokenizer only" in error_of(mock + ["--tokenizer-special-tokens", "<x>"])


def test_an_empty_training_split_and_an_unwritable_save_folder_fail_before_work(prefix, tmp_path):
    message = error_of(["--data-path", prefix, "--tokenizer-type", "ByteTokenizer", "--split", "0,1,0", *MODEL])
    assert f"--split 0,1,0 leaves no training sequences ({prefix}: 1 sequences): give the training split" in message
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert f"--save {blocker}/ckpt is not writable (Not a directory: {blocker}): give a folder" in error_of(
        ["--save", str(blocker / "ckpt")])
    assert not (tmp_path / "new").exists()
    validate_args(parse_args(["--save", str(tmp_path / "new" / "ckpt")]), 1)  # creatable: fine, and not created yet
    assert not (tmp_path / "new").exists()


def test_unknown_flag_suggests_the_closest():
    with pytest.raises(ArgumentError, match=r"unrecognized argument --num-layer; did you mean --num-layers\?"):
        validate_args(parse_args(["--num-layer", "4"]), 1)
    with pytest.raises(ArgumentError, match="unrecognized argument --tensor-parallel"):
        validate_args(parse_args(["--tensor-parallel=2"]), 1)


def test_every_error_of_a_command_line_is_reported_together():
    message = error_of(["--num-layer", "4", "--lr", "abc", "--fp16", "--bf16", "--num-experts", "8",
                        "--attention-backend", "nope", "--tp", "3"], world_size=2)
    for expected in ("unrecognized argument --num-layer", "argument --lr: invalid float value: 'abc'",
                     "argument --attention-backend: invalid choice: 'nope'", "--num-experts 8: mixture-of-experts",
                     ):
        assert expected in message
    message = error_of(["--fp16", "--bf16", "--tp", "3", "--context-parallel-size", "2"], world_size=2)
    for expected in ("--fp16 and --bf16 are both set", "does not divide the world size 2",
                     "num_attention_heads 8 is not divisible by the tensor-parallel size 3",
                     "--context-parallel-size 2: context parallelism is not built"):
        assert expected in message


def test_megatron_spellings_and_fallbacks():
    args = parse_args(["--distributed-backend", "nccl", "--attention-backend", "unfused", "--context-parallel-size",
                       "1", "--no-gradient-accumulation-fusion", "--split", "'99,1,0'",
                       "--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "2"])
    warnings = validate_args(args, 1)
    if not torch.cuda.is_available():
        assert distributed_backend(args) == "gloo"
        assert "--distributed-backend nccl: no GPU is visible, using gloo on the CPU instead" in warnings
    assert transformer_config_from_args(args, vocab_size=10).attention_backend == "explicit"
    assert any(w.startswith("--no-gradient-accumulation-fusion: ignored") for w in warnings)
    assert any(w.startswith("--recompute-method block") for w in warnings)
    args = parse_args(["--pp", "2", "--num-virtual-stages-per-pipeline-rank", "2"])
    validate_args(args, 2)
    assert args.virtual_pipeline_model_parallel_size == 2


def test_script_exits_nonzero_with_a_line_per_problem_before_any_work(tmp_path):
    env = dict(os.environ, WORLD_SIZE="2", RANK="0", MEGATRONISH_CACHE=str(tmp_path / "cache"))
    for argv, expected in ((["--tp", "3"], ["does not divide the world size 2", "num_attention_heads 8 is not "
                                           "divisible by the tensor-parallel size 3"]),):
        proc = subprocess.run([sys.executable, str(REPO / "pretrain_gpt.py"), *argv], capture_output=True, text=True,
                              env=env, timeout=120, cwd=tmp_path)
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == len(expected)
        assert all(line.startswith("pretrain_gpt.py: error: ") and want in line for line, want in zip(lines, expected))
        assert not (tmp_path / "cache").exists() and not (tmp_path / "checkpoints").exists()  # nothing was built
