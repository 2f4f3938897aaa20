"""Shared pieces of the checkpoint tests: a tiny corpus, tiny-GPT argv, and pretrain runs inside
forked ranks, with optional faults injected into the training step of one rank."""

import os
import signal
import time

import numpy as np

from megatronish.data.indexed_dataset import IndexedDatasetBuilder
from megatronish.testing import run_pretrain
from megatronish.training import training


def build_corpus(root) -> str:
    """Repeated byte phrases with noise, ended by ByteTokenizer's end-of-document id 256."""
    rng = np.random.default_rng(0)
    phrases = [rng.integers(32, 127, size=rng.integers(3, 9)) for _ in range(20)]
    prefix = os.path.join(str(root), "tiny_text_document")
    builder = IndexedDatasetBuilder(prefix, dtype=np.uint16)
    for _ in range(60):
        doc = np.concatenate([phrases[i] for i in rng.integers(0, len(phrases), size=rng.integers(10, 30))])
        builder.add_document(np.append(doc, 256))
    builder.finalize()
    return prefix


def tiny_argv(prefix: str, *extra: str, iters: int = 10, tp: int = 1, dropout: float = 0.0) -> list[str]:
    """A 2-layer GPT (SwiGLU: a stride-2 parameter; untied output layer: a second padded vocabulary
    weight), global batch 8, eval on 2 validation batches, no log lines."""
    return ["--data-path", prefix, "--data-cache-path", prefix + "-cache", "--tokenizer-type", "ByteTokenizer",
            "--split", "90,10,0", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
            "--swiglu", "--ffn-hidden-size", "64", "--untie-embeddings-and-output-weights",
            "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", str(iters),
            "--lr", "3e-3", "--min-lr", "3e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "2",
            "--hidden-dropout", str(dropout), "--attention-dropout", str(dropout), "--log-interval", "1000",
            "--eval-interval", "1000", "--eval-iters", "2", "--num-workers", "0", "--tp", str(tp), *extra]


class FaultyTrainStep:
    """Replaces training.train_step in a forked rank: global rank `rank` does `action` ("SIGTERM",
    "SIGUSR1", "hang", "kill") during its `at_step`-th training step of each pretrain call."""

    def __init__(self, action: str, rank: int, at_step: int):
        self.real, self.action, self.rank, self.at_step, self.calls = training.train_step, action, rank, at_step, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.at_step and int(os.environ["RANK"]) == self.rank:
            if self.action == "hang":
                time.sleep(3600)
            if self.action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            os.kill(os.getpid(), getattr(signal, self.action))  # handled at the next iteration boundary
        return self.real(*args, **kwargs)


def run_pretrains(argvs: list[list[str]], faults: list | None = None) -> list[dict]:
    """Run pretrain once per argv, one after the other, in this rank; faults[i] (FaultyTrainStep's
    arguments, or None) is injected into run i."""
    real_train_step = training.train_step
    results = []
    for argv, fault in zip(argvs, faults or [None] * len(argvs)):
        training.train_step = FaultyTrainStep(*fault) if fault else real_train_step
        try:
            results.append(run_pretrain(argv))
        finally:
            training.train_step = real_train_step
    return results


def pretrain_errors(argvs: list[list[str]]) -> list[str]:
    """Run pretrain once per argv in this rank; each run's error as "Type: message", or "no error"."""
    messages = []
    for argv in argvs:
        try:
            run_pretrains([argv])
            messages.append("no error")
        except Exception as error:  # noqa: BLE001 - the message is what the tests check
            messages.append(f"{type(error).__name__}: {error}")
    return messages
