"""The class report: which mistakes a class made, for the instructor planning the next lesson.

Built only from the files ``grade-class`` already wrote for each student (``OUT/<student>/
results.json`` and ``grade.json``), so it is rebuilt without grading anything
(``lora-rlhf grade-class DIR --report-only``). It writes, next to ``gradebook.csv``:

* ``class_report.md`` — the score distribution, the mean points per exercise, every check sorted
  from most to least failed (how many students failed it, what it checks, the most common failure
  message among them), and, apart, the students whose grading timed out or crashed;
* ``scores.png`` — the score histogram with its mean and median, and the failures per check.
"""

from __future__ import annotations

import csv
import json
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPORT_FILE = "class_report.md"
SCORES_FILE = "scores.png"
RESULTS, RECORD, GRADEBOOK = "results.json", "grade.json", "gradebook.csv"
# How the sandbox words a check it could not finish (lora_rlhf.grading.sandbox): not a mistake in
# the student's formulas but a submission to look at by hand.
INCOMPLETE_SIGNS = (
    "timed out",
    "overall time limit",
    "crashed",
    "was killed",
    "stopped responding",
    "the submission exited",
    "could not talk to the submission",
)


@dataclass
class CheckOutcome:
    name: str
    exercise: str
    passed: bool
    points: float
    max_points: float
    description: str  # what the check tests
    message: str  # the failure message ("" when passed)


@dataclass
class StudentResults:
    student: str
    score: float  # Section 2's score (the bonus is not in it)
    max_score: float
    checks: list[CheckOutcome]
    notes: list[str] = field(default_factory=list)

    def incomplete(self) -> list[CheckOutcome]:
        """The checks whose grading timed out or crashed."""
        return [c for c in self.checks if not c.passed and is_incomplete(c.message)]


def is_incomplete(message: str) -> bool:
    return any(sign in message for sign in INCOMPLETE_SIGNS)


def _outcome(test: dict) -> CheckOutcome:
    """One entry of results.json's ``tests`` read back. Its ``output`` is the check's description,
    then, for a failure, a blank line and the message (lora_rlhf.grading.reports.gradescope)."""
    exercise, name = test["name"].split(": ", 1)
    if test.get("tags", [])[:1] == ["bonus"]:
        exercise = f"bonus: {test['tags'][-1]}"
    passed = test.get("status") == "passed"
    description, _, message = test.get("output", "").partition("\n\n")
    return CheckOutcome(
        name,
        exercise,
        passed,
        test["score"],
        test["max_score"],
        description.strip(),
        "" if passed else message.strip(),
    )


def read_student(folder: Path) -> StudentResults:
    results = json.loads((folder / RESULTS).read_text())
    record = json.loads((folder / RECORD).read_text())
    return StudentResults(
        student=record.get("student", folder.name),
        score=float(record["score"]),
        max_score=float(record["max_score"]),
        checks=[_outcome(t) for t in results["tests"]],
        notes=list(record.get("notes", [])),
    )


def roster(out: Path) -> list[str]:
    """The students of the last ``grade-class`` run: gradebook.csv's rows, else every sub-folder
    holding a results.json."""
    gradebook = out / GRADEBOOK
    if gradebook.is_file():
        with gradebook.open(newline="") as f:
            return [row["student"] for row in csv.DictReader(f)]
    return sorted(p.parent.name for p in out.glob(f"*/{RESULTS}"))


def first_line(message: str, limit: int = 160) -> str:
    line = (message.strip().splitlines() or ["failed"])[0].strip()
    return line if len(line) <= limit else line[: limit - 1] + "…"


def failure_kind(message: str) -> str:
    """What a failure message says before its details: the first line up to " — ", after which
    the checks list the numbers (which differ between students who made the same mistake)."""
    return first_line(message).split(" — ", 1)[0]


@dataclass
class CheckSummary:
    name: str
    exercise: str
    description: str
    failed: list[str]  # students
    common_message: str  # the most common failure_kind among the failures, "" if none failed
    common_count: int


def check_summaries(students: list[StudentResults]) -> list[CheckSummary]:
    """Every check, most failed first (ties in rubric order)."""
    order: dict[str, CheckOutcome] = {}
    for s in students:
        for c in s.checks:
            order.setdefault(c.name, c)
    out = []
    for name, first in order.items():
        failures = [(s.student, c) for s in students for c in s.checks if c.name == name]
        failures = [(st, c) for st, c in failures if not c.passed]
        messages = Counter(failure_kind(c.message) for _, c in failures)
        common, count = messages.most_common(1)[0] if messages else ("", 0)
        out.append(CheckSummary(name, first.exercise, first.description, [st for st, _ in failures],
                                common, count))  # fmt: skip
    return sorted(out, key=lambda c: -len(c.failed))  # stable: rubric order among ties


def exercise_means(students: list[StudentResults]) -> dict[str, tuple[float, float, int]]:
    """Exercise → (mean points, maximum points, students with full marks)."""
    totals: dict[str, list[tuple[float, float]]] = {}
    for s in students:
        per: dict[str, list[float]] = {}
        for c in s.checks:
            got, most = per.setdefault(c.exercise, [0.0, 0.0])
            per[c.exercise] = [got + c.points, most + c.max_points]
        for exercise, (got, most) in per.items():
            totals.setdefault(exercise, []).append((got, most))
    return {
        ex: (
            statistics.fmean(g for g, _ in rows),
            max(m for _, m in rows),
            sum(g >= m for g, m in rows),
        )  # fmt: skip
        for ex, rows in totals.items()
    }


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def _points(x: float) -> str:
    return f"{x:.1f}".removesuffix(".0")


def markdown(out: Path, students: list[StudentResults]) -> str:
    scores = [s.score for s in students]
    most = max((s.max_score for s in students), default=100.0)
    incomplete = [s for s in students if s.incomplete()]
    lines = [
        f"# Class report: {out.name}",
        "",
        f"{len(students)} students, Section 2 scored out of {_points(most)} "
        f"(from each student's `results.json` in `{out.name}/`). "
        f"Mean **{statistics.fmean(scores):.1f}**, median **{_points(statistics.median(scores))}**, "
        f"lowest {_points(min(scores))}, highest {_points(max(scores))}; "
        f"{sum(s.score >= s.max_score for s in students)} with full marks.",
        "",
        f"![score histogram and failures per check]({SCORES_FILE})",
        "",
        "## Per exercise",
        "",
        "| exercise | mean points | out of | full marks |",
        "|---|---:|---:|---:|",
    ]
    for exercise, (mean, maximum, full) in exercise_means(students).items():
        lines.append(
            f"| {exercise} | {mean:.1f} | {_points(maximum)} | {full} of {len(students)} |"
        )
    lines += [
        "",
        "## Per check, most failed first",
        "",
        'The most common failure: the failure messages\' first line up to any " — " (the '
        "details after it differ from student to student), with how many of the failing students "
        "got it. Students listed under *Timed out or crashed* count here too.",
        "",
        "| check | exercise | failed | what it checks | most common failure |",
        "|---|---|---:|---|---|",
    ]
    for c in check_summaries(students):
        common = (
            f"{_cell(c.common_message)} ({c.common_count} of {len(c.failed)})" if c.failed else "—"
        )
        lines.append(
            f"| `{c.name}` | {c.exercise} | {len(c.failed)} | {_cell(c.description)} | {common} |"
        )
    lines += ["", "## Timed out or crashed", ""]
    if not incomplete:
        lines.append("None: every check of every student ran to a verdict.")
    else:
        lines += [
            "Grading could not finish some checks of these students (a hang, a crash, a memory "
            "limit): look at their code by hand.",
            "",
            "| student | score | checks not finished | first such failure |",
            "|---|---:|---:|---|",
        ]
        for s in incomplete:
            bad = s.incomplete()
            lines.append(
                f"| {s.student} | {_points(s.score)} | {len(bad)} of {len(s.checks)} | "
                f"`{bad[0].name}`: {_cell(first_line(bad[0].message))} |"
            )
    return "\n".join(lines) + "\n"


def write_class_report(out: str | Path, names: list[str] | None = None) -> tuple[Path, Path]:
    """Write ``class_report.md`` and ``scores.png`` into `out` from the students' result files.

    Args:
        out: the folder ``grade-class`` wrote (``gradebook.csv`` and one sub-folder per student).
        names: the students to include (default: :func:`roster`).

    Returns:
        The two paths written.

    Raises:
        FileNotFoundError: `out` holds no graded students (the message says which folder).
    """
    from lora_rlhf.plots import plot_class_scores

    out = Path(out)
    names = roster(out) if names is None else names
    students = [read_student(out / n) for n in names if (out / n / RESULTS).is_file()]
    if not students:
        raise FileNotFoundError(f"{out}: no graded students (no <student>/{RESULTS}); grade first")
    report = out / REPORT_FILE
    report.write_text(markdown(out, students))
    failures = [(c.name, len(c.failed)) for c in check_summaries(students)]
    scores = plot_class_scores(
        [s.score for s in students],
        max(s.max_score for s in students),
        failures,
        out / SCORES_FILE,
        title=f"{out.name}: {len(students)} students",
    )
    return report, scores
