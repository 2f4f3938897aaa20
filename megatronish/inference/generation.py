"""generate(): continue token prompts with a GPTModel at any TP size, plainly or speculatively.

    from megatronish.inference import Request, SamplingParams, TokenTree, generate
    out = generate(model, [Request(prompt_ids, max_new_tokens=64, sampling=SamplingParams(0.8, top_k=40))])
    out.completions[0].tokens, out.stats.summary()

    generate(target, requests, draft=draft_model)                         # a chain of 4 draft tokens
    generate(target, requests, draft=draft_model, tree=TokenTree.chain(6))
    generate(target, requests, draft=draft_model, tree=sequoia.best_tree(acceptance, 32, 6))

Without a draft the requests are decoded together as one batch; with one, one after another
(speculative decoding here is for one sequence at a time). Every TP rank of the group calls it
with the same requests and gets the same tokens. `on_tokens(index, new_tokens)` is called as
tokens arrive (streaming); returning True stops that request (stop strings, a closed client).
"""

import dataclasses
import time
from dataclasses import dataclass

import torch

from megatronish.inference.decoding import decode
from megatronish.inference.request import Completion, CompletionTracker, GenerationStats, Request
from megatronish.inference.speculative import speculative_decode
from megatronish.inference.tree import TokenTree
from megatronish.model import GPTModel

DEFAULT_TREE = TokenTree.chain(4)


@dataclass
class GenerationOutput:
    completions: list[Completion]
    stats: GenerationStats


def generate(model, requests: list[Request], draft=None, tree: TokenTree | None = None,
             on_tokens=None) -> GenerationOutput:
    check_requests(model, requests, draft)
    if tree is not None and draft is None:
        raise ValueError("a speculation tree needs a draft model: pass draft=... or drop tree")
    device = next(model.parameters()).device
    trackers = [CompletionTracker(i, request, on_tokens) for i, request in enumerate(requests)]
    stats = GenerationStats(prompt_tokens=sum(len(r.prompt) for r in requests))
    was_training = [m.training for m in (model, draft) if m is not None]
    for m in (model, draft):
        if m is not None:
            m.eval()
    start = time.perf_counter()
    try:
        if draft is None:
            live = [tracker for tracker in trackers if not tracker.finished]
            if live:
                decode(model, live, stats, device)
        else:
            for tracker in trackers:
                if not tracker.finished:
                    speculative_decode(model, draft, tracker, tree or DEFAULT_TREE, stats, device)
    finally:
        for m, training in zip([m for m in (model, draft) if m is not None], was_training):
            m.train(training)
    stats.seconds = time.perf_counter() - start
    return GenerationOutput([tracker.completion for tracker in trackers], stats)


def check_requests(model, requests: list[Request], draft=None) -> None:
    """Fail before any work on what cannot be generated, naming the value and the fix."""
    if not requests:
        raise ValueError("no requests: pass at least one Request")
    for m, name in ((model, "model"), (draft, "draft model")):
        if m is None:
            continue
        if not (m.pre_process and m.post_process):
            raise ValueError(f"the {name} is one pipeline stage of several: generation needs the whole model on "
                             "every rank; load it at pipeline-model-parallel size 1 (any TP size)")
        if m.config.sequence_parallel:
            raise ValueError(f"the {name} splits sequences across TP ranks (sequence_parallel=True), which KV-cached "
                             "decoding cannot do: pass without_sequence_parallel(model) (same weights)")
    if draft is not None and draft.config.vocab_size != model.config.vocab_size:
        raise ValueError(f"the draft model's vocabulary has {draft.config.vocab_size} tokens, the target's "
                         f"{model.config.vocab_size}: the draft must use the target's tokenizer")
    longest = min(m.config.max_position_embeddings for m in (model, draft) if m is not None)
    vocab = model.config.vocab_size
    for i, request in enumerate(requests):
        bad = [t for t in request.prompt if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"request {i}: token id {bad[0]} is outside the model's vocabulary [0, {vocab})")
        if len(request.prompt) + request.max_new_tokens > longest:
            raise ValueError(f"request {i}: the prompt's {len(request.prompt)} tokens plus max_new_tokens "
                             f"{request.max_new_tokens} exceed the model's {longest} positions: shorten the prompt "
                             f"or ask for at most {max(0, longest - len(request.prompt))} new tokens")


def without_sequence_parallel(model: GPTModel) -> GPTModel:
    """The model itself, or, if it splits sequences across TP ranks, a twin that does not and shares
    its parameters (sequence parallelism changes only the communication, not the weights)."""
    if not model.config.sequence_parallel:
        return model
    twin = GPTModel(dataclasses.replace(model.config, sequence_parallel=False), layout=model.layout)
    twin.load_state_dict(model.state_dict(), assign=True)
    return twin.train(model.training)
