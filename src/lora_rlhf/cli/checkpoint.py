"""Checkpoints written during a `lora-rlhf train` run, so that a killed run can be resumed.

Every ``--save-every`` phases the run writes ``checkpoints/phase-NNNNNN/`` inside its folder
(NNNNNN: the phases done). It holds the same files as the save at the end of a run (adapter,
config, trainer state, metrics, samples), so a checkpoint is itself a saved run that
``--resume`` and :func:`~lora_rlhf.adapters.files.load_lora_model` read.

A checkpoint is written into a temporary folder beside the others, each file is flushed to the
disk (fsync), and the folder is then renamed into place in one step (``os.replace``). A kill at
any moment therefore leaves either the whole new checkpoint or none of it. The newest checkpoint
and the one before it are kept, so that ``--resume`` can fall back when the newest is damaged.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

CHECKPOINTS_DIR = "checkpoints"
_NAME = re.compile(r"phase-(\d{6,})")
_WRITING = ".writing-"  # a checkpoint being written; left behind only by a kill
_OLD = ".old-"  # a checkpoint being replaced (a resumed run reaching the same phase again)


def checkpoint_phase(path: Path) -> int | None:
    """The phases done of a checkpoint folder, from its name; None for any other path."""
    match = _NAME.fullmatch(Path(path).name)
    return int(match.group(1)) if match and Path(path).parent.name == CHECKPOINTS_DIR else None


def list_checkpoints(run_folder: str | Path) -> list[Path]:
    """The checkpoint folders of a run, newest (most phases done) first."""
    folder = Path(run_folder) / CHECKPOINTS_DIR
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and checkpoint_phase(p) is not None]
    return sorted(found, key=checkpoint_phase, reverse=True)


def _sync(path: Path) -> None:
    """Flush a file (or a folder's list of names) to the disk."""
    fd = os.open(path, os.O_RDONLY if path.is_dir() else os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_folder(folder: Path) -> None:
    try:
        _sync(folder)
    except OSError:  # some filesystems (and Windows) cannot open or sync a folder
        pass


def write_checkpoint(
    run_folder: str | Path, phases_done: int, fill: Callable[[Path], None]
) -> Path:
    """Write checkpoint ``phases_done`` of a run: ``fill(folder)`` writes its files into an empty
    temporary folder, which then replaces the checkpoint in one rename; older checkpoints but
    the newest one before it are removed afterwards. Returns the checkpoint's folder."""
    parent = Path(run_folder) / CHECKPOINTS_DIR
    parent.mkdir(parents=True, exist_ok=True)
    target = parent / f"phase-{phases_done:06d}"
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=_WRITING))
    fill(tmp)
    for file in sorted(tmp.iterdir()):
        _sync(file)
    _sync_folder(tmp)
    if target.exists():  # only ever an abandoned run's: the rename needs the name free
        old = Path(tempfile.mkdtemp(dir=parent, prefix=_OLD))
        os.replace(target, old / target.name)
    os.replace(tmp, target)
    _sync_folder(parent)
    _prune(parent, keep=target)
    return target


def _prune(parent: Path, keep: Path) -> None:
    """Keep ``keep`` and the newest checkpoint before it; remove the rest (older ones, those of
    an abandoned run past ``keep``, and what a kill left half-written)."""
    phase = checkpoint_phase(keep)
    older = [p for p in list_checkpoints(parent.parent) if checkpoint_phase(p) < phase]
    for path in parent.iterdir():
        leftover = path.name.startswith((_WRITING, _OLD))
        if path != keep and (
            leftover or (checkpoint_phase(path) is not None and path not in older[:1])
        ):
            shutil.rmtree(path, ignore_errors=True)


__all__ = ["CHECKPOINTS_DIR", "checkpoint_phase", "list_checkpoints", "write_checkpoint"]
