"""KV-cached forwards equal full recomputation (fp32, 1e-5) at TP = 1 and 2.

A batch of prompts of different lengths (right-padded with random tokens the rows must never
see) is prefilled (all logits, and only each prompt's last), decoded token by token, extended by a chain of which only part is kept, then
by a token tree written level by level (each level attends to its ancestors among the pending
tokens) of which one path per row is kept and moved into place; every logit along the way is
compared with the logits of the model run on that row's whole sequence from scratch.
Learned and rotary positions, SDPA and the explicit softmax path.
"""

import pytest
import torch

from megatronish import parallel_state
from megatronish.inference.context import InferenceContext, forward_step
from megatronish.model import GPTModel, TransformerConfig
from megatronish.tensor_parallel import gather_from_tensor_model_parallel_region, model_parallel_manual_seed
from megatronish.testing import run_distributed

VOCAB = 100
TINY = dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=48,
            hidden_dropout=0.0, attention_dropout=0.0)
LLAMA = dict(TINY, ffn_hidden_size=48, activation="swiglu", normalization="RMSNorm", position_embedding_type="rope",
             add_bias_linear=False, tie_word_embeddings=False)
CASES = {"gpt2": TINY, "gpt2_explicit": dict(TINY, attention_backend="explicit"),
         "llama": LLAMA, "llama_explicit": dict(LLAMA, attention_backend="explicit")}
PROMPT_LENGTHS = [5, 2, 7]
TOLERANCE = 1e-5
# A tree of 5 nodes after each row's committed tokens, written in three forwards (one per level).
PARENTS = [-1, 0, 0, 1, 2]
LEVELS = [[0], [1, 2], [3, 4]]
KEPT_PATHS = [[0, 2, 4], [0, 1, 3], [0]]  # one root-to-node path per row


def _recomputed(model, sequence: list[int]) -> torch.Tensor:
    logits = model(torch.tensor([sequence]))
    return gather_from_tensor_model_parallel_region(logits)[0, :, :VOCAB].float()


def _ancestors(node: int) -> list[int]:
    path = []
    while node != -1:
        path.append(node)
        node = PARENTS[node]
    return path[::-1]


def _level_mask(level: int) -> torch.Tensor:
    """[new, pending + new]: each node of the level attends to itself and its ancestors."""
    written = [n for lv in LEVELS[:level + 1] for n in lv]
    return torch.tensor([[w in _ancestors(n) for w in written] for n in LEVELS[level]])


def _worst_error(options: dict) -> float:
    model_parallel_manual_seed(1234)
    model = GPTModel(TransformerConfig(**options)).eval()
    g = torch.Generator().manual_seed(5)  # the same tokens on every rank
    random_tokens = lambda *shape: torch.randint(0, VOCAB, shape, generator=g)  # noqa: E731
    rows = len(PROMPT_LENGTHS)
    sequences = [random_tokens(n).tolist() for n in PROMPT_LENGTHS]
    padded = random_tokens(rows, max(PROMPT_LENGTHS))
    for row, sequence in enumerate(sequences):
        padded[row, :len(sequence)] = torch.tensor(sequence)
    context = InferenceContext(rows, max_length=40)
    errors = []

    def check(logits, row_index, row):  # logits [q, vocab] of the tokens that end at these indices of row's sequence
        reference = _recomputed(model, sequences[row])
        errors.append((logits - reference[row_index]).abs().max().item())

    with torch.no_grad():
        logits = forward_step(model, context, padded)
        for row, n in enumerate(PROMPT_LENGTHS):
            check(logits[row, :n], slice(0, n), row)
        context.commit(PROMPT_LENGTHS)
        last_only = forward_step(model, InferenceContext(rows, max_length=40), padded,
                                 logits_at=torch.tensor(PROMPT_LENGTHS) - 1)  # [b, 1, vocab]: each prompt's last
        for row, n in enumerate(PROMPT_LENGTHS):
            check(last_only[row], [n - 1], row)
        for _ in range(3):  # token-by-token decoding
            step = random_tokens(rows, 1)
            for row in range(rows):
                sequences[row].append(step[row, 0].item())
            logits = forward_step(model, context, step)
            for row in range(rows):
                check(logits[row], [-1], row)
            context.commit(1)
        chain = random_tokens(rows, 3)  # a chain of 3 of which each row keeps 2
        logits = forward_step(model, context, chain)
        for row in range(rows):
            sequences[row] += chain[row, :2].tolist()
            check(logits[row, :2], slice(-2, None), row)
        context.commit(2)
        tree = random_tokens(rows, len(PARENTS))
        for level, nodes in enumerate(LEVELS):
            depth = len(_ancestors(nodes[0])) - 1
            positions = torch.tensor(context.lengths)[:, None] + depth + torch.zeros(len(nodes), dtype=torch.long)
            logits = forward_step(model, context, tree[:, nodes], positions, _level_mask(level))
            for row in range(rows):
                for i, node in enumerate(nodes):
                    path = tree[row, _ancestors(node)].tolist()
                    errors.append((logits[row, i] - _recomputed(model, sequences[row] + path)[-1]).abs().max().item())
        context.keep([[[n for lv in LEVELS for n in lv].index(node) for node in path] for path in KEPT_PATHS])
        step = random_tokens(rows, 1)
        for row, path in enumerate(KEPT_PATHS):
            sequences[row] += tree[row, path].tolist() + [step[row, 0].item()]
        logits = forward_step(model, context, step)
        for row in range(rows):
            check(logits[row], [-1], row)
    return max(errors)


def _all_cases():
    parallel_state.initialize_model_parallel(torch.distributed.get_world_size())
    return {case: _worst_error(options) for case, options in CASES.items()}


@pytest.mark.parametrize("tp", [1, 2])
def test_cached_forwards_equal_recomputation(tp):
    worst = run_distributed(_all_cases, tp)[0]
    for case, error in worst.items():
        assert error < TOLERANCE, f"{case} at TP={tp}: cached logits differ from recomputation by {error:.2e}"


def _context_errors():
    parallel_state.initialize_model_parallel(1)
    messages = []
    for call in (lambda c: c.begin(41),
                 lambda c: c.begin(2, torch.ones(2, 3, dtype=torch.bool)),
                 lambda c: (c.begin(1), c.end(), c.keep([[1], [0]])),
                 lambda c: InferenceContext(0, 4)):
        try:
            call(InferenceContext(2, max_length=40, device="cpu"))
        except ValueError as error:
            messages.append(str(error))
    return messages


def test_context_rejects_bad_use_with_the_fix():
    messages = run_distributed(_context_errors, 1)[0]
    assert "this forward needs 41: create the InferenceContext with max_length >= 41" in messages[0]
    assert "mask must be bool [2, 2] or [batch, 2, 2]" in messages[1]
    assert "keep() needs one list of pending offsets (each in [0, 1))" in messages[2]
    assert "batch_size must be a positive integer, got 0" in messages[3]
