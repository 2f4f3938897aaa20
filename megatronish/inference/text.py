"""Text in, text out: generate() behind a tokenizer, with stop strings and streamed text.

    generator = TextGenerator(model, tokenizer, draft=draft, tree=tree)
    [completion] = generator.complete([TextRequest("Once upon a time", max_tokens=50, stop=("\\n\\n",))],
                                      on_text=lambda index, text: print(text, end=""))

Generation of a request ends at the end-of-document token, at max_tokens, or where the text
reaches one of its stop strings (the text is cut before it). Streamed text never shows a stop
string, nor a character whose UTF-8 bytes have not all arrived: such a tail waits for the next
tokens (or for the end).
"""

from dataclasses import dataclass

from megatronish.inference.generation import GenerationOutput, check_requests, generate
from megatronish.inference.request import Request
from megatronish.inference.sampling import SamplingParams


@dataclass(frozen=True)
class TextRequest:
    prompt: str
    max_tokens: int = 16
    sampling: SamplingParams = SamplingParams()
    seed: int = 0
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "stop", tuple(self.stop))
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {list(self.stop)}")


@dataclass
class TextCompletion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class _TextStream:
    """One request's new tokens as text: finds stop strings, hands out the part that is final."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer, self.stop = tokenizer, stop
        self.tokens, self.text, self.shown, self.stopped = [], "", 0, False

    def add(self, tokens: list[int]) -> str:
        """Take new tokens; return the text that became final."""
        self.tokens += tokens
        self.text = self.tokenizer.detokenize(self.tokens)
        hits = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[:min(hits)], True
            return self.flush()
        final = len(self.text) - self._undecided_tail()
        shown, self.shown = self.shown, max(self.shown, final)
        return self.text[shown:self.shown]

    def flush(self) -> str:
        shown, self.shown = self.shown, len(self.text)
        return self.text[shown:]

    def _undecided_tail(self) -> int:
        """Characters at the end that may still change: the start of a stop string, an incomplete character."""
        tail = max((n for s in self.stop for n in range(1, len(s)) if self.text.endswith(s[:n])), default=0)
        replacement = len(self.text) - len(self.text.rstrip("\ufffd"))
        return max(tail, replacement)


class TextGenerator:
    def __init__(self, model, tokenizer, draft=None, tree=None):
        if tokenizer.vocab_size != model.config.vocab_size:
            raise ValueError(f"the model's vocabulary has {model.config.vocab_size} tokens, the tokenizer's "
                             f"{tokenizer.vocab_size}: use the tokenizer the model was trained with")
        self.model, self.tokenizer, self.draft, self.tree = model, tokenizer, draft, tree

    def token_requests(self, requests: list[TextRequest]) -> list[Request]:
        """The token-level requests, checked (a ValueError names the bad request and the fix)."""
        out = [Request(self.tokenizer.tokenize(r.prompt) or [self.tokenizer.eod], r.max_tokens, r.sampling, r.seed,
                       stop_token_ids=(self.tokenizer.eod,)) for r in requests]
        check_requests(self.model, out, self.draft)
        return out

    def complete(self, requests: list[TextRequest], on_text=None) -> tuple[list[TextCompletion], GenerationOutput]:
        """Generate every request (a batch); on_text(index, text) gets each request's text as it becomes final."""
        token_requests = self.token_requests(requests)
        streams = [_TextStream(self.tokenizer, r.stop) for r in requests]

        def on_tokens(index: int, tokens: list[int]) -> bool:
            text = streams[index].add(tokens)
            if text and on_text is not None:
                on_text(index, text)
            return streams[index].stopped

        output = generate(self.model, token_requests, self.draft, self.tree, on_tokens)
        completions = []
        for index, (stream, completion, request) in enumerate(zip(streams, output.completions, token_requests)):
            rest = stream.flush()
            if rest and on_text is not None:
                on_text(index, rest)
            completions.append(TextCompletion(stream.text, completion.finish_reason, len(request.prompt),
                                              len(completion.tokens)))
        return completions, output
