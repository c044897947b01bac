"""The grader (`lora-rlhf grade`): scores, isolation, tamper-proofing and the report files.

Each fixture submission is graded once per session, through the command line's `main`, in a
module-scoped fixture, in four threads that share one fork server: the long grading of
`solutions/`, each of the two fixtures that wait for a time limit, and the quick ones. Fixture
submissions are generated from `solutions/` and `exercises/` by small edits, so they follow the
exercise file.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import sys
import textwrap
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from mutants import MUTANTS, ROOT, SOLUTION, VARIANTS

import lora_rlhf.cli.command as cli
from lora_rlhf.checks import EXERCISES, checks_for
from lora_rlhf.grading import static
from lora_rlhf.grading.rubric import exercise_points, markdown_table

FIXTURES = Path(__file__).parent / "grading_fixtures"
EXERCISE_FILE = ROOT / "exercises" / "section2_lora.py"
CHECKS = {c.name: c for c in checks_for()}
CHECKS_OF = {ex: [c.name for c in checks_for(ex)] for ex in EXERCISES}
POINTS = exercise_points()
MUTANT = {m.name: m for m in MUTANTS}


# --------------------------------------------------------------------------------------------
# Building fixture submissions from the solution and the stubs
def _top_level_class(tree: ast.Module, name: str) -> ast.ClassDef:
    return next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name)


def with_class_from(target: str, donor: str, name: str) -> str:
    """`target` with its top-level class `name` replaced by the one in `donor`."""
    t_lines, d_lines = target.splitlines(keepends=True), donor.splitlines(keepends=True)
    t, d = _top_level_class(ast.parse(target), name), _top_level_class(ast.parse(donor), name)
    return "".join(
        t_lines[: t.lineno - 1] + d_lines[d.lineno - 1 : d.end_lineno] + t_lines[t.end_lineno :]
    )


def with_code_in(source: str, cls: str, method: str, code: str) -> str:
    """`source` with `code` inserted at the start of `cls.method`'s body."""
    fn = next(
        n
        for n in _top_level_class(ast.parse(source), cls).body
        if isinstance(n, ast.FunctionDef) and n.name == method
    )
    lines = source.splitlines(keepends=True)
    first = fn.body[0].lineno - 1
    indent = lines[first][: len(lines[first]) - len(lines[first].lstrip())]
    return (
        "".join(lines[:first])
        + textwrap.indent(textwrap.dedent(code), indent)
        + "".join(lines[first:])
    )


def with_code_at_import(source: str, code: str) -> str:
    """`source` with `code` run right after its imports (before the exercise classes)."""
    anchor = "FwdHook = tuple[str, Callable]\n"
    assert source.count(anchor) == 1
    return source.replace(anchor, anchor + textwrap.dedent(code))


STUBS, SOLVED = EXERCISE_FILE.read_text(), SOLUTION.read_text()
LORA_ONLY = with_class_from(STUBS, SOLVED, "Lora")


def line_of(source: str, text: str) -> int:
    return next(i for i, line in enumerate(source.splitlines(), 1) if text in line)


# --------------------------------------------------------------------------------------------
@dataclass
class Graded:
    path: Path
    exit_code: int
    results: dict  # results.json
    junit: ET.Element

    @property
    def score(self) -> float:
        return self.results["score"]

    def test(self, check: str) -> dict:
        return next(t for t in self.results["tests"] if t["name"].endswith(f": {check}"))

    def exercise_score(self, exercise: str) -> float:
        return sum(t["score"] for t in self.results["tests"] if t["tags"] == [exercise])

    def failed(self) -> set[str]:
        return {
            t["name"].split(": ", 1)[1] for t in self.results["tests"] if t["status"] == "failed"
        }


def run_grade(path: Path, *options: str) -> Graded:
    out = path.with_suffix("")
    results, junit = Path(f"{out}.results.json"), Path(f"{out}.junit.xml")
    code = cli.main(
        ["grade", str(path), "--results", str(results), "--junit", str(junit), "--quiet", *options]
    )
    return Graded(path, code, json.loads(results.read_text()), ET.parse(junit).getroot())


# The hang sleeps rather than spins: the grader stops it by the wall clock either way, and a
# spinning loop would burn a core for the 5 + 3 s that the other tests need.
HANG_AND_EXIT = with_code_in(
    with_code_in(
        LORA_ONLY.replace("import math\n", "import math\nimport os\nimport time\n"),
        "Lora",
        "__init__",
        "if d_out == 48:  # only lora_init builds this shape\n"
        "    while True:\n"
        "        time.sleep(0.1)\n",
    ),
    "Lora",
    "forward",
    "if x.shape[-1] == 512:  # only lora_xa_then_b\n    os._exit(3)\n",
)
TAMPERED = with_code_at_import(
    MUTANT["scaling_missing"].apply(SOLVED),
    """\
    torch.allclose = lambda *args, **kwargs: True
    torch.testing.assert_close = lambda *args, **kwargs: None
    """,
)
MUTANT_CHECKS = {  # mutant → the checks graded (its exercise, or the cheap part of it)
    "scaling_missing": CHECKS_OF["Lora"],
    "x_times_ab": CHECKS_OF["Lora"],
    "kv_with_n_heads": CHECKS_OF["LoraHooks"],
    "heads_averaged": CHECKS_OF["LoraHooks"],
    "value_head_hook_missing": ["model_fwd_hooks", "model_forward_with_value_head"],
    "optimizer_gets_all_params": ["model_fwd_hooks", "model_frozen_params", "model_training_step"],
}


def fixture_sources(tmp: Path) -> dict[str, tuple[str, tuple[str, ...]]]:
    """name → (source, extra command-line options)."""
    fake_report = json.dumps({"score": 100, "tests": []})
    return {
        "stubs": (STUBS, ()),
        "lora_only": (LORA_ONLY, ()),
        "syntax_error": (SOLVED + "\ndef broken(:\n    pass\n", ()),
        "raise_at_import": (
            with_code_at_import(STUBS, "raise RuntimeError('boom at import')\n"),
            (),
        ),
        "sys_exit_at_import": (with_code_at_import(STUBS, "import sys\nsys.exit(0)\n"), ()),
        "os_exit_at_import": (with_code_at_import(STUBS, "import os\nos._exit(0)\n"), ()),
        "segfault_at_import": ((FIXTURES / "segfault_at_import.py").read_text(), ()),
        "hang_and_exit": (HANG_AND_EXIT, ("--check-timeout", "5")),
        "over_total_time": (HANG_AND_EXIT, ("--total-timeout", "3", "--check-timeout", "60")),
        "memory_hog": (
            with_code_in(
                LORA_ONLY,
                "LoraHooks",
                "__init__",
                "torch.empty(3 * 2**28)  # 3 GiB: fine without a limit, too much under 2048 MB\n",
            ),
            ("--memory-mb", "2048"),
        ),
        "tampered": (TAMPERED, ()),
        "fake_report": (
            with_code_at_import(
                STUBS,
                f"""\
            for _path in ("results.json", {str(tmp / "fake_report.results.json")!r}):
                with open(_path, "w") as _f:
                    _f.write({fake_report!r})
            """,
            ),
            (),
        ),
        "reexport": ((FIXTURES / "reexport_star.py").read_text(), ()),
        **{
            f"mutant_{name}": (MUTANT[name].apply(SOLVED), tuple(f"--only={c}" for c in checks))
            for name, checks in MUTANT_CHECKS.items()
        },
    }


@pytest.fixture(scope="module")
def graded(tmp_path_factory) -> dict[str, Graded]:
    tmp = tmp_path_factory.mktemp("grading")
    jobs = {}
    for name, (source, options) in fixture_sources(tmp).items():
        path = tmp / f"{name}.py"
        path.write_text(source)
        jobs[name] = (path, options)
    (tmp / "solutions").mkdir()
    (tmp / "solutions" / "section2_lora.py").write_text(SOLVED)  # a folder submission
    jobs["solutions"] = (tmp / "solutions", ())
    # Four queues: the long grading of the solutions; each of the two fixtures that mostly sleep
    # until a time limit; all the quick ones. Judges take turns (a lock), so the CPU load stays
    # ~2 processes.
    queues = [["solutions"], ["hang_and_exit"], ["over_total_time"]]
    queues.append([n for n in jobs if not any(n in q for q in queues)])

    def grade_all(names: list[str]) -> dict[str, Graded]:
        return {n: run_grade(jobs[n][0], *jobs[n][1]) for n in names}

    with ThreadPoolExecutor(max_workers=len(queues)) as pool:
        return {n: g for part in pool.map(grade_all, queues) for n, g in part.items()}


# --------------------------------------------------------------------------------------------
# Scores
def test_rubric_points_sum_to_100_over_the_four_exercises():
    assert POINTS == {
        "Lora": 30,
        "LoraHooks": 30,
        "TransformerWithValueHeadLora": 30,
        "RLHFTrainerLora": 10,
    }


def test_the_documented_rubric_is_the_checks_rubric():
    assert markdown_table() in (ROOT / "docs" / "grading.md").read_text()


def test_the_solutions_score_100(graded):
    g = graded["solutions"]
    assert g.exit_code == 0
    assert g.score == 100, g.failed()


def test_the_untouched_stubs_score_0_and_say_not_implemented(graded):
    g = graded["stubs"]
    assert (g.exit_code, g.score) == (0, 0)
    assert all("not implemented" in t["output"] for t in g.results["tests"])


def test_solving_only_lora_scores_exactly_its_points(graded):
    g = graded["lora_only"]
    assert g.score == POINTS["Lora"] == g.exercise_score("Lora")
    assert g.failed() == {c for ex in EXERCISES if ex != "Lora" for c in CHECKS_OF[ex]}


@pytest.mark.parametrize("mutant", list(MUTANT_CHECKS))
def test_a_mutant_loses_points_in_its_exercise(graded, mutant):
    g = graded[f"mutant_{mutant}"]
    exercise = CHECKS[MUTANT[mutant].catches[0]].exercise
    graded_checks = set(MUTANT_CHECKS[mutant])
    caught = set(MUTANT[mutant].catches) & graded_checks
    assert caught and caught <= g.failed() <= graded_checks
    assert g.exercise_score(exercise) < POINTS[exercise]
    assert MUTANT[mutant].says in g.test(MUTANT[mutant].catches[0])["output"]


def test_grading_is_deterministic(graded, tmp_path):
    again = run_grade(Path(shutil.copy(graded["lora_only"].path, tmp_path / "lora_only.py")))
    assert [(t["name"], t["score"], t["output"]) for t in again.results["tests"]] == [
        (t["name"], t["score"], t["output"]) for t in graded["lora_only"].results["tests"]
    ]


# --------------------------------------------------------------------------------------------
# Submissions that do not import
def test_a_syntax_error_is_reported_with_file_and_line(graded):
    g = graded["syntax_error"]
    line = line_of(SOLVED + "\ndef broken(:\n    pass\n", "def broken(:")
    assert (g.exit_code, g.score) == (0, 0)
    assert f"syntax_error.py:{line}" in g.test("lora_init")["output"]
    assert "SyntaxError" in g.results["output"]


@pytest.mark.parametrize(
    "name, says",
    [
        ("raise_at_import", "raised RuntimeError: boom at import (at raise_at_import.py:"),
        ("sys_exit_at_import", "called sys.exit(0) while being imported"),
        ("os_exit_at_import", "exited while being imported (exit code 0)"),
        ("segfault_at_import", "crashed while being imported (SIGSEGV)"),
    ],
)
def test_a_submission_that_dies_at_import_scores_0_with_the_reason(graded, name, says):
    g = graded[name]
    assert (g.exit_code, g.score) == (0, 0)
    assert all(says in t["output"] for t in g.results["tests"]), g.results["tests"][0]["output"]


# --------------------------------------------------------------------------------------------
# Isolation: time and memory limits
def test_an_infinite_loop_times_out_and_the_other_checks_are_graded(graded):
    g = graded["hang_and_exit"]
    assert "timed out after 5 s" in g.test("lora_init")["output"]
    assert g.failed() >= {"lora_init", "lora_xa_then_b"}
    assert (
        g.exercise_score("Lora")
        == POINTS["Lora"] - CHECKS["lora_init"].points - CHECKS["lora_xa_then_b"].points
    )


def test_exiting_inside_one_check_fails_only_that_check(graded):
    g = graded["hang_and_exit"]
    assert (
        "the submission exited during lora_xa_then_b (exit code 3)"
        in g.test("lora_xa_then_b")["output"]
    )
    assert g.test("lora_gradients")["status"] == "passed"  # graded by a fresh worker


def test_the_overall_time_limit_ends_grading_and_fails_the_rest(graded):
    g = graded["over_total_time"]
    over = {
        t["name"].split(": ")[1] for t in g.results["tests"] if "overall time limit" in t["output"]
    }
    assert g.exit_code == 0
    assert {"lora_init", "trainer_smoke_run"} <= over
    assert g.score <= CHECKS["lora_param_shapes"].points


def test_a_memory_hog_fails_its_checks_with_a_memory_message(graded):
    g = graded["memory_hog"]
    assert g.score == POINTS["Lora"]
    for check in CHECKS_OF["LoraHooks"]:
        assert "memory limit (2048 MB)" in g.test(check)["output"]


# --------------------------------------------------------------------------------------------
# Tamper-proofing
def test_patching_torch_comparisons_earns_nothing(graded):
    g = graded["tampered"]
    assert g.score == 0
    line = line_of(TAMPERED, "torch.allclose = ")
    assert f"tampered.py line {line}" in g.test("lora_forward_formula")["output"]
    assert "tampers" in g.results["output"]


def test_patching_torch_in_the_child_cannot_pass_a_check_even_unflagged(graded, monkeypatch):
    """Defence in depth: with the static scan switched off, the judges still run here."""
    monkeypatch.setattr(static, "scan", lambda path: static.ScanReport())
    g = run_grade(
        graded["tampered"].path, "--only=lora_forward_formula", "--only=lora_alpha_scaling"
    )
    assert g.score == 0
    assert "scaling is missing" in g.test("lora_forward_formula")["output"]


def test_a_fake_results_file_written_at_import_is_replaced(graded):
    g = graded["fake_report"]
    assert g.score == 0
    assert len(g.results["tests"]) == len(CHECKS)


def test_reexporting_the_reference_classes_earns_nothing_for_them(graded):
    g = graded["reexport"]
    assert g.score == 0
    for exercise in EXERCISES:
        assert "the library's reference class" in g.test(CHECKS_OF[exercise][0])["output"]


# --------------------------------------------------------------------------------------------
# The static scan
@pytest.mark.parametrize(
    "source",
    [SOLVED, STUBS, *(v.apply(SOLVED) for v in VARIANTS)],
    ids=["solutions", "exercises", *(v.name for v in VARIANTS)],
)
def test_the_course_files_pass_the_static_scan(source, tmp_path):
    path = tmp_path / "submission.py"
    path.write_text(source)
    report = static.scan(path)
    assert report.tampering == [] and report.reused == {}


TAMPERING = {
    "assign_module_attribute": "import torch\ntorch.allclose = lambda *a, **k: True",
    "assign_through_alias": "import torch.testing as tt\nt = tt\nt.assert_close = None",
    "assign_imported_class_attribute": "from torch import Tensor\nTensor.__eq__ = None",
    "setattr_module": "import numpy as np\nsetattr(np, 'allclose', None)",
    "delete_module_attribute": "import einops\ndel einops.einsum",
    "dunder_import": "m = __import__('torch')",
    "importlib": "import importlib",
    "exec": "exec('x = 1')",
    "eval": "y = eval('1')",
    "compile": "c = compile('1', 'f', 'eval')",
    "ctypes": "import ctypes",
    "gc": "import gc",
    "builtins": "import builtins",
    "sys_modules": "import sys\nsys.modules['torch']",
    "getframe": "import sys\nf = sys._getframe(1)",
    "inspect_frames": "from inspect import currentframe",
    "frame_from_traceback": "try:\n    1 / 0\nexcept Exception as e:\n    g = e.__traceback__.tb_frame",
    "import_checks": "from lora_rlhf.checks import CHECKS",
    "import_grader": "import lora_rlhf.grading.worker",
    "checks_through_package": "import lora_rlhf\nlora_rlhf.checks.core",
    "checks_through_tests_lora": "from lora_rlhf import tests_lora\ntests_lora.run_check",
    "import_solutions": "from solutions.section2_lora import Lora",
    "module_dict": "import torch\ntorch.__dict__['allclose'] = None",
}


@pytest.mark.parametrize("source", TAMPERING.values(), ids=TAMPERING.keys())
def test_the_static_scan_flags_tampering_on_its_line(source, tmp_path):
    path = tmp_path / "submission.py"
    path.write_text("import math\n" + source + "\n")
    findings = static.scan(path).tampering
    assert findings, "not flagged"
    assert findings[0].line >= 2  # the offending line, not the harmless first one


REUSE = {
    "reexport": ("from lora_rlhf import Lora\n", {"Lora"}),
    "alias": (
        "import lora_rlhf.lessons.section2_lora\nLoraHooks = lora_rlhf.lessons.section2_lora.LoraHooks\n",
        {"LoraHooks"},
    ),
    "subclass": (
        "import lora_rlhf.lessons.section2_lora\nclass Lora(lora_rlhf.lessons.section2_lora.Lora):\n    pass\n",
        {"Lora"},
    ),
    "uses_reference_inside": (
        "from torch import nn\nfrom lora_rlhf.lessons.section2_lora import Lora as Ref\n"
        "class Lora(nn.Module):\n    def forward(self, x):\n        return Ref.forward(self, x)\n",
        {"Lora"},
    ),
    "hooks_use_reference_lora": (
        "from torch import nn\nfrom lora_rlhf.lessons.section2_lora import Lora\n"
        "class LoraHooks(nn.Module):\n    def __init__(self):\n        self.lora_q = Lora()\n",
        {"Lora", "LoraHooks"},
    ),
    "star_import_then_own_classes": (
        "from torch import nn\nfrom lora_rlhf.lessons.section2_lora import *  # noqa\nclass Lora(nn.Module):\n    pass\n"
        "class LoraHooks(nn.Module):\n    pass\n",
        {"TransformerWithValueHeadLora", "RLHFTrainerLora"},
    ),
}


@pytest.mark.parametrize("source, reused", REUSE.values(), ids=REUSE.keys())
def test_the_static_scan_finds_reuse_of_the_reference_classes(source, reused, tmp_path):
    path = tmp_path / "submission.py"
    path.write_text(source)
    report = static.scan(path)
    assert report.tampering == []
    assert set(report.reused) == reused


# --------------------------------------------------------------------------------------------
# The command line and the report files
def test_a_missing_path_is_a_one_line_error_with_exit_2_and_a_report(tmp_path, capsys):
    results, junit = tmp_path / "results.json", tmp_path / "junit.xml"
    code = cli.main(
        ["grade", str(tmp_path / "nowhere"), "--results", str(results), "--junit", str(junit)]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "nowhere" in err
    assert json.loads(results.read_text())["score"] == 0
    ET.parse(junit)


GRADESCOPE_TEST_KEYS = {"name", "score", "max_score", "status", "output", "visibility"}


@pytest.mark.parametrize(
    "name", ["solutions", "stubs", "hang_and_exit", "tampered", "syntax_error"]
)
def test_results_json_follows_the_gradescope_schema(graded, name):
    r = graded[name].results
    assert isinstance(r["score"], (int, float)) and isinstance(r["execution_time"], (int, float))
    assert isinstance(r["output"], str) and r["visibility"] in (
        "visible",
        "hidden",
        "after_due_date",
        "after_published",
    )
    assert len(r["tests"]) == len(CHECKS)
    for t in r["tests"]:
        assert GRADESCOPE_TEST_KEYS <= set(t)
        assert t["status"] in ("passed", "failed")
        assert t["score"] == (t["max_score"] if t["status"] == "passed" else 0)
    assert r["score"] == sum(t["score"] for t in r["tests"])
    assert sum(t["max_score"] for t in r["tests"]) == 100


@pytest.mark.parametrize("name", ["solutions", "stubs", "hang_and_exit"])
def test_junit_xml_has_one_suite_per_exercise_and_one_case_per_check(graded, name):
    root = graded[name].junit
    assert [s.get("name") for s in root.iter("testsuite")] == list(EXERCISES)
    cases = list(root.iter("testcase"))
    assert len(cases) == len(CHECKS)
    failed = {c.get("name") for c in cases if c.find("failure") is not None}
    assert failed == graded[name].failed()
    assert int(root.get("failures")) == len(failed)


# --------------------------------------------------------------------------------------------
# Time limits and the generated files' install cell
def test_every_check_has_a_measured_reference_time_and_a_limit_from_it():
    from lora_rlhf.grading import timing
    from lora_rlhf.grading.grader import Limits

    assert set(timing.REFERENCE_SECONDS) == set(CHECKS)
    limits = Limits()
    for name, seconds in timing.REFERENCE_SECONDS.items():
        assert limits.for_check(name) == max(timing.FLOOR, timing.FACTOR * seconds)
    assert Limits(check_timeout=7).for_check("lora_init") == 7
    assert limits.total_timeout <= 300  # well below Gradescope's default of 10 minutes


def test_the_install_cell_of_the_generated_files_is_not_tampering_but_using_it_is(tmp_path):
    from lora_rlhf.authoring.sync import INSTALL_CELL

    path = tmp_path / "submission.py"
    path.write_text("import math\n" + INSTALL_CELL)
    assert static.scan(path).tampering == []
    path.write_text("import math\n" + INSTALL_CELL + "subprocess.run(['true'])\n")
    (finding,) = {f.line for f in static.scan(path).tampering}
    assert finding == line_of(path.read_text(), "subprocess.run(['true'])")
    path.write_text("import math\n" + INSTALL_CELL.replace("--quiet", "--verbose"))
    assert static.scan(path).tampering  # only the cell word for word is the course's own


# --------------------------------------------------------------------------------------------
# Which file is graded
def test_a_notebook_is_graded_as_its_script(tmp_path):
    from lora_rlhf.grading import grade

    folder = tmp_path / "upload"
    folder.mkdir()
    shutil.copy(ROOT / "solutions" / "section2_lora.ipynb", folder / "my_work.ipynb")
    report = grade(folder, checks=["lora_forward_formula", "hooks_gradients_tiny_llama"])
    assert report.score == report.max_score > 0, [r.message for r in report.results]
    assert report.submission == str((folder / "my_work.ipynb").resolve())


def test_a_folder_gives_its_section2_file_or_its_only_python_file(tmp_path):
    from lora_rlhf.authoring.implementations import ImplementationError
    from lora_rlhf.grading.submissions import students, submission_file

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "lab.py").write_text("")
    (tmp_path / "a" / "lab.ipynb").write_text("{}")
    assert submission_file(tmp_path / "a").name == "lab.py"
    (tmp_path / "a" / "other.py").write_text("")
    with pytest.raises(ImplementationError, match="2 candidate files"):
        submission_file(tmp_path / "a")
    (tmp_path / "a" / "nested").mkdir()
    (tmp_path / "a" / "nested" / "section2_lora.py").write_text("")
    assert submission_file(tmp_path / "a").parts[-2:] == ("nested", "section2_lora.py")
    (tmp_path / "bo.ipynb").write_text("{}")
    (tmp_path / "bo.py").write_text("")
    assert students(tmp_path) == {"a": tmp_path / "a", "bo": tmp_path / "bo.py"}


def test_the_fork_server_is_started_with_this_processs_path(monkeypatch):
    """Python < 3.12 starts the fork server without the caller's sys.path and skips a preload it
    cannot import: the grader hands its path over as PYTHONPATH, only for that start."""
    from multiprocessing import forkserver

    from lora_rlhf.grading import sandbox

    seen = []
    monkeypatch.setattr(forkserver, "ensure_running", lambda: seen.append(os.environ["PYTHONPATH"]))
    monkeypatch.setattr(sys, "path", [*sys.path, "/nowhere/extra"])
    monkeypatch.setenv("PYTHONPATH", "/before")
    sandbox.start_server()
    assert seen and seen[0].split(os.pathsep)[-1] == "/nowhere/extra"
    assert os.environ["PYTHONPATH"] == "/before"
