"""The model to evaluate, built for the TP size of this run, whatever layout it was saved at.

Three sources:
    --hf-model DIR   a GPT2LMHeadModel directory (save_pretrained), through the GPT-2 converter
    --load DIR       a megatronish full-state directory (config.json + model.pt, written by
                     tools/convert_checkpoint.py), which loads at any TP size
    --load DIR       a training checkpoint (latest_checkpointed_iteration.txt + iter_XXXXXXX/),
                     through the checkpoint module's loader: see _load_training_checkpoint
`read_model_config` gives the config cheaply (no weights) where the format allows, so that bad
options fail before anything heavy is loaded.
"""

import json
import os

from megatronish.model import GPTModel, TransformerConfig, load_full_checkpoint, load_full_state_dict
from megatronish.model.full_state import CONFIG_FILE, WEIGHTS_FILE
from megatronish.model.hf_gpt2 import config_from_hf_gpt2, load_hf_gpt2
from megatronish.training.checkpointing import TRACKER_FILENAME


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
    if os.path.isfile(os.path.join(load, TRACKER_FILENAME)):
        return "training"
    raise FileNotFoundError(f"--load {load} is not a megatronish checkpoint: expected {CONFIG_FILE} + "
                            f"{WEIGHTS_FILE} (tools/convert_checkpoint.py) or {TRACKER_FILENAME} (training)")


def read_model_config(load: str | None, hf_model: str | None) -> TransformerConfig | None:
    """The model's config without loading its weights; None for a training checkpoint (known only on load)."""
    kind = _kind(load, hf_model)
    if kind == "hf":
        with open(os.path.join(hf_model, "config.json")) as f:
            return config_from_hf_gpt2(json.load(f))
    if kind == "full_state":
        with open(os.path.join(load, CONFIG_FILE)) as f:
            return TransformerConfig.from_dict(json.load(f))
    return None


def load_model(load: str | None, hf_model: str | None) -> GPTModel:
    """The model at this run's TP size, in eval mode. A collective: every rank calls it."""
    kind = _kind(load, hf_model)
    if kind == "training":
        model = _load_training_checkpoint(load)
    else:
        config, state = load_hf_gpt2(hf_model) if kind == "hf" else load_full_checkpoint(load)
        model = GPTModel(config)
        load_full_state_dict(model, state)
    return model.eval()


def _load_training_checkpoint(load_dir: str) -> GPTModel:
    # The one place that reads training checkpoints. It needs the checkpoint module's
    # `load_model_for_inference(load_dir) -> GPTModel`: the newest checkpoint under load_dir,
    # saved at any TP size, built for the current TP size from the config saved with it.
    try:
        from megatronish.training.checkpointing import load_model_for_inference
    except ImportError:
        raise NotImplementedError(
            f"--load {load_dir} is a training checkpoint, which this version cannot read yet "
            "(megatronish.training.checkpointing has no load_model_for_inference): evaluate a directory "
            "written by tools/convert_checkpoint.py, or a Hugging Face export with --hf-model") from None
    return load_model_for_inference(load_dir)


def tokenizer_files_beside(load: str | None, hf_model: str | None) -> dict:
    """vocab.json / merges.txt next to the checkpoint (the converter copies them there), where present."""
    directory = hf_model if hf_model is not None else load
    files = {}
    for key, name in (("vocab_file", "vocab.json"), ("merge_file", "merges.txt")):
        if os.path.isfile(os.path.join(directory, name)):
            files[key] = os.path.join(directory, name)
    return files
