"""Inference: KV-cached generation, speculative decoding, serving."""
