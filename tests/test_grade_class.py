"""`lora-rlhf grade-class`: a whole class graded in parallel, each student exactly as if alone.

One mixed class — correct, wrong, crashing, hanging (inside a hook), tampering, memory-hogging,
without Exercise 4 — is graded as a batch (two at a time) while each submission but the hanging one
is also graded alone, one after the other. The hanging one is graded in the batch only: its time
there, beside the others, is the bound on a hang's cost (graded alone it would only wait the same
limits out a second time).
"""

from __future__ import annotations

import csv
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from backward_mutants import COURSE_SUBMISSION, MUTANTS

import lora_rlhf.cli.command as cli
from lora_rlhf.checks import checks_for
from lora_rlhf.grading import grade
from lora_rlhf.grading.classroom import GRADEBOOK, grade_class
from lora_rlhf.grading.grader import Limits

FIXTURES = Path(__file__).parent / "grading_fixtures"
COURSE = COURSE_SUBMISSION.read_text()
HANG_BOUND_S = 90  # a submission that hangs inside a hook, on 2 cores
HANGS = "abe_hangs_in_a_hook"  # first in name order: the batch starts it at once
LIMITS = Limits(memory_mb=2048)
TRAINER = COURSE[COURSE.index("class RLHFTrainerLora(") :]


def _with(old: str, new: str, source: str = COURSE) -> str:
    assert source.count(old) == 1, old
    return source.replace(old, new)


QKV_HOOK = "    def lora_hook_qkv(self, qkv_hook_out: Tensor, hook: HookPoint) -> Tensor:\n"
HANG_IN_HOOK = _with(
    QKV_HOOK,
    QKV_HOOK
    + "        while True:  # sleeps rather than spins: the limit is wall-clock time either way\n"
    "            time.sleep(0.1)\n",
    _with("import math\n", "import math\nimport time\n")
    if "\nimport time\n" not in COURSE
    else COURSE,
)
CLASS = {
    HANGS: HANG_IN_HOOK,
    "ada_correct": COURSE,
    "ben_wrong_gradients": next(m for m in MUTANTS if m.name == "z_detached").apply(),
    "cy_crashes": (FIXTURES / "segfault_at_import.py").read_text(),
    "eve_tampers": _with(
        "FwdHook = tuple[str, Callable]\n",
        "FwdHook = tuple[str, Callable]\nt.allclose = lambda *args, **kwargs: True\n",
    ),
    "fay_hogs_memory": _with(
        "        self.layer_idx = layer_idx\n",
        "        self.layer_idx = layer_idx\n        t.empty(3 * 2**28)  # 3 GiB: over 2048 MB\n",
    ),
    "gus_no_trainer": COURSE.replace(TRAINER, ""),
}


def _scores(results: dict) -> dict[str, float]:
    return {t["name"]: t["score"] for t in results["tests"]}


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    root = tmp_path_factory.mktemp("class")
    folder = root / "submissions"
    folder.mkdir()
    for name, source in CLASS.items():
        if name == "ada_correct":  # a folder submission with an unusual file name
            (folder / name).mkdir()
            (folder / name / "my_lora.py").write_text(source)
        else:
            (folder / f"{name}.py").write_text(source)

    def solo() -> dict:
        out = {}
        for name in CLASS:
            if name == HANGS:
                continue
            start = time.monotonic()
            report = grade(
                folder / name if name == "ada_correct" else folder / f"{name}.py", LIMITS
            )
            out[name] = (report, time.monotonic() - start)
        return out

    def batch():
        return grade_class(folder, root / "grades", LIMITS, jobs=2)

    with ThreadPoolExecutor(max_workers=2) as pool:
        alone, together = pool.submit(solo), pool.submit(batch)
        return {"root": root, "folder": folder, "alone": alone.result(), "batch": together.result()}


def test_each_student_gets_the_same_score_alone_and_in_the_batch(graded):
    out = graded["root"] / "grades"
    assert set(graded["alone"]) == set(CLASS) - {HANGS}
    for name, (report, _) in graded["alone"].items():
        batch = json.loads((out / name / "results.json").read_text())
        solo = {f"{r.exercise}: {r.name}": r.points for r in report.results}
        assert _scores(batch) == solo, name
    scores = {n: r.score for n, (r, _) in graded["alone"].items()}
    assert scores["ada_correct"] == 100
    assert 0 < scores["ben_wrong_gradients"] < 100
    assert scores["cy_crashes"] == scores["eve_tampers"] == 0
    assert 0 < scores["fay_hogs_memory"] < 100
    assert scores["gus_no_trainer"] == 90


def test_a_hang_inside_a_hook_is_graded_within_the_bound(graded):
    (seconds,) = [g.seconds for g in graded["batch"] if g.student == HANGS]
    assert seconds <= HANG_BOUND_S
    tests = json.loads((graded["root"] / "grades" / HANGS / "results.json").read_text())["tests"]
    failed = [t for t in tests if t["score"] < t["max_score"]]
    assert failed and all("timed out" in t["output"] for t in failed)
    by_exercise = {ex: [t for t in tests if t["tags"] == [ex]] for ex in ("Lora", "LoraHooks")}
    assert by_exercise["Lora"] and all(t["score"] == t["max_score"] for t in by_exercise["Lora"])
    assert any(t["score"] == t["max_score"] for t in by_exercise["LoraHooks"])  # hook-free checks
    hook_checks = [t for t in tests if t["tags"] != ["Lora"]]
    assert sum(t["score"] for t in hook_checks) < sum(t["max_score"] for t in hook_checks) / 2


def test_a_submission_without_the_trainer_scores_0_on_exercise_4_with_a_note(graded):
    report, _ = graded["alone"]["gus_no_trainer"]
    (trainer,) = report.by_exercise()["RLHFTrainerLora"]
    assert trainer.points == 0 and "does not define RLHFTrainerLora" in trainer.message
    assert any("Exercise 4 (RLHFTrainerLora) is not written" in n for n in report.notes)
    assert report.score == 90  # the other exercises use the student's own classes


def test_the_gradebook_has_a_row_per_student_with_totals_exercises_checks_and_notes(graded):
    rows = list(csv.DictReader((graded["root"] / "grades" / GRADEBOOK).open()))
    assert [r["student"] for r in rows] == sorted(CLASS)
    by_name = {r["student"]: r for r in rows}
    assert float(by_name["ada_correct"]["total"]) == 100
    checks = [c.name for c in checks_for()]
    for row in rows:
        total = sum(float(row[c]) for c in checks)
        assert float(row["total"]) == pytest.approx(total)
        assert float(row["total"]) == pytest.approx(
            sum(
                float(row[e])
                for e in ("Lora", "LoraHooks", "TransformerWithValueHeadLora", "RLHFTrainerLora")
            )
        )
    assert "tampers" in by_name["eve_tampers"]["notes"]
    assert "not written" in by_name["gus_no_trainer"]["notes"]
    for name in CLASS:
        assert (graded["root"] / "grades" / name / "junit.xml").is_file()


def test_a_rerun_skips_graded_students_unless_asked_to_regrade(graded, capsys):
    folder, out = graded["folder"], graded["root"] / "grades"
    changed = folder / "ben_wrong_gradients.py"
    changed.write_text(CLASS["ada_correct"])  # ben fixes his submission
    before = {n: (out / n / "results.json").read_text() for n in CLASS}
    assert cli.main(["grade-class", str(folder), "--out", str(out), "--memory-mb", "2048"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("already graded") == len(CLASS) - 1
    after = {n: (out / n / "results.json").read_text() for n in CLASS}
    assert {n for n in CLASS if after[n] != before[n]} == {"ben_wrong_gradients"}
    assert json.loads(after["ben_wrong_gradients"])["score"] == 100


def test_a_missing_class_folder_is_one_line_with_exit_2(tmp_path, capsys):
    assert cli.main(["grade-class", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nowhere" in err


def test_an_out_folder_inside_the_class_folder_is_not_a_student(tmp_path, capsys):
    (tmp_path / "ann.py").write_text(
        (FIXTURES.parent.parent / "exercises" / "section2_lora.py").read_text()
    )
    out = tmp_path / "grades"
    for _ in range(2):
        assert cli.main(["grade-class", str(tmp_path), "--out", str(out)]) == 0
    assert "1 students (0 graded now)" in capsys.readouterr().out
    rows = list(csv.DictReader((out / GRADEBOOK).open()))
    assert [r["student"] for r in rows] == ["ann"]
    record = json.loads((out / "ann" / "grade.json").read_text())
    (out / "ann" / "grade.json").write_text(json.dumps({**record, "rubric": "an older rubric"}))
    assert cli.main(["grade-class", str(tmp_path), "--out", str(out)]) == 0
    assert "1 students (1 graded now)" in capsys.readouterr().out  # graded against today's
