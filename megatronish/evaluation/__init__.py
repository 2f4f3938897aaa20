"""Evaluation of GPT checkpoints: WikiText-103 perplexity and LAMBADA accuracy (Megatron-LM's procedure).

    from megatronish.evaluation import evaluate_wikitext, evaluate_lambada
    result = evaluate_wikitext(model, tokenizer, raw_text, seq_length=1024, stride=32)

The command-line tools are tools/eval_wikitext103.py and tools/eval_lambada.py (cli.py).
"""

from megatronish.evaluation.detokenizer import wikitext_detokenize
from megatronish.evaluation.lambada import LambadaResult, evaluate_lambada, tokenize_lambada
from megatronish.evaluation.wikitext import WikitextResult, evaluate_wikitext, tokenize_wikitext
from megatronish.evaluation.windows import make_window, num_windows

__all__ = [
    "LambadaResult",
    "WikitextResult",
    "evaluate_lambada",
    "evaluate_wikitext",
    "make_window",
    "num_windows",
    "tokenize_lambada",
    "tokenize_wikitext",
    "wikitext_detokenize",
]
