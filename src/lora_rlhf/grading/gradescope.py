"""`lora-rlhf gradescope-bundle OUT.zip`: Gradescope's autograder zip.

Gradescope unzips the bundle into ``/autograder/source``, runs ``setup.sh`` once (as root) while
it builds the autograder image, then ``run_autograder`` for every submission, with the student's
files in ``/autograder/submission``; it reads ``/autograder/results/results.json``.

The bundle holds this package's source (``lora_rlhf/``, with a ``pyproject.toml`` listing the
installed version's dependencies), ``setup.sh``, which installs it into a virtual environment
(``/autograder/venv``; CPU-only torch), and ``run_autograder``, which runs ``lora-rlhf grade``.
Both scripts take their root from ``$AUTOGRADER_ROOT`` (default ``/autograder``), so a test can
lay out a fake one; ``run_autograder`` takes the Python to use from ``$LORA_RLHF_PYTHON``.
"""

from __future__ import annotations

import importlib.metadata
import shlex
import zipfile
from pathlib import Path

import lora_rlhf
from lora_rlhf.grading.reports import VISIBILITIES

DISTRIBUTION = "lora_rlhf"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
EXECUTABLE = 0o755

SETUP_SH = """\
#!/usr/bin/env bash
# Gradescope runs this once, as root, while building the autograder image (Ubuntu; choose a
# base image with Python >= 3.10, e.g. Ubuntu 24.04). It installs lora_rlhf and its dependencies
# (torch as a CPU build: the grader runs tiny models on the CPU) into a virtual environment.
set -euo pipefail
ROOT="${AUTOGRADER_ROOT:-/autograder}"
if [ -z "${PYTHON:-}" ] && command -v apt-get >/dev/null; then
    # Ubuntu's python3 creates virtual environments only with python3-venv installed
    apt-get install -y python3 python3-venv python3-pip
fi
PYTHON="${PYTHON:-python3}"
"$PYTHON" -m venv "$ROOT/venv"
"$ROOT/venv/bin/python" -m pip install --upgrade pip
"$ROOT/venv/bin/python" -m pip install --extra-index-url {torch_index} "$ROOT/source/lora_rlhf"
"$ROOT/venv/bin/python" -c "import lora_rlhf.grading.worker"  # fail the build, not the students
"""

RUN_AUTOGRADER = """\
#!/usr/bin/env bash
# Gradescope runs this for every submission: grade /autograder/submission into
# /autograder/results/results.json (always written, whatever the submission does).
ROOT="${{AUTOGRADER_ROOT:-/autograder}}"
PYTHON="${{LORA_RLHF_PYTHON:-$ROOT/venv/bin/python}}"
mkdir -p "$ROOT/results"
cd "$ROOT"
"$PYTHON" -m lora_rlhf.cli.command grade "$ROOT/submission" \\
    --results "$ROOT/results/results.json" --junit "$ROOT/results/junit.xml" {options}
status=$?
# 0 once results.json is written, whatever the score; Gradescope shows it
[ -f "$ROOT/results/results.json" ] && exit 0
exit $status
"""


def _pyproject() -> str:
    """A pyproject.toml for the bundled copy: the installed version and its required packages."""
    try:
        version = importlib.metadata.version(DISTRIBUTION)
        requires = [
            r for r in importlib.metadata.requires(DISTRIBUTION) or [] if "extra ==" not in r
        ]
    except importlib.metadata.PackageNotFoundError:
        version, requires = "0", []
    deps = "".join(f"    {r!r},\n".replace("'", '"') for r in requires)
    return (
        '[build-system]\nrequires = ["setuptools>=68"]\nbuild-backend = "setuptools.build_meta"\n\n'
        f'[project]\nname = "{DISTRIBUTION}"\nversion = "{version}"\n'
        f'requires-python = ">=3.10"\ndependencies = [\n{deps}]\n\n'
        '[project.scripts]\nlora-rlhf = "lora_rlhf.cli.command:main"\n\n'
        '[tool.setuptools.packages.find]\nwhere = ["src"]\n\n'
        '[tool.setuptools.package-data]\nlora_rlhf = ["assets/**/*"]\n'
    )


def grade_options(
    visibility: str = "visible",
    leaderboard: bool = False,
    total_timeout: float | None = None,
    memory_mb: int | None = None,
) -> list[str]:
    """The `lora-rlhf grade` options that run_autograder passes."""
    if visibility not in VISIBILITIES:
        raise ValueError(f"visibility must be one of {', '.join(VISIBILITIES)}, got {visibility!r}")
    options = ["--quiet", f"--visibility={visibility}"]
    if leaderboard:
        options.append("--leaderboard")
    if total_timeout is not None:
        options.append(f"--total-timeout={total_timeout:g}")
    if memory_mb is not None:
        options.append(f"--memory-mb={memory_mb}")
    return options


def _add(zf: zipfile.ZipFile, name: str, text: str, mode: int = 0o644) -> None:
    info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
    info.external_attr = (0o100000 | mode) << 16  # a regular file with these permissions
    info.compress_type = zipfile.ZIP_DEFLATED
    zf.writestr(info, text)


def write_bundle(out: str | Path, **options) -> Path:
    """Write the autograder zip to `out`; `options` as :func:`grade_options` takes them."""
    out = Path(out)
    if out.suffix != ".zip":
        raise ValueError(f"{out}: the bundle must be a .zip file")
    package = Path(lora_rlhf.__file__).resolve().parent
    run = RUN_AUTOGRADER.format(options=shlex.join(grade_options(**options)))
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(out, "w") as zf:
        _add(zf, "setup.sh", SETUP_SH.replace("{torch_index}", TORCH_CPU_INDEX), EXECUTABLE)
        _add(zf, "run_autograder", run, EXECUTABLE)
        _add(zf, "lora_rlhf/pyproject.toml", _pyproject())
        for path in sorted(package.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                name = f"lora_rlhf/src/lora_rlhf/{path.relative_to(package).as_posix()}"
                zf.write(path, name)
    return out


def unpack(bundle: str | Path, root: str | Path) -> Path:
    """Lay `bundle` out as Gradescope does under `root` (for tests): ``source/`` holds the
    bundle, ``run_autograder`` and ``setup.sh`` are executable, ``submission/`` and
    ``results/`` exist."""
    root = Path(root)
    source = root / "source"
    with zipfile.ZipFile(bundle) as zf:
        zf.extractall(source)
        for info in zf.infolist():
            mode = (info.external_attr >> 16) & 0o777
            if mode:
                (source / info.filename).chmod(mode)
    (root / "run_autograder").write_bytes((source / "run_autograder").read_bytes())
    (root / "run_autograder").chmod(EXECUTABLE)
    (root / "submission").mkdir(exist_ok=True)
    (root / "results").mkdir(exist_ok=True)
    return root
