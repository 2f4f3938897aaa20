"""What tools/generate.py runs, and the speculation flags it shares with tools/serve.py.

Speculation (with a draft model): `--speculate chain` drafts --num-draft-tokens tokens one after
another; `--speculate tree` (the default) builds Sequoia's tree: the acceptance vector is given
(--acceptance 0.6,0.2,0.1) or measured first by decoding the prompt with one level of
--calibration-width candidates, then the tree of at most --tree-size nodes and depth
--tree-depth that gives the most tokens per second, with forward times measured on this machine
(or, with --fixed-tree-size, the best tree of exactly --tree-size nodes).
"""

import argparse
import os
import sys

import torch.distributed as dist

from megatronish.evaluation.cli import tool_main
from megatronish.inference import sequoia
from megatronish.inference.loading import add_model_arguments, setup
from megatronish.inference.request import Request
from megatronish.inference.sampling import SamplingParams
from megatronish.inference.text import TextGenerator, TextRequest
from megatronish.inference.tree import TokenTree


def add_speculation_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("speculative decoding (with --draft-load or --draft-hf-model)")
    g.add_argument("--speculate", choices=("tree", "chain"), default="tree", help="default: tree")
    g.add_argument("--num-draft-tokens", type=int, default=4, help="chain length (default 4)")
    g.add_argument("--tree-size", type=int, default=16, help="most tree nodes, the root included (default 16)")
    g.add_argument("--tree-depth", type=int, default=6, help="deepest tree (default 6)")
    g.add_argument("--fixed-tree-size", action="store_true",
                   help="take the best tree of exactly --tree-size nodes instead of timing the machine")
    g.add_argument("--acceptance", help="acceptance rates of candidates 1, 2, ... (comma-separated); "
                   "default: measured on the first prompt")
    g.add_argument("--calibration-width", type=int, default=8, help="candidates per node when measuring (default 8)")
    g.add_argument("--calibration-tokens", type=int, default=64, help="tokens decoded to measure (default 64)")


def check_speculation_arguments(args) -> None:
    for flag in ("num_draft_tokens", "tree_size", "tree_depth", "calibration_width", "calibration_tokens"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.acceptance is not None:
        try:
            rates = [float(a) for a in args.acceptance.split(",")]
        except ValueError:
            rates = []
        if not rates or any(not 0 <= a <= 1 for a in rates) or sum(rates) > 1 + 1e-9:
            raise ValueError(f"--acceptance {args.acceptance!r} must be comma-separated rates in [0, 1] that add up "
                             "to at most 1 (at most one candidate is accepted), e.g. 0.6,0.2,0.1")


def speculation_tree(args, model, draft, calibration: Request) -> tuple[TokenTree | None, str]:
    """The tree to speculate with (None without a draft) and a line that says how it was chosen."""
    if draft is None:
        return None, "no draft model: plain decoding"
    if args.speculate == "chain":
        return TokenTree.chain(args.num_draft_tokens), f"chain of {args.num_draft_tokens} draft tokens"
    if args.acceptance is not None:
        acceptance, source = [float(a) for a in args.acceptance.split(",")], "given"
    else:
        probe = Request(calibration.prompt, min(args.calibration_tokens,
                                                _room(model, draft, calibration.prompt)), calibration.sampling)
        acceptance = sequoia.measure_acceptance(model, draft, [probe], args.calibration_width)
        source = f"measured over {probe.max_new_tokens} tokens"
    rates = ", ".join(f"{a:.2f}" for a in acceptance)
    if args.fixed_tree_size:
        tree = sequoia.best_tree(acceptance, args.tree_size, args.tree_depth)
        return tree, (f"Sequoia tree of {tree.size} nodes, depth {tree.depth} (acceptance {source}: [{rates}]; "
                      f"expected {tree.expected_tokens(acceptance):.2f} tokens per target forward)")
    plan = sequoia.plan_for_machine(model, draft, acceptance, args.tree_size, args.tree_depth)
    return plan.tree, (f"Sequoia tree of {plan.tree.size} nodes, depth {plan.tree.depth} (acceptance {source}: "
                       f"[{rates}]; expected {plan.expected_tokens:.2f} tokens per target forward, "
                       f"{plan.tokens_per_second:.1f} tokens/s predicted for this machine)")


def _room(model, draft, prompt) -> int:
    return min(m.config.max_position_embeddings for m in (model, draft)) - len(prompt)


def sampling_from(args) -> SamplingParams:
    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)


def run_generate(argv=None, description: str = __doc__):
    p = argparse.ArgumentParser(prog="generate.py", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64, help="default 64")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (default 0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop where the text reaches this string (repeatable)")
    add_speculation_arguments(p)
    args = p.parse_args(argv)
    check_speculation_arguments(args)
    request = TextRequest(args.prompt, args.max_new_tokens, sampling_from(args), args.seed, tuple(args.stop))
    model, draft, tokenizer = setup(args)
    generator = TextGenerator(model, tokenizer, draft)
    [token_request] = generator.token_requests([request])  # bad requests fail before any calibration
    generator.tree, how = speculation_tree(args, model, draft, token_request)
    printing = dist.get_rank() == 0
    if printing:
        print(how, file=sys.stderr)
    on_text = (lambda index, text: print(text, end="", flush=True)) if printing else None
    [completion], output = generator.complete([request], on_text)
    if printing:
        print(flush=True)
        print(f"finish reason: {completion.finish_reason}; {output.stats.summary()}", file=sys.stderr)
    return completion


def main(argv=None) -> int:
    return tool_main(run_generate, argv, "generate.py", __doc__)


def run_serve(argv=None, description: str = __doc__):
    p = argparse.ArgumentParser(prog="serve.py", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="default 8000")
    p.add_argument("--model-name", help="the model's name in the API (default: the checkpoint folder's name)")
    p.add_argument("--max-batch-size", type=int, default=8, help="most prompts generated together (default 8)")
    add_speculation_arguments(p)
    args = p.parse_args(argv)
    check_speculation_arguments(args)
    if args.max_batch_size < 1:
        raise ValueError(f"--max-batch-size must be >= 1, got {args.max_batch_size}")
    try:
        import uvicorn

        from megatronish.inference import server
    except ImportError as error:
        raise ValueError(f"tools/serve.py needs FastAPI and uvicorn ({error}): pip install 'megatronish[serve]'") from None
    name = args.model_name or os.path.basename(os.path.normpath(args.load or args.hf_model))
    model, draft, tokenizer = setup(args)
    generator = TextGenerator(model, tokenizer, draft)
    # Requests come with any settings; the tree is planned for OpenAI's default, temperature 1, after an empty document.
    calibration = Request([tokenizer.eod], args.calibration_tokens, SamplingParams(temperature=1.0))
    generator.tree, how = speculation_tree(args, model, draft, calibration)
    if dist.get_rank() != 0:
        server.follow(generator)
        return
    print(how, file=sys.stderr)
    worker = server.GenerationWorker(generator, args.max_batch_size)
    try:
        print(f"serving {name!r} at http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
        uvicorn.run(server.create_app(worker, name), host=args.host, port=args.port, log_level="warning")
    finally:
        worker.stop()


def serve_main(argv=None) -> int:
    return tool_main(run_serve, argv, "serve.py", __doc__)
