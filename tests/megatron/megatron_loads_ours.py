"""Real megatron-core loads the torch_dist checkpoints megatronish writes, and computes megatronish's logits.

    MEGATRON_PYTHON tests/megatron/megatron_loads_ours.py [--megatronish-python PY] [--models gpt llama]

Run it with a Python that has megatron-core 0.19.2 (tests/megatron/test_megatron_loads_ours.py says how to make one);
megatronish's side runs in --megatronish-python (default: $MEGATRONISH_PYTHON, else `python3`). Everything is
written in a temporary folder that is removed at the end. For each model (the shapes of the megatron-core fixture
checkpoints in tests/megatron/fixtures: 2 layers, hidden 64, 4 heads; a GPT and a Llama-style GQA model):
1. megatronish trains it 3 iterations at TP=2 (torchrun, 2 ranks) twice, the same run: once saved in megatronish's
   own format, once with `pretrain_gpt.py --ckpt-format torch_dist --save`; tools/convert_checkpoint.py exports the
   first (`--output-format megatron --tp 2`): two torch_dist checkpoints by two writers;
2. megatronish computes the logits of a fixed batch from its own-format checkpoint (TP=1, one process: the dense
   reference, independent of the torch_dist writers and reader);
3. megatron-core loads each checkpoint the way Megatron-LM's pretrain_gpt.py resumes one, at TP=2 on 2 gloo
   ranks: a Megatron-LM command line with `--use-checkpoint-args --load DIR` (parse_and_validate_args, so the
   model's shape, padded vocabulary and parallel sizes come from the checkpoint's args), the model built as
   gpt_builders.gpt_builder builds it (local spec), then megatron.training.checkpointing.load_checkpoint; and
   computes the gathered logits of the same batch;
4. the logits must agree within --tolerance (absolute, fp32) on the real vocabulary columns, and Megatron must
   read back the iteration and consumed samples we saved.
Megatron runs on CPU with the patches make_fixture.py (the fixture's generating script) applies: torch.cuda's
current_device/get_rng_state/synchronize, get_device_arch_version, and the flags --transformer-impl local
--use-cpu-initialization --no-gradient-accumulation-fusion --no-persist-layer-norm --distributed-backend gloo
--no-rope-fusion, with an explicit causal attention mask; and load_checkpoint reads the tracker file on each rank
without its cross-rank check, an all-reduce of a CUDA tensor (the ranks read the same file).
Exit status 0 when every check passes; the last line is a JSON summary of what was measured.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from unittest import mock

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.path.join(REPO, "tests", "data", "fixtures")
VOCAB = 553  # tests/data/fixtures/vocab.json's entries
ITERS = 3
SEED = 1234
SHAPE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--ffn-hidden-size", "256",
         "--seq-length", "32", "--max-position-embeddings", "32"]
MODELS = {
    "gpt": [],
    "llama": ["--group-query-attention", "--num-query-groups", "2", "--swiglu", "--normalization", "RMSNorm",
              "--position-embedding-type", "rope", "--untie-embeddings-and-output-weights", "--disable-bias-linear"],
}
# Megatron-LM's side: what a user adds to `--use-checkpoint-args --load DIR` to run pretrain_gpt.py on CPU
MEGATRON_ARGV = ["--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "100", "--lr", "1e-4",
                 "--tensor-model-parallel-size", "2", "--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB),
                 "--no-use-tokenizer-model-from-checkpoint-args",  # the saved GPT2BPETokenizer needs the HF hub
                 "--transformer-impl", "local", "--use-cpu-initialization", "--no-gradient-accumulation-fusion",
                 "--no-persist-layer-norm", "--no-rope-fusion", "--distributed-backend", "gloo",
                 "--hidden-dropout", "0", "--attention-dropout", "0", "--seed", str(SEED)]


def fixed_batch():
    """Two sequences of 32 token ids of the real vocabulary, the same in both interpreters."""
    import torch
    g = torch.Generator().manual_seed(SEED + 7)
    return torch.randint(0, VOCAB, (2, 32), generator=g)


# ------------------------------------------------------------------------------------------ megatronish's side

def megatronish_logits(checkpoint: str, out: str) -> None:
    """The logits of the model in megatronish's own checkpoint format at `checkpoint` (TP=1, one process: the dense
    reference, read without the torch_dist code under test), saved to `out`."""
    import torch
    from megatronish.testing import run_distributed
    (logits,) = run_distributed(_megatronish_rank, 1, args=(checkpoint,), timeout=300)
    torch.save(logits[..., :VOCAB], out)


def _megatronish_rank(checkpoint: str):
    import torch
    from megatronish import parallel_state
    from megatronish.model import GPTModel
    from megatronish.model.full_state import load_full_state_dict
    from megatronish.training.checkpointing import read_full_model_state
    parallel_state.initialize_model_parallel(1)
    config, state, _ = read_full_model_state(checkpoint)
    model = GPTModel(config).eval()
    load_full_state_dict(model, state)
    with torch.no_grad():
        return model(fixed_batch())


# ------------------------------------------------------------------------------------------ Megatron's side

def _patch_for_cpu():
    """make_fixture.py's CPU patches (Megatron's files untouched), and one for load_checkpoint's tracker file."""
    import torch
    if not torch.cuda.is_available():
        torch.cuda.current_device = lambda: torch.device("cpu")
        torch.cuda.get_rng_state = lambda device="cuda": torch.empty(0, dtype=torch.uint8)
        torch.cuda.synchronize = lambda device=None: None
    import megatron.training.arguments as margs
    margs.get_device_arch_version = lambda: 9
    import megatron.training.checkpointing as mckpt
    read_metadata = mckpt.read_metadata

    def read_metadata_on_one_rank(tracker_filename):
        """The tracker file as Megatron reads it, without its cross-rank check (an all-reduce of a CUDA tensor)."""
        with mock.patch.object(torch.distributed, "is_initialized", lambda: False):
            return read_metadata(tracker_filename)

    mckpt.read_metadata = read_metadata_on_one_rank
    return torch


def megatron_logits(checkpoint: str, out: str) -> None:
    """One rank of megatron-core loading `checkpoint` as pretrain_gpt.py --use-checkpoint-args --load does."""
    import warnings
    warnings.filterwarnings("ignore")
    torch = _patch_for_cpu()
    torch.set_num_threads(1)
    import torch.distributed as dist
    import megatron.core
    from megatron.core import mpu, tensor_parallel
    from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids
    from megatron.core.enums import ModelType
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel.random import initialize_rng_tracker
    from megatron.training.arguments import core_transformer_config_from_args, parse_and_validate_args
    from megatron.training.checkpointing import load_checkpoint
    from megatron.training.initialize import _set_random_seed

    saved_argv, sys.argv = sys.argv, ["pretrain_gpt.py", *MEGATRON_ARGV, "--use-checkpoint-args", "--load", checkpoint]
    try:
        args = parse_and_validate_args()  # also sets Megatron's global args and builds the (Null) tokenizer
    finally:
        sys.argv = saved_argv
    dist.init_process_group("gloo")
    mpu.initialize_model_parallel(tensor_model_parallel_size=args.tensor_model_parallel_size,
                                  pipeline_model_parallel_size=args.pipeline_model_parallel_size)
    _set_random_seed(args.seed)
    initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)

    # gpt_builders.gpt_builder (Megatron-LM's pretrain_gpt.py builder), non-TE / no-MoE branch
    config = core_transformer_config_from_args(args)
    spec = get_gpt_layer_local_spec(
        config.num_moe_experts, config.moe_grouped_gemm, config.qk_layernorm, config.multi_latent_attention,
        normalization=config.normalization, use_kitchen=config.use_kitchen,
        use_kitchen_attention=config.use_kitchen_attention, kitchen_attention_backend=config.kitchen_attention_backend)
    model = GPTModel(
        config=config, transformer_layer_spec=spec, vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings, pre_process=True, post_process=True,
        fp16_lm_cross_entropy=args.fp16_lm_cross_entropy, parallel_output=True,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type, rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base, rope_scaling=args.use_rope_scaling)
    model.model_type = ModelType.encoder_or_decoder
    for p in model.parameters():
        tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(p)

    iteration, _ = load_checkpoint([model], None, None, strict=True)

    tokens = fixed_batch()
    masks = [_get_ltor_masks_and_position_ids(t, VOCAB, False, False, False, True) for t in tokens]
    attention_mask = torch.stack([m[0] for m in masks])
    position_ids = torch.stack([m[2] for m in masks])
    model.eval()
    with torch.no_grad():
        local = model(tokens, position_ids, attention_mask)  # [b, s, padded V / tp]
    parts = [torch.empty_like(local) for _ in range(mpu.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, local.contiguous(), group=mpu.get_tensor_model_parallel_group())
    if dist.get_rank() == 0:
        torch.save({"logits": torch.cat(parts, dim=-1), "iteration": iteration,
                    "consumed_train_samples": args.consumed_train_samples,
                    "padded_vocab_size": args.padded_vocab_size, "megatron_core": megatron.core.__version__,
                    "config": {name: getattr(config, name) for name in (
                        "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
                        "normalization", "gated_linear_unit", "add_bias_linear")}}, out)
    dist.barrier()
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------ the check

def pretrain_argv(name: str, tmp: str) -> list[str]:
    """megatronish's pretrain_gpt.py at TP=2 on the repo's fixture corpus, fp32, no dropout."""
    return [*SHAPE, *MODELS[name], "--tp", "2", "--data-path", os.path.join(DATA, "meg_text_document"),
            "--vocab-file", os.path.join(DATA, "vocab.json"), "--merge-file", os.path.join(DATA, "merges.txt"),
            "--data-cache-path", os.path.join(tmp, "cache"), "--split", "949,50,1", "--micro-batch-size", "2",
            "--global-batch-size", "4", "--train-iters", str(ITERS), "--lr", "3e-3", "--hidden-dropout", "0",
            "--attention-dropout", "0", "--eval-interval", "1000", "--eval-iters", "1", "--num-workers", "0"]


def _run(cmd: list[str], env: dict, what: str) -> None:
    done = subprocess.run(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=900)
    if done.returncode:
        raise SystemExit(f"{what} failed (exit status {done.returncode}):\n$ {' '.join(cmd)}\n{done.stdout[-8000:]}")


def check(megatronish_python: str, models: list[str], tolerance: float) -> dict:
    import torch
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", TORCH_COMPILE_DISABLE="1",
               CUDA_DEVICE_MAX_CONNECTIONS="1", PYTHONWARNINGS="ignore")
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    results, failures = {}, []
    with tempfile.TemporaryDirectory(prefix="megatron-loads-ours-") as tmp:
        for name in models:
            folder = os.path.join(tmp, name)
            native, trained, converted = (os.path.join(folder, kind) for kind in ("native", "trained", "converted"))
            for save, ckpt_format in ((native, []), (trained, ["--ckpt-format", "torch_dist"])):  # the same run twice
                _run([megatronish_python, *torchrun, "pretrain_gpt.py", *pretrain_argv(name, tmp), *ckpt_format,
                      "--save", save], env, f"{name}: megatronish training")
            _run([megatronish_python, "tools/convert_checkpoint.py", "--input-format", "training", "--input", native,
                  "--output-format", "megatron", "--output", converted, "--tp", "2"], env, f"{name}: the converter")
            ours = os.path.join(folder, "megatronish_logits.pt")
            _run([megatronish_python, __file__, "megatronish-logits", native, ours], env, f"{name}: megatronish's logits")
            for kind, checkpoint in (("pretrain_gpt.py --ckpt-format torch_dist", trained),
                                     ("convert_checkpoint.py --output-format megatron", converted)):
                theirs = checkpoint + ".megatron.pt"
                _run([sys.executable, *torchrun, __file__, "megatron-logits", checkpoint, theirs], env,
                     f"{name} ({kind}): megatron-core's load_checkpoint")
                expected, loaded = torch.load(ours), torch.load(theirs, weights_only=False)
                logits = loaded["logits"]
                difference = (logits[..., :VOCAB] - expected).abs().max().item()
                result = {"max_abs_logit_difference": difference, "max_abs_logit": expected.abs().max().item(),
                          "padding_logits_max_abs": logits[..., VOCAB:].abs().max().item(),
                          "iteration": loaded["iteration"], "consumed_train_samples": loaded["consumed_train_samples"],
                          "padded_vocab_size": loaded["padded_vocab_size"], "megatron_core": loaded["megatron_core"]}
                results[f"{name}: {kind}"] = result
                print(f"{name} ({kind}): megatron-core {loaded['megatron_core']} loaded iteration "
                      f"{loaded['iteration']}, consumed samples {loaded['consumed_train_samples']}; max |logit "
                      f"difference| {difference:.3g} (logits up to {result['max_abs_logit']:.3g})", flush=True)
                if difference > tolerance:
                    failures.append(f"{name} ({kind}): logits differ by {difference:.3g} > {tolerance}")
                if (loaded["iteration"], loaded["consumed_train_samples"]) != (ITERS, ITERS * 4):
                    failures.append(f"{name} ({kind}): Megatron read iteration {loaded['iteration']} and consumed "
                                    f"samples {loaded['consumed_train_samples']}, saved {ITERS} and {ITERS * 4}")
    return {"results": results, "failures": failures}


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] in ("megatronish-logits", "megatron-logits"):
        (megatronish_logits if sys.argv[1] == "megatronish-logits" else megatron_logits)(sys.argv[2], sys.argv[3])
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--megatronish-python", default=os.environ.get("MEGATRONISH_PYTHON", "python3"),
                   help="the Python that runs megatronish (its requirements installed)")
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS))
    p.add_argument("--tolerance", type=float, default=1e-5, help="largest absolute logit difference (fp32)")
    args = p.parse_args()
    summary = check(args.megatronish_python, args.models, args.tolerance)
    for failure in summary["failures"]:
        print("FAILED:", failure)
    print(json.dumps(summary))
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
