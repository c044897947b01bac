"""Which file is graded, and what grading leaves behind: a script and its notebook twin are both
graded and the better kept; `lora-rlhf grade` writes report files only when asked (the untouched
bonus as one line: tests/test_grpo_grading.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from mutants import ROOT

import lora_rlhf.cli.command as cli
from lora_rlhf.grading import grade
from lora_rlhf.grading.reports import scorecard
from lora_rlhf.grading.submissions import submission_file, twin_files


def _autosaved(folder: Path) -> Path:
    """A finished script, then Jupyter autosaving the untouched notebook beside it (newer)."""
    import os

    folder.mkdir()
    shutil.copy(ROOT / "solutions" / "section2_lora.py", folder / "section2_lora.py")
    shutil.copy(ROOT / "exercises" / "section2_lora.ipynb", folder / "section2_lora.ipynb")
    os.utime(folder / "section2_lora.py", (1_000, 1_000))
    os.utime(folder / "section2_lora.ipynb", (2_000, 2_000))
    return folder


def test_a_folder_with_both_twins_names_both(tmp_path):
    folder = _autosaved(tmp_path / "work")
    assert twin_files(folder) == (folder / "section2_lora.py", folder / "section2_lora.ipynb")
    assert submission_file(folder) == folder / "section2_lora.py"
    (folder / "section2_lora.ipynb").unlink()
    assert twin_files(folder) is None


def test_a_finished_script_beside_a_newer_untouched_notebook_grades_100(tmp_path):
    report = grade(_autosaved(tmp_path / "work"))
    assert report.score == report.max_score == 100, [r.message for r in report.results]
    assert report.submission.endswith("section2_lora.py")
    note = report.notes[0]
    assert "section2_lora.py (100 / 100)" in note and "section2_lora.ipynb (0 / 100)" in note
    assert "kept the better, section2_lora.py" in note
    assert note in scorecard(report)


def test_importing_a_submission_leaves_no_bytecode_beside_it(tmp_path, monkeypatch):
    """Where Python writes bytecode (most machines; this one's environment turns it off), a
    submission's import would leave __pycache__/ in the student's folder."""
    import sys

    from lora_rlhf.authoring.implementations import load_module

    submission = tmp_path / "mine.py"
    submission.write_text("ANSWER = 42\n")
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    assert load_module(submission).ANSWER == 42
    assert [p.name for p in tmp_path.iterdir()] == ["mine.py"]
    assert sys.dont_write_bytecode is False  # given back


def test_grade_leaves_no_file_in_its_folder_unless_asked(tmp_path, monkeypatch, capsys):
    submission = tmp_path / "sub" / "mine.py"
    submission.parent.mkdir()
    shutil.copy(ROOT / "solutions" / "section2_lora.py", submission)
    here = tmp_path / "cwd"
    here.mkdir()
    monkeypatch.chdir(here)
    only = ["--only", "lora_param_shapes"]
    assert cli.main(["grade", str(submission), *only]) == 0
    assert "Total: 4 / 4" in capsys.readouterr().out
    assert list(here.iterdir()) == [] and sorted(p.name for p in submission.parent.iterdir()) == [
        "mine.py"
    ]
    assert cli.main(["grade", str(submission), *only, "--out", "reports"]) == 0
    assert sorted(p.name for p in (here / "reports").iterdir()) == ["junit.xml", "results.json"]
    assert json.loads((here / "reports" / "results.json").read_text())["score"] == 4
