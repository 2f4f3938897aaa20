"""SWARM checkpoints: each stage's part written by one of its peers, assembled into one megatronish checkpoint.

    <save>/iter_0000020.swarm/stage0/    stage 0's tensors (DCP files) and part.json (its checkpoint.json)
    <save>/iter_0000020.swarm/stage1/    ...
    <save>/iter_0000020/                 the assembled checkpoint, in pretrain_gpt.py's format
Names are global, so a stage writes its parameters and their Adam state under the keys a
pretrain_gpt.py checkpoint uses; the first and last stage both hold the tied word embeddings
(identical on both: they step on the same summed gradient) and the first stage's copy is kept.

A part is written into a temporary folder and renamed into place, replacing an older save of the
same stage and iteration (a stage's last complete save wins). Whoever completes the set of parts
assembles: the data files are hard-linked side by side (`__<stage>_0.distcp`), DCP's indexes are
merged into one, and the folder is published as pretrain_gpt.py publishes its own (checkpoint.json,
manifest, rename, tracker file). A lock file makes one writer assemble; a writer killed midway
leaves that iteration unassembled and the previous checkpoint the newest, never a half checkpoint.
"""

import dataclasses
import json
import os
import pickle
import shutil
import uuid

from megatronish.training.checkpoint_format import DCP_METADATA_FILE, read_metadata, save_blocks
from megatronish.training.checkpointing import (
    _fsync_dir,
    _publish,
    _write_bytes_durably,
    _write_json_durably,
    checkpoint_dir,
    publish_checkpoint,
)

PART_FILENAME = "part.json"
DATA_FILENAME = "__0_0.distcp"  # what DCP names the one data file of a single-process save


def parts_dir(save_dir: str, iteration: int) -> str:
    return checkpoint_dir(save_dir, iteration) + ".swarm"


def save_stage_part(save_dir: str, stage: int, num_stages: int, blocks: dict, common: dict) -> str | None:
    """Write stage `stage`'s tensors (`blocks`, checkpointing.checkpoint_blocks) and its checkpoint.json
    (`common`, with only this stage's parameters); assemble the checkpoint if this completes it.
    Returns the published checkpoint folder, or None while other stages' parts are missing."""
    parts = parts_dir(save_dir, common["iteration"])
    os.makedirs(parts, exist_ok=True)
    temporary = os.path.join(parts, f"stage{stage}.{uuid.uuid4().hex}.tmp")
    save_blocks(blocks, temporary, no_dist=True)  # DCP fsyncs its files
    _write_json_durably(os.path.join(temporary, PART_FILENAME), common)
    _fsync_dir(temporary)
    _publish(temporary, os.path.join(parts, f"stage{stage}"))
    return assemble(save_dir, common["iteration"], num_stages)


def assemble(save_dir: str, iteration: int, num_stages: int) -> str | None:
    """Publish iteration `iteration` from its stage parts once all are written (else None)."""
    parts = parts_dir(save_dir, iteration)
    stages = [os.path.join(parts, f"stage{stage}") for stage in range(num_stages)]
    if not all(os.path.isfile(os.path.join(stage, PART_FILENAME)) for stage in stages):
        return None
    try:
        os.close(os.open(os.path.join(parts, "assembling"), os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return None  # another stage's writer completed the set at the same time and assembles
    temporary = checkpoint_dir(save_dir, iteration) + f".{uuid.uuid4().hex}.tmp"
    os.makedirs(temporary)
    metadata = None
    for stage, folder in enumerate(stages):
        data_file = f"__{stage}_0.distcp"
        os.link(os.path.join(folder, DATA_FILENAME), os.path.join(temporary, data_file))
        metadata = _merge_metadata(metadata, read_metadata(folder), data_file)
    _write_bytes_durably(os.path.join(temporary, DCP_METADATA_FILE), pickle.dumps(metadata))
    common = _merged_common(stages)
    final = publish_checkpoint(temporary, save_dir, common)
    shutil.rmtree(parts, ignore_errors=True)
    return final


def _merge_metadata(merged, part, data_file: str):
    """Add one part's DCP index to `merged`, its entries pointing at `data_file`; a tensor already
    present (the tied embeddings, on the first and last stage) keeps its first entry."""
    if merged is None:
        merged = dataclasses.replace(part, state_dict_metadata={}, storage_data={})
    new = {name: entry for name, entry in part.state_dict_metadata.items() if name not in merged.state_dict_metadata}
    merged.state_dict_metadata.update(new)
    merged.storage_data.update({index: dataclasses.replace(info, relative_path=data_file)
                                for index, info in part.storage_data.items() if index.fqn in new})
    return merged


def _merged_common(stages: list[str]) -> dict:
    """Stage 0's checkpoint.json with every stage's parameter list."""
    commons = []
    for folder in stages:
        with open(os.path.join(folder, PART_FILENAME)) as f:
            commons.append(json.load(f))
    common = dict(commons[0])
    common["parameters"] = {name: shapes for part in commons for name, shapes in part["parameters"].items()}
    return common
