"""WikiText-103 perplexity as the Megatron-LM paper computes it.

    raw text --(num_original_tokens = len(raw.strip().split(" ")))-->
    wikitext_detokenize --> tokenizer --> T tokens --> overlapping windows (windows.py)
    avg_loss     = sum of the T - 1 token losses / (T - 1)
    ppl          = exp(min(20, avg_loss))
    token_ratio  = (T - 1) / (num_original_tokens - 1)
    adjusted_ppl = exp(min(20, avg_loss * token_ratio))
The adjusted perplexity is per WikiText (word-level) token, so it compares across tokenizers
and with word-level results; the plain one is per tokenizer token.
"""

import math
from dataclasses import asdict, dataclass

import torch

from megatronish.evaluation.detokenizer import wikitext_detokenize
from megatronish.evaluation.scoring import data_parallel_share, micro_batches, sum_over_data_parallel, token_losses
from megatronish.evaluation.windows import check_window_options, make_window, num_windows

MAX_LOG_PPL = 20.0  # Megatron caps the exponent so that a diverged model still prints a number


@dataclass
class WikitextResult:
    avg_loss: float
    ppl: float
    adjusted_ppl: float
    token_ratio: float
    num_original_tokens: int
    num_tokenized_tokens: int

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (f"wikitext | avg_loss {self.avg_loss:.6f} | ppl {self.ppl:.4f} | adjusted_ppl {self.adjusted_ppl:.4f}"
                f" | token_ratio {self.token_ratio:.6f} | num_original_tokens {self.num_original_tokens}"
                f" | num_tokenized_tokens {self.num_tokenized_tokens}")


def wikitext_from_rows(rows: list[str]) -> str:
    """The file's text from its lines as a table stores them (a raw file is a single row).

    The hub's wikitext dataset keeps each line with its newline but stores the file's blank
    lines, " \n", as "": they are put back, or the text and num_original_tokens would differ
    from those of wiki.test.tokens.
    """
    return "".join(row or " \n" for row in rows)


def tokenize_wikitext(raw_text: str, tokenizer) -> tuple[torch.Tensor, int]:
    """(token ids of the detokenized text, num_original_tokens of the raw text)."""
    num_original_tokens = len(raw_text.strip().split(" "))
    tokens = torch.tensor(tokenizer.tokenize(wikitext_detokenize(raw_text)), dtype=torch.long)
    if tokens.numel() < 2 or num_original_tokens < 2:
        raise ValueError(f"the text has {tokens.numel()} tokens ({num_original_tokens} WikiText tokens): "
                         "perplexity needs at least 2 of each; check the input file")
    return tokens, num_original_tokens


def wikitext_metrics(loss_sum: float, num_tokenized_tokens: int, num_original_tokens: int) -> WikitextResult:
    avg_loss = loss_sum / (num_tokenized_tokens - 1)
    token_ratio = (num_tokenized_tokens - 1) / (num_original_tokens - 1)
    return WikitextResult(
        avg_loss=avg_loss, ppl=math.exp(min(MAX_LOG_PPL, avg_loss)),
        adjusted_ppl=math.exp(min(MAX_LOG_PPL, avg_loss * token_ratio)), token_ratio=token_ratio,
        num_original_tokens=num_original_tokens, num_tokenized_tokens=num_tokenized_tokens)


def evaluate_wikitext(model, tokenizer, raw_text: str, seq_length: int, stride: int = 32,
                      micro_batch_size: int = 8, show_progress: bool = True) -> WikitextResult:
    """Score `raw_text` (WikiText format) with `model`. Collective: every rank calls it, all get the result."""
    check_window_options(seq_length, stride)
    tokens, num_original_tokens = tokenize_wikitext(raw_text, tokenizer)
    share = data_parallel_share(num_windows(tokens.numel(), stride))
    loss_sum = torch.zeros((), dtype=torch.float64)
    for indices in micro_batches(share, micro_batch_size, "wikitext windows", show_progress):
        windows, masks = zip(*(make_window(tokens, i, seq_length, stride, tokenizer.eod) for i in indices))
        losses = token_losses(model, torch.stack(windows)).cpu()
        loss_sum += losses[torch.stack(masks)].double().sum()
    (loss_sum,) = sum_over_data_parallel(loss_sum)
    return wikitext_metrics(loss_sum, tokens.numel(), num_original_tokens)
