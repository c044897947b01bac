"""A grade report three ways: a console scorecard, Gradescope's ``results.json``, JUnit XML."""

from __future__ import annotations

import json
import re
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

from lora_rlhf.grading.grader import GradeReport

WIDTH = 100
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _points(x: float) -> str:
    return f"{x:g}"


def _description(name: str) -> str:
    from lora_rlhf.checks import CHECKS
    from lora_rlhf.checks.grpo_checks import GRPO_CHECKS

    c = CHECKS.get(name) or GRPO_CHECKS.get(name)
    return c.description if c else ""


def _xml_text(text: str) -> str:
    """`text` without the characters XML 1.0 cannot hold (a submission's messages may have any)."""
    return _NOT_XML.sub("\N{REPLACEMENT CHARACTER}", text)


def _bonus_max(report: GradeReport) -> str:
    return _points(sum(r.max_points for r in report.bonus))


def scorecard(report: GradeReport, quiet: bool = False) -> str:
    """Per exercise: every check, passed or failed; for a failure, what the check tests and why it
    failed, in the judge's words."""
    total = (
        f"Total: {_points(report.score)} / {_points(report.max_score)}"
        + (f" + bonus {_points(report.bonus_score)} / {_bonus_max(report)}" if report.bonus else "")
        + f"   (graded in {report.execution_time:.1f} s)"
    )
    if quiet:
        return total
    lines = [f"lora-rlhf grade: {report.submission}", ""]
    for note in report.notes:
        lines += [textwrap.indent(note, "! ", lambda _: True), ""]
    indent = " " * 8
    for exercise, results in {**report.by_exercise(), **report.bonus_by_exercise()}.items():
        got, most = sum(r.points for r in results), sum(r.max_points for r in results)
        lines.append(f"{exercise:<48}{_points(got):>5} / {_points(most)}")
        for r in results:
            mark = "PASS" if r.passed else "FAIL"
            lines.append(f"  {mark}  {r.name:<38}{_points(r.points):>3} / {_points(r.max_points)}")
            if r.passed:
                continue
            lines += textwrap.wrap(
                _description(r.name), WIDTH, initial_indent=indent, subsequent_indent=indent
            )
            for i, para in enumerate(r.message.splitlines() or ["failed"]):
                lines += textwrap.wrap(
                    para,
                    WIDTH,
                    initial_indent=indent + ("→ " if i == 0 else "  "),
                    subsequent_indent=indent + "  ",
                ) or [""]
        lines.append("")
    lines.append(total)
    return "\n".join(lines)


VISIBILITIES = ("visible", "hidden", "after_due_date", "after_published")


def gradescope(report: GradeReport, visibility: str = "visible", leaderboard: bool = False) -> dict:
    """Gradescope's autograder results format (https://gradescope-autograders.readthedocs.io).

    `visibility` applies to every check (e.g. ``after_due_date``: students see their total but not
    the checks until the due date); `leaderboard` adds the total and each exercise's points."""
    if visibility not in VISIBILITIES:
        raise ValueError(f"visibility must be one of {', '.join(VISIBILITIES)}, got {visibility!r}")
    tests = []
    numbers: dict[str, int] = {}
    exercise_index = {ex: i + 1 for i, ex in enumerate(report.by_exercise())}
    for r in report.results:
        numbers[r.exercise] = numbers.get(r.exercise, 0) + 1
        tests.append(
            {
                "name": f"{r.exercise}: {r.name}",
                "number": f"{exercise_index[r.exercise]}.{numbers[r.exercise]}",
                "score": r.points,
                "max_score": r.max_points,
                "status": "passed" if r.passed else "failed",
                "output": _description(r.name) + ("" if r.passed else f"\n\n{r.message}"),
                "tags": [r.exercise],
                "visibility": visibility,
            }
        )
    lines = [f"Score: {_points(report.score)} / {_points(report.max_score)}"]
    for exercise, results in report.by_exercise().items():
        lines.append(
            f"{exercise}: {_points(sum(r.points for r in results))} / "
            f"{_points(sum(r.max_points for r in results))}"
        )
    for i, r in enumerate(report.bonus, 1):  # optional: on top of the score's maximum
        tests.append(
            {
                "name": f"Bonus (GRPO) {r.exercise}: {r.name}",
                "number": f"B.{i}",
                "score": r.points,
                "max_score": r.max_points,
                "status": "passed" if r.passed else "failed",
                "output": _description(r.name) + ("" if r.passed else f"\n\n{r.message}"),
                "tags": ["bonus", r.exercise],
                "visibility": visibility,
            }
        )
    if report.bonus:
        lines.append(f"Bonus (GRPO): {_points(report.bonus_score)} / {_bonus_max(report)}")
    results = {
        "score": round(report.score + report.bonus_score, 6),
        "execution_time": round(report.execution_time, 3),
        "output": "\n".join([*report.notes, *lines]),
        "visibility": "visible",
        "stdout_visibility": "visible",
        "tests": tests,
    }
    if leaderboard:
        results["leaderboard"] = [{"name": "Total", "value": report.score}] + [
            {"name": exercise, "value": round(sum(r.points for r in rs), 6)}
            for exercise, rs in report.by_exercise().items()
        ]
        if report.bonus:
            results["leaderboard"].append({"name": "Bonus (GRPO)", "value": report.bonus_score})
    return results


def junit(report: GradeReport) -> ET.ElementTree:
    """One <testsuite> per exercise, one <testcase> per check; the points as properties."""
    failures = sum(not r.passed for r in [*report.results, *report.bonus])
    root = ET.Element(
        "testsuites",
        name="lora-rlhf grade",
        tests=str(len(report.results) + len(report.bonus)),
        failures=str(failures),
        errors="0",
        time=f"{report.execution_time:.3f}",
    )
    for exercise, results in {**report.by_exercise(), **report.bonus_by_exercise()}.items():
        suite = ET.SubElement(
            root,
            "testsuite",
            name=exercise,
            tests=str(len(results)),
            failures=str(sum(not r.passed for r in results)),
            errors="0",
            skipped="0",
        )
        props = ET.SubElement(suite, "properties")
        ET.SubElement(
            props, "property", name="score", value=_points(sum(r.points for r in results))
        )
        ET.SubElement(
            props, "property", name="max_score", value=_points(sum(r.max_points for r in results))
        )
        for r in results:
            case = ET.SubElement(
                suite, "testcase", classname=f"lora_rlhf.grade.{exercise}", name=r.name
            )
            case_props = ET.SubElement(case, "properties")
            ET.SubElement(case_props, "property", name="points", value=_points(r.points))
            ET.SubElement(case_props, "property", name="max_points", value=_points(r.max_points))
            if not r.passed:
                text = _xml_text(r.message) or "failed"
                failure = ET.SubElement(
                    case, "failure", message=text.splitlines()[0][:200], type="CheckFailed"
                )
                failure.text = text
    if report.notes:
        ET.SubElement(root, "system-out").text = _xml_text("\n".join(report.notes))
    ET.indent(root)
    return ET.ElementTree(root)


def write_reports(
    report: GradeReport,
    results_path: Path | None,
    junit_path: Path | None,
    visibility: str = "visible",
    leaderboard: bool = False,
) -> None:
    if results_path is not None:
        results = gradescope(report, visibility, leaderboard)
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    if junit_path is not None:
        junit_path.parent.mkdir(parents=True, exist_ok=True)
        junit(report).write(junit_path, encoding="utf-8", xml_declaration=True)
