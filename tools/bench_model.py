"""Time training steps of megatronish's GPTModel at TP = 1 against a plain PyTorch GPT of the same shape.

    python tools/bench_model.py                      # nanoGPT's CPU config: 4 layers, 4 heads,
                                                     # hidden 128, sequence 64, batch 12, vocab 65
    python tools/bench_model.py --layers 6 --hidden 384 --heads 6 --seq 256 --batch 8 --vocab 50257
    python tools/bench_model.py --torch-compile      # also both models under torch.compile (Inductor)

A step is forward + backward + AdamW step on a fixed random batch, fp32, dropout 0, timed three ways:
  baseline       the plain PyTorch GPT below with torch.optim.AdamW (its default multi-tensor
                 implementation, what nanoGPT uses on CPU)
  megatronish    GPTModel with the same torch.optim.AdamW: the model alone against the baseline
  megatronish    GPTModel trained as pretrain_gpt.py trains it: DistributedDataParallel grad buffers,
   train_step    megatronish's optimizer (fused AdamW, grad norm; clipping off, as the baseline has
                 none) and megatronish.training.train_step
With --torch-compile, two more: the baseline and the megatronish model (GPTModel.compile(), the fused ops
inside its graph) compiled, each with torch.optim.AdamW; the first warm-up step compiles them.
They run interleaved in one process (rounds of --steps steps each, after --warmup steps), so
that a busy machine slows all alike. Reported: the median over rounds of each one's time per
step, and the speed ratio to the baseline as the median over rounds of the ratio within each
round (the two ran seconds apart, so a busy spell mostly cancels), of wall-clock time and of
the process's CPU time (on a shared machine the steadier one: it does not count time spent
waiting for a core). One thread by default (see --threads).

FLOPs per step (matmuls only, causal attention counted as full s x s, as Megatron does), for
T = batch * seq tokens, L layers, hidden h, FFN width f, sequence s and true vocabulary V:
    3 * T * (L * (8 h^2 + 4 h f + 4 s h) + 2 h V)
(forward = 1, backward = 2 units; per layer: QKV 6h^2 + projection 2h^2, MLP 4hf, scores and
context 4sh; the output layer 2hV). With f = 4h this is Megatron's 72 T L h^2 (1 + s/6h + V/12Lh).
Both models get the same count, so the GFLOP/s ratio equals the speed ratio. megatronish pads
the vocabulary (to --make-vocab-size-divisible-by) and computes those columns too; they are
not counted.
"""

import argparse
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from megatronish import parallel_state
from megatronish.model import GPTModel, TransformerConfig, full_state_dict
from megatronish.optimizer import DistributedDataParallel, OptimizerConfig, get_megatron_optimizer
from megatronish.tensor_parallel import model_parallel_manual_seed
from megatronish.testing import find_free_port
from megatronish.training.training import train_step
from megatronish.training.utils import prepare_process_for_training_loop


class BaselineBlock(nn.Module):
    """A nanoGPT block: pre-LayerNorm, fused QKV, SDPA causal attention, tanh-GeLU MLP."""

    def __init__(self, hidden: int, heads: int, ffn: int):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.c_attn, self.c_proj = nn.Linear(hidden, 3 * hidden), nn.Linear(hidden, hidden)
        self.c_fc, self.mlp_proj = nn.Linear(hidden, ffn), nn.Linear(ffn, hidden)

    def forward(self, x):
        b, s, h = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(h, dim=2)
        q, k, v = (t.view(b, s, self.heads, h // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).contiguous().view(b, s, h))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class BaselineGPT(nn.Module):
    def __init__(self, layers: int, hidden: int, heads: int, ffn: int, vocab: int, positions: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, hidden), nn.Embedding(positions, hidden)
        self.blocks = nn.ModuleList(BaselineBlock(hidden, heads, ffn) for _ in range(layers))
        self.ln_f = nn.LayerNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as GPT-2

    def forward(self, ids, labels):
        x = self.wte(ids) + self.wpe.weight[:ids.size(1)]
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), labels.view(-1))


@torch.no_grad()
def copy_weights(baseline: BaselineGPT, ours: GPTModel) -> None:
    """Give the baseline megatronish's (GPT-2 initialized) weights, so both compute the same numbers.

    Same values matter for speed too: GPT-2's small init gives small activations, and CPU
    arithmetic on tiny (denormal) floats is far slower than on PyTorch's default-init values.
    """
    state = full_state_dict(ours)
    heads, vocab = ours.config.num_attention_heads, ours.config.vocab_size
    baseline.wte.weight.copy_(state["embedding.word_embeddings.weight"][:vocab])
    baseline.wpe.weight.copy_(state["embedding.position_embeddings.weight"])
    baseline.ln_f.weight.copy_(state["decoder.final_layernorm.weight"])
    baseline.ln_f.bias.copy_(state["decoder.final_layernorm.bias"])
    for i, block in enumerate(baseline.blocks):
        layer = {name.removeprefix(f"decoder.layers.{i}."): value for name, value in state.items()
                 if name.startswith(f"decoder.layers.{i}.")}
        # megatronish lays the fused QKV out per head; the baseline as [all q | all k | all v].
        qkv_w, qkv_b = layer["self_attention.linear_qkv.weight"], layer["self_attention.linear_qkv.bias"]
        block.c_attn.weight.copy_(qkv_w.view(heads, 3, -1, qkv_w.size(1)).transpose(0, 1).reshape(qkv_w.shape))
        block.c_attn.bias.copy_(qkv_b.view(heads, 3, -1).transpose(0, 1).reshape(qkv_b.shape))
        for module, prefix in ((block.ln_1, "input_layernorm"), (block.ln_2, "pre_mlp_layernorm"),
                               (block.c_proj, "self_attention.linear_proj"), (block.c_fc, "mlp.linear_fc1"),
                               (block.mlp_proj, "mlp.linear_fc2")):
            module.weight.copy_(layer[prefix + ".weight"])
            module.bias.copy_(layer[prefix + ".bias"])


def flops_per_step(args) -> float:
    tokens, h, f = args.batch * args.seq, args.hidden, 4 * args.hidden
    return 3.0 * tokens * (args.layers * (8 * h * h + 4 * h * f + 4 * args.seq * h) + 2 * h * args.vocab)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--vocab", type=int, default=65)
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="steps per model per round")
    p.add_argument("--rounds", type=int, default=25)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per model first")
    p.add_argument("--torch-compile", action="store_true", help="also time both models compiled with torch.compile")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: what each rank gets when the ranks fill the cores, and the "
                        "steadier timing on a shared machine; 0: every core)")
    args = p.parse_args(argv)
    if args.threads < 0:
        p.error(f"--threads {args.threads}: give a thread count >= 1, or 0 for every core")
    if args.rounds < 2 or args.steps < 1:
        p.error(f"--rounds {args.rounds} / --steps {args.steps}: need at least 2 rounds (the ratio is a median "
                "over rounds) of at least 1 step")
    return args


def make_step(model, loss_fn):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss_fn().backward()
        optimizer.step()

    return step


def main(argv=None):
    args = parse_args(argv)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(find_free_port()), RANK="0", WORLD_SIZE="1")
    parallel_state.initialize_distributed("gloo")
    parallel_state.initialize_model_parallel(1)
    if args.threads:
        torch.set_num_threads(args.threads)
    model_parallel_manual_seed(1234)

    config = TransformerConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                               vocab_size=args.vocab, max_position_embeddings=args.seq, hidden_dropout=0.0,
                               attention_dropout=0.0, make_vocab_size_divisible_by=args.make_vocab_size_divisible_by)
    ours = GPTModel(config)
    baseline = BaselineGPT(args.layers, args.hidden, args.heads, 4 * args.hidden, args.vocab, args.seq)
    copy_weights(baseline, ours)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=generator)
    labels = torch.randint(0, args.vocab, (args.batch, args.seq), generator=generator)
    with torch.no_grad():
        losses = {"baseline": baseline(ids, labels).item(), "megatronish": ours(ids, labels=labels).mean().item()}
    if not math.isclose(losses["baseline"], losses["megatronish"], rel_tol=1e-4):
        raise RuntimeError(f"the two models disagree before training: losses {losses}; the benchmark is not fair")
    trained = DistributedDataParallel(GPTModel(config))  # the same initial weights as `ours`
    trained_optimizer = get_megatron_optimizer(trained, OptimizerConfig(lr=1e-4, clip_grad=0.0))
    batch = {"tokens": ids, "labels": labels, "loss_mask": torch.ones(ids.shape)}
    steps = {
        "baseline": make_step(baseline, lambda: baseline(ids, labels)),
        "megatronish": make_step(ours, lambda: ours(ids, labels=labels).mean()),
        "train_step": lambda: train_step([batch], trained, trained_optimizer),
    }
    ratios = [("megatronish", "baseline"), ("train_step", "baseline")]
    if args.torch_compile:  # their own copies of the same initial weights
        baseline_compiled = BaselineGPT(args.layers, args.hidden, args.heads, 4 * args.hidden, args.vocab, args.seq)
        copy_weights(baseline_compiled, ours)
        ours_compiled = GPTModel(config)
        baseline_compiled.compile()
        ours_compiled.compile()
        steps["baseline_compiled"] = make_step(baseline_compiled, lambda: baseline_compiled(ids, labels))
        steps["megatronish_compiled"] = make_step(ours_compiled, lambda: ours_compiled(ids, labels=labels).mean())
        ratios += [("baseline_compiled", "baseline"), ("megatronish_compiled", "baseline"),
                   ("megatronish_compiled", "baseline_compiled"), ("megatronish_compiled", "megatronish")]
    prepare_process_for_training_loop()  # as pretrain_gpt.py does before its loop; process-wide, so for all three alike
    for step in steps.values():
        for _ in range(args.warmup):
            step()

    wall = {name: [] for name in steps}
    cpu = {name: [] for name in steps}
    for round_index in range(args.rounds):
        order = list(steps.items())
        for name, step in order if round_index % 2 else reversed(order):  # alternate who goes first
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                step()
            wall[name].append((time.perf_counter() - start_wall) / args.steps)
            cpu[name].append((time.process_time() - start_cpu) / args.steps)

    tokens, flops = args.batch * args.seq, flops_per_step(args)
    print(f"config: layers {args.layers}, heads {args.heads}, hidden {args.hidden}, seq {args.seq}, "
          f"batch {args.batch}, vocab {args.vocab} (megatronish pads to {ours.padded_vocab_size}), "
          f"threads {torch.get_num_threads()}, {args.rounds} rounds x {args.steps} steps")
    print(f"initial loss: baseline {losses['baseline']:.5f}, megatronish {losses['megatronish']:.5f} (same weights)")
    print(f"FLOPs/step = 3 T (L (8h^2 + 4hf + 4sh) + 2hV) = {flops / 1e9:.3f} GFLOP")
    for label, times in (("wall", wall), ("cpu", cpu)):
        for name, per_round in times.items():
            seconds, spread = statistics.median(per_round), max(per_round) / min(per_round) - 1
            print(f"{label:4s} {name:20s} {seconds * 1e3:8.2f} ms/step  {tokens / seconds:10.0f} tokens/s  "
                  f"{flops / seconds / 1e9:7.2f} GFLOP/s  (spread over rounds {spread:.0%})")
        for name, reference in ratios:
            per_round = [theirs / mine for theirs, mine in zip(times[reference], times[name])]
            low, _, high = statistics.quantiles(per_round, n=4)
            print(f"{label:4s} speed {name} / {reference}: {statistics.median(per_round):.3f} "
                  f"(median of the {len(per_round)} rounds; quartiles {low:.3f}-{high:.3f})")
    return wall, cpu


if __name__ == "__main__":
    main()
