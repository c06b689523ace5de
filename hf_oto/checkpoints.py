"""Which checkpoint folders hold everything a resume needs, and which to delete when rotating.

``OTOTrainer`` writes each checkpoint in a temporary sibling folder and renames it into place
after ``oto_state.json``, written last, lists the size of every other file (see
:mod:`hf_oto.atomic`). A ``checkpoint-N`` folder is therefore complete when that list checks out;
folders without the list (written by Trainer alone, or by an older hf_oto) are judged by the files
Trainer writes.
"""

from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Iterable

from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME, TRAINER_STATE_NAME, TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import (ADAPTER_SAFE_WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME,
                                SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME)

from .atomic import remove_dir

OTO_CHECKPOINT_FILE = "oto_state.json"
_CHECKPOINT_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
_WEIGHT_FILES = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME,
                 ADAPTER_SAFE_WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME)


@dataclass(frozen=True)
class CheckpointStatus:
    """What a checkpoint folder lacks to be resumed with its OTO state."""

    path: str
    missing: tuple[str, ...] = ()
    #: A complete Trainer checkpoint written without OTO (no ``oto_state.json``, and training
    #: arguments that are not :class:`~hf_oto.OTOTrainingArguments`).
    foreign: bool = False

    @property
    def complete(self) -> bool:
        return not self.missing and not self.foreign

    @property
    def resumable_by_trainer(self) -> bool:
        return not self.missing


def inspect_checkpoint(folder: str | os.PathLike) -> CheckpointStatus:
    """Check a checkpoint folder against the file list its ``oto_state.json`` holds.

    Example:
        >>> os.makedirs("out/checkpoint-10")
        >>> status = inspect_checkpoint("out/checkpoint-10")
        >>> status.complete, status.missing[-3:]
        (False, ('trainer_state.json', 'rng_state.pth', 'oto_state.json'))
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return CheckpointStatus(folder, ("the folder itself",))
    state_file = os.path.join(folder, OTO_CHECKPOINT_FILE)
    if not os.path.isfile(state_file):
        missing = _missing_trainer_files(folder)
        if not missing and not _has_oto_arguments(folder):
            return CheckpointStatus(folder, foreign=True)
        return CheckpointStatus(folder, (*missing, OTO_CHECKPOINT_FILE))
    try:
        with open(state_file) as f:
            files = json.load(f).get("files")
    except (OSError, ValueError) as err:
        return CheckpointStatus(folder, (f"{OTO_CHECKPOINT_FILE} (unreadable: {err})",))
    if files is None:  # written before the file list existed
        return CheckpointStatus(folder, tuple(_missing_trainer_files(folder)))
    missing = []
    for name, size in files.items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            missing.append(name)
        elif os.path.getsize(path) != size:
            missing.append(f"{name} (truncated: {os.path.getsize(path)} of {size} bytes)")
    return CheckpointStatus(folder, tuple(missing))


def _missing_trainer_files(folder: str) -> list[str]:
    missing = []
    if not any(os.path.isfile(os.path.join(folder, name)) for name in _WEIGHT_FILES):
        missing.append(f"the model weights ({SAFE_WEIGHTS_NAME})")
    missing += [name for name in (OPTIMIZER_NAME, SCHEDULER_NAME, TRAINER_STATE_NAME)
                if not os.path.isfile(os.path.join(folder, name))]
    if not glob.glob(os.path.join(glob.escape(folder), "rng_state*.pth")):
        missing.append("rng_state.pth")
    return missing


def _has_oto_arguments(folder: str) -> bool:
    """Whether Trainer pickled OTOTrainingArguments into the folder: an OTOTrainer checkpoint that
    lost its state (older hf_oto versions wrote ``oto_state.json`` after the rest). The pickle is
    searched, not loaded: loading it would run whatever code it names."""
    try:
        with open(os.path.join(folder, TRAINING_ARGS_NAME), "rb") as f:
            return b"OTOTrainingArguments" in f.read()
    except OSError:
        return False


def write_oto_state(folder: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``oto_state.json`` into a checkpoint folder whose other files are all written: it
    records their sizes, so a resume can tell a complete checkpoint from a damaged one."""
    folder = os.fspath(folder)
    files = {}
    for root, _dirs, names in os.walk(folder):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), folder)
            if rel != OTO_CHECKPOINT_FILE:
                files[rel] = os.path.getsize(os.path.join(root, name))
    with open(os.path.join(folder, OTO_CHECKPOINT_FILE), "w") as f:
        f.write(json.dumps({**state, "files": dict(sorted(files.items()))}, indent=2, default=str))


def checkpoint_folders(output_dir: str | os.PathLike) -> list[str]:
    """The ``checkpoint-N`` folders of ``output_dir``, newest step first."""
    output_dir = os.fspath(output_dir)
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), entry) for entry in os.listdir(output_dir)
             if (m := _CHECKPOINT_NAME.match(entry)) and os.path.isdir(os.path.join(output_dir, entry))]
    return [os.path.join(output_dir, entry) for _, entry in sorted(found, reverse=True)]


def find_resumable_checkpoint(output_dir: str | os.PathLike) -> tuple[CheckpointStatus | None, list[CheckpointStatus]]:
    """The newest checkpoint that is not incomplete (complete, or a whole Trainer checkpoint
    written without OTO, which the caller refuses with its own message), and the incomplete ones
    newer than it.

    Example:
        >>> find_resumable_checkpoint("no-such-folder")
        (None, [])
    """
    skipped = []
    for folder in checkpoint_folders(output_dir):
        status = inspect_checkpoint(folder)
        if status.resumable_by_trainer:
            return status, skipped
        skipped.append(status)
    return None, skipped


def rotate_checkpoints(output_dir: str | os.PathLike, save_total_limit: int | None,
                       protect: Iterable[str | None] = ()) -> list[str]:
    """Delete the oldest complete checkpoints beyond ``save_total_limit``, as Trainer does, but
    counting complete ones only: an incomplete folder neither takes the place of a complete one
    nor gets deleted. ``protect`` (the checkpoint just written, the best one) is always kept.
    Returns the folders deleted.
    """
    if save_total_limit is None or save_total_limit <= 0:
        return []
    complete = [f for f in checkpoint_folders(output_dir) if inspect_checkpoint(f).resumable_by_trainer]
    keep = {os.path.abspath(p) for p in protect if p} & {os.path.abspath(f) for f in complete}
    # Oldest first by modification time, like Trainer: after resuming from an older checkpoint,
    # the newer folders of the abandoned run go first. Same times (coarse filesystems): by step.
    complete.sort(key=lambda f: (os.stat(f).st_mtime, int(_CHECKPOINT_NAME.match(os.path.basename(f)).group(1))))
    deleted = []
    remaining = len(complete)
    for folder in complete:
        if remaining <= max(save_total_limit, len(keep)):
            break
        if os.path.abspath(folder) not in keep:
            remove_dir(folder)
            deleted.append(folder)
            remaining -= 1
    return deleted


__all__ = ["OTO_CHECKPOINT_FILE", "CheckpointStatus", "checkpoint_folders", "find_resumable_checkpoint",
           "inspect_checkpoint", "rotate_checkpoints", "write_oto_state"]
