"""Megatron-LM flags that have no implementation here: accepted with a warning, or rejected with a reason.

Every flag that Megatron-LM's GPT launch examples and GPT functional-test configs pass is handled
in one of three ways (README: "Megatron-LM compatibility"):
- implemented with Megatron's meaning (arguments.py);
- WARNED: accepted, one warning line, where the flag only tunes something that does not exist
  here (a CUDA kernel, a communication overlap, a checkpoint writer's I/O) and cannot change the
  results, or configures a feature whose switch is itself rejected below;
- REJECTED: one line saying why and what to use instead, where the flag would change the model or
  the run and is not supported. A value that means "off" (NO_OP_VALUES) is accepted silently: it
  asks for what runs here anyway.
The names and value counts are facts of Megatron's interface; the reasons are ours.
"""

import argparse

KERNEL = "selects a fused or CUDA-only kernel; the computation here is the same either way"
OVERLAP = "schedules communication to overlap computation; the results are the same without it"
CKPT_IO = "tunes how Megatron writes or reads checkpoint files; the saved values are the same"
DEBUG = "a Megatron debugging/bookkeeping aid that does not exist here; the results are the same"
LAYOUT = "changes only how work is placed on ranks; losses and weights are the same"


def _part_of(feature_flag: str) -> str:
    return f"configures a feature that is not built here ({feature_flag} is rejected); without it this does nothing"


# flag: (number of values: 0 switch, 1 one value, "+" one or more; why it cannot change the results)
WARNED = {
    "--no-gradient-accumulation-fusion": (0, KERNEL),
    "--no-masked-softmax-fusion": (0, KERNEL),
    "--no-persist-layer-norm": (0, KERNEL),
    "--no-rope-fusion": (0, KERNEL),
    "--cross-entropy-fusion-impl": (1, KERNEL),
    "--attention-softmax-in-fp32": (0, "the attention softmax is always computed in fp32 here"),
    "--apply-query-key-layer-scaling": (0, "rescales q.k by the layer number and back for fp16 range; the same "
                                           "scores, and softmax runs in fp32 here"),
    "--use-mcore-models": (0, "deprecated in Megatron; the model here always has Megatron-core's layout and names"),
    "--tp-comm-overlap": (0, OVERLAP),
    "--tp-comm-overlap-cfg": (1, OVERLAP),
    "--overlap-param-gather-with-optimizer-step": (0, OVERLAP),
    "--overlap-p2p-communication-warmup-flush": (0, OVERLAP),
    "--defer-embedding-wgrad-compute": (0, OVERLAP),
    "--wgrad-deferral-limit": (1, OVERLAP),
    "--microbatch-group-size-per-virtual-pipeline-stage": (1, "orders micro-batches in the interleaved schedule; "
                                                              "the gradients are the same"),
    "--ddp-average-in-collective": (0, "averages gradients inside the all-reduce instead of before it: the same mean"),
    "--num-distributed-optimizer-instances": (1, LAYOUT),
    "--use-tp-pp-dp-mapping": (0, LAYOUT + " (ranks are ordered TP, DP, PP here)"),
    "--disable-gloo-process-groups": (0, "Megatron's extra gloo groups do not exist here (CPU runs use gloo itself)"),
    "--ckpt-fully-parallel-save": (0, CKPT_IO),
    "--no-ckpt-fully-parallel-save": (0, CKPT_IO),
    "--ckpt-fully-parallel-load": (0, CKPT_IO),
    "--ckpt-assume-constant-structure": (0, CKPT_IO),
    "--dist-ckpt-strictness": (1, CKPT_IO + " (a mismatched checkpoint is an error here, naming the keys)"),
    "--dist-ckpt-optim-fully-reshardable": (0, CKPT_IO + " (optimizer state reshards to any layout here)"),
    "--use-persistent-ckpt-worker": (0, CKPT_IO + " (--async-save writes in a background thread here)"),
    "--async-strategy": (1, CKPT_IO + " (--async-save writes in a background thread here)"),
    "--async-ckpt-use-cpu-shm": (0, CKPT_IO),
    "--verify-integrity": (0, CKPT_IO + " (every checkpoint's files are checked against its manifest here)"),
    "--save-retain-interval": (1, "Megatron deletes other checkpoints; here all are kept unless --keep-last N"),
    "--check-weight-hash-across-dp-replicas-interval": (1, DEBUG),
    "--rerun-mode": (1, DEBUG + " (the rerun state machine; 'disabled' is what runs here)"),
    "--test-mode": (0, DEBUG),
    "--expert-tensor-parallel-size": (1, _part_of("--num-experts")),
    "--moe-ffn-hidden-size": (1, _part_of("--num-experts")),
    "--moe-router-dtype": (1, _part_of("--num-experts")),
    "--moe-router-load-balancing-type": (1, _part_of("--num-experts")),
    "--moe-router-topk": (1, _part_of("--num-experts")),
    "--moe-shared-expert-gate": (0, _part_of("--num-experts")),
    "--moe-shared-expert-intermediate-size": (1, _part_of("--num-experts")),
    "--q-lora-rank": (1, _part_of("--multi-latent-attention")),
    "--kv-lora-rank": (1, _part_of("--multi-latent-attention")),
    "--qk-head-dim": (1, _part_of("--multi-latent-attention")),
    "--qk-pos-emb-head-dim": (1, _part_of("--multi-latent-attention")),
    "--v-head-dim": (1, _part_of("--multi-latent-attention")),
    "--dsa-indexer-head-dim": (1, _part_of("--experimental-attention-variant")),
    "--dsa-indexer-loss-coeff": (1, _part_of("--experimental-attention-variant")),
    "--dsa-indexer-n-heads": (1, _part_of("--experimental-attention-variant")),
    "--dsa-indexer-topk": (1, _part_of("--experimental-attention-variant")),
    "--linear-attention-freq": (1, _part_of("--experimental-attention-variant")),
    "--linear-conv-kernel-dim": (1, _part_of("--experimental-attention-variant")),
    "--linear-key-head-dim": (1, _part_of("--experimental-attention-variant")),
    "--linear-num-key-heads": (1, _part_of("--experimental-attention-variant")),
    "--linear-num-value-heads": (1, _part_of("--experimental-attention-variant")),
    "--linear-value-head-dim": (1, _part_of("--experimental-attention-variant")),
    "--apply-wd-to-qk-layernorm": (0, _part_of("--qk-layernorm")),
    "--fp8-recipe": (1, _part_of("--fp8-format")),
    "--fp8-amax-history-len": (1, _part_of("--fp8-format")),
    "--fp8-amax-compute-algo": (1, _part_of("--fp8-format")),
    "--fp8-param-gather": (0, _part_of("--fp8-format")),
    "--data-parallel-sharding-strategy": (1, _part_of("--use-megatron-fsdp")),
    "--megatron-fsdp-grad-comm-dtype": (1, _part_of("--use-megatron-fsdp")),
    "--megatron-fsdp-main-grads-dtype": (1, _part_of("--use-megatron-fsdp")),
    "--megatron-fsdp-main-params-dtype": (1, _part_of("--use-megatron-fsdp")),
    "--mup-base-hidden-size": (1, _part_of("--use-mup")),
    "--fim-rate": (1, _part_of("--fim-data")),
    "--fim-spm-rate": (1, _part_of("--fim-data")),
    "--cp-comm-type": (1, _part_of("--context-parallel-size > 1")),
    "--hierarchical-context-parallel-sizes": ("+", _part_of("--context-parallel-size > 1")),
}

# flag: (number of values, why not and what to use instead, values that mean "off")
REJECTED = {
    "--context-parallel-size": (1, "context parallelism is not built: split long sequences over TP with "
                                   "--sequence-parallel, or shorten --seq-length", ("1",)),
    "--num-experts": (1, "mixture-of-experts layers are not built: use a dense model (drop --num-experts and the "
                         "--moe-* flags)", ("0", "1")),
    "--multi-latent-attention": (0, "multi-latent attention is not built: use --group-query-attention "
                                    "--num-query-groups N for a smaller KV cache", ()),
    "--experimental-attention-variant": (1, "experimental attention variants (dsa, gated_delta_net) are not built: "
                                            "use standard attention (drop the flag)", ()),
    "--attention-output-gate": (0, "a gated attention output is not built: drop the flag for standard attention", ()),
    "--qk-layernorm": (0, "layer norms on queries and keys are not built: drop the flag", ()),
    "--rotary-interleaved": (0, "interleaved rotary pairs are not built: drop the flag for rotate-half RoPE "
                                "(Megatron's default)", ()),
    "--squared-relu": (0, "the squared-ReLU MLP is not built: use GeLU (the default) or --swiglu", ()),
    "--fp8-format": (1, "FP8 training needs Transformer Engine on a GPU with FP8 (Hopper or newer), not built "
                        "here: use --bf16", ()),
    "--use-megatron-fsdp": (0, "Megatron-FSDP is not built: use --use-distributed-optimizer (sharded optimizer "
                               "state over data-parallel ranks)", ()),
    "--use-torch-fsdp2": (0, "PyTorch FSDP2 is not built: use --use-distributed-optimizer", ()),
    "--use-mup": (0, "muP parametrization is not built: drop --use-mup and --mup-base-hidden-size", ()),
    "--fim-data": (0, "fill-in-the-middle samples are not built: drop --fim-data (plain GPT samples)", ()),
    "--export-kd-teacher-load": (1, "knowledge distillation (ModelOpt) is not built: pretrain without a teacher", ()),
    "--export-kd-cfg": (1, "knowledge distillation (ModelOpt) is not built: pretrain without a teacher", ()),
    "--export-te-mcore-model": (0, "exporting Transformer Engine models (ModelOpt) is not built: use "
                                   "tools/convert_checkpoint.py to write a Megatron checkpoint", ()),
    "--account-for-embedding-in-pipeline-split": (0, "counting the embedding as a pipeline layer is not built: give "
                                                        "the first stage fewer layers with "
                                                        "--decoder-first-pipeline-num-layers", ()),
    "--account-for-loss-in-pipeline-split": (0, "counting the loss as a pipeline layer is not built: give the last "
                                                "stage fewer layers with --decoder-last-pipeline-num-layers", ()),
    "--error-injection-rate": (1, "the rerun state machine's fault injection is not built: drop the flag", ()),
    "--error-injection-type": (1, "the rerun state machine's fault injection is not built: drop the flag", ()),
}


def _add(group, flag: str, count, help_text: str) -> None:
    if count == 0:
        group.add_argument(flag, action="store_true", default=None, help=help_text)
    else:
        group.add_argument(flag, nargs="+" if count == "+" else None, metavar="VALUE", help=help_text)


def add_compatibility_arguments(parser: argparse.ArgumentParser) -> None:
    """The WARNED and REJECTED flags, in two --help groups that say what each does here."""
    group = parser.add_argument_group(
        "accepted with a warning (Megatron flags that cannot change the results here)")
    for flag, (count, why) in WARNED.items():
        _add(group, flag, count, f"warning: {why}")
    group = parser.add_argument_group("rejected (Megatron flags for features not built here)")
    for flag, (count, why, off) in REJECTED.items():
        accepted = f" (accepted: {' or '.join(off)})" if off else ""
        _add(group, flag, count, f"error: {why}{accepted}")


def _given(args: argparse.Namespace, flag: str):
    return getattr(args, flag.lstrip("-").replace("-", "_"), None)


def compatibility_messages(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(warning lines, error lines) for the WARNED and REJECTED flags on this command line."""
    warnings = [f"{flag}: ignored, {why}" for flag, (_, why) in WARNED.items() if _given(args, flag) is not None]
    errors = []
    for flag, (_, why, off) in REJECTED.items():
        value = _given(args, flag)
        if value is not None and not (value is not True and str(value) in off):
            shown = flag if value is True else f"{flag} {value}"
            errors.append(f"{shown}: {why}")
    return warnings, errors
