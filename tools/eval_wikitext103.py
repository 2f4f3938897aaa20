"""WikiText-103 perplexity of a GPT checkpoint, computed as in the Megatron-LM paper.

    python tools/eval_wikitext103.py --hf-model gpt2-dir --data wiki.test.tokens --output result.json
    torchrun --nproc_per_node 4 tools/eval_wikitext103.py --tp 2 --load ckpt-dir \\
        --hf-dataset wikitext --seq-length 1024 --overlapping-eval 32

The procedure (megatronish/evaluation/):
1. num_original_tokens = len(raw_text.strip().split(" ")), counted on the raw WikiText text.
2. The text is detokenized (" @-@ " -> "-", " , " -> ", ", "( x )" -> "(x)", "= = =" -> "===", ...,
   the paper's rules in its order: detokenizer.py) and tokenized: T tokens.
3. Windows of seq_length + 1 tokens start every --overlapping-eval tokens; window 0 scores all its
   targets, each later one only its last --overlapping-eval, so every one of the T - 1 targets is
   scored once, with at least seq_length - overlapping_eval tokens of context (windows.py).
   With several data-parallel ranks each window goes to exactly one of them.
4. avg_loss = summed token loss / (T - 1); ppl = exp(min(20, avg_loss));
   token_ratio = (T - 1) / (num_original_tokens - 1); adjusted_ppl = exp(min(20, avg_loss * token_ratio)).
The adjusted perplexity is the one comparable with word-level WikiText-103 results (the paper's number).

Inputs: --data wiki.test.tokens (raw text), a parquet file or a save_to_disk folder with a "text"
column; or --hf-dataset wikitext (config wikitext-103-raw-v1, split test) where the network allows.
The tokenizer defaults to GPT-2 BPE from the vocab.json + merges.txt beside the checkpoint.
Run with torchrun for TP or DP > 1 (world size = TP x DP).
"""

import sys

from megatronish.evaluation.cli import run_wikitext, tool_main


def main(argv=None) -> int:
    return tool_main(run_wikitext, argv, "eval_wikitext103.py", __doc__)


if __name__ == "__main__":
    sys.exit(main())
