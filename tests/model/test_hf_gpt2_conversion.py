"""Hugging Face interoperability: GPT-2 import/export through tools/convert_checkpoint.py, and
the Llama-style model against transformers' Llama (rotate-half rope, RMSNorm, SwiGLU).

The transformers models are random-init tiny configs made here (no download), their weights
perturbed so that biases and norm weights are not the trivial zeros and ones. Tolerance: logits
within 1e-4 of transformers' (fp32); the round trip back to transformers is exact.
"""

import json

import numpy as np
import pytest
import torch

from megatronish import parallel_state
from megatronish.model import (
    GPTModel,
    TransformerConfig,
    load_full_checkpoint,
    load_full_state_dict,
)
from megatronish.model.hf_gpt2 import config_from_hf_gpt2, hf_gpt2_config
from megatronish.tensor_parallel import gather_from_tensor_model_parallel_region
from megatronish.testing import load_tool, run_distributed

transformers = pytest.importorskip("transformers")

VOCAB, SEQ = 100, 12


def _load_tool():
    return load_tool("convert_checkpoint")


def _token_ids():
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def _perturb(model):
    generator = torch.Generator().manual_seed(1)
    for param in model.parameters():
        param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model.eval()


@pytest.fixture(scope="module")
def hf_gpt2_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=16)
    model = _perturb(transformers.GPT2LMHeadModel(config))
    directory = tmp_path_factory.mktemp("hf_gpt2")
    model.save_pretrained(directory)
    (directory / "vocab.json").write_text(json.dumps({"a": 0}))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return directory


def _megatronish_logits(checkpoint_dir, tp):
    parallel_state.initialize_model_parallel(tp)
    config, state = load_full_checkpoint(checkpoint_dir)
    model = GPTModel(config)
    load_full_state_dict(model, state)
    with torch.no_grad():
        logits = gather_from_tensor_model_parallel_region(model.eval()(_token_ids()))
    return logits[..., :config.vocab_size].numpy()


def test_gpt2_import_matches_transformers_and_round_trips(hf_gpt2_dir, tmp_path):
    tool = _load_tool()
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(hf_gpt2_dir).eval()
    with torch.no_grad():
        expected = hf_model(_token_ids()).logits.numpy()

    checkpoint = tmp_path / "megatronish"
    assert tool.main(["--input-format", "hf", "--input", str(hf_gpt2_dir), "--output-format", "megatronish",
                      "--output", str(checkpoint), "--tp", "2"]) == 0
    for tp in (1, 2):
        for rank, logits in enumerate(run_distributed(_megatronish_logits, tp, args=(checkpoint, tp))):
            np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-4, err_msg=f"TP {tp} rank {rank}")

    exported = tmp_path / "hf_out"
    assert tool.main(["--input-format", "megatronish", "--input", str(checkpoint), "--output-format", "hf",
                      "--output", str(exported)]) == 0
    for name in ("vocab.json", "merges.txt"):
        assert (exported / name).read_bytes() == (hf_gpt2_dir / name).read_bytes()
    original, round_trip = hf_model.state_dict(), transformers.GPT2LMHeadModel.from_pretrained(exported).state_dict()
    assert original.keys() == round_trip.keys()
    for name in original:
        assert torch.equal(original[name], round_trip[name]), name


def test_tool_rejects_a_tp_size_the_model_cannot_split_into(hf_gpt2_dir, tmp_path):
    with pytest.raises(ValueError, match="num_attention_heads 4 is not divisible by the tensor-parallel size 8"):
        _load_tool().main(["--input-format", "hf", "--input", str(hf_gpt2_dir), "--output-format", "megatronish",
                           "--output", str(tmp_path / "out"), "--tp", "8"])


def test_unsupported_configs_are_rejected():
    with pytest.raises(ValueError, match="activation_function='relu'"):
        config_from_hf_gpt2(dict(n_layer=1, n_embd=8, n_head=2, vocab_size=10, n_positions=8,
                                 activation_function="relu"))
    llama_style = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, vocab_size=10,
                                    normalization="RMSNorm")
    with pytest.raises(ValueError, match="a GPT-2 export needs normalization='LayerNorm'"):
        hf_gpt2_config(llama_style)


def _llama_state(hf_state, config):
    """The megatronish full state of a transformers LlamaForCausalLM state dict (test-only mapping)."""
    heads, head_dim, hidden = config.num_attention_heads, config.head_dim, config.hidden_size
    state = {"embedding.word_embeddings.weight": hf_state["model.embed_tokens.weight"],
             "decoder.final_layernorm.weight": hf_state["model.norm.weight"],
             "output_layer.weight": hf_state["lm_head.weight"]}
    for i in range(config.num_layers):
        theirs, ours = f"model.layers.{i}.", f"decoder.layers.{i}."
        q, k, v = (hf_state[theirs + f"self_attn.{x}_proj.weight"].view(heads, head_dim, hidden) for x in "qkv")
        state.update({
            ours + "input_layernorm.weight": hf_state[theirs + "input_layernorm.weight"],
            ours + "self_attention.linear_qkv.weight": torch.stack([q, k, v], dim=1).reshape(3 * hidden, hidden),
            ours + "self_attention.linear_proj.weight": hf_state[theirs + "self_attn.o_proj.weight"],
            ours + "pre_mlp_layernorm.weight": hf_state[theirs + "post_attention_layernorm.weight"],
            ours + "mlp.linear_fc1.weight": torch.cat([hf_state[theirs + "mlp.gate_proj.weight"],
                                                       hf_state[theirs + "mlp.up_proj.weight"]]),
            ours + "mlp.linear_fc2.weight": hf_state[theirs + "mlp.down_proj.weight"],
        })
    return state


def _llama_logits(config, state, tp):
    parallel_state.initialize_model_parallel(tp)
    model = GPTModel(config)
    load_full_state_dict(model, state)
    with torch.no_grad():
        logits = gather_from_tensor_model_parallel_region(model.eval()(_token_ids()))
    return logits[..., :config.vocab_size].numpy()


def test_llama_style_model_matches_transformers_llama():
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=16,
                                         rms_norm_eps=1e-5, tie_word_embeddings=False)
    hf_model = _perturb(transformers.LlamaForCausalLM(hf_config))
    with torch.no_grad():
        expected = hf_model(_token_ids()).logits.numpy()
    config = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=VOCAB,
                               ffn_hidden_size=48, max_position_embeddings=16, activation="swiglu",
                               normalization="RMSNorm", position_embedding_type="rope", add_bias_linear=False,
                               tie_word_embeddings=False, layernorm_epsilon=1e-5)
    state = {name: t.clone() for name, t in _llama_state(hf_model.state_dict(), config).items()}
    logits = run_distributed(_llama_logits, 2, args=(config, state, 2))[0]
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-4)
