"""`lora-rlhf grade` and the GRPO bonus: graded when the submission has a GRPO file, in the sandbox,
as optional points on top of Section 2's 100, in all three reports; no points for the untouched
stubs, for importing the library's GRPO code, or for tampering."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest

from lora_rlhf.grading.bonus import bonus_file, grade_bonus
from lora_rlhf.grading.grader import grade
from lora_rlhf.grading.reports import gradescope, junit, scorecard

ROOT = Path(__file__).resolve().parents[1]
SECTION2 = ROOT / "solutions" / "section2_lora.py"
GRPO = ROOT / "solutions" / "section3_grpo.py"
FLIPPED = ("advantages = (grouped - mean) /", "advantages = (mean - grouped) /")


def folder(tmp: Path, grpo_text: str | None = None, section2: bool = True) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    if section2:
        shutil.copy(SECTION2, tmp / "section2_lora.py")
    if grpo_text is not None:
        (tmp / "section3_grpo.py").write_text(grpo_text)
    return tmp


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """Section 2's solutions with a GRPO file whose advantages have the wrong sign."""
    text = GRPO.read_text()
    assert text.count(FLIPPED[0]) == 1
    return grade(folder(tmp_path_factory.mktemp("sub"), text.replace(*FLIPPED)))


def test_the_bonus_comes_on_top_of_section_2s_hundred(report):
    assert (report.score, report.max_score) == (100, 100)
    assert len(report.bonus) == 9 and 0 < report.bonus_score < 10
    failed = {r.name for r in report.bonus if not r.passed}
    assert {"grpo_advantages_grpo", "grpo_trainer_learns"} <= failed
    assert "grpo_kl_k3" not in failed


def test_every_report_shows_the_bonus_apart(report):
    card = scorecard(report)
    assert f"Total: 100 / 100 + bonus {report.bonus_score:g} / 10" in card
    assert "Bonus (GRPO): group_advantages" in card and "wrong sign" in card

    results = gradescope(report, leaderboard=True)
    assert results["score"] == pytest.approx(100 + report.bonus_score)
    bonus_tests = [t for t in results["tests"] if "bonus" in t.get("tags", [])]
    assert len(bonus_tests) == 9 and sum(t["max_score"] for t in bonus_tests) == 10
    others = [t for t in results["tests"] if t not in bonus_tests]
    assert sum(t["max_score"] for t in others) == 100
    assert {"name": "Bonus (GRPO)", "value": report.bonus_score} in results["leaderboard"]
    json.dumps(results)

    suites = junit(report).getroot().findall("testsuite")
    assert sum(s.get("name").startswith("Bonus (GRPO)") for s in suites) == 4


def test_a_submission_without_a_grpo_file_has_no_bonus(tmp_path):
    assert bonus_file(folder(tmp_path / "a")) is None
    assert bonus_file(SECTION2) is None
    assert grade_bonus(tmp_path / "a") == ([], [])
    assert (
        bonus_file(folder(tmp_path / "b", GRPO.read_text())) == tmp_path / "b" / "section3_grpo.py"
    )
    assert bonus_file(GRPO) == GRPO  # a single file that defines the GRPO exercises


def test_the_untouched_stubs_are_one_not_attempted_line(tmp_path):
    stubs = (ROOT / "exercises" / "section3_grpo.py").read_text()
    results, notes = grade_bonus(folder(tmp_path, stubs, section2=False))
    assert results == []
    assert notes == [
        "Bonus (GRPO): section3_grpo.py not attempted (its exercises are still stubs)."
    ]


def test_one_exercise_written_is_graded_in_full(tmp_path):
    """Attempted at all, the bonus shows every check (here: the advantages written, the rest stubs)."""
    stubs = (ROOT / "exercises" / "section3_grpo.py").read_text()
    solved = GRPO.read_text()
    (written,) = [
        ast.get_source_segment(solved, node)
        for node in ast.parse(solved).body
        if isinstance(node, ast.FunctionDef) and node.name == "group_advantages"
    ]
    text = stubs + "\n\n" + written + "\n"  # the later definition replaces the stub
    results, notes = grade_bonus(folder(tmp_path, text, section2=False))
    assert len(results) == 9 and not notes
    assert any(r.passed for r in results) and any("not implemented" in r.message for r in results)


@pytest.mark.parametrize(
    "line, says",
    [
        (
            "from lora_rlhf.lessons.section3_grpo import group_advantages  # noqa",
            "imports the library's GRPO",
        ),
        ("import lora_rlhf.checks.core as core", "tampering"),
    ],
)
def test_no_bonus_for_the_librarys_solution_or_tampering(tmp_path, line, says):
    text = GRPO.read_text() + f"\n{line}\n"
    results, notes = grade_bonus(folder(tmp_path, text, section2=False))
    assert results and all(r.points == 0 and says in r.message for r in results)
    assert notes and says.split()[0] in notes[0]
