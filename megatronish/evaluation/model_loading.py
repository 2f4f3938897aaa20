"""The model to evaluate, built for the TP size of this run, whatever layout it was saved at.

Three sources:
    --hf-model DIR   a GPT2LMHeadModel directory (save_pretrained), through the GPT-2 converter
    --load DIR       a megatronish training checkpoint (latest_checkpointed_iteration.txt +
                     iter_XXXXXXX/, or one iter_XXXXXXX folder), saved at any TP x DP layout,
                     through the checkpoint module's load_model_for_inference
    --load DIR       a megatronish full-state directory (config.json + model.pt, written by
                     tools/convert_checkpoint.py), which loads at any TP size
`read_model_config` gives the config without the weights, so that bad options fail before
anything heavy is loaded.
"""

import json
import os

from megatronish.model import GPTModel, TransformerConfig, load_full_checkpoint, load_full_state_dict
from megatronish.model.full_state import CONFIG_FILE, WEIGHTS_FILE
from megatronish.model.hf_gpt2 import config_from_hf_gpt2, load_hf_gpt2
from megatronish.training.checkpointing import (
    COMMON_FILENAME,
    TRACKER_FILENAME,
    load_model_for_inference,
    read_checkpoint_config,
)


def _is_full_state_dir(directory: str) -> bool:
    return all(os.path.isfile(os.path.join(directory, name)) for name in (CONFIG_FILE, WEIGHTS_FILE))


def _check_dir(directory: str, flag: str) -> None:
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{flag} {directory} is not a directory: pass a checkpoint directory")


def _kind(load: str | None, hf_model: str | None) -> str:
    if (load is None) == (hf_model is None):
        raise ValueError("pass exactly one of --load CKPT_DIR and --hf-model HF_DIR")
    if hf_model is not None:
        _check_dir(hf_model, "--hf-model")
        if not os.path.isfile(os.path.join(hf_model, "config.json")):
            raise FileNotFoundError(f"--hf-model {hf_model} has no config.json: pass a directory written by "
                                    "GPT2LMHeadModel.save_pretrained")
        return "hf"
    _check_dir(load, "--load")
    if _is_full_state_dir(load):
        return "full_state"
    if any(os.path.isfile(os.path.join(load, name)) for name in (TRACKER_FILENAME, COMMON_FILENAME)):
        return "training"
    raise FileNotFoundError(f"--load {load} is not a megatronish checkpoint: expected {TRACKER_FILENAME} or "
                            f"{COMMON_FILENAME} (training), or {CONFIG_FILE} + {WEIGHTS_FILE} "
                            "(tools/convert_checkpoint.py)")


def read_model_config(load: str | None, hf_model: str | None) -> TransformerConfig:
    """The model's config (with the true vocabulary size) without loading its weights."""
    kind = _kind(load, hf_model)
    if kind == "hf":
        with open(os.path.join(hf_model, "config.json")) as f:
            return config_from_hf_gpt2(json.load(f))
    if kind == "full_state":
        with open(os.path.join(load, CONFIG_FILE)) as f:
            return TransformerConfig.from_dict(json.load(f))
    return read_checkpoint_config(load)


def load_model(load: str | None, hf_model: str | None) -> GPTModel:
    """The model at this run's TP size, in eval mode. A collective: every rank calls it."""
    kind = _kind(load, hf_model)
    if kind == "training":
        return load_model_for_inference(load)
    config, state = load_hf_gpt2(hf_model) if kind == "hf" else load_full_checkpoint(load)
    model = GPTModel(config)
    load_full_state_dict(model, state)
    return model.eval()


def tokenizer_files_beside(load: str | None, hf_model: str | None) -> dict:
    """vocab.json / merges.txt next to the checkpoint (the converter copies them there), where present."""
    directory = hf_model if hf_model is not None else load
    files = {}
    for key, name in (("vocab_file", "vocab.json"), ("merge_file", "merges.txt")):
        if os.path.isfile(os.path.join(directory, name)):
            files[key] = os.path.join(directory, name)
    return files
