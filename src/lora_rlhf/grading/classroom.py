"""Grade a whole class: every file or sub-folder of a folder is one student's submission.

Students are graded in threads of this process, up to the number of cores at once. Each grading
is the same as ``lora-rlhf grade``'s: the student's code runs only in its own sandboxed workers
(time and memory limits, its own process group), so a crashing, hanging, memory-hogging or
tampering submission costs only its own points; the verdicts are reached here. The threads share
one fork server, which saves each student the import of torch.

``OUT/<student>/`` receives ``results.json`` (Gradescope's format), ``junit.xml`` and
``grade.json`` (what was graded: the submission's fingerprint, score, notes); ``OUT/gradebook.csv``
holds one row per student, and ``OUT/class_report.md`` with ``OUT/scores.png`` what the class got
wrong (:mod:`lora_rlhf.grading.class_report`, built from those files). A student whose submission
(and the rubric) has not changed since its ``grade.json`` was written is not graded again, unless
`regrade` is set.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from lora_rlhf.authoring.implementations import ImplementationError
from lora_rlhf.grading.class_report import write_class_report
from lora_rlhf.grading.grader import GradeReport, Limits, grade
from lora_rlhf.grading.reports import write_reports
from lora_rlhf.grading.submissions import students

GRADEBOOK = "gradebook.csv"
RECORD = "grade.json"


@dataclass
class StudentGrade:
    student: str
    score: float
    max_score: float
    seconds: float
    skipped: bool  # graded by an earlier run (unchanged submission)


def fingerprint(path: Path) -> str:
    """SHA-256 over the submission's files (names and contents), in a fixed order."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        digest.update(str(f.relative_to(path) if f != path else f.name).encode() + b"\0")
        digest.update(f.read_bytes() + b"\0")
    return digest.hexdigest()


def rubric_fingerprint() -> str:
    """Changes when a check is added, removed or re-weighted: earlier grades are then stale."""
    from lora_rlhf.grading.rubric import rubric

    text = ";".join(f"{c.name}:{c.points:g}" for cs in rubric().values() for c in cs)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _not_graded(submission: Path, message: str) -> GradeReport:
    """Every check failed with `message` (a submission with nothing to grade)."""
    from lora_rlhf.checks import CheckResult
    from lora_rlhf.grading.rubric import rubric

    checks = [c for cs in rubric().values() for c in cs]
    results = [CheckResult(c.name, c.exercise, False, message, 0.0, c.points) for c in checks]
    return GradeReport(submission=str(submission), results=results, notes=[message])


def _grade_one(
    name: str, path: Path, out: Path, limits: Limits, regrade: bool, visibility: str
) -> StudentGrade:
    folder = out / name
    record_path = folder / RECORD
    digest = fingerprint(path)
    if not regrade and record_path.is_file() and (folder / "results.json").is_file():
        try:
            record = json.loads(record_path.read_text())
        except (OSError, json.JSONDecodeError):
            record = {}
        if record.get("sha256") == digest and record.get("rubric") == rubric_fingerprint():
            return StudentGrade(name, record["score"], record["max_score"], 0.0, skipped=True)
    start = time.monotonic()
    try:
        report = grade(path, limits)
    except ImplementationError as exc:
        report = _not_graded(path, f"not graded: {exc}")
    write_reports(report, folder / "results.json", folder / "junit.xml", visibility)
    record = {
        "student": name,
        "submission": str(path),
        "sha256": digest,
        "rubric": rubric_fingerprint(),
        "score": report.score,
        "max_score": report.max_score,
        "notes": report.notes,
        "graded_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "execution_time": round(report.execution_time, 3),
    }
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    return StudentGrade(name, report.score, report.max_score, time.monotonic() - start, False)


def write_gradebook(out: Path, names: list[str]) -> Path:
    """``gradebook.csv``: student, total, max, points per exercise, points per check, notes."""
    from lora_rlhf.grading.rubric import rubric

    by_exercise = rubric()
    checks = [c.name for cs in by_exercise.values() for c in cs]
    header = ["student", "total", "max", *by_exercise, *checks, "notes"]
    path = out / GRADEBOOK
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for name in names:
            results = json.loads((out / name / "results.json").read_text())
            record = json.loads((out / name / RECORD).read_text())
            points = {t["name"].split(": ", 1)[1]: t["score"] for t in results["tests"]}
            per_exercise = {
                ex: sum(t["score"] for t in results["tests"] if t["tags"] == [ex])
                for ex in by_exercise
            }
            notes = " | ".join(" ".join(n.split()) for n in record.get("notes", []))
            writer.writerow(
                [
                    name,
                    f"{results['score']:g}",
                    f"{record['max_score']:g}",
                    *(f"{per_exercise[ex]:g}" for ex in by_exercise),
                    *(f"{points.get(c, 0):g}" for c in checks),
                    notes,
                ]
            )
    return path


def grade_class(
    folder: str | Path,
    out: str | Path,
    limits: Limits | None = None,
    jobs: int | None = None,
    regrade: bool = False,
    visibility: str = "visible",
    progress: Callable[[StudentGrade], None] | None = None,
) -> list[StudentGrade]:
    """Grade every student of `folder` into `out` (see the module docstring); returns one
    :class:`StudentGrade` per student, in name order."""
    folder, out = Path(folder), Path(out)
    if not folder.is_dir():
        raise ImplementationError(f"{folder}: no such folder (one file or sub-folder per student)")
    # OUT may live inside DIR: it is not a student
    roster = {n: p for n, p in students(folder).items() if p.resolve() != out.resolve()}
    if not roster:
        raise ImplementationError(f"{folder}: no submissions (expected .py files or sub-folders)")
    out.mkdir(parents=True, exist_ok=True)
    limits = limits or Limits()
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(roster)))

    def one(item: tuple[str, Path]) -> StudentGrade:
        result = _grade_one(*item, out, limits, regrade, visibility)
        if progress is not None:
            progress(result)
        return result

    with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="grade") as pool:
        graded = list(pool.map(one, roster.items()))
    write_gradebook(out, list(roster))
    write_class_report(out, list(roster))
    return graded
