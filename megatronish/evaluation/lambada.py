"""LAMBADA last-word accuracy: greedy, and every token of the last word must be right.

An example's last word is the text after its last whitespace. The context (the text before
that word, stripped) and " " + word are tokenized separately, as in Megatron's strict LAMBADA,
so the word's tokens are the same whatever precedes it. The model reads context + word; the
example counts as correct when, at every position of the word, the most likely next token
is the word's token (teacher forcing, which for an all-correct word equals greedy decoding).
Contexts longer than the model's window lose their oldest tokens.
"""

from dataclasses import asdict, dataclass

import torch

from megatronish import parallel_state
from megatronish.evaluation.scoring import (
    data_parallel_share,
    greedy_predictions,
    micro_batches,
    sum_over_data_parallel,
)


@dataclass
class LambadaResult:
    accuracy: float
    num_correct: int
    num_examples: int

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return f"lambada | accuracy {self.accuracy:.6f} | num_correct {self.num_correct} | num_examples {self.num_examples}"


def tokenize_lambada(text: str, tokenizer) -> tuple[list[int], list[int]]:
    """(context tokens, last-word tokens) of one example."""
    words = text.split()
    if len(words) < 2:
        raise ValueError(f"LAMBADA example {text[:80]!r} needs a context before its last word")
    last_word = words[-1]
    context = text[:text.rfind(last_word)].strip()
    return tokenizer.tokenize(context), tokenizer.tokenize(" " + last_word)


def make_example(context: list[int], answer: list[int], seq_length: int) -> tuple[torch.Tensor, int]:
    """(tokens [<= seq_length + 1], number of answer tokens): context + answer, oldest context dropped to fit."""
    if len(answer) > seq_length:
        raise ValueError(f"a last word of {len(answer)} tokens does not fit in --seq-length {seq_length}")
    tokens = (context + answer)[-(seq_length + 1):]
    return torch.tensor(tokens, dtype=torch.long), len(answer)


def _batch(examples, pad_id: int, multiple: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded inputs [b, s] and the mask of positions whose next token is an answer token."""
    length = max(tokens.numel() for tokens, _ in examples) - 1
    length += -length % multiple
    inputs = torch.full((len(examples), length + 1), pad_id, dtype=torch.long)
    answer_positions = torch.zeros(len(examples), length, dtype=torch.bool)
    for row, (tokens, answer_length) in enumerate(examples):
        inputs[row, :tokens.numel()] = tokens
        answer_positions[row, tokens.numel() - 1 - answer_length:tokens.numel() - 1] = True
    return inputs, answer_positions


def evaluate_lambada(model, tokenizer, texts: list[str], seq_length: int, micro_batch_size: int = 8,
                     show_progress: bool = True) -> LambadaResult:
    """Last-word accuracy over `texts`. Collective: every rank calls it, all get the result."""
    examples = [make_example(*tokenize_lambada(text, tokenizer), seq_length) for text in texts]
    # Sequence parallelism splits the sequence evenly across TP: batch lengths must divide by it.
    multiple = parallel_state.get_tensor_model_parallel_world_size() if model.config.sequence_parallel else 1
    num_correct = torch.zeros((), dtype=torch.float64)
    for indices in micro_batches(data_parallel_share(len(examples)), micro_batch_size, "lambada examples",
                                 show_progress):
        inputs, answer_positions = _batch([examples[i] for i in indices], tokenizer.eod, multiple)
        predicted = greedy_predictions(model, inputs[:, :-1], answer_positions)
        wrong = predicted != inputs[:, 1:][answer_positions]
        row_of = answer_positions.nonzero()[:, 0]  # the example each answer token belongs to
        wrong_per_example = torch.zeros(len(indices)).index_add_(0, row_of, wrong.float())
        num_correct += (wrong_per_example == 0).sum()
    (num_correct,) = sum_over_data_parallel(num_correct)
    return LambadaResult(accuracy=num_correct / len(examples), num_correct=int(num_correct),
                         num_examples=len(examples))
