"""The student-facing files: generated from one source, in sync, notebooks, stubs that say what to do."""

from __future__ import annotations

import ast

import jupytext
import pytest

from lora_rlhf.authoring.implementations import load_impl, repo_root
from lora_rlhf.authoring.sync import MarkerError, render, sources, sync

ROOT = repo_root()
SECTION2 = "section2_lora.py"


def test_generated_files_are_up_to_date():
    stale = sync(ROOT, check=True)
    assert not stale, f"run `lora-rlhf sync`: stale {[str(p) for p in stale]}"


def test_sync_check_command_reports_stale_file(tmp_path, capsys):
    from lora_rlhf.cli.command import main

    (tmp_path / "solutions").mkdir()
    (tmp_path / "exercises").mkdir()
    assert main(["sync", "--check", "--root", str(tmp_path)]) == 1
    assert "stale: solutions/section2_lora.py" in capsys.readouterr().out
    assert main(["sync", "--root", str(tmp_path)]) == 0
    assert main(["sync", "--check", "--root", str(tmp_path)]) == 0


@pytest.mark.parametrize("kind", ["exercises", "solutions"])
def test_student_notebooks_explain_before_they_ask(kind):
    notebook = jupytext.read(ROOT / kind / SECTION2.replace(".py", ".ipynb"))
    kinds = [cell.cell_type for cell in notebook.cells]
    assert kinds.count("markdown") >= 5 and kinds.count("code") >= 5
    text = "\n".join(cell.source for cell in notebook.cells if cell.cell_type == "markdown")
    for topic in ("(xA)B", "bias", "grouped-query attention", "sum W_O", "second model"):
        assert topic.lower() in text.lower(), f"the explanation of {topic!r} is missing"


def test_each_exercise_ends_with_its_check():
    text = (ROOT / "exercises" / SECTION2).read_text()
    for call in (
        "testing_lora(Lora)",
        "testing_lora_hooks(LoraHooks)",
        "testing_lora_hooks_qkv_dispatch_and_out(LoraHooks)",
        "test_lora_fwd_hooks_list(_model)",
        "test_lora_model_forward_methods(_model)",
    ):
        assert call in text


def test_stubs_raise_not_implemented_naming_the_exercise():
    tree = ast.parse((ROOT / "exercises" / SECTION2).read_text())
    raises = [
        node.exc.args[0].value
        for node in ast.walk(tree)
        if isinstance(node, ast.Raise)
        and isinstance(node.exc, ast.Call)
        and getattr(node.exc.func, "id", "") == "NotImplementedError"
    ]
    assert len(raises) == 8  # the course's asked methods (tests/test_course_interface.py)
    assert all(msg.startswith("Exercise ") for msg in raises)
    assert any("Lora.forward" in msg for msg in raises)


def test_solutions_contain_no_markers_and_stubs_no_solution_code():
    solution = (ROOT / "solutions" / SECTION2).read_text()
    stubs = (ROOT / "exercises" / SECTION2).read_text()
    assert ">>> exercise" not in solution and 'NotImplementedError("Exercise' not in solution
    assert "kaiming_uniform_(self.A" in solution and "kaiming_uniform_(self.A" not in stubs


def test_unbalanced_markers_are_reported():
    with pytest.raises(MarkerError, match="never closed"):
        render("    # >>> exercise: X — y\n    pass\n", "exercises")
    with pytest.raises(MarkerError, match="without an opening marker"):
        render("    # <<< exercise\n", "solutions")


def test_every_source_is_a_library_module():
    for src in sources():
        if src.path.exists():
            assert src.path.parent.name == "lessons"


def test_stub_module_imports_and_names_the_classes():
    stubs = load_impl(ROOT / "exercises")
    with pytest.raises(NotImplementedError, match="Exercise Lora.__init__"):
        stubs.Lora()


# --------------------------------------------------------------------------------------------
# `lora-rlhf exercises DIR`: the files for a student who has only the installed package


def repo_exercise_files() -> dict[str, str]:
    names = [
        name
        for src in sources()
        if src.path.exists()
        for name in (src.target_name, src.target_name.replace(".py", ".ipynb"))
    ]
    return {name: (ROOT / "exercises" / name).read_text() for name in names}


def test_exercises_command_writes_the_scripts_and_notebooks(tmp_path, capsys):
    from lora_rlhf.cli.command import main

    out = tmp_path / "my" / "exercises"
    assert main(["exercises", str(out)]) == 0
    wanted = repo_exercise_files()
    assert {p.name for p in out.iterdir()} == set(wanted)
    assert {"section2_lora.py", "section2_lora.ipynb"} <= set(wanted)
    for name, text in wanted.items():
        assert (out / name).read_text() == text, f"{name} differs from exercises/{name}"
    assert "section2_lora.ipynb" in capsys.readouterr().out


def test_exercises_command_refuses_to_overwrite_and_writes_nothing(tmp_path, capsys):
    from lora_rlhf.cli.command import main

    (tmp_path / "section2_lora.py").write_text("# my work\n")
    assert main(["exercises", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "section2_lora.py already exists" in err and "nothing written" in err
    assert len(err.strip().splitlines()) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["section2_lora.py"]
    assert (tmp_path / "section2_lora.py").read_text() == "# my work\n"


def test_exercises_command_refuses_a_file_as_folder(tmp_path, capsys):
    from lora_rlhf.cli.command import main

    (tmp_path / "f").write_text("x")
    assert main(["exercises", str(tmp_path / "f")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_exercises_command_works_from_a_wheel_without_a_clone(tmp_path):
    """Build the wheel (from a copy of the project: nothing is written into the checkout), unpack
    it alone on the path, and run the command there: no exercises/ folder exists anywhere near."""
    import os
    import shutil
    import subprocess
    import sys
    import zipfile

    pytest.importorskip("setuptools", reason="building the wheel needs setuptools")
    project = tmp_path / "project"
    for name in ("pyproject.toml", "README.md"):
        project.mkdir(exist_ok=True)
        shutil.copy(ROOT / name, project / name)
    shutil.copytree(
        ROOT / "src",
        project / "src",
        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"),
    )
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    build = subprocess.run(
        [*pip, "-w", str(tmp_path / "dist"), str(project)], capture_output=True, text=True
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("lora_rlhf-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)

    out = tmp_path / "out"
    code = (
        "import sys, lora_rlhf; from lora_rlhf.cli.command import main; "
        f"assert lora_rlhf.__file__.startswith({str(site)!r}), lora_rlhf.__file__; "
        f"sys.exit(main(['exercises', {str(out)!r}]))"
    )
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-2000:]
    for name, text in repo_exercise_files().items():
        assert (out / name).read_text() == text
