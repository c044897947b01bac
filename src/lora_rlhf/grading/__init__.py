"""The grader: `lora-rlhf grade [PATH]` scores a submission against every check (`grade-class`
a whole class, `gradescope-bundle` the Gradescope autograder).

* :mod:`~lora_rlhf.grading.rubric` — points per check and per exercise (total 100).
* :mod:`~lora_rlhf.grading.static` — before anything runs: syntax errors, tampering, reuse of the
  library's reference classes (an AST scan; the submission is never executed here).
* :mod:`~lora_rlhf.grading.sandbox` — runs the probes in child processes forked from a
  pre-imported server, with time and memory limits; :mod:`~lora_rlhf.grading.worker` is the child.
* :mod:`~lora_rlhf.grading.grader` — the verdicts (judges run in the grading process only).
* :mod:`~lora_rlhf.grading.reports` — console scorecard, Gradescope ``results.json``, JUnit XML.
* :mod:`~lora_rlhf.grading.timing` — each check's time limit, from the reference's measured time.
* :mod:`~lora_rlhf.grading.submissions` — which file of a folder is graded; a class's students.
* :mod:`~lora_rlhf.grading.classroom` — ``lora-rlhf grade-class``: a class to a CSV gradebook.
* :mod:`~lora_rlhf.grading.gradescope` — ``lora-rlhf gradescope-bundle``: the autograder zip.

This package is imported by the forked workers too, so it imports nothing heavy at top level.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from lora_rlhf.grading.grader import GradeReport, Limits

__all__ = ["GradeReport", "Limits", "grade"]


def grade(*args, **kwargs) -> GradeReport:
    """Grade a submission; see :func:`lora_rlhf.grading.grader.grade`."""
    from lora_rlhf.grading.grader import grade as _grade

    return _grade(*args, **kwargs)


def __getattr__(name: str):
    if name in ("GradeReport", "Limits"):
        import lora_rlhf.grading.grader as grader

        return getattr(grader, name)
    raise AttributeError(name)
