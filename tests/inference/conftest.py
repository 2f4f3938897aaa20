"""A target and a smaller draft GPT, trained for a few seconds on the same small text (fixed seeds).

Trained, so that the draft agrees with the target often but not always: speculative decoding
then accepts whole paths and rejects others, and the tests see both. The text is made here from
a tiny grammar (no data files). Byte tokens, so prompts are plain strings.
"""

import random

import numpy as np
import pytest
import torch

from megatronish import parallel_state
from megatronish.data.tokenizers import ByteTokenizer
from megatronish.model import GPTModel, TransformerConfig, full_state_dict, load_full_state_dict
from megatronish.testing import run_distributed

VOCAB = ByteTokenizer().vocab_size
BASE = dict(vocab_size=VOCAB, max_position_embeddings=96, hidden_dropout=0.0, attention_dropout=0.0)
TARGET = dict(BASE, num_layers=2, hidden_size=48, num_attention_heads=4)
DRAFT = dict(BASE, num_layers=1, hidden_size=24, num_attention_heads=2)
SUBJECTS = ["the cat", "a dog", "my friend", "the old man", "her sister"]
VERBS = ["sat on", "looked at", "ran to", "walked past", "found"]
OBJECTS = ["the mat", "a tree", "the red house", "the river", "a small box"]


def tiny_text(sentences: int = 300, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join(f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}." for _ in range(sentences))


def _train(options: dict, steps: int, seed: int) -> dict:
    torch.manual_seed(seed)
    model = GPTModel(TransformerConfig(**options), seed=seed)
    data = torch.tensor(list(tiny_text().encode()))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    window = 64
    for _ in range(steps):
        starts = torch.randint(0, len(data) - window - 1, (16,))
        batch = torch.stack([data[s:s + window + 1] for s in starts])
        loss = model(batch[:, :-1], labels=batch[:, 1:]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {name: t.numpy() for name, t in full_state_dict(model).items()}


def _train_pair():
    parallel_state.initialize_model_parallel(1)
    return _train(TARGET, steps=150, seed=1), _train(DRAFT, steps=60, seed=2)


@pytest.fixture(scope="session")
def trained_pair():
    """(target full state, draft full state) as numpy arrays; build them with `build_model`."""
    return run_distributed(_train_pair, 1, timeout=300)[0]


def build_model(options: dict, state: dict) -> GPTModel:
    """The model at this rank's TP size with the given full weights (parallel state must be set up)."""
    model = GPTModel(TransformerConfig(**options))
    load_full_state_dict(model, {name: torch.from_numpy(np.asarray(value)) for name, value in state.items()})
    return model.eval()


def _save_checkpoints(states, directories):
    from argparse import Namespace

    from megatronish.training.checkpointing import save_model_only

    parallel_state.initialize_model_parallel(1)
    for options, state, directory in zip((TARGET, DRAFT), states, directories):
        save_model_only(directory, build_model(options, state), args=Namespace(tokenizer_type="ByteTokenizer"))


@pytest.fixture(scope="session")
def trained_checkpoints(trained_pair, tmp_path_factory):
    """(target, draft) training checkpoints whose saved arguments name the ByteTokenizer."""
    root = tmp_path_factory.mktemp("checkpoints")
    directories = (str(root / "target"), str(root / "draft"))
    run_distributed(_save_checkpoints, 1, args=(trained_pair, directories))
    return directories
