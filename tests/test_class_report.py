"""The class report of `grade-class` (class_report.md, scores.png) on the 20-submission fixture class.

Grading the class takes over a minute on 2 cores, so the per-student files are rebuilt from a
snapshot of what `grade-class` gave for it (tests/data/class20_results.json, written from
`python tests/grading_fixtures/make_class.py /tmp/class20; lora-rlhf grade-class /tmp/class20`),
through the same writers `grade-class` uses. Every expectation below is counted from those
per-student files (or the gradebook), not from the report's own code.
"""

from __future__ import annotations

import csv
import json
import re
import statistics
from collections import Counter
from pathlib import Path

import pytest

import lora_rlhf.cli.command as cli
from lora_rlhf.checks import CheckResult, checks_for
from lora_rlhf.grading.class_report import REPORT_FILE, SCORES_FILE
from lora_rlhf.grading.classroom import GRADEBOOK, RECORD, write_gradebook
from lora_rlhf.grading.grader import GradeReport
from lora_rlhf.grading.reports import write_reports

SNAPSHOT = Path(__file__).parent / "data" / "class20_results.json"
PNG = b"\x89PNG\r\n\x1a\n"


def _write_student(out: Path, name: str, saved: dict) -> None:
    checks_for()  # the registry fills as the checks load: results.json takes descriptions from it
    results = [CheckResult(*c) for c in saved["checks"]]
    report = GradeReport(submission=f"{name}.py", results=results, notes=saved["notes"])
    write_reports(report, out / name / "results.json", out / name / "junit.xml")
    record = {"student": name, "score": report.score, "max_score": report.max_score,
              "notes": report.notes}  # fmt: skip
    (out / name / RECORD).write_text(json.dumps(record))


@pytest.fixture(scope="module")
def graded(tmp_path_factory) -> Path:
    """OUT as `grade-class` leaves it for the fixture class, the report not yet written."""
    out = tmp_path_factory.mktemp("class20") / "class20-grades"
    snapshot = {k: v for k, v in json.loads(SNAPSHOT.read_text()).items() if k != "_about"}
    for name, saved in snapshot.items():
        _write_student(out, name, saved)
    write_gradebook(out, list(snapshot))
    return out


@pytest.fixture(scope="module")
def report(graded: Path) -> str:
    assert cli.main(["grade-class", str(graded.parent / "class20"), "--out", str(graded),
                     "--report-only"]) == 0  # fmt: skip
    return (graded / REPORT_FILE).read_text()


def _failures(out: Path) -> dict[str, list[tuple[str, str]]]:
    """check → [(student, failure message)], straight from each student's results.json."""
    failed: dict[str, list[tuple[str, str]]] = {c.name: [] for c in checks_for()}
    for results in out.glob("*/results.json"):
        for test in json.loads(results.read_text())["tests"]:
            if test["status"] == "failed":
                check = test["name"].split(": ", 1)[1]
                failed[check].append((results.parent.name, test["output"].split("\n\n", 1)[1]))
    return failed


def _section(report: str, heading: str) -> str:
    return report.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]


def _table(section: str) -> list[list[str]]:
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in re.split(r"(?<!\\)\|", row)[1:-1]] for row in rows[1:]]


def test_every_check_is_listed_most_failed_first_with_the_students_counts(graded, report):
    rows = _table(_section(report, "Per check, most failed first"))
    listed = [(row[0].strip("`"), int(row[2])) for row in rows]
    counted = {check: len(students) for check, students in _failures(graded).items()}
    assert sorted(name for name, _ in listed) == sorted(c.name for c in checks_for())
    assert dict(listed) == counted
    assert [n for _, n in listed] == sorted(counted.values(), reverse=True)
    assert listed[0][1] == 9  # the gradient checks: 5 backward mutants, 2 stubs, tamper, hang


def test_each_check_shows_its_description_and_its_commonest_failure(graded, report):
    rows = {
        row[0].strip("`"): row for row in _table(_section(report, "Per check, most failed first"))
    }
    descriptions = {c.name: c.description for c in checks_for()}
    for check, students in _failures(graded).items():
        row = rows[check]
        assert row[3] == descriptions[check].replace("|", "\\|")
        kinds = Counter(message.splitlines()[0].split(" — ")[0] for _, message in students)
        kind, count = kinds.most_common(1)[0]
        assert row[4].endswith(f"({count} of {len(students)})")
        assert kinds[row[4].rsplit(" (", 1)[0].replace("\\|", "|")] == count, check
        if check == "hooks_gradients_tiny_llama":
            assert kind == "tiny-llama: the gradient of layer 0 lora_q.A is wrong" and count == 4


def test_the_hanging_submission_is_listed_apart(report):
    rows = _table(_section(report, "Timed out or crashed"))
    assert [row[0] for row in rows] == ["s_hang_in_hook"]
    assert rows[0][1] == "49" and rows[0][2] == "13 of 26" and "timed out" in rows[0][3]


def test_scores_and_exercise_means_match_the_gradebook(graded, report):
    rows = list(csv.DictReader((graded / GRADEBOOK).open()))
    totals = [float(r["total"]) for r in rows]
    assert f"Mean **{statistics.fmean(totals):.1f}**" in report
    assert f"median **{statistics.median(totals):g}**" in report
    means = {row[0]: row[1] for row in _table(_section(report, "Per exercise"))}
    for exercise in ("Lora", "LoraHooks", "TransformerWithValueHeadLora", "RLHFTrainerLora"):
        assert means[exercise] == f"{statistics.fmean(float(r[exercise]) for r in rows):.1f}"
    assert (graded / SCORES_FILE).read_bytes().startswith(PNG)
    assert f"]({SCORES_FILE})" in report  # shown in the report, relative to it


def test_report_only_grades_nothing(graded, report, monkeypatch, capsys):
    def no_grading(*args, **kwargs):
        raise AssertionError("--report-only graded a submission")

    monkeypatch.setattr("lora_rlhf.grading.classroom.grade", no_grading)
    (graded / REPORT_FILE).unlink()
    args = ["grade-class", str(graded.parent / "class20"), "--out", str(graded), "--report-only"]
    assert cli.main(args) == 0
    assert (graded / REPORT_FILE).read_text() == report
    assert "rebuilt" in capsys.readouterr().out


def test_report_only_without_grades_is_one_line_with_exit_2(tmp_path, capsys):
    args = ["grade-class", str(tmp_path), "--out", str(tmp_path / "none"), "--report-only"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "none" in err and "no graded students" in err


def test_grade_class_writes_the_report_beside_the_gradebook(tmp_path, monkeypatch):
    snapshot = json.loads(SNAPSHOT.read_text())
    names = ["s00_correct", "s_hang_in_hook", "s_stubs_a"]
    folder = tmp_path / "class"
    folder.mkdir()
    for name in names:
        (folder / f"{name}.py").write_text("# graded by the stand-in below\n")

    def from_snapshot(path, limits):  # stands in for grading: what the real grader gave
        saved = snapshot[Path(path).stem]
        results = [CheckResult(*c) for c in saved["checks"]]
        return GradeReport(submission=str(path), results=results, notes=saved["notes"])

    monkeypatch.setattr("lora_rlhf.grading.classroom.grade", from_snapshot)
    assert cli.main(["grade-class", str(folder), "--out", str(tmp_path / "out")]) == 0
    report = (tmp_path / "out" / REPORT_FILE).read_text()
    assert "3 students" in report and (tmp_path / "out" / SCORES_FILE).is_file()
    assert [r[0] for r in _table(_section(report, "Timed out or crashed"))] == ["s_hang_in_hook"]
