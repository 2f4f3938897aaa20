"""Train a tokenizer on text files: SentencePiece BPE, or GPT-2 style byte-level BPE.

The results load with build_tokenizer: "SentencePieceTokenizer" (--tokenizer-model x.model) and
"GPT2BPETokenizer" (--vocab-file vocab.json --merge-file merges.txt) or "HuggingFaceTokenizer"
(--tokenizer-model tokenizer.json).
"""

import os


def train_sentencepiece(files: list[str], output_prefix: str, vocab_size: int) -> str:
    """Train a SentencePiece BPE model with ids unk=0, bos=1, eos=2 (the EOD), pad=3, byte
    fallback (no text is ever unknown) and no normalization (detokenize gives the text back);
    returns the path of `<output_prefix>.model`."""
    import sentencepiece

    _check_inputs(files, vocab_size)
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    sentencepiece.SentencePieceTrainer.Train(
        input=",".join(files),
        model_prefix=output_prefix,
        vocab_size=vocab_size,
        model_type="bpe",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return output_prefix + ".model"


def train_byte_level_bpe(files: list[str], output_dir: str, vocab_size: int) -> dict[str, str]:
    """Train a GPT-2 style byte-level BPE with "<|endoftext|>" as id 0; writes vocab.json,
    merges.txt and tokenizer.json into `output_dir` and returns their paths by name."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    _check_inputs(files, vocab_size)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train(files, trainer)
    os.makedirs(output_dir, exist_ok=True)
    vocab, merges = tokenizer.model.save(output_dir)
    tokenizer_json = os.path.join(output_dir, "tokenizer.json")
    tokenizer.save(tokenizer_json)
    return {"vocab.json": vocab, "merges.txt": merges, "tokenizer.json": tokenizer_json}


def _check_inputs(files: list[str], vocab_size: int) -> None:
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(f"input text file(s) do not exist: {', '.join(missing)}")
    if vocab_size < 260:
        raise ValueError(
            f"vocab size {vocab_size} is too small: it must exceed the 256 byte tokens plus special tokens"
        )
