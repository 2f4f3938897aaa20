"""Continue a prompt with a megatronish checkpoint (or a Hugging Face GPT-2 directory), at any TP size,
optionally with speculative decoding by a draft model.

    python tools/generate.py --load checkpoints/default --prompt "def " --max-new-tokens 64 --temperature 0
    python tools/generate.py --load target-ckpt --draft-load draft-ckpt --prompt "ROMEO:" --temperature 0.6
    torchrun --nproc_per_node 2 tools/generate.py --tp 2 --hf-model gpt2-dir --prompt "Hello" --top-k 40

The continuation is printed to stdout as it is generated; how the speculation tree was chosen and
the statistics (tokens/s, tokens per target forward, acceptance by depth and by candidate rank) go
to stderr. The tokenizer is the one the checkpoint was trained with (its saved arguments), else
the vocab.json + merges.txt or tokenizer.json beside it, else the --tokenizer-* flags. Generation
stops at the end-of-document token, at --max-new-tokens, or at a --stop string.
"""

import sys

from megatronish.inference.cli import main

if __name__ == "__main__":
    sys.exit(main())
