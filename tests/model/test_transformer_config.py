"""Every configuration error is raised before any work starts, and its message names the value and the fix."""

import json

import pytest
import torch

from megatronish import parallel_state
from megatronish.model import GPTModel, TransformerConfig
from megatronish.testing import run_distributed

BASE = dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=100, max_position_embeddings=16)


def _config(**changes):
    return TransformerConfig(**{**BASE, **changes})


@pytest.mark.parametrize("changes, message", [
    (dict(hidden_size=30), "hidden_size 30 is not divisible by num_attention_heads 4"),
    (dict(activation="relu"), "unknown activation 'relu': choose one of 'gelu', 'swiglu'"),
    (dict(normalization="BatchNorm"), "unknown normalization 'BatchNorm': choose one of 'LayerNorm', 'RMSNorm'"),
    (dict(position_embedding_type="alibi"), "unknown position_embedding_type 'alibi'"),
    (dict(recompute_granularity="some"), "unknown recompute_granularity 'some': choose one of None, 'full', 'selective'"),
    (dict(attention_backend="flash"), "unknown attention_backend 'flash': choose one of 'sdpa', 'explicit'"),
    (dict(params_dtype="fp8"), "unknown params_dtype 'fp8': choose one of 'float32', 'float16', 'bfloat16'"),
    (dict(params_dtype=torch.int32), "unknown params_dtype torch.int32"),
    (dict(num_layers=0), "num_layers must be a positive integer, got 0"),
    (dict(vocab_size=-5), "vocab_size must be a positive integer, got -5"),
    (dict(make_vocab_size_divisible_by=0), "make_vocab_size_divisible_by must be a positive integer, got 0"),
    (dict(hidden_dropout=1.0), "hidden_dropout must be in [0, 1), got 1.0"),
    (dict(attention_dropout=-0.1), "attention_dropout must be in [0, 1), got -0.1"),
    (dict(layernorm_epsilon=0.0), "layernorm_epsilon must be > 0"),
    (dict(hidden_size=36, num_attention_heads=12, position_embedding_type="rope"),
     "rotary embeddings need an even number of rotated dims, got int(head dim 3 x rotary_percent 1.0) = 3"),
    (dict(num_query_groups=3), "num_query_groups 3 must be a positive divisor of num_attention_heads 4"),
    (dict(rotary_percent=0.0), "rotary_percent must be in (0, 1], got 0.0"),
    (dict(kv_channels=0), "kv_channels must be a positive integer, got 0"),
])
def test_bad_option_is_rejected_when_the_config_is_made(changes, message):
    with pytest.raises(ValueError) as error:
        _config(**changes)
    assert message in str(error.value)


@pytest.mark.parametrize("changes, tp, message", [
    (dict(num_attention_heads=4), 8, "num_attention_heads 4 is not divisible by the tensor-parallel size 8"),
    (dict(num_attention_heads=8, ffn_hidden_size=100), 8, "ffn_hidden_size 100 is not divisible by the tensor-parallel size 8"),
    (dict(), 0, "tensor-parallel size must be >= 1, got 0"),
])
def test_bad_tensor_parallel_size_is_rejected(changes, tp, message):
    with pytest.raises(ValueError) as error:
        _config(**changes).validate(tp)
    assert message in str(error.value)
    assert "choose" in str(error.value) or tp == 0


@pytest.mark.parametrize("seq, tp, sequence_parallel, message", [
    (17, 1, False, "sequence length 17 is longer than max_position_embeddings 16"),
    (6, 4, True, "sequence length 6 is not divisible by the tensor-parallel size 4, which sequence parallelism needs"),
])
def test_bad_sequence_length_is_rejected(seq, tp, sequence_parallel, message):
    with pytest.raises(ValueError) as error:
        _config(sequence_parallel=sequence_parallel).validate_sequence_length(seq, tp)
    assert message in str(error.value)


@pytest.mark.parametrize("vocab, divisible_by, tp, padded", [
    (100, 128, 1, 128), (100, 128, 2, 256), (50257, 128, 8, 51200), (65, 1, 3, 66), (128, 128, 1, 128),
])
def test_vocabulary_is_padded_to_a_multiple_of_divisible_by_times_tp(vocab, divisible_by, tp, padded):
    config = _config(vocab_size=vocab, make_vocab_size_divisible_by=divisible_by)
    assert config.padded_vocab_size(tp) == padded


def test_config_dict_round_trip_and_unknown_keys():
    config = _config(params_dtype="bfloat16", activation="swiglu")
    values = json.loads(json.dumps(config.to_dict()))
    assert TransformerConfig.from_dict(values) == config
    with pytest.raises(ValueError, match=r"unknown TransformerConfig option\(s\) \['hiden_size'\]"):
        TransformerConfig.from_dict({**values, "hiden_size": 3})


def _model_errors():
    """The model checks its config and inputs before doing any work (at TP = 2)."""
    parallel_state.initialize_model_parallel(2)
    messages = []
    for build, call in [
        (dict(num_attention_heads=1, hidden_size=32), None),
        (dict(), lambda m: m(torch.zeros(1, 17, dtype=torch.long))),
        (dict(sequence_parallel=True), lambda m: m(torch.zeros(1, 5, dtype=torch.long))),
        (dict(sequence_parallel=True), lambda m: m(torch.zeros(1, 4, dtype=torch.long), inference_context=object())),
        (dict(), lambda m: m(torch.zeros(4, dtype=torch.long))),
        (dict(), lambda m: m(torch.zeros(1, 4, dtype=torch.long), labels=torch.zeros(1, 3, dtype=torch.long))),
    ]:
        try:
            model = GPTModel(_config(**build))
            call(model)
        except ValueError as error:
            messages.append(str(error))
        else:
            messages.append(None)
    return messages


def test_model_rejects_bad_config_and_inputs():
    messages = run_distributed(_model_errors, 2)[0]
    expected = [
        "num_attention_heads 1 is not divisible by the tensor-parallel size 2",
        "sequence length 17 is longer than max_position_embeddings 16",
        "sequence length 5 is not divisible by the tensor-parallel size 2",
        "a KV-cached forward cannot split the sequence across TP ranks: build the model with sequence_parallel=False",
        "input_ids must be [batch, sequence] token ids, got shape [4]",
        "labels must have the shape of input_ids [1, 4], got [1, 3]",
    ]
    for message, fragment in zip(messages, expected):
        assert message is not None and fragment in message, (message, fragment)
