"""The KV cache of one batch of sequences, and where each forward writes into it.

    context = InferenceContext(batch_size=2, max_length=256)
    logits = forward_step(model, context, prompts)   # [b, s] right-padded prompts -> logits [b, s, vocab]
    context.commit([5, 3])                           # the rows' real prompt lengths
    logits = forward_step(model, context, next_ids)  # [b, 1]: one token per row, each after its own row
    context.commit(1)

Each attention layer keeps keys and values [b, max_length, np, hn] at this TP rank's heads,
allocated the first time the layer stores (so a pipeline stage allocates only its own layers)
and reused for the whole batch; the caller chooses max_length.

Slots of row r: [0, lengths[r]) hold its committed tokens. After them come the pending tokens,
written by earlier forwards of this step and not committed yet (a draft chain, the levels of a
token tree), then the tokens of the forward in progress. A query attends to every committed
slot of its row and to the pending and new tokens its mask allows (causal by default, any
[query, key] boolean mask for token trees). Committing ends the step: `commit(counts)` keeps
each row's first pending tokens, `keep(offsets)` keeps chosen ones (the accepted path of a
tree), moved into consecutive slots; the others are dropped (later forwards overwrite them).
"""

import torch

from megatronish import parallel_state
from megatronish.tensor_parallel import gather_from_tensor_model_parallel_region


class InferenceContext:
    def __init__(self, batch_size: int, max_length: int, device: torch.device | str | None = None):
        for name, value in (("batch_size", batch_size), ("max_length", max_length)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"InferenceContext {name} must be a positive integer, got {value!r}")
        self.batch_size, self.max_length = batch_size, max_length
        self.device = torch.device(device) if device is not None else parallel_state.get_device()
        self.lengths = [0] * batch_size  # committed tokens per row
        self.pending = 0  # tokens written after every row's committed ones, not committed yet
        self.num_new = 0  # tokens per row of the forward in progress (between begin and end)
        self.attention_mask = None  # bool [b, 1, num_new, used slots] of the forward in progress, True = attend
        self.logits_at = None  # [b]: the one token per row whose logits the forward in progress returns (None: all)
        self._write = None  # its slots: one slice for all rows, or (rows, slots) index tensors
        self._used = 0
        self._cache: dict[torch.nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}

    def next_positions(self, num_tokens: int) -> torch.Tensor:
        """[b, num_tokens] positions that continue each row after its committed and pending tokens."""
        starts = torch.tensor(self.lengths, device=self.device)[:, None] + self.pending
        return starts + torch.arange(num_tokens, device=self.device)

    def begin(self, num_tokens: int, mask: torch.Tensor | None = None, logits_at: torch.Tensor | None = None) -> None:
        """Prepare a forward of num_tokens tokens per row, written after the pending ones.

        mask: bool [q, p + q] or [b, q, p + q] (p pending tokens, q = num_tokens): which pending and
        new tokens each new token attends to, True = attend; default causal (all pending, new ones up
        to itself). Committed tokens are always attended. logits_at [b]: the model returns logits
        [b, 1, V] of only these tokens (one index per row, as each prompt's last), not [b, q, V].
        """
        if self.num_new:
            raise RuntimeError("InferenceContext.begin() called during a forward: call end() after each forward")
        window = self.pending + num_tokens
        used = max(self.lengths) + window
        if used > self.max_length:
            raise ValueError(f"the KV cache holds {self.max_length} tokens per sequence and this forward needs "
                             f"{used}: create the InferenceContext with max_length >= {used}")
        if mask is None:
            mask = torch.ones(num_tokens, window, dtype=torch.bool, device=self.device).tril(diagonal=self.pending)
        elif mask.dtype != torch.bool or mask.shape[-2:] != (num_tokens, window) or mask.dim() not in (2, 3):
            raise ValueError(f"mask must be bool [{num_tokens}, {window}] or [batch, {num_tokens}, {window}] "
                             f"(new tokens x pending + new tokens), got {mask.dtype} {list(mask.shape)}")
        lengths = torch.tensor(self.lengths, device=self.device)[:, None]
        offset = torch.arange(used, device=self.device) - lengths  # [b, used]: each slot's place after the committed
        in_window = (offset >= 0) & (offset < window)
        picked = mask.to(self.device).expand(self.batch_size, num_tokens, window).gather(
            2, offset.clamp(0, window - 1)[:, None, :].expand(self.batch_size, num_tokens, used))
        self.attention_mask = ((offset < 0)[:, None, :] | (in_window[:, None, :] & picked)).unsqueeze(1)
        starts = [length + self.pending for length in self.lengths]
        if len(set(starts)) == 1:  # every row writes at the same slots: a slice, no index tensors
            self._write = slice(starts[0], starts[0] + num_tokens)
        else:
            slots = torch.tensor(starts, device=self.device)[:, None] + torch.arange(num_tokens, device=self.device)
            self._write = (torch.arange(self.batch_size, device=self.device)[:, None], slots)
        self.num_new, self._used, self.logits_at = num_tokens, used, logits_at

    def store(self, layer: torch.nn.Module, key: torch.Tensor, value: torch.Tensor):
        """Write a layer's new keys and values [b, q, np, hn]; return all its used ones [b, used, np, hn]."""
        if key.shape[:2] != (self.batch_size, self.num_new):
            raise ValueError(f"keys of shape {list(key.shape)} do not fit the forward this context was prepared "
                             f"for ({self.batch_size} rows x {self.num_new} tokens): call begin() first")
        if layer not in self._cache:
            # Zeros, not empty: a masked slot gets probability 0, and 0 * NaN garbage would still be NaN.
            shape = (self.batch_size, self.max_length, *key.shape[2:])
            self._cache[layer] = (key.new_zeros(shape), value.new_zeros(shape))
        keys, values = self._cache[layer]
        if isinstance(self._write, slice):
            keys[:, self._write], values[:, self._write] = key, value
        else:
            keys[self._write], values[self._write] = key, value
        return keys[:, :self._used], values[:, :self._used]

    def end(self) -> None:
        """The forward is done: its tokens become pending."""
        self.pending += self.num_new
        self.num_new, self.attention_mask, self._write, self.logits_at = 0, None, None, None

    def commit(self, counts) -> None:
        """Keep the first counts[r] pending tokens of row r (an int: the same for every row), drop the rest."""
        if isinstance(counts, int):
            counts = [counts] * self.batch_size
        self.keep([list(range(count)) for count in counts])

    def keep(self, offsets: list[list[int]]) -> None:
        """Keep, for each row, the pending tokens at these offsets (in this order), drop the others."""
        if len(offsets) != self.batch_size or any(not 0 <= o < self.pending for row in offsets for o in row):
            raise ValueError(f"keep() needs one list of pending offsets (each in [0, {self.pending})) for each of "
                             f"the {self.batch_size} rows, got {offsets}")
        for row, kept in enumerate(offsets):
            start = self.lengths[row]
            if kept != list(range(len(kept))):  # already in place otherwise
                source = torch.tensor(kept, device=self.device) + start
                target = slice(start, start + len(kept))
                for keys, values in self._cache.values():
                    keys[row, target], values[row, target] = keys[row, source], values[row, source]
            self.lengths[row] += len(kept)
        self.pending = 0


def forward_step(model, context: InferenceContext, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                 mask: torch.Tensor | None = None, logits_at: torch.Tensor | None = None) -> torch.Tensor:
    """Run tokens [b, q] through the model with the context's cache -> fp32 logits [b, q, vocab] (whole
    vocabulary), or [b, 1, vocab] at logits_at [b] (one token per row).

    positions default to the slots after each row's committed and pending tokens; mask as in
    InferenceContext.begin. The tokens become pending; commit or keep them afterwards.
    """
    if positions is None:
        positions = context.next_positions(tokens.size(1))
    context.begin(tokens.size(1), mask, logits_at)
    logits = model(tokens, positions, inference_context=context)
    context.end()
    return gather_from_tensor_model_parallel_region(logits, model.tp_group)[..., :model.config.vocab_size].float()


def agree_across_tp(tokens: torch.Tensor, tp_group) -> torch.Tensor:
    """TP rank 0's copy of an integer tensor, on every rank of the TP group (in place).

    Every rank computes the same choices from the same gathered logits; this makes sure that
    the tokens they feed the next forward are identical even if a last bit differs somewhere.
    """
    if tp_group.size() > 1:
        torch.distributed.broadcast(tokens, torch.distributed.get_global_rank(tp_group, 0), group=tp_group)
    return tokens
