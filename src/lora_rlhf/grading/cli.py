"""`lora-rlhf grade [PATH]`: grade a submission, print a scorecard; on request (``--out DIR``,
``--results``, ``--junit``) write results.json and junit.xml.

Exit status: 0 whenever grading completed (whatever the score); 2 when there is nothing to grade
(PATH missing, bad options); 1 when the grader itself failed. The report files asked for are
written in every case, so a CI or Gradescope run always has one; a student's plain
``lora-rlhf grade`` leaves no file behind.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lora_rlhf.grading.timing as timing

DESCRIPTION = """Grade a submission of the Section 2 exercises: a .py file defining Lora, LoraHooks,
TransformerWithValueHeadLora (and RLHFTrainerLora), or a folder holding section2_lora.py. Its code
runs only in child processes with time and memory limits; the verdicts are reached here. Prints a
scorecard per exercise; with --out DIR (or --results/--junit) also writes Gradescope's results.json
and a JUnit XML report."""


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
        help="grade a submission (scorecard; results.json and JUnit XML with --out)",
        description=DESCRIPTION,
    )
    p.add_argument(
        "path",
        nargs="?",
        default="exercises",
        help="a .py file or a folder holding section2_lora.py (default: the checkout's exercises/)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="write results.json and junit.xml into DIR (default: no report files, the "
        "scorecard only)",
    )
    p.add_argument(
        "--results",
        type=Path,
        default=None,
        metavar="PATH",
        help="Gradescope results file (default: DIR/results.json with --out, else none)",
    )
    p.add_argument(
        "--junit",
        type=Path,
        default=None,
        metavar="PATH",
        help="JUnit XML report (default: DIR/junit.xml with --out, else none)",
    )
    _limit_options(p)
    p.add_argument(
        "--only",
        action="append",
        metavar="CHECK",
        help="grade only this check (repeatable; for instructors: the score is then out "
        "of these checks' points)",
    )
    _visibility_options(p)
    p.add_argument("--quiet", action="store_true", help="print only the total")
    p.set_defaults(func=run)
    add_class_parser(subparsers)
    add_bundle_parser(subparsers)
    return p


def _limit_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--check-timeout",
        type=_positive(float),
        default=None,
        metavar="S",
        help="seconds each check (and importing the submission) may take (default: per check, "
        f"{timing.FACTOR:g}x the reference's measured time, at least {timing.FLOOR:g} s)",
    )
    p.add_argument(
        "--total-timeout",
        type=_positive(float),
        default=timing.TOTAL_LIMIT,
        metavar="S",
        help=f"seconds all the checks together may take (default: {timing.TOTAL_LIMIT:g})",
    )
    p.add_argument(
        "--memory-mb",
        type=_positive(int),
        default=4096,
        metavar="N",
        help="memory the submission may allocate, in MB, on top of the ~2 GB that torch "
        "and transformer_lens map when imported (default: 4096)",
    )


def _visibility_options(p: argparse.ArgumentParser, leaderboard: bool = True) -> None:
    from lora_rlhf.grading.reports import VISIBILITIES

    p.add_argument(
        "--visibility",
        choices=VISIBILITIES,
        default="visible",
        help="Gradescope visibility of each check in results.json, e.g. after_due_date: students "
        "see their total at once and the checks after the due date (default: visible)",
    )
    if leaderboard:
        p.add_argument(
            "--leaderboard",
            action="store_true",
            help="add a Gradescope leaderboard entry (total and points per exercise)",
        )


def _limits(args: argparse.Namespace):
    from lora_rlhf.grading.grader import Limits

    return Limits(
        check_timeout=args.check_timeout, total_timeout=args.total_timeout, memory_mb=args.memory_mb
    )


def add_class_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "grade-class",
        help="grade a whole class (CSV gradebook, each student's results.json and JUnit)",
        description="Grade every file or sub-folder of DIR as one student's submission, in "
        "parallel (up to the number of cores). Writes OUT/gradebook.csv and, per student, "
        "OUT/<student>/results.json, junit.xml and grade.json, and the class report "
        "OUT/class_report.md + OUT/scores.png (most failed checks, scores). Students whose "
        "submission has not changed since they were graded are skipped, unless --regrade.",
    )
    p.add_argument("dir", type=Path, help="a folder with one .py file or sub-folder per student")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="where the gradebook and reports go (default: DIR-grades, next to DIR)",
    )
    p.add_argument(
        "--jobs",
        type=_positive(int),
        default=None,
        metavar="N",
        help="students graded at once (default: the number of cores)",
    )
    p.add_argument("--regrade", action="store_true", help="grade every student again")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="grade nothing: rebuild OUT/class_report.md and OUT/scores.png from the results "
        "already in OUT",
    )
    _limit_options(p)
    _visibility_options(p, leaderboard=False)
    p.set_defaults(func=run_class)
    return p


def run_class(args: argparse.Namespace) -> int:
    import time

    from lora_rlhf.authoring.implementations import ImplementationError
    from lora_rlhf.grading.class_report import REPORT_FILE
    from lora_rlhf.grading.classroom import GRADEBOOK, grade_class

    out = args.out or args.dir.resolve().parent / f"{args.dir.resolve().name}-grades"
    start = time.monotonic()
    if args.report_only:
        from lora_rlhf.grading.class_report import write_class_report

        try:
            report, scores = write_class_report(out)
        except (OSError, ValueError, KeyError) as exc:  # KeyError: a results file of another kind
            print(f"lora-rlhf grade-class: {exc}", file=sys.stderr)
            return 2
        print(f"{report} and {scores} rebuilt in {time.monotonic() - start:.1f} s")
        return 0

    def show(g) -> None:
        when = "already graded" if g.skipped else f"graded in {g.seconds:.1f} s"
        print(f"{g.student:<32}{g.score:>6g} / {g.max_score:g}   ({when})", flush=True)

    try:
        graded = grade_class(
            args.dir,
            out,
            _limits(args),
            jobs=args.jobs,
            regrade=args.regrade,
            visibility=args.visibility,
            progress=show,
        )
    except ImplementationError as exc:
        print(f"lora-rlhf grade-class: {exc}", file=sys.stderr)
        return 2
    print(
        f"{len(graded)} students ({sum(not g.skipped for g in graded)} graded now) in "
        f"{time.monotonic() - start:.1f} s: {out / GRADEBOOK}, {out / REPORT_FILE}"
    )
    return 0


def add_bundle_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "gradescope-bundle",
        help="write Gradescope's autograder zip (setup.sh, run_autograder)",
        description="Write the autograder zip to upload to a Gradescope programming assignment: "
        "setup.sh installs this package, run_autograder grades /autograder/submission into "
        "/autograder/results/results.json.",
    )
    p.add_argument("out", type=Path, help="the zip to write, e.g. autograder.zip")
    _visibility_options(p)
    p.add_argument(
        "--total-timeout",
        type=_positive(float),
        default=None,
        metavar="S",
        help=f"seconds all the checks together may take (default: {timing.TOTAL_LIMIT:g})",
    )
    p.add_argument(
        "--memory-mb", type=_positive(int), default=None, metavar="N", help="as for grade"
    )
    p.set_defaults(func=run_bundle)
    return p


def run_bundle(args: argparse.Namespace) -> int:
    from lora_rlhf.grading.gradescope import write_bundle

    try:
        path = write_bundle(
            args.out,
            visibility=args.visibility,
            leaderboard=args.leaderboard,
            total_timeout=args.total_timeout,
            memory_mb=args.memory_mb,
        )
    except (ValueError, OSError) as exc:
        print(f"lora-rlhf gradescope-bundle: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}: upload it as the autograder of a Gradescope programming assignment")
    return 0


def _fallback_report(submission: str, message: str, only):
    """Every check failed with `message`: what the report files say when grading could not run."""
    from lora_rlhf.checks import CheckResult
    from lora_rlhf.grading.grader import GradeReport
    from lora_rlhf.grading.rubric import rubric

    checks = [c for cs in rubric().values() for c in cs if not only or c.name in only]
    results = [CheckResult(c.name, c.exercise, False, message, 0.0, c.points) for c in checks]
    return GradeReport(submission=submission, results=results, notes=[message])


def run(args: argparse.Namespace) -> int:
    from lora_rlhf.authoring.implementations import ImplementationError
    from lora_rlhf.grading.grader import grade
    from lora_rlhf.grading.reports import scorecard, write_reports

    limits = _limits(args)
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
    results, junit = args.results, args.junit
    if args.out is not None:
        results = results or args.out / "results.json"
        junit = junit or args.out / "junit.xml"
    try:
        write_reports(report, results, junit, args.visibility, args.leaderboard)
    except OSError as exc:
        print(f"lora-rlhf grade: cannot write the reports: {exc}", file=sys.stderr)
        return 1
    if status == 0:
        print(scorecard(report, quiet=args.quiet))
    return status
