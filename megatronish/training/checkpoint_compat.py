"""Whether a checkpoint's model is the model this run asks for.

Shapes alone do not tell: a model with RMSNorm instead of LayerNorm, rotary instead of learned
positions or no linear biases has a subset of the saved tensors, each at its saved shape, and
would load silently while the saved biases and position embeddings are dropped. So the saved
model config is compared field by field for every field that decides which parameters exist or
their shapes. A deliberate change (fine-tuning into another architecture) needs --finetune and
--allow-architecture-change: then the parameters both models share load and the others keep
their fresh initialization.
"""

PARAMETER_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "vocab_size",
                    "activation", "normalization", "position_embedding_type", "add_bias_linear",
                    "tie_word_embeddings", "max_position_embeddings")


def architecture_differences(saved: dict, requested: dict) -> list[str]:
    """'field: saved X, requested Y' for each parameter-deciding field that differs."""
    learned_positions = "learned_absolute" in (saved.get("position_embedding_type"),
                                               requested.get("position_embedding_type"))
    return [f"{field}: saved {saved.get(field)!r}, requested {requested.get(field)!r}"
            for field in PARAMETER_FIELDS
            if saved.get(field) != requested.get(field)
            and (field != "max_position_embeddings" or learned_positions)]  # rotary positions have no table


def check_architecture(folder: str, saved: dict, requested: dict, allow_change: bool) -> list[str]:
    """Raise ValueError listing the differences unless `allow_change`; returns them."""
    differences = architecture_differences(saved, requested)
    if differences and not allow_change:
        raise ValueError(f"the checkpoint {folder} holds another model architecture ({'; '.join(differences)}): "
                         "resume with the model arguments it was saved with (see its checkpoint.json), or, to "
                         "fine-tune into the new architecture, add --finetune --allow-architecture-change")
    return differences
