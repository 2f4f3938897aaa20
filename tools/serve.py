"""Serve a megatronish checkpoint (or a Hugging Face GPT-2 directory) over an OpenAI-compatible HTTP API.

    pip install 'megatronish[serve]'      # FastAPI and uvicorn
    python tools/serve.py --load checkpoints/default --port 8000
    torchrun --nproc_per_node 2 tools/serve.py --tp 2 --load ckpt --draft-load draft-ckpt --port 8000

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    client.completions.create(model="default", prompt="def ", max_tokens=32, temperature=0)

POST /v1/completions (with "stream": true as server-sent events) and GET /v1/models; the model's
name is the checkpoint folder's (--model-name to change it). Rank 0 serves HTTP; at TP > 1 it
broadcasts each batch of requests to the other ranks, which generate with it. Requests queued
together are generated as one batch (--max-batch-size). Bad requests get a 4xx with an
OpenAI-style error body. With --draft-load, decoding is speculative (see tools/generate.py).
"""

import sys

from megatronish.inference.cli import serve_main

if __name__ == "__main__":
    sys.exit(serve_main())
