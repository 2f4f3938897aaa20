"""The WikiText metrics from a loss sum and the two token counts, against hand-computed values."""

import math

import pytest

from megatronish.evaluation.wikitext import wikitext_metrics


def test_metrics_from_counts():
    result = wikitext_metrics(loss_sum=30.0, num_tokenized_tokens=11, num_original_tokens=6)
    assert result.avg_loss == pytest.approx(3.0)  # 30 / (11 - 1)
    assert result.token_ratio == pytest.approx(2.0)  # (11 - 1) / (6 - 1)
    assert result.ppl == pytest.approx(math.exp(3.0))
    assert result.adjusted_ppl == pytest.approx(math.exp(6.0))
    assert (result.num_tokenized_tokens, result.num_original_tokens) == (11, 6)


def test_exponents_are_capped_at_20():
    result = wikitext_metrics(loss_sum=150.0, num_tokenized_tokens=11, num_original_tokens=6)
    assert result.avg_loss == pytest.approx(15.0) and result.ppl == pytest.approx(math.exp(15.0))
    assert result.adjusted_ppl == pytest.approx(math.exp(20.0))  # 15 x 2 = 30, capped
