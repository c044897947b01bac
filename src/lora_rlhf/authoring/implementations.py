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
    dont_write = sys.dont_write_bytecode
    sys.dont_write_bytecode = True  # leave no __pycache__/ beside a student's file
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    finally:
        sys.dont_write_bytecode = dont_write
    return module


# Each section's exercise file and the library module that solves it: `load_section` reads a
# submission of any of them the same way.
SECTIONS = {
    "section2": (EXERCISE_FILE, "lora_rlhf.lessons.section2_lora"),
    "grpo": ("section3_grpo.py", "lora_rlhf.lessons.section3_grpo"),
    "mlp": ("bonus_mlp_lora.py", "lora_rlhf.lessons.bonus_mlp_lora"),
    "fast": ("bonus_fast_lora.py", "lora_rlhf.lessons.bonus_fast_lora"),
}

# Classes an exercise file is given rather than asked to write: a single-file submission may
# leave them out, and then runs with the library's (the module named here).
GIVEN = {
    "RLHFArgsLora": SECTIONS["section2"][1],
    "GRPOArgsLora": SECTIONS["grpo"][1],
}


def load_impl(spec: str | Path = "library", require: tuple[str, ...] = REQUIRED) -> ModuleType:
    """The module whose `Lora`, `LoraHooks`, `TransformerWithValueHeadLora` are under test."""
    if str(spec) == "library":
        # by name, as every section's library module (the lessons import their check runners,
        # which read this module: a static import here would close that loop)
        return importlib.import_module(SECTIONS["section2"][1])
    path = resolve_path(spec)
    module = load_module(path)
    missing = [n for n in require if not isinstance(getattr(module, n, None), type)]
    if missing:
        raise ImplementationError(
            f"{path} does not define {', '.join(missing)} (each must be a class)"
        )
    return module


def load_section(section: str, spec: str | Path = "library") -> ModuleType:
    """The module of `section` (a key of :data:`SECTIONS`) under test: ``library`` (the library's
    own), ``solutions``, ``exercises``, a folder holding the section's file, or a ``.py`` file."""
    if section not in SECTIONS:
        raise ImplementationError(f"no section {section!r}: choose one of {', '.join(SECTIONS)}")
    file_name, library_module = SECTIONS[section]
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


def given_class(impl, name: str) -> type:
    """`impl`'s class `name` (one of :data:`GIVEN`), or the library's when `impl` leaves it out.

    The checks call this instead of importing a lesson, so no check depends on the lessons."""
    cls = getattr(impl, name, None)
    return cls if isinstance(cls, type) else getattr(importlib.import_module(GIVEN[name]), name)
