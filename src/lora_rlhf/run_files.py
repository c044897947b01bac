"""The files of a training run folder (``lora-rlhf train --out``), checked before ``--resume``
reads any of them: a missing or damaged file stops the run with one line that names it, before a
model is loaded or anything is written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lora_rlhf.adapters import (
    ADAPTER_CONFIG,
    RESAVE,
    AdapterFileError,
    damaged,
    one_line,
    read_adapter_config,
    read_adapter_weights,
)


def check_run_folder(folder: str | Path) -> dict[str, Any]:
    """Check every file ``lora-rlhf train --resume`` reads from a run folder, before anything is
    loaded or written; return the adapter config.

    Raises :class:`AdapterFileError` with one line naming the first missing or damaged file.
    """
    import torch

    from lora_rlhf.train_outputs import METRICS_FILE, SAMPLES_JSON, TRAINER_STATE

    folder = Path(folder)
    fix = (
        "this run cannot be resumed from it: restore the file from a copy, or start a new run "
        "with another --out (nothing was overwritten)"
    )
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
