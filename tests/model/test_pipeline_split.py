"""Which layers each pipeline stage holds: even, uneven (first/last stage fixed) and interleaved splits."""

import pytest

from megatronish.model import TransformerConfig
from megatronish.model.pipeline_split import stage_layers


def _config(layers, first=None, last=None):
    return TransformerConfig(num_layers=layers, hidden_size=16, num_attention_heads=2, vocab_size=10,
                             num_layers_in_first_pipeline_stage=first, num_layers_in_last_pipeline_stage=last)


def _split(config, pp, virtual_pp=None):
    chunks = virtual_pp or 1
    return [[list(stage_layers(config, pp, r, virtual_pp, c)) for c in range(chunks)] for r in range(pp)]


def test_even_uneven_and_interleaved_splits_cover_every_layer_once():
    assert _split(_config(8), 4) == [[[0, 1]], [[2, 3]], [[4, 5]], [[6, 7]]]
    assert _split(_config(8, first=1, last=3), 3) == [[[0]], [[1, 2, 3, 4]], [[5, 6, 7]]]
    assert _split(_config(7, first=1), 4) == [[[0]], [[1, 2]], [[3, 4]], [[5, 6]]]
    assert _split(_config(8, last=2), 4) == [[[0, 1]], [[2, 3]], [[4, 5]], [[6, 7]]]
    assert _split(_config(6, first=0, last=0), 3) == [[[]], [[0, 1, 2, 3, 4, 5]], [[]]]
    # Interleaved: chunk c of stage r is chunk c * p + r of the pipeline order.
    assert _split(_config(8), 2, virtual_pp=2) == [[[0, 1], [4, 5]], [[2, 3], [6, 7]]]
    assert _split(_config(8), 2, virtual_pp=4) == [[[0], [2], [4], [6]], [[1], [3], [5], [7]]]


@pytest.mark.parametrize("config,pp,virtual_pp,message", [
    (_config(6), 4, None, "num_layers 6 is not divisible by the pipeline-model-parallel size 4"),
    (_config(8), 2, 3, "num_layers 8 is not divisible by pipeline size 2 x virtual stages 3 = 6"),
    (_config(8, first=2), 1, None, "need a pipeline-model-parallel size > 1"),
    (_config(8, first=9), 2, None, "must be >= 0 and leave at most num_layers 8"),
    (_config(8, first=2, last=2), 2, None, "hold 4 layers, but num_layers is 8"),
    (_config(8, first=1), 3, None, "7 of num_layers 8 remain for 2 middle stage(s)"),
    (_config(8, first=2), 2, 2, "cannot be combined here"),
])
def test_bad_splits_name_the_values(config, pp, virtual_pp, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        stage_layers(config, pp, 0, virtual_pp)
