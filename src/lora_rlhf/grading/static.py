"""What the grader learns from a submission's source before running any of it.

* :func:`syntax_error` compiles the file (compiling never executes it) and reports file:line.
* :func:`scan` walks the AST for **tampering** (:mod:`.tamper`: code that reaches into the
  libraries, the checks or the grader), which costs every point, and for **reuse of the reference
  classes** (:mod:`.reuse`), which costs the exercises concerned (and every check that needs them).

The scan is defence in depth: verdicts are reached by the judges in the grading process, which the
submission never runs in, so patching a library in the submission's process cannot pass a check
anyway. Only the submission's own file is scanned: it is loaded as a lone module, so it cannot
import neighbours without ``sys.path`` tricks, which are tampering too.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import threading
from dataclasses import dataclass, field
from pathlib import Path

from lora_rlhf.grading.names import Finding, Names
from lora_rlhf.grading.reuse import find_reuse
from lora_rlhf.grading.tamper import find_tampering

__all__ = ["Finding", "ScanReport", "parse", "scan", "syntax_error"]

# CPython 3.11.7 (gh-106905) can fail ast.parse in threads that parse at once ("AST constructor
# recursion depth mismatch"), which grade-class's threads do: one parse at a time.
_PARSE_LOCK = threading.Lock()


def parse(source: str | bytes, filename: str = "<unknown>") -> ast.Module:
    """``ast.parse``, one thread at a time (see ``_PARSE_LOCK``)."""
    with _PARSE_LOCK:
        return ast.parse(source, filename)


@dataclass
class ScanReport:
    tampering: list[Finding] = field(default_factory=list)
    reused: dict[str, Finding] = field(default_factory=dict)  # exercise → why it scores nothing


def syntax_error(path: Path) -> str | None:
    """``"file:line:col: SyntaxError: ..."`` when the file does not compile, else None."""
    try:
        compile(path.read_bytes(), str(path), "exec", dont_inherit=True)
    except SyntaxError as exc:
        where = f"{exc.filename or path}:{exc.lineno}" + (f":{exc.offset}" if exc.offset else "")
        text = (exc.text or "").strip()
        return f"{where}: {type(exc).__name__}: {exc.msg}" + (f"\n    {text}" if text else "")
    except (ValueError, UnicodeDecodeError) as exc:  # null bytes, not UTF-8
        return f"{path}: cannot be read as Python source ({exc})"
    return None


@functools.cache
def _install_cell() -> str:
    """``lora_rlhf.authoring.sync.INSTALL_CELL``, read from the module's source: importing authoring
    would import jupytext and nbformat, on the grading's critical path."""
    spec = importlib.util.find_spec("lora_rlhf.authoring.sync")
    if spec is None or spec.origin is None:
        return ""
    tree = parse(Path(spec.origin).read_text())
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else []
        if any(isinstance(t, ast.Name) and t.id == "INSTALL_CELL" for t in targets):
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                return ""
            return value if isinstance(value, str) else ""
    return ""


def install_cell_lines(source: str) -> range:
    """The lines of the course's own install cell (:data:`lora_rlhf.authoring.sync.INSTALL_CELL`,
    which every generated exercise file starts with), when `source` holds it word for word.

    That cell imports ``importlib`` and ``subprocess`` to pip-install the course on Google Colab
    and does nothing elsewhere; only its own lines are exempt from the tampering scan, so a later
    line that uses the names it imports is still flagged."""
    cell = _install_cell().strip("\n") + "\n"
    if cell == "\n":
        return range(0)
    at = source.find(cell)
    if at < 0 or source.count(cell) != 1:
        return range(0)
    first = source.count("\n", 0, at) + 1
    return range(first, first + cell.count("\n"))


def scan(path: Path) -> ScanReport:
    """Tampering and reuse of the reference classes in a file that compiles."""
    data = path.read_bytes()
    names = Names(parse(data, str(path)))
    exempt = install_cell_lines(data.decode("utf-8", errors="replace"))
    tampering = [f for f in find_tampering(names) if f.line not in exempt]
    return ScanReport(tampering=tampering, reused=find_reuse(names))
