"""What a generation is asked for, what it returns, and what it measured.

Request: token ids of the prompt and how to continue it. Completion: the new token ids and why
they ended ("stop": a stop token or the caller's on_tokens said so; "length": max_new_tokens).
GenerationStats: tokens per second, tokens per target forward, and the speculative acceptance
by depth (how often the accepted path reached each depth of the tree) and by rank (how often the
k-th candidate below an accepted node was the one accepted: Sequoia's acceptance vector).
"""

from dataclasses import dataclass, field

from megatronish.inference.sampling import SamplingParams


@dataclass(frozen=True)
class Request:
    prompt: tuple[int, ...]
    max_new_tokens: int
    sampling: SamplingParams = SamplingParams()
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()  # generation ends at any of them (not included in the completion)

    def __post_init__(self):
        object.__setattr__(self, "prompt", tuple(int(t) for t in self.prompt))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if not self.prompt:
            raise ValueError("the prompt is empty: give at least one token (for example the end-of-document token)")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}")


@dataclass
class Completion:
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # None while generating, then "stop" or "length"


class CompletionTracker:
    """Takes a request's new tokens as they come: applies stop tokens and max_new_tokens, tells
    `on_tokens(index, new_tokens)` (streaming; a true return value stops the request)."""

    def __init__(self, index: int, request: Request, on_tokens=None):
        self.index, self.request, self.on_tokens = index, request, on_tokens
        self.completion = Completion()
        if request.max_new_tokens == 0:
            self.completion.finish_reason = "length"

    @property
    def finished(self) -> bool:
        return self.completion.finish_reason is not None

    def extend(self, tokens: list[int]) -> None:
        completion, request = self.completion, self.request
        taken = []
        for token in tokens[:request.max_new_tokens - len(completion.tokens)]:
            if token in request.stop_token_ids:
                completion.finish_reason = "stop"
                break
            taken.append(token)
        completion.tokens += taken
        if not self.finished and len(completion.tokens) >= request.max_new_tokens:
            completion.finish_reason = "length"
        if taken and self.on_tokens is not None and self.on_tokens(self.index, taken):
            completion.finish_reason = "stop"


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    target_forwards: int = 0  # forwards of the target that yielded tokens (the prefill of plain decoding counts)
    draft_forwards: int = 0
    depth_reached: list[int] = field(default_factory=list)  # [d-1]: steps whose accepted path reached depth d
    depth_tried: list[int] = field(default_factory=list)  # [d-1]: steps that verified a candidate at depth d
    rank_accepted: list[int] = field(default_factory=list)  # [k-1]: the k-th candidate was the accepted one
    rank_tried: list[int] = field(default_factory=list)  # [k-1]: verified nodes with at least k candidates

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def tokens_per_forward(self) -> float:
        return self.generated_tokens / self.target_forwards if self.target_forwards else 0.0

    def acceptance_by_depth(self) -> list[float]:
        return [r / t if t else 0.0 for r, t in zip(self.depth_reached, self.depth_tried)]

    def acceptance_by_rank(self) -> list[float]:
        return [a / t if t else 0.0 for a, t in zip(self.rank_accepted, self.rank_tried)]

    def count(self, counts: list[int], index: int) -> None:
        """counts[index] += 1, growing the list as needed."""
        counts.extend([0] * (index + 1 - len(counts)))
        counts[index] += 1

    def summary(self) -> str:
        line = (f"{self.generated_tokens} tokens in {self.seconds:.3f} s ({self.tokens_per_second:.1f} tokens/s), "
                f"{self.target_forwards} target forwards ({self.tokens_per_forward:.2f} tokens per forward)")
        if self.draft_forwards:
            line += (f", {self.draft_forwards} draft forwards; acceptance by depth "
                     f"[{', '.join(f'{a:.2f}' for a in self.acceptance_by_depth())}], by candidate rank "
                     f"[{', '.join(f'{a:.2f}' for a in self.acceptance_by_rank())}]")
        return line
