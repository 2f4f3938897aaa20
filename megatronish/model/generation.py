"""Token-by-token decoding for a GPTModel at any TP size (recomputes the whole context per token)."""

import torch
import torch.distributed as dist

from megatronish import parallel_state
from megatronish.tensor_parallel import gather_from_tensor_model_parallel_region


@torch.no_grad()
def generate(model, prompt_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Extend prompt_ids [b, s0] by max_new_tokens tokens; returns [b, s0 + max_new_tokens].

    temperature 0 decodes greedily; otherwise it samples from softmax(logits / temperature),
    restricted to the top_k most likely tokens if given. Padding columns of the vocabulary are
    never chosen. Every TP rank of a group must call it; they all return the tokens of TP rank 0.
    The context is cropped to the last max_position_embeddings tokens.
    """
    config = model.config
    if prompt_ids.dim() != 2 or prompt_ids.size(1) == 0:
        raise ValueError(f"prompt_ids must be [batch, length >= 1] token ids, got shape {list(prompt_ids.shape)}")
    if temperature < 0 or (top_k is not None and top_k < 1):
        raise ValueError(f"need temperature >= 0 and top_k >= 1 (or None), got {temperature} and {top_k}")
    tp = parallel_state.get_tensor_model_parallel_world_size()
    # Sequence parallelism needs a length divisible by TP: pad on the right, which a causal model never sees.
    multiple = tp if config.sequence_parallel else 1
    longest = config.max_position_embeddings - config.max_position_embeddings % multiple
    was_training = model.training
    model.eval()
    tokens = prompt_ids
    try:
        for _ in range(max_new_tokens):
            context = tokens[:, -longest:]
            length = context.size(1)
            padded = torch.nn.functional.pad(context, (0, (-length) % multiple))
            logits = model(padded)[:, length - 1]  # [b, V_padded / tp]
            logits = gather_from_tensor_model_parallel_region(logits)[:, :config.vocab_size].float()
            next_token = _choose(logits, temperature, top_k, generator)
            if tp > 1:
                dist.broadcast(next_token, parallel_state.get_tensor_model_parallel_src_rank(),
                               group=parallel_state.get_tensor_model_parallel_group())
            tokens = torch.cat([tokens, next_token], dim=1)
    finally:
        model.train(was_training)
    return tokens


def _choose(logits: torch.Tensor, temperature: float, top_k: int | None, generator) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        threshold = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)
