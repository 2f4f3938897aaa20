"""Conversion between Hugging Face `GPT2LMHeadModel` weights and megatronish full state dicts.

The differences the conversion handles:
- GPT-2 stores linears as Conv1D, weight [in, out]; megatronish (nn.Linear) stores [out, in].
- GPT-2's fused c_attn output is [all q | all k | all v]; megatronish lays it out per head,
  [head 0: q k v | head 1: q k v | ...], so that a TP split keeps whole heads.
- GPT-2 ties lm_head to wte; megatronish's tied output layer has no weight of its own.
- Vocabulary padding never appears here: full state dicts hold the true vocabulary rows.

The tensor functions work on plain dicts; only `load_hf_gpt2` / `save_hf_gpt2` need
`transformers`, imported when they are called (the package itself never requires it).
"""

import torch

from megatronish.model.config import TransformerConfig

# GPT-2's GeLU is the tanh approximation under either name.
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")


def config_from_hf_gpt2(hf: dict) -> TransformerConfig:
    """A TransformerConfig from a GPT2Config dict (config.json); fails on options megatronish does not model."""
    unsupported = {
        "activation_function": (hf.get("activation_function", "gelu_new") not in _TANH_GELUS,
                                f"use one of {_TANH_GELUS} (the tanh GeLU)"),
        "scale_attn_by_inverse_layer_idx": (hf.get("scale_attn_by_inverse_layer_idx", False), "must be false"),
        "scale_attn_weights": (not hf.get("scale_attn_weights", True), "must be true"),
        "tie_word_embeddings": (not hf.get("tie_word_embeddings", True), "must be true for GPT-2"),
    }
    for key, (bad, fix) in unsupported.items():
        if bad:
            raise ValueError(f"GPT-2 config has {key}={hf.get(key)!r}, which megatronish does not support: {fix}")
    return TransformerConfig(
        num_layers=hf["n_layer"], hidden_size=hf["n_embd"], num_attention_heads=hf["n_head"],
        vocab_size=hf["vocab_size"], ffn_hidden_size=hf.get("n_inner") or 4 * hf["n_embd"],
        max_position_embeddings=hf["n_positions"], hidden_dropout=hf.get("resid_pdrop", 0.1),
        attention_dropout=hf.get("attn_pdrop", 0.1), layernorm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
        init_method_std=hf.get("initializer_range", 0.02), activation="gelu", normalization="LayerNorm",
        position_embedding_type="learned_absolute", add_bias_linear=True, tie_word_embeddings=True,
    )


def hf_gpt2_config(config: TransformerConfig) -> dict:
    """The GPT2Config dict of a GPT-2-shaped TransformerConfig; fails for configs GPT-2 cannot express."""
    required = {"activation": "gelu", "normalization": "LayerNorm", "position_embedding_type": "learned_absolute",
                "add_bias_linear": True, "tie_word_embeddings": True}
    for field, value in required.items():
        if getattr(config, field) != value:
            raise ValueError(f"a GPT-2 export needs {field}={value!r}, the model has {getattr(config, field)!r}: "
                             "only GPT-2-style models convert to GPT2LMHeadModel")
    return {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
        "n_layer": config.num_layers, "n_embd": config.hidden_size, "n_head": config.num_attention_heads,
        "vocab_size": config.vocab_size, "n_positions": config.max_position_embeddings,
        "n_inner": config.ffn_hidden_size, "activation_function": "gelu_new",
        "resid_pdrop": config.hidden_dropout, "embd_pdrop": config.hidden_dropout,
        "attn_pdrop": config.attention_dropout, "layer_norm_epsilon": config.layernorm_epsilon,
        "initializer_range": config.init_method_std, "tie_word_embeddings": True,
        # GPT-2's end-of-text token is the last of its vocabulary.
        "bos_token_id": config.vocab_size - 1, "eos_token_id": config.vocab_size - 1,
    }


def _qkv_hf_to_per_head(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[3 * heads * hn, ...] from [q | k | v] order to per-head [q k v] order."""
    return t.reshape(3, heads, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def _qkv_per_head_to_hf(t: torch.Tensor, heads: int) -> torch.Tensor:
    return t.reshape(heads, 3, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def _layer_names(i: int) -> list[tuple[str, str, str]]:
    """(megatronish name, GPT-2 name, how to convert) for layer i."""
    ours, theirs = f"decoder.layers.{i}.", f"h.{i}."
    return [
        (ours + "input_layernorm.weight", theirs + "ln_1.weight", "copy"),
        (ours + "input_layernorm.bias", theirs + "ln_1.bias", "copy"),
        (ours + "self_attention.linear_qkv.weight", theirs + "attn.c_attn.weight", "qkv_conv1d"),
        (ours + "self_attention.linear_qkv.bias", theirs + "attn.c_attn.bias", "qkv"),
        (ours + "self_attention.linear_proj.weight", theirs + "attn.c_proj.weight", "conv1d"),
        (ours + "self_attention.linear_proj.bias", theirs + "attn.c_proj.bias", "copy"),
        (ours + "pre_mlp_layernorm.weight", theirs + "ln_2.weight", "copy"),
        (ours + "pre_mlp_layernorm.bias", theirs + "ln_2.bias", "copy"),
        (ours + "mlp.linear_fc1.weight", theirs + "mlp.c_fc.weight", "conv1d"),
        (ours + "mlp.linear_fc1.bias", theirs + "mlp.c_fc.bias", "copy"),
        (ours + "mlp.linear_fc2.weight", theirs + "mlp.c_proj.weight", "conv1d"),
        (ours + "mlp.linear_fc2.bias", theirs + "mlp.c_proj.bias", "copy"),
    ]


def _all_names(config: TransformerConfig) -> list[tuple[str, str, str]]:
    names = [("embedding.word_embeddings.weight", "wte.weight", "copy"),
             ("embedding.position_embeddings.weight", "wpe.weight", "copy")]
    for i in range(config.num_layers):
        names += _layer_names(i)
    return names + [("decoder.final_layernorm.weight", "ln_f.weight", "copy"),
                    ("decoder.final_layernorm.bias", "ln_f.bias", "copy")]


def full_state_from_hf_gpt2(hf_state: dict[str, torch.Tensor], config: TransformerConfig) -> dict[str, torch.Tensor]:
    """A megatronish full state dict from a GPT2LMHeadModel (or GPT2Model) state dict."""
    hf_state = {k.removeprefix("transformer."): v for k, v in hf_state.items()}
    heads = config.num_attention_heads
    state = {}
    for ours, theirs, how in _all_names(config):
        if theirs not in hf_state:
            raise KeyError(f"GPT-2 state dict has no {theirs!r}: is it a GPT-2 checkpoint with {config.num_layers} layers?")
        t = hf_state[theirs]
        if how in ("conv1d", "qkv_conv1d"):
            t = t.t()
        if how in ("qkv", "qkv_conv1d"):
            t = _qkv_hf_to_per_head(t, heads)
        state[ours] = t.contiguous().clone()
    return state


def hf_gpt2_state_from_full(state: dict[str, torch.Tensor], config: TransformerConfig) -> dict[str, torch.Tensor]:
    """A GPT2LMHeadModel state dict (with lm_head tied to wte) from a megatronish full state dict."""
    heads = config.num_attention_heads
    hf_state = {}
    for ours, theirs, how in _all_names(config):
        t = state[ours]
        if how in ("qkv", "qkv_conv1d"):
            t = _qkv_per_head_to_hf(t, heads)
        if how in ("conv1d", "qkv_conv1d"):
            t = t.t()
        hf_state["transformer." + theirs] = t.contiguous().clone()
    hf_state["lm_head.weight"] = hf_state["transformer.wte.weight"]
    return hf_state


def load_hf_gpt2(directory) -> tuple[TransformerConfig, dict[str, torch.Tensor]]:
    """Read a GPT2LMHeadModel directory (config.json + weights) as (config, megatronish full state)."""
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(directory)
    config = config_from_hf_gpt2(model.config.to_dict())
    return config, full_state_from_hf_gpt2(model.state_dict(), config)


def save_hf_gpt2(directory, config: TransformerConfig, state: dict[str, torch.Tensor]) -> None:
    """Write a directory that transformers.GPT2LMHeadModel.from_pretrained loads."""
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_config = hf_gpt2_config(config)
    hf_config.pop("model_type")
    model = GPT2LMHeadModel(GPT2Config(**hf_config))
    model.load_state_dict(hf_gpt2_state_from_full(state, config), strict=True)
    model.to(config.params_dtype).save_pretrained(directory)
