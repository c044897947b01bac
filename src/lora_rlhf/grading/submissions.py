"""Where a submission's code is: a ``.py`` file, or a folder holding ``section2_lora.py`` (or a
single ``.py`` file, as Gradescope and class uploads deliver them); and who the students of a
class folder are."""

from __future__ import annotations

from pathlib import Path

from lora_rlhf.impl import EXERCISE_FILE, ImplementationError, resolve_path

IGNORED = ("__pycache__", "__MACOSX")


def _python_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*.py")
        if p.is_file()
        and not any(
            part in IGNORED or part.startswith(".") for part in p.parts[len(folder.parts) :]
        )
    )


def submission_file(spec: str | Path) -> Path:
    """The file to grade for `spec`: the file itself; in a folder, its ``section2_lora.py`` (at
    the top, or the only one below), else its only ``.py`` file.

    Raises :class:`ImplementationError` (one line, naming the problem) when there is none or more
    than one to choose from.
    """
    path = Path(spec)
    if not path.is_dir():
        return resolve_path(spec)
    if (path / EXERCISE_FILE).is_file():
        return path / EXERCISE_FILE
    files = _python_files(path)
    named = [p for p in files if p.name == EXERCISE_FILE]
    for choice in (named, files):
        if len(choice) == 1:
            return choice[0]
    if not files:
        raise ImplementationError(f"{path}: no .py file to grade (expected {EXERCISE_FILE})")
    shown = ", ".join(str(p.relative_to(path)) for p in (named or files)[:4])
    raise ImplementationError(
        f"{path}: {len(named or files)} candidate files ({shown}): name the one to grade "
        f"{EXERCISE_FILE}"
    )


def students(folder: Path) -> dict[str, Path]:
    """A class folder's students: each ``.py`` file (named by its stem) and each sub-folder."""
    found: dict[str, Path] = {}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(".") or entry.name in IGNORED:
            continue
        if entry.is_dir():
            found[entry.name] = entry
        elif entry.suffix == ".py":
            found[entry.stem] = entry
    return found
