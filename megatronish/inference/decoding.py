"""Plain KV-cached decoding of a batch of requests: one prefill forward, then one token per row per forward.

Prompts of different lengths are right-padded into one prefill; each row then decodes after its
own last token (the context keeps a length per row). A row that has finished stays in the batch
(shapes stay fixed) but commits nothing, until every row has finished.
"""

import torch

from megatronish.inference.context import InferenceContext, agree_across_tp, forward_step
from megatronish.inference.request import CompletionTracker, GenerationStats
from megatronish.inference.sampling import choose


@torch.no_grad()
def decode(model, trackers: list[CompletionTracker], stats: GenerationStats, device: torch.device) -> None:
    requests = [tracker.request for tracker in trackers]
    lengths = [len(r.prompt) for r in requests]
    context = InferenceContext(len(requests), max(n + r.max_new_tokens for n, r in zip(lengths, requests)), device)
    prompts = torch.zeros(len(requests), max(lengths), dtype=torch.long)
    for row, request in enumerate(requests):
        prompts[row, :lengths[row]] = torch.tensor(request.prompt)
    generators = [torch.Generator(device=device).manual_seed(r.seed) for r in requests]
    last = forward_step(model, context, prompts.to(device), logits_at=torch.tensor(lengths, device=device) - 1)[:, 0]
    context.commit(lengths)
    while True:
        stats.target_forwards += 1
        tokens = torch.cat([choose(last[row:row + 1], request.sampling, generators[row])
                            for row, request in enumerate(requests)])
        tokens = agree_across_tp(tokens, model.tp_group).tolist()
        running = [not tracker.finished for tracker in trackers]
        for tracker, token, live in zip(trackers, tokens, running):
            if live:
                tracker.extend([token])
                stats.generated_tokens += 1
        if all(tracker.finished for tracker in trackers):
            return
        last = forward_step(model, context, torch.tensor(tokens, device=device)[:, None])[:, 0]
        context.commit([int(not tracker.finished) for tracker in trackers])
