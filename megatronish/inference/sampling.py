"""How a next token is chosen from logits: greedy, or sampled with temperature, top-k and top-p.

`probabilities` gives the distribution that sampling draws from (logits / temperature, cut to the
top_k most likely tokens and to the smallest set whose probability reaches top_p, renormalized);
speculative sampling verifies drafts against exactly this distribution, so its output follows it.
"""

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy (the most likely token)
    top_k: int = 0  # keep the k most likely tokens; 0 = all
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p; 1 = all

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = no top-k cut), got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1] (1 = no nucleus cut), got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The sampling distribution over the last dim of fp32 logits [..., V] (not for greedy params)."""
    logits = logits / params.temperature
    if 0 < params.top_k < logits.size(-1):
        threshold = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        # A token stays if the tokens more likely than it hold less than top_p (the first always stays).
        drop_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs >= params.top_p
        probs = probs.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def choose(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> torch.Tensor:
    """One token per row of logits [b, V] -> [b]: the argmax for greedy params, else a draw."""
    if params.greedy:
        return logits.argmax(dim=-1)
    return torch.multinomial(probabilities(logits, params), 1, generator=generator)[:, 0]


def candidates(logits: torch.Tensor, probs: torch.Tensor | None, count: int,
               generator: torch.Generator) -> torch.Tensor:
    """`count` distinct tokens from logits [V]: the most likely ones in order (greedy, probs None), or
    drawn one after another without replacement from probs (the Gumbel top-k trick: the top `count`
    of log p + Gumbel noise are such a sequence of draws). Where probs has fewer than `count`
    possible tokens, impossible ones (probability 0) fill the last places."""
    if probs is None:
        return torch.topk(logits, count).indices
    uniform = torch.rand(probs.shape, generator=generator, device=probs.device).clamp_(min=1e-20)
    return torch.topk(probs.log() - (-uniform.log()).log(), count).indices
