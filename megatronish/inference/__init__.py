"""Inference: KV-cached generation at any TP size, speculative decoding (draft chains and Sequoia
token trees), and an OpenAI-compatible server (megatronish.inference.server, needs the `serve` extra).

    from megatronish.inference import Request, SamplingParams, generate
"""

from megatronish.inference.context import InferenceContext, forward_step
from megatronish.inference.generation import GenerationOutput, generate, without_sequence_parallel
from megatronish.inference.request import Completion, GenerationStats, Request
from megatronish.inference.sampling import SamplingParams
from megatronish.inference.tree import TokenTree

__all__ = [
    "Completion",
    "GenerationOutput",
    "GenerationStats",
    "InferenceContext",
    "Request",
    "SamplingParams",
    "TokenTree",
    "forward_step",
    "generate",
    "without_sequence_parallel",
]
