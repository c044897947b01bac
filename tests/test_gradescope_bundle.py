"""`lora-rlhf gradescope-bundle`: the autograder zip, run end to end in a fake /autograder.

The results.json it writes is checked against Gradescope's documented format
(https://gradescope-autograders.readthedocs.io/en/latest/specs/): top-level fields and their
types, each test's fields, the allowed visibility values and the leaderboard entries.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from backward_mutants import COURSE_SUBMISSION

import lora_rlhf.cli.command as cli
from lora_rlhf.grading.gradescope import unpack

VISIBILITY = {"hidden", "after_due_date", "after_published", "visible"}
FORMATS = {"text", "html", "simple_format", "md", "ansi"}
TOP_LEVEL = {
    "score": (int, float),
    "execution_time": (int, float),
    "output": str,
    "output_format": str,
    "test_output_format": str,
    "test_name_format": str,
    "visibility": str,
    "stdout_visibility": str,
    "extra_data": dict,
    "tests": list,
    "leaderboard": list,
}
TEST_FIELDS = {
    "score": (int, float),
    "max_score": (int, float),
    "status": str,
    "name": str,
    "name_format": str,
    "number": str,
    "output": str,
    "output_format": str,
    "tags": list,
    "visibility": str,
    "extra_data": dict,
}


def gradescope_problems(results: dict) -> list[str]:
    """What in `results` breaks Gradescope's documented results.json format (empty: valid)."""
    problems = [f"unknown top-level field {k!r}" for k in results if k not in TOP_LEVEL]
    problems += [
        f"{k} should be {v}"
        for k, v in TOP_LEVEL.items()
        if k in results and not isinstance(results[k], v)
    ]
    if "score" not in results and not all("score" in t for t in results.get("tests", [])):
        problems.append("no score: neither at the top level nor on every test")
    for key in ("visibility", "stdout_visibility"):
        if key in results and results[key] not in VISIBILITY:
            problems.append(f"{key} {results[key]!r} is not one of {sorted(VISIBILITY)}")
    for key in ("output_format", "test_output_format", "test_name_format"):
        if key in results and results[key] not in FORMATS:
            problems.append(f"{key} {results[key]!r} is not one of {sorted(FORMATS)}")
    for i, t in enumerate(results.get("tests", [])):
        problems += [f"tests[{i}]: unknown field {k!r}" for k in t if k not in TEST_FIELDS]
        problems += [
            f"tests[{i}].{k} should be {v}"
            for k, v in TEST_FIELDS.items()
            if k in t and not isinstance(t[k], v)
        ]
        if t.get("status") not in (None, "passed", "failed"):
            problems.append(f"tests[{i}].status {t['status']!r}")
        if t.get("visibility", "visible") not in VISIBILITY:
            problems.append(f"tests[{i}].visibility {t['visibility']!r}")
    for i, entry in enumerate(results.get("leaderboard", [])):
        if set(entry) - {"name", "value", "order"} or not {"name", "value"} <= set(entry):
            problems.append(f"leaderboard[{i}] should have name, value (and order): {entry}")
        if entry.get("order", "desc") not in ("asc", "desc"):
            problems.append(f"leaderboard[{i}].order {entry['order']!r}")
    return problems


def test_the_schema_check_itself_catches_bad_results():
    assert gradescope_problems({"score": 1, "tests": []}) == []
    assert gradescope_problems({"tests": [{"name": "x"}]})  # no score anywhere
    assert gradescope_problems({"score": 1, "visibility": "later"})
    assert gradescope_problems({"score": 1, "tests": [{"score": 1, "visibility": "soon"}]})
    assert gradescope_problems({"score": "1"})
    assert gradescope_problems({"score": 1, "leaderboard": [{"name": "a"}]})


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "autograder.zip"
    assert (
        cli.main(["gradescope-bundle", str(out), "--visibility", "after_due_date", "--leaderboard"])
        == 0
    )
    return out


def test_the_zip_has_setup_and_run_autograder_at_its_root_executable(bundle):
    with zipfile.ZipFile(bundle) as zf:
        infos = {i.filename: i for i in zf.infolist()}
        assert {"setup.sh", "run_autograder"} <= set(infos)
        for name in ("setup.sh", "run_autograder"):
            assert (infos[name].external_attr >> 16) & 0o111, f"{name} is not executable"
            assert zf.read(name).startswith(b"#!/usr/bin/env bash\n")
        assert "lora_rlhf/pyproject.toml" in infos
        assert "lora_rlhf/src/lora_rlhf/grading/grader.py" in infos
        assert not any("__pycache__" in n for n in infos)


def _autograde(bundle: Path, root: Path, submission: str, name: str = "section2_lora.py") -> dict:
    unpack(bundle, root)
    (root / "submission" / name).write_text(submission)
    env = {**os.environ, "AUTOGRADER_ROOT": str(root), "LORA_RLHF_PYTHON": sys.executable}
    done = subprocess.run(
        [str(root / "run_autograder")], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads((root / "results" / "results.json").read_text())


def test_run_autograder_grades_the_submission_into_a_valid_results_json(bundle, tmp_path):
    results = _autograde(bundle, tmp_path / "autograder", COURSE_SUBMISSION.read_text(), "lab.py")
    assert gradescope_problems(results) == []
    assert results["score"] == 100
    assert {t["visibility"] for t in results["tests"]} == {"after_due_date"}
    assert results["visibility"] == "visible"  # the total is shown at once
    board = {e["name"]: e["value"] for e in results["leaderboard"]}
    assert board["Total"] == 100 and board["LoraHooks"] == 30
    assert (tmp_path / "autograder" / "results" / "junit.xml").is_file()


def test_the_bundled_source_builds_a_wheel_with_the_package_and_its_assets(bundle, tmp_path):
    """What setup.sh's pip install builds, offline (no dependencies fetched)."""
    root = unpack(bundle, tmp_path / "autograder")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path / "wheel"), str(root / "source" / "lora_rlhf")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = (tmp_path / "wheel").glob("lora_rlhf-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        metadata = next(zf.read(n).decode() for n in names if n.endswith("METADATA"))
    assert {
        "lora_rlhf/grading/worker.py",
        "lora_rlhf/assets/tiny_tokenizer/tokenizer.json",
    } <= names
    assert "Requires-Dist: torch" in metadata
    assert "Requires-Dist: transformer_lens<4" in metadata


def test_setup_sh_installs_the_bundled_package_into_a_venv(bundle, tmp_path):
    """setup.sh, with a stand-in python3 that logs its arguments (no network in tests)."""
    root = unpack(bundle, tmp_path / "autograder")
    log = tmp_path / "calls.log"
    fake = tmp_path / "python3"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        f'echo "$0 $*" >> {log}\n'
        'if [ "$1 $2" = "-m venv" ] && [ -n "$3" ] && [ "$3" != "--help" ]; then\n'
        '  mkdir -p "$3/bin" && cp "$0" "$3/bin/python"\n'
        "fi\n"
    )
    fake.chmod(0o755)
    env = {**os.environ, "AUTOGRADER_ROOT": str(root), "PYTHON": str(fake)}
    done = subprocess.run(
        ["bash", str(root / "source" / "setup.sh")], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    calls = log.read_text()
    assert f"-m venv {root}/venv" in calls
    assert (
        f"-m pip install --extra-index-url https://download.pytorch.org/whl/cpu {root}/source/lora_rlhf"
        in calls
    )


def test_a_bundle_path_that_is_not_a_zip_is_one_line_with_exit_2(tmp_path, capsys):
    assert cli.main(["gradescope-bundle", str(tmp_path / "autograder.tar")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
