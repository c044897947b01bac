"""The files of a training run folder (``lora-rlhf train --out``), checked before ``--resume``
reads any of them: a missing or damaged file stops the run with one line that names it, before a
model is loaded or anything is written.

A run folder holds up to three saved states: the save at the end of the run (or at a stop), and
the two newest checkpoints (:mod:`lora_rlhf.cli.checkpoint`). :func:`choose_resume_source` picks the
one with the most phases done that is intact, and says which damaged ones it passed over."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lora_rlhf.adapters.files import (
    ADAPTER_CONFIG,
    RESAVE,
    AdapterFileError,
    damaged,
    one_line,
    read_adapter_config,
    read_adapter_weights,
)

# The files of a run folder (what :mod:`lora_rlhf.cli.recorder` writes); they are named here, with
# the folder's checks, so that the checks need nothing from the modules that write them.
METRICS_FILE = "metrics.jsonl"
CURVE_FILE = "reward_curve.png"
SAMPLES_MD = "samples.md"
SAMPLES_JSON = "samples.json"
TRAINER_STATE = "trainer_state.pt"
# a folder holding one of these holds a run
RUN_FILES = (ADAPTER_CONFIG, METRICS_FILE, "checkpoints")
SUMMARY_EVENT = "summary"  # metrics.jsonl's last line: {"event": "summary", ...}

FIX = (
    "this run cannot be resumed from it: restore the file from a copy, or start a new run "
    "with another --out (nothing was overwritten)"
)


class NoSavedRun(Exception):
    """A folder that holds no saved state at all (the message says what is missing)."""


def check_run_folder(folder: str | Path, fix: str = FIX) -> dict[str, Any]:
    """Check every file ``lora-rlhf train --resume`` reads from a run folder, before anything is
    loaded or written; return the adapter config.

    Raises :class:`AdapterFileError` with one line naming the first missing or damaged file.
    """
    import torch

    folder = Path(folder)
    try:
        config = read_adapter_config(folder)
    except FileNotFoundError:
        raise AdapterFileError(f"{folder / ADAPTER_CONFIG}: missing; {fix}") from None
    except AdapterFileError as err:
        raise AdapterFileError(str(err).replace(RESAVE, fix)) from None
    read_adapter_weights(folder, fix)
    state = folder / TRAINER_STATE
    if not state.is_file():
        raise AdapterFileError(f"{state}: missing; {fix}")
    try:
        saved = torch.load(state, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (torch raises many kinds for a damaged file)
        raise damaged(state, f"not a readable torch file: {one_line(err)}", fix) from None
    if not isinstance(saved, dict) or not {"optimizer", "rng"} <= saved.keys():
        raise damaged(state, "no optimizer or random-number state in it", fix)
    if "phase" in saved and saved["phase"] != config.get("phases_done"):
        # the save at the end replaces this file first and the config last: a kill in between
        why = f"it holds phase {saved['phase']}, {ADAPTER_CONFIG} {config.get('phases_done')}"
        raise damaged(state, f"{why}; a save that was cut short", fix)
    metrics = folder / METRICS_FILE
    if not metrics.is_file():
        raise AdapterFileError(f"{metrics}: missing; {fix}")
    for n, line in enumerate(metrics.read_text(errors="replace").splitlines(), 1):
        try:
            ok = not line.strip() or isinstance(json.loads(line), dict)
        except json.JSONDecodeError:
            ok = False
        if not ok:
            raise damaged(metrics, f"line {n} is not a JSON object", fix)
    samples = folder / SAMPLES_JSON
    if samples.exists():
        try:
            ok = isinstance(json.loads(samples.read_text()), dict)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            ok = False
        if not ok:
            raise damaged(samples, "not a JSON object", fix)
    return config


def _phases_done(folder: Path) -> float:
    """The phases done of a saved state, for ordering; +inf when its config is unreadable (it
    is then tried first, so that its damage is reported)."""
    try:
        done = json.loads((folder / ADAPTER_CONFIG).read_text()).get("phases_done")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return math.inf
    return done if isinstance(done, int) else math.inf


def choose_resume_source(path: str | Path) -> tuple[Path, Path, list[str]]:
    """Which saved state ``--resume PATH`` continues from: ``(state folder, run folder, notices)``.

    PATH is a run folder (its newest intact checkpoint, or its final save when that has more
    phases done: a checkpoint wins a tie, being written in one step), one checkpoint folder, or
    an adapter file (that folder's save, nothing else). A damaged state is passed over for the
    next one, with a one-line notice; when none is intact, the newest one's damage is raised as
    :class:`AdapterFileError`. Raises :class:`NoSavedRun` when there is nothing saved at all.
    """
    from lora_rlhf.cli.checkpoint import checkpoint_phase, list_checkpoints

    path = Path(path)
    if path.is_file():
        run_folder = path.parent
        candidates = [run_folder]
    elif checkpoint_phase(path) is not None:
        run_folder = path.parent.parent
        candidates = [path]
    else:
        run_folder = path
        candidates = list_checkpoints(path)
        if (path / ADAPTER_CONFIG).exists():
            candidates.append(path)
    if not candidates:
        raise NoSavedRun(f"no checkpoint and no {ADAPTER_CONFIG}")
    candidates.sort(key=lambda c: (_phases_done(c), c != run_folder), reverse=True)
    passed_over = []
    for candidate in candidates:
        try:
            check_run_folder(candidate, fix="")
        except AdapterFileError as err:
            passed_over.append(str(err).removesuffix("; "))
            continue
        notices = [f"{why}; resuming from {candidate} instead" for why in passed_over]
        return candidate, run_folder, notices
    check_run_folder(candidates[0])  # raises, with the fix in its message
    raise AssertionError("unreachable: the check above failed once already")


def metrics_past(run_folder: str | Path, phases_done: int) -> list[int | None]:
    """The phases of the lines of a run's ``metrics.jsonl`` past ``phases_done`` (None for a line
    that is not readable JSON, such as one cut short by a kill): what resuming drops."""
    file = Path(run_folder) / METRICS_FILE
    if not file.is_file():
        return []
    past: list[int | None] = []
    for line in file.read_text(errors="replace").splitlines():
        try:
            phase = json.loads(line).get("phase", -1) if line.strip() else -1
        except (json.JSONDecodeError, AttributeError):
            phase = None
        if phase is None or (isinstance(phase, int) and phase >= phases_done):
            past.append(phase)
    return past
