"""LAMBADA last-word accuracy of a GPT checkpoint (Megatron's strict LAMBADA).

    python tools/eval_lambada.py --hf-model gpt2-dir --data lambada_test.jsonl --output result.json
    torchrun --nproc_per_node 2 tools/eval_lambada.py --tp 2 --load ckpt-dir --data lambada_test.jsonl

Input: JSON lines {"text": ...} (--data), a parquet file or save_to_disk folder with a "text"
column, or --hf-dataset NAME [--hf-dataset-config C] [--split test] where the network allows.
The last word of each text (after its last whitespace) must be predicted greedily, every one of
its tokens, from the text before it (megatronish/evaluation/lambada.py). Prints accuracy,
num_correct and num_examples; --output writes them as JSON.
"""

import sys

from megatronish.evaluation.cli import run_lambada, tool_main


def main(argv=None) -> int:
    return tool_main(run_lambada, argv, "eval_lambada.py", __doc__)


if __name__ == "__main__":
    sys.exit(main())
