"""The optional bonus of `lora-rlhf grade`: the GRPO section (``section3_grpo.py``).

Graded as Section 2 is — a syntax check, the tampering scan, the probes in sandboxed workers, every
verdict reached here by the checks' judges (:mod:`lora_rlhf.checks.grpo_checks`) — but kept apart:
its points come on top of Section 2's 100 and its maximum is not part of the report's. A submission
without a GRPO file has no bonus (nothing is run, nothing is reported); one that imports the
library's own GRPO code (``lora_rlhf.lessons.section3_grpo``, ``lora_rlhf.cli.grpo_trainer``) scores no bonus points.
"""

from __future__ import annotations

import ast
import tempfile
from pathlib import Path

import lora_rlhf.grading.sandbox as sandbox
import lora_rlhf.grading.static as static
from lora_rlhf.authoring.implementations import ImplementationError
from lora_rlhf.authoring.sync import definitions
from lora_rlhf.checks.grpo_checks import GRPO_EXERCISES, GRPO_FILE, grpo_checks_for
from lora_rlhf.grading.sandbox import Limits, Outcome
from lora_rlhf.grading.submissions import IGNORED, NOTEBOOK, notebook_as_script, twin_files
from lora_rlhf.grading.verdicts import failed_result, verdict

LIBRARY_GRPO = ("lora_rlhf.lessons.section3_grpo", "lora_rlhf.cli.grpo_trainer")


def bonus_file(submission: str | Path) -> Path | None:
    """The submission's GRPO file: ``section3_grpo.py`` in a submission folder (at the top, or
    the only one below; a notebook twin beside it is graded too, see :func:`grade_bonus`), or a
    single-file submission (script or notebook) that defines a GRPO exercise; else None."""
    path = Path(submission)
    if path.is_dir():
        found = [path / GRPO_FILE] if (path / GRPO_FILE).is_file() else []
        found = found or [p for p in path.rglob(GRPO_FILE) if p.is_file() and _kept(p, path)]
        if len(found) != 1:
            notebooks = [p for p in path.rglob(NOTEBOOK_NAME) if p.is_file() and _kept(p, path)]
            return notebooks[0] if not found and len(notebooks) == 1 else None
        return found[0]
    if path.suffix not in (".py", NOTEBOOK) or not path.is_file():
        return None
    try:
        with tempfile.TemporaryDirectory(prefix="lora-rlhf-bonus-") as folder:
            text = _script(path, Path(folder)).read_text(errors="replace")
        defined = definitions(text)
    except (SyntaxError, ValueError, ImplementationError):
        return None
    return path if defined & set(GRPO_EXERCISES) else None


NOTEBOOK_NAME = Path(GRPO_FILE).with_suffix(NOTEBOOK).name


def _kept(path: Path, root: Path) -> bool:
    return not any(p in IGNORED or p.startswith(".") for p in path.parts[len(root.parts) :])


def _script(path: Path, folder: Path) -> Path:
    """`path` itself, or for a notebook its code cells as a script in `folder`."""
    return notebook_as_script(path, folder) if path.suffix == NOTEBOOK else path


def imports_library_grpo(path: Path) -> int | None:
    """The line of the first import of the library's GRPO code (the reference solution), or None."""
    for node in ast.walk(static.parse(path.read_bytes(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        if any(n == m or n.startswith(m + ".") for n in names for m in LIBRARY_GRPO):
            return node.lineno
    return None


def grade_bonus(submission: str | Path, limits: Limits | None = None) -> tuple[list, list[str]]:
    """``(results, notes)`` of the GRPO checks for a submission (``([], [])`` without a GRPO
    file): one CheckResult per check, in the bonus rubric's order. A script and its notebook
    side by side are both graded and the better kept, as for Section 2; a GRPO file whose every
    exercise is still a stub is one note ("not attempted") and no results."""
    found = bonus_file(submission)
    if found is None:
        return [], []
    twins = twin_files(submission, GRPO_FILE)
    if twins is None or found != twins[0]:
        results, notes = _grade_found(found, limits)
        return _attempted(found, results, notes)
    graded = [(p, *_grade_found(p, limits)) for p in twins]
    path, results, notes = max(graded, key=lambda g: sum(r.points for r in g[1]))
    both = " and ".join(f"{p.name} ({sum(r.points for r in rs):g})" for p, rs, _ in graded)
    results, notes = _attempted(path, results, notes)
    if not results:  # neither was attempted: one line
        return results, notes
    return results, [f"Bonus (GRPO): graded both {both}; kept the better, {path.name}.", *notes]


def _attempted(path: Path, results: list, notes: list[str]) -> tuple[list, list[str]]:
    """No results and one note when every check met an untouched stub."""
    if results and all(
        r.message.startswith(("raised not implemented yet", "not written")) for r in results
    ):
        return [], [f"Bonus (GRPO): {path.name} not attempted (its exercises are still stubs)."]
    return results, notes


def _grade_found(found: Path, limits: Limits | None) -> tuple[list, list[str]]:
    with tempfile.TemporaryDirectory(prefix="lora-rlhf-bonus-") as folder:
        try:
            path = _script(found.resolve(), Path(folder))
        except ImplementationError as err:
            message = f"Bonus (GRPO): {err}"
            return [failed_result(c, str(err)) for c in grpo_checks_for()], [message]
        return _grade_file(path, limits or Limits())


def _grade_file(path: Path, limits: Limits) -> tuple[list, list[str]]:
    checks = grpo_checks_for()
    problem = static.syntax_error(path)
    if problem:
        note = f"Bonus (GRPO): {path.name} does not compile: {problem}"
        return [failed_result(c, f"syntax error: {problem}") for c in checks], [note]
    scan = static.scan(path)
    if scan.tampering:
        first = scan.tampering[0]
        message = f"tampering ({path.name} line {first.line}: {first.message}): no points"
        note = f"Bonus (GRPO): no points for tampering ({path.name} line {first.line}: {first.message})"
        return [failed_result(c, message) for c in checks], [note]
    line = imports_library_grpo(path)
    if line is not None:
        message = f"no points: {path.name} line {line} imports the library's GRPO solution"
        return [failed_result(c, message) for c in checks], [f"Bonus (GRPO): {message}"]

    results: dict[str, object] = {}
    by_name = {c.name: c for c in checks}

    def emit(outcome: Outcome) -> None:
        results[outcome.check] = verdict(by_name[outcome.check], outcome, limits)

    sandbox.start_server()
    with tempfile.TemporaryDirectory(prefix="lora-rlhf-grade-bonus-") as scratch:
        sandbox.run_probes(path, list(by_name), limits, emit, Path(scratch))
    return [results.get(c.name) or failed_result(c, "not graded") for c in checks], []
