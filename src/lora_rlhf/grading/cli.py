"""`lora-rlhf grade [PATH]`: grade a submission, print a scorecard, write results.json and junit.xml.

Exit status: 0 whenever grading completed (whatever the score); 2 when there is nothing to grade
(PATH missing, bad options); 1 when the grader itself failed. The report files are written in
every case, so a CI or Gradescope run always has one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DESCRIPTION = """Grade a submission of the Section 2 exercises: a .py file defining Lora, LoraHooks,
TransformerWithValueHeadLora (and RLHFTrainerLora), or a folder holding section2_lora.py. Its code
runs only in child processes with time and memory limits; the verdicts are reached here. Prints a
scorecard per exercise and writes Gradescope's results.json and a JUnit XML report."""


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "grade",
        help="grade a submission (scorecard, results.json, JUnit XML)",
        description=DESCRIPTION,
    )
    p.add_argument(
        "path",
        nargs="?",
        default="exercises",
        help="a .py file or a folder holding section2_lora.py (default: the checkout's exercises/)",
    )
    p.add_argument(
        "--results",
        type=Path,
        default=Path("results.json"),
        metavar="PATH",
        help="Gradescope results file (default: ./results.json)",
    )
    p.add_argument(
        "--junit",
        type=Path,
        default=Path("junit.xml"),
        metavar="PATH",
        help="JUnit XML report (default: ./junit.xml)",
    )
    p.add_argument(
        "--check-timeout",
        type=_positive(float),
        default=60.0,
        metavar="S",
        help="seconds each check (and importing the submission) may take (default: 60)",
    )
    p.add_argument(
        "--total-timeout",
        type=_positive(float),
        default=600.0,
        metavar="S",
        help="seconds all the checks together may take (default: 600)",
    )
    p.add_argument(
        "--memory-mb",
        type=_positive(int),
        default=4096,
        metavar="N",
        help="memory the submission may allocate, in MB, on top of the ~2 GB that torch "
        "and transformer_lens map when imported (default: 4096)",
    )
    p.add_argument(
        "--only",
        action="append",
        metavar="CHECK",
        help="grade only this check (repeatable; for instructors: the score is then out "
        "of these checks' points)",
    )
    p.add_argument("--quiet", action="store_true", help="print only the total")
    p.set_defaults(func=run)
    return p


def _fallback_report(submission: str, message: str, only):
    """Every check failed with `message`: what the report files say when grading could not run."""
    from lora_rlhf.checks import CheckResult
    from lora_rlhf.grading.grader import GradeReport
    from lora_rlhf.grading.rubric import rubric

    checks = [c for cs in rubric().values() for c in cs if not only or c.name in only]
    results = [CheckResult(c.name, c.exercise, False, message, 0.0, c.points) for c in checks]
    return GradeReport(submission=submission, results=results, notes=[message])


def run(args: argparse.Namespace) -> int:
    from lora_rlhf.grading.grader import Limits, grade
    from lora_rlhf.grading.reports import scorecard, write_reports
    from lora_rlhf.impl import ImplementationError

    limits = Limits(
        check_timeout=args.check_timeout, total_timeout=args.total_timeout, memory_mb=args.memory_mb
    )
    status = 0
    try:
        report = grade(args.path, limits, checks=args.only)
    except (ImplementationError, ValueError) as exc:
        print(f"lora-rlhf grade: {exc}", file=sys.stderr)
        report, status = _fallback_report(str(args.path), f"not graded: {exc}", None), 2
    except Exception as exc:  # a bug of the grader, not of the submission
        print(f"lora-rlhf grade: the grader failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        report = _fallback_report(
            str(args.path), f"not graded: the grader failed ({exc})", args.only
        )
        status = 1
    try:
        write_reports(report, args.results, args.junit)
    except OSError as exc:
        print(f"lora-rlhf grade: cannot write the reports: {exc}", file=sys.stderr)
        return 1
    if status == 0:
        print(scorecard(report, quiet=args.quiet))
    return status
