"""Generation speed on CPU: megatronish against Hugging Face transformers, plain and speculative.

    python tools/bench_generate.py --text tinyshakespeare.txt [--work-dir DIR] [--new-tokens 128]

1. Data: the text's first 90% (split into documents at blank lines) is the training data; the
   benchmark prompts are --prompt-tokens bytes taken from its last 10%, which no model saw.
2. Models (byte tokenizer, trained by pretrain_gpt.py on the training part, kept in --work-dir):
   a target (8 layers, hidden 384, 6 heads, 14M parameters) and a draft (2 layers, hidden 128,
   4 heads, 0.4M parameters), both exported to Hugging Face GPT-2 with tools/convert_checkpoint.py.
3. Timings, one process, each run once as warm-up and then --repeats times (the best is kept):
   - plain KV-cached decoding vs transformers' generate of the exported target, batch 1 and 8,
     greedy: tokens/s and the ratio;
   - at temperature 0 and 0.6, batch 1 over every prompt: plain decoding, a draft chain of
     --chain-length tokens and the Sequoia tree (acceptance measured on held-out text between the
     prompts, at the run's temperature and length; size and depth chosen for this machine), next to
     transformers' assisted generation with the exported pair: tokens/s, speed-up over plain, tokens
     per target forward.
Every number is printed with what it compares against; nothing is asserted.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TARGET = dict(num_layers=8, hidden_size=384, num_attention_heads=6)
DRAFT = dict(num_layers=2, hidden_size=128, num_attention_heads=4)
SEQ_LENGTH = 256


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", default="../shared/bench-data/tinyshakespeare.txt", help="plain-text corpus")
    p.add_argument("--work-dir", default=os.path.expanduser("~/.cache/megatronish/bench_generate"),
                   help="data, checkpoints and exports (reused when present)")
    p.add_argument("--target-iters", type=int, default=200)
    p.add_argument("--draft-iters", type=int, default=200)
    p.add_argument("--prompts", type=int, default=8, help="benchmark prompts (default 8)")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--chain-length", type=int, default=4)
    p.add_argument("--tree-size", type=int, default=24, help="most tree nodes the planner considers")
    p.add_argument("--tree-depth", type=int, default=8)
    p.add_argument("--repeats", type=int, default=1, help="timed runs after the warm-up, the best kept (default 1)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = p.parse_args(argv)
    if not os.path.isfile(args.text):
        p.error(f"--text {args.text} does not exist: pass a plain-text file (e.g. tinyshakespeare.txt)")
    return args


# ------------------------------------------------------------------------------------------- setup

def prepare_data(text_path: str, work: Path) -> tuple[str, str]:
    """(data prefix of the training part, the held-out text)."""
    text = Path(text_path).read_text()
    cut = int(len(text) * 0.9)
    train, held_out = text[:cut], text[cut:]
    prefix = work / "train_text_document"
    if not prefix.with_suffix(".idx").exists():
        from megatronish.data.preprocess import TokenizerSpec, preprocess_jsonl

        jsonl = work / "train.jsonl"
        with open(jsonl, "w") as f:
            for document in train.split("\n\n"):
                f.write(json.dumps({"text": document + "\n\n"}) + "\n")
        preprocess_jsonl(str(jsonl), str(work / "train"), TokenizerSpec("ByteTokenizer"), append_eod=False)
    return str(prefix), held_out


def train(name: str, shape: dict, iters: int, data_prefix: str, work: Path, threads: int) -> str:
    save = work / name
    if (save / "latest_checkpointed_iteration.txt").exists():
        return str(save)
    argv = [sys.executable, str(REPO / "pretrain_gpt.py"), "--data-path", data_prefix, "--split", "98,2,0",
            "--tokenizer-type", "ByteTokenizer", "--num-layers", str(shape["num_layers"]),
            "--hidden-size", str(shape["hidden_size"]), "--num-attention-heads", str(shape["num_attention_heads"]),
            "--seq-length", str(SEQ_LENGTH), "--max-position-embeddings", str(SEQ_LENGTH),
            "--micro-batch-size", "8", "--global-batch-size", "8", "--train-iters", str(iters),
            "--lr", "2e-3", "--min-lr", "2e-4", "--lr-decay-style", "cosine", "--lr-warmup-fraction", "0.05",
            "--hidden-dropout", "0", "--attention-dropout", "0", "--seed", "1234",
            "--eval-interval", str(iters), "--eval-iters", "5", "--log-interval", "25",
            "--save", str(save), "--save-interval", str(iters), "--data-cache-path", str(work / "cache")]
    env = dict(os.environ, PYTHONPATH=str(REPO), MEGATRONISH_NUM_THREADS=str(threads))
    start = time.perf_counter()
    subprocess.run(argv, check=True, env=env)
    reached = (save / "latest_checkpointed_iteration.txt").read_text().strip()  # less if stopped (SIGTERM saves)
    print(f"trained {name} to iteration {reached} of {iters} in {time.perf_counter() - start:.0f} s", flush=True)
    return str(save)


def export_hf(checkpoint: str, work: Path, name: str) -> str:
    out = work / f"{name}-hf"
    if not (out / "config.json").exists():
        subprocess.run([sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), "--input-format", "training",
                        "--input", checkpoint, "--output-format", "hf", "--output", str(out)], check=True,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    return str(out)


# ------------------------------------------------------------------------------------------ timing

def best_of(repeats: int, run) -> tuple[float, object]:
    """(the fastest of `repeats` timed runs after one warm-up, the last run's result)."""
    result = run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - start)
    return best, result


def ours(model, prompts, new_tokens: int, sampling, draft=None, tree=None):
    """Every prompt decoded (one batch without a draft, one after another with one) -> GenerationOutput."""
    from megatronish.inference import Request, generate

    return generate(model, [Request(p, new_tokens, sampling, seed=i) for i, p in enumerate(prompts)], draft, tree)


def theirs(model, prompts, new_tokens: int, temperature: float, assistant=None, batched=True):
    """transformers' generate (assisted with `assistant`): the generated token lists."""
    sampling = dict(do_sample=True, temperature=temperature, top_k=0) if temperature > 0 else dict(do_sample=False)
    groups = [prompts] if batched else [[p] for p in prompts]
    out = []
    with torch.no_grad():
        for group in groups:
            ids = torch.tensor(group)
            tokens = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                    min_new_tokens=new_tokens, assistant_model=assistant, pad_token_id=0, **sampling)
            out += tokens[:, ids.size(1):].tolist()
    return out


def report(label: str, seconds: float, tokens: int, reference: float | None = None, extra: str = "") -> float:
    rate = tokens / seconds
    ratio = f"  {rate / reference:5.2f}x" if reference else ""
    print(f"  {label:<44} {rate:8.1f} tokens/s{ratio}{extra}", flush=True)
    return rate


def bench(args, target_dir: str, draft_dir: str, target_hf: str, draft_hf: str, held_out: str):
    import torch.distributed as dist
    import transformers
    from transformers import GPT2LMHeadModel

    from megatronish import ops, parallel_state
    from megatronish.evaluation.model_loading import load_model
    from megatronish.inference import Request, SamplingParams, TokenTree, sequoia

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()  # its notes on generation_config and min_new_tokens, per call
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1)
    ops.initialize_kernels()
    target, draft = load_model(target_dir, None), load_model(draft_dir, None)
    target_theirs = GPT2LMHeadModel.from_pretrained(target_hf).eval()
    draft_theirs = GPT2LMHeadModel.from_pretrained(draft_hf).eval()
    step = len(held_out) // max(args.prompts, 8)  # the batch comparison needs 8 of them
    held = [list(held_out[i * step:i * step + args.prompt_tokens].encode()) for i in range(max(args.prompts, 8))]
    prompts = held[:args.prompts]
    n = args.new_tokens
    print(f"held-out prompts of {args.prompt_tokens} tokens ({args.prompts} for speculation), {n} new tokens each, "
          f"{args.threads} threads; best of {args.repeats} runs after a warm-up", flush=True)

    print("plain KV-cached decoding vs transformers generate (greedy, the same exported target):")
    greedy = SamplingParams(temperature=0)
    for batch in (1, 8):
        group = held[:batch]
        t_ours, out = best_of(args.repeats, lambda: ours(target, group, n, greedy))
        t_hf, hf_tokens = best_of(args.repeats, lambda: theirs(target_theirs, group, n, 0.0))
        same = sum(c.tokens == h for c, h in zip(out.completions, hf_tokens))
        hf_rate = report(f"transformers generate, batch {batch}", t_hf, batch * n)
        report(f"megatronish generate, batch {batch}", t_ours, batch * n, hf_rate,
               f" of transformers ({same}/{batch} rows token-identical)")

    # Acceptance is calibrated on held-out text between the prompts: text neither model trained on, as the
    # prompts are, but never the prompts themselves.
    calibration = [list(held_out[i * step + step // 2:i * step + step // 2 + args.prompt_tokens].encode())
                   for i in range(4)]
    for temperature in (0.0, 0.6):
        sampling = SamplingParams(temperature=temperature)
        print(f"speculative decoding at temperature {temperature}, batch 1, all prompts:")
        # Calibrated as the benchmark decodes: the same temperature and length.
        acceptance = sequoia.measure_acceptance(
            target, draft, [Request(p, n, sampling, seed=i) for i, p in enumerate(calibration)], width=8)
        plan = sequoia.plan_for_machine(target, draft, acceptance, args.tree_size, args.tree_depth)
        t_plain = sum(best_of(args.repeats, lambda p=p: ours(target, [p], n, sampling))[0] for p in prompts)
        plain = report("megatronish plain", t_plain, len(prompts) * n)
        for label, tree in ((f"megatronish chain of {args.chain_length}", TokenTree.chain(args.chain_length)),
                            (f"megatronish Sequoia tree ({plan.tree.size} nodes, depth {plan.tree.depth})",
                             plan.tree)):
            seconds, out = best_of(args.repeats, lambda tree=tree: ours(target, prompts, n, sampling, draft, tree))
            report(label, seconds, len(prompts) * n, plain,
                   f" of plain, {out.stats.tokens_per_forward:.2f} tokens per target forward")
        print(f"    (acceptance by candidate rank, measured on held-out text: "
              f"[{', '.join(f'{a:.2f}' for a in acceptance)}]; planned {plan.expected_tokens:.2f} tokens per forward)")
        t_hf, _ = best_of(args.repeats, lambda: theirs(target_theirs, prompts, n, temperature, batched=False))
        hf = report("transformers generate", t_hf, len(prompts) * n, plain, " of megatronish plain")
        t_assisted, _ = best_of(args.repeats, lambda: theirs(target_theirs, prompts, n, temperature, draft_theirs,
                                                             batched=False))
        report("transformers assisted generation", t_assisted, len(prompts) * n, hf, " of transformers generate")


if __name__ == "__main__":
    args = parse_args()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    data_prefix, held_out = prepare_data(args.text, work)
    target_dir = train("target", TARGET, args.target_iters, data_prefix, work, args.threads)
    draft_dir = train("draft", DRAFT, args.draft_iters, data_prefix, work, args.threads)
    target_hf, draft_hf = export_hf(target_dir, work, "target"), export_hf(draft_dir, work, "draft")
    bench(args, target_dir, draft_dir, target_hf, draft_hf, held_out)
