"""The sampling distribution (temperature, top-k, top-p) against a direct reference, and candidate drawing."""

import torch

from megatronish.inference.sampling import SamplingParams, candidates, choose, probabilities


def _reference(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Row by row: sort, keep the top k, then the shortest prefix reaching top_p, renormalize."""
    out = torch.zeros_like(logits)
    for row, values in enumerate(logits):
        order = torch.argsort(values, descending=True)
        kept = order[:top_k] if top_k else order
        probs = torch.softmax(values[kept] / temperature, dim=-1)
        cumulative, keep = 0.0, 0
        while keep < len(kept) and cumulative < top_p:
            cumulative += probs[keep].item()
            keep += 1
        out[row, kept[:keep]] = probs[:keep] / probs[:keep].sum()
    return out


def test_probabilities_match_the_reference():
    logits = torch.randn(6, 50, dtype=torch.float64) * 3
    for temperature, top_k, top_p in ((1.0, 0, 1.0), (0.5, 10, 1.0), (1.3, 0, 0.8), (0.7, 20, 0.6), (2.0, 1, 0.3)):
        got = probabilities(logits, SamplingParams(temperature, top_k, top_p))
        torch.testing.assert_close(got, _reference(logits, temperature, top_k, top_p), rtol=1e-9, atol=1e-12)


def test_choose_and_candidates():
    logits = torch.randn(3, 40)
    assert torch.equal(choose(logits, SamplingParams(temperature=0), None), logits.argmax(-1))
    generator = torch.Generator().manual_seed(0)
    drawn = choose(logits, SamplingParams(top_k=3), generator)
    assert all(d in torch.topk(row, 3).indices for d, row in zip(drawn, logits))
    assert torch.equal(candidates(logits[0], None, 4, generator), torch.topk(logits[0], 4).indices)
    probs = probabilities(logits[0], SamplingParams(top_k=3))
    picked = candidates(logits[0], probs, 5, generator)
    assert len(set(picked.tolist())) == 5  # distinct: without replacement
    assert set(picked[:3].tolist()) == set(torch.topk(logits[0], 3).indices.tolist())  # the possible ones first
