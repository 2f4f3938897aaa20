"""A tiny random GPT-2 (transformers, no download) with the data tests' small BPE tokenizer, and
WikiText-formatted text made here."""

import json
import random
import shutil

import pytest
import torch

from data.conftest import gpt2_files

WORDS = ("the", "game", "players", "season", "river", "city", "was", "in", "of", "and", "first", "album",
         "song", "team", "north", "war", "his", "her", "new", "year", "released", "called", "known")


def wikitext_text(seed: int, paragraphs: int = 3) -> str:
    """Text in WikiText-103's format: headings, " @-@ " and friends, spaced punctuation and brackets."""
    rng = random.Random(seed)

    def words(n):
        return " ".join(rng.choice(WORDS) for _ in range(n))

    lines = [" \n", f" = {words(2).title()} = \n", " \n"]
    for p in range(paragraphs):
        sentence = (f" {words(4)} @-@ {words(1)} , {words(3)} ( {words(2)} ) 1 @,@ 500 {words(2)} . "
                    f"{words(3)} \" {words(2)} \" 3 @.@ 5 {words(2)} 's {words(1)} ; {words(2)} . \n")
        lines += [sentence, " \n", f" = = {words(2)} = = \n", " \n"] if p % 2 == 0 else [sentence, " \n"]
    return "".join(lines)


@pytest.fixture(scope="package", autouse=True)
def _one_torch_thread():
    """The references computed in this process run on one thread: on 2 busy cores, 2 threads made
    them 10-20x slower (ranks forked by run_distributed set their own single thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tokenizer_vocab_size() -> int:
    with open(gpt2_files()["vocab_file"]) as f:
        return len(json.load(f))


@pytest.fixture(scope="package")
def hf_gpt2_dir(tmp_path_factory):
    """A random GPT2LMHeadModel saved with save_pretrained, vocab.json + merges.txt beside it."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=tokenizer_vocab_size(),
                                     n_positions=32, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():  # biases and norms away from their trivial zeros and ones; sharper predictions
        for param in model.parameters():
            param.add_(0.1 * torch.randn(param.shape))
    directory = tmp_path_factory.mktemp("hf_gpt2")
    model.save_pretrained(directory)
    for key, name in (("vocab_file", "vocab.json"), ("merge_file", "merges.txt")):
        shutil.copyfile(gpt2_files()[key], directory / name)
    return directory
