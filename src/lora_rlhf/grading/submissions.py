"""Where a submission's code is: a ``.py`` file, or a folder holding ``section2_lora.py`` (or a
single ``.py`` file, or a single notebook, as Gradescope and class uploads deliver them); and who
the students of a class folder are."""

from __future__ import annotations

from pathlib import Path

from lora_rlhf.authoring.implementations import EXERCISE_FILE, ImplementationError, resolve_path

IGNORED = ("__pycache__", "__MACOSX", ".ipynb_checkpoints")
NOTEBOOK = ".ipynb"


def notebook_as_script(notebook: Path, folder: Path) -> Path:
    """The notebook's code cells as a percent-format script in `folder` (jupytext reads the JSON;
    nothing of the notebook runs). IPython magics become comments, as jupytext writes them."""
    import jupytext

    try:
        script = jupytext.writes(jupytext.read(notebook), fmt="py:percent")
    except Exception as exc:  # noqa: BLE001  (a damaged notebook: any JSON or format error)
        raise ImplementationError(f"{notebook}: not a readable notebook ({exc})") from None
    path = folder / f"{notebook.stem}.py"
    path.write_text(script)
    return path


def _python_files(folder: Path, suffix: str = ".py") -> list[Path]:
    return sorted(
        p
        for p in folder.rglob(f"*{suffix}")
        if p.is_file()
        and not any(
            part in IGNORED or part.startswith(".") for part in p.parts[len(folder.parts) :]
        )
    )


def submission_file(spec: str | Path) -> Path:
    """The file to grade for `spec`: the file itself; in a folder, its ``section2_lora.py`` (at
    the top, or the only one below), else its only ``.py`` file, else its only notebook. (A
    folder that also holds ``section2_lora.ipynb`` beside the script has both graded: see
    :func:`twin_files`.)

    Raises :class:`ImplementationError` (one line, naming the problem) when there is none or more
    than one to choose from.
    """
    path = Path(spec)
    if path.suffix == NOTEBOOK and path.is_file():
        return path
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
        notebooks = _python_files(path, NOTEBOOK)
        if len(notebooks) == 1:
            return notebooks[0]
        raise ImplementationError(f"{path}: no .py file to grade (expected {EXERCISE_FILE})")
    shown = ", ".join(str(p.relative_to(path)) for p in (named or files)[:4])
    raise ImplementationError(
        f"{path}: {len(named or files)} candidate files ({shown}): name the one to grade "
        f"{EXERCISE_FILE}"
    )


def twin_files(spec: str | Path, name: str = EXERCISE_FILE) -> tuple[Path, Path] | None:
    """``(script, notebook)`` when the folder `spec` holds the exercise file `name` and its
    notebook side by side (as exercises/ does), else None. Which one the student worked in cannot
    be told from the files (Jupyter autosaves an untouched notebook), so both are graded."""
    path = Path(spec)
    if not path.is_dir():
        return None
    script = path / name
    if not script.is_file():
        found = [p for p in _python_files(path) if p.name == name]
        if len(found) != 1:
            return None
        script = found[0]
    notebook = script.with_suffix(NOTEBOOK)
    return (script, notebook) if notebook.is_file() else None


def students(folder: Path) -> dict[str, Path]:
    """A class folder's students: each ``.py`` file (named by its stem) and each sub-folder."""
    found: dict[str, Path] = {}
    for entry in sorted(folder.iterdir(), key=lambda p: (p.stem, p.suffix != ".py", p.name)):
        if entry.name.startswith(".") or entry.name in IGNORED:
            continue
        if entry.is_dir():
            found[entry.name] = entry
        elif entry.suffix in (".py", NOTEBOOK):
            found.setdefault(entry.stem, entry)
    return found
