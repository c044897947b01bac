"""Grade a submission: static checks, then the probes in child processes, then the judges here.

The verdict of every check is reached in this process by the check's judge, from plain data the
probe sent back; nothing the submission does in its own process can change a judge, a reference
or this process's libraries.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import lora_rlhf.grading.sandbox as sandbox
import lora_rlhf.grading.static as static
from lora_rlhf.grading.sandbox import Limits, Outcome
from lora_rlhf.grading.submissions import (
    NOTEBOOK,
    notebook_as_script,
    submission_file,
    twin_files,
)
from lora_rlhf.grading.verdicts import failed_result, verdict

__all__ = ["GradeReport", "Limits", "grade"]


@dataclass
class GradeReport:
    submission: str
    results: list  # CheckResult, in rubric order
    notes: list[str] = field(default_factory=list)  # grading-wide remarks (syntax error, tampering)
    execution_time: float = 0.0
    limits: Limits = field(default_factory=Limits)
    bonus: list = field(default_factory=list)  # CheckResult of the optional GRPO bonus (.bonus)

    @property
    def score(self) -> float:
        return round(sum(r.points for r in self.results), 6)

    @property
    def max_score(self) -> float:
        return round(sum(r.max_points for r in self.results), 6)

    @property
    def bonus_score(self) -> float:
        """Optional bonus points, on top of :attr:`score` (whose maximum stays Section 2's)."""
        return round(sum(r.points for r in self.bonus), 6)

    def bonus_by_exercise(self) -> dict[str, list]:
        """:attr:`bonus` grouped as :meth:`by_exercise` groups the results, labelled as bonus."""
        out: dict[str, list] = {}
        for r in self.bonus:
            out.setdefault(f"Bonus (GRPO): {r.exercise}", []).append(r)
        return out

    def by_exercise(self) -> dict[str, list]:
        out: dict[str, list] = {}
        for r in self.results:
            out.setdefault(r.exercise, []).append(r)
        return out


def _not_written(planned: list, results: dict) -> list[str]:
    """A note for each exercise whose class the submission does not define (its checks score 0)."""
    from lora_rlhf.checks import EXERCISES

    notes = []
    for number, exercise in enumerate(EXERCISES, 1):
        own = [results[c.name] for c in planned if c.exercise == exercise]
        if own and all(f"does not define {exercise}" in r.message for r in own):
            notes.append(
                f"Exercise {number} ({exercise}) is not written: the submission does not define "
                f"{exercise}, so its checks score 0."
            )
    return notes


def grade(
    submission: str | Path, limits: Limits | None = None, checks: Iterable[str] | None = None
) -> GradeReport:
    """Grade a submission file or folder against every check (or only the named `checks`).

    A folder holding both ``section2_lora.py`` and ``section2_lora.ipynb`` has both graded and
    the better kept (the script on a tie), the report naming both: an untouched or older twin,
    such as a notebook Jupyter autosaved after the script was finished, never costs points.

    Raises :class:`lora_rlhf.authoring.implementations.ImplementationError` when `submission` does not exist; every
    other problem of the submission (syntax error, crash, hang, tampering) is a graded failure.
    """
    from lora_rlhf.grading.bonus import grade_bonus

    limits = limits or Limits()
    start = time.monotonic()
    twins = twin_files(submission)
    if twins is None:
        path = submission_file(submission).resolve()
        report = _grade_file(path, limits, checks)
    else:
        path = twins[0].resolve()
        graded = [_grade_file(p.resolve(), limits, checks) for p in twins]
        report = max(graded, key=lambda r: r.score)  # the first, the script, on a tie
        kept = Path(report.submission).name
        both = " and ".join(
            f"{Path(r.submission).name} ({r.score:g} / {r.max_score:g})" for r in graded
        )
        report.notes.insert(0, f"Graded both {both}; kept the better, {kept}.")
    if checks is None:
        bonus, bonus_notes = grade_bonus(submission, limits)
        if not bonus and not bonus_notes and Path(submission).resolve() != path:
            bonus, bonus_notes = grade_bonus(path, limits)  # e.g. a folder's only notebook
        report.bonus, report.notes = bonus, report.notes + bonus_notes
    report.execution_time = time.monotonic() - start
    return report


def _grade_file(path: Path, limits: Limits, checks: Iterable[str] | None) -> GradeReport:
    """Section 2's checks on one file (a notebook graded as its script); no bonus."""
    start = time.monotonic()
    if path.suffix == NOTEBOOK:  # graded as its script
        with tempfile.TemporaryDirectory(prefix="lora-rlhf-notebook-") as folder:
            report = _grade_file(notebook_as_script(path, Path(folder)), limits, checks)
        report.submission = str(path)
        return report
    problem = static.syntax_error(path)
    if problem is None:
        sandbox.start_server()  # imports torch in the background while this process does too

    from lora_rlhf.grading.rubric import rubric

    planned = [c for cs in rubric().values() for c in cs]
    if checks is not None:
        wanted = set(checks)
        unknown = wanted - {c.name for c in planned}
        if unknown:
            raise ValueError(f"unknown checks: {', '.join(sorted(unknown))}")
        planned = [c for c in planned if c.name in wanted]

    results: dict[str, object] = {}
    notes: list[str] = []
    if problem:
        notes.append(f"The submission does not compile: {problem}")
        results = {c.name: failed_result(c, f"syntax error: {problem}") for c in planned}
    else:
        scan = static.scan(path)
        if scan.tampering:
            notes.append(
                "No points: the submission tampers with the grading environment:\n"
                + "\n".join(f"  {path.name} {f}" for f in scan.tampering)
            )
            first = scan.tampering[0]
            message = f"tampering ({path.name} line {first.line}: {first.message}): no points"
            results = {c.name: failed_result(c, message) for c in planned}
        if scan.reused:
            notes.append(
                "No points for exercises that reuse the library's reference classes:\n"
                + "\n".join(f"  {path.name} {f}" for f in scan.reused.values())
            )
        for c in planned:
            culprit = next((n for n in (c.exercise, *c.needs) if n in scan.reused), None)
            if c.name not in results and culprit:
                finding = scan.reused[culprit]
                results[c.name] = failed_result(
                    c, f"no points: {finding.message} (line {finding.line})"
                )

    to_run = [c for c in planned if c.name not in results]
    if to_run:
        by_name = {c.name: c for c in to_run}

        def emit(outcome: Outcome) -> None:
            results[outcome.check] = verdict(by_name[outcome.check], outcome, limits)

        with tempfile.TemporaryDirectory(prefix="lora-rlhf-grade-") as scratch:
            sandbox.run_probes(path, [c.name for c in to_run], limits, emit, Path(scratch))
        for c in to_run:  # never leave a check without a verdict
            results.setdefault(c.name, failed_result(c, "not graded"))

    notes += _not_written(planned, results)
    return GradeReport(
        submission=str(path),
        results=[results[c.name] for c in planned],
        notes=notes,
        execution_time=time.monotonic() - start,
        limits=limits,
    )
