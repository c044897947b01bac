"""Whose classes to use: the library's, `solutions/`, `exercises/`, or a student's file or folder.

A submission is a single ``.py`` file defining ``Lora``, ``LoraHooks`` and
``TransformerWithValueHeadLora``, or a folder laid out like ``exercises/`` (its
``section2_lora.py``). It imports Section 1 code from ``lora_rlhf``.
"""

from __future__ import annotations

import importlib.util
import itertools
import sys
from pathlib import Path
from types import ModuleType

import lora_rlhf

REQUIRED = ("Lora", "LoraHooks", "TransformerWithValueHeadLora")
EXERCISE_FILE = "section2_lora.py"
_counter = itertools.count()


class ImplementationError(RuntimeError):
    """A submission that cannot be used, with what is wrong and how to fix it."""


def repo_root() -> Path | None:
    """The source checkout holding `solutions/` and `exercises/`, when installed from one."""
    root = Path(lora_rlhf.__file__).resolve().parents[2]
    return root if (root / "solutions").is_dir() else None


def resolve_path(spec: str | Path) -> Path:
    """`solutions`/`exercises` name the checkout's folders; anything else is a path."""
    if str(spec) in ("solutions", "exercises") and not Path(spec).exists():
        root = repo_root()
        if root is None:
            raise ImplementationError(
                f"--impl {spec}: no {spec}/ folder found next to the installed package; "
                "give the path to the folder or file instead"
            )
        spec = root / str(spec)
    path = Path(spec)
    if path.is_dir():
        path = path / EXERCISE_FILE
    if not path.exists():
        raise ImplementationError(
            f"{path}: no such file (a submission is a .py file or a folder holding {EXERCISE_FILE})"
        )
    if path.suffix != ".py":
        raise ImplementationError(f"{path}: a submission must be a .py file")
    return path


def load_module(path: Path) -> ModuleType:
    """Import a file as a fresh module (a unique name, so two submissions never collide)."""
    name = f"lora_rlhf_submission_{next(_counter)}_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def load_impl(spec: str | Path = "library", require: tuple[str, ...] = REQUIRED) -> ModuleType:
    """The module whose `Lora`, `LoraHooks`, `TransformerWithValueHeadLora` are under test."""
    if str(spec) == "library":
        import lora_rlhf.lessons.section2_lora as lora

        return lora
    path = resolve_path(spec)
    module = load_module(path)
    missing = [n for n in require if not isinstance(getattr(module, n, None), type)]
    if missing:
        raise ImplementationError(
            f"{path} does not define {', '.join(missing)} (each must be a class)"
        )
    return module


def load_section(spec: str | Path, file_name: str, library_module: str) -> ModuleType:
    """The module of a bonus section under test: ``library`` (the library's `library_module`),
    ``solutions``, ``exercises``, a folder holding `file_name`, or a ``.py`` file."""
    if str(spec) == "library":
        return importlib.import_module(library_module)
    path = Path(spec)
    if str(spec) in ("solutions", "exercises") and not path.exists() and repo_root() is not None:
        path = repo_root() / str(spec)
    if path.is_dir():
        path = path / file_name
    if not path.is_file():
        raise ImplementationError(f"{path}: no such file (this section lives in {file_name})")
    return load_module(path)
