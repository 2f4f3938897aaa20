"""Speculative sampling keeps the target's distribution.

A 6-token target and a different draft (random models with peaked distributions that disagree:
their total-variation distance is checked to be large) generate two tokens after a fixed prompt
with a token tree (the root has two candidates drawn without replacement, the first of which has
a child: both Sequoia's sibling rule and the chain rule are used), once per seed. The empirical
joint distribution of the two tokens must match the target's own (temperature, top-k and top-p
applied), computed exactly from the target: chi-square test at significance 1e-3 over the cells
expected to hold at least 5 draws (the rest pooled). The seeds are fixed, so the outcome is
reproducible. The same counts must be far from what the draft alone gives (p < 1e-6), which is
what plain acceptance of the draft's tokens would produce: the test has the power to catch it.
"""

import torch

from megatronish import parallel_state
from megatronish.inference import Request, SamplingParams, TokenTree, generate
from megatronish.inference.sampling import probabilities
from megatronish.model import GPTModel, TransformerConfig
from megatronish.tensor_parallel import model_parallel_manual_seed
from megatronish.testing import run_distributed

VOCAB, RUNS, SIGNIFICANCE = 6, 1000, 1e-3
TINY = dict(num_layers=1, hidden_size=16, num_attention_heads=2, vocab_size=VOCAB, max_position_embeddings=16,
            hidden_dropout=0.0, attention_dropout=0.0, init_method_std=0.4)
PROMPT = [1, 2, 3]
SAMPLING = SamplingParams(temperature=0.9, top_k=5, top_p=0.97)
TREE = TokenTree((-1, 0, 0, 1))


def _joint(model) -> torch.Tensor:
    """[VOCAB, VOCAB]: the probability of each (first, second) token under the model's own sampling."""
    with torch.no_grad():
        first = probabilities(model(torch.tensor([PROMPT]))[0, -1, :VOCAB].float(), SAMPLING)
        after = torch.stack([probabilities(model(torch.tensor([PROMPT + [x]]))[0, -1, :VOCAB].float(), SAMPLING)
                             for x in range(VOCAB)])
    return first[:, None] * after


def _counts_and_distributions():
    parallel_state.initialize_model_parallel(1)
    model_parallel_manual_seed(0)
    target = GPTModel(TransformerConfig(**TINY), seed=11).eval()
    draft = GPTModel(TransformerConfig(**TINY), seed=12).eval()
    counts = torch.zeros(VOCAB, VOCAB)
    for seed in range(RUNS):
        tokens = generate(target, [Request(PROMPT, 2, SAMPLING, seed=seed)], draft=draft, tree=TREE).completions[0].tokens
        counts[tokens[0], tokens[1]] += 1
    return counts, _joint(target), _joint(draft)


def _p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Chi-square goodness of fit; cells expected to hold fewer than 5 draws are pooled into one."""
    counts, expected = counts.flatten().double(), probs.flatten().double() * counts.sum()
    small = expected < 5
    observed = torch.cat([counts[~small], counts[small].sum()[None]])
    expected = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = expected > 0
    if (observed[~keep] > 0).any():  # draws where the distribution has none: as unlikely as it gets
        return 0.0
    statistic = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    degrees = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(degrees / 2.0), statistic / 2))


def test_speculative_sampling_preserves_the_target_distribution():
    counts, target, draft = run_distributed(_counts_and_distributions, 1, timeout=300)[0]
    distance = 0.5 * (target - draft).abs().sum()
    assert distance > 0.4, f"draft and target agree too much ({distance:.2f}) for the test to mean anything"
    p = _p_value(counts, target)
    assert p > SIGNIFICANCE, f"speculative samples do not follow the target's distribution (chi-square p = {p:.2e})"
    assert _p_value(counts, draft) < 1e-6, "the counts cannot tell the draft's distribution from the target's"
