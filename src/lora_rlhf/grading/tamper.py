"""Tampering: code that reaches into the libraries, the checks or the grader.

Flagged (outside ``if __name__ == "__main__":``, which never runs when graded): assigning or
deleting attributes of imported modules and of their objects (``torch.allclose = ...``,
``Tensor.__eq__ = ...``), ``setattr``/``delattr`` on them; ``__import__``, importlib, ``exec``,
``eval``, ``compile``, ``globals()``; ctypes, gc, builtins, pickle/marshal; starting or signalling
processes; ``sys.modules``, ``sys.path``, ``sys._getframe``, tracing, frame inspection (``inspect``
frames, ``tb_frame``, ``f_back``, ``__globals__``, ``__subclasses__`` ...); importing the checks,
the grader, ``solutions`` or the tests, or reaching them through other modules' attributes.
"""

from __future__ import annotations

import ast
from collections.abc import Callable

from lora_rlhf.grading.names import (
    MISSING,
    Finding,
    Names,
    getattr_constant,
    home_module,
    import_bindings,
    is_main_guard,
    is_private,
    library_object,
    source,
    under,
)

# Importing any of these (or anything inside them) is tampering.
FORBIDDEN_IMPORTS: dict[str, str] = {
    **dict.fromkeys(
        ("importlib", "imp", "_imp", "zipimport", "pkgutil", "runpy", "site"),
        "imports modules dynamically",
    ),
    **dict.fromkeys(("ctypes", "_ctypes", "cffi"), "calls C code directly"),
    "gc": "reaches live objects through the garbage collector",
    **dict.fromkeys(("builtins", "__builtin__"), "changes Python's builtins"),
    **dict.fromkeys(
        ("marshal", "pickle", "_pickle", "cloudpickle", "dill", "code", "codeop"),
        "builds code at run time",
    ),
    **dict.fromkeys(
        ("subprocess", "_posixsubprocess", "multiprocessing", "pty", "signal"),
        "starts or signals processes",
    ),
    **dict.fromkeys(
        ("solutions", "exercises", "section2_lora", "tests", "mutants", "conftest"),
        "imports the course's solutions or tests",
    ),
}

# Reaching any of these dotted names (by import or attribute access) is tampering.
FORBIDDEN_NAMES: dict[str, str] = {
    "sys.modules": "reaches other modules through sys.modules",
    "sys.path": "changes where modules are imported from",
    "sys.meta_path": "changes how modules are imported",
    "sys.path_hooks": "changes how modules are imported",
    "sys.path_importer_cache": "changes how modules are imported",
    "sys._getframe": "inspects the caller's frames",
    "sys._current_frames": "inspects the caller's frames",
    "sys.settrace": "traces the grader's code",
    "sys.setprofile": "traces the grader's code",
    "sys.addaudithook": "hooks the interpreter",
    "sys.excepthook": "changes how errors are reported",
    "threading.settrace": "traces the grader's code",
    "threading.setprofile": "traces the grader's code",
    **dict.fromkeys(
        (
            "inspect.currentframe",
            "inspect.stack",
            "inspect.trace",
            "inspect.getouterframes",
            "inspect.getinnerframes",
            "inspect.getframeinfo",
            "traceback.walk_stack",
            "traceback.walk_tb",
        ),
        "inspects the caller's frames",
    ),
    **dict.fromkeys(
        (
            "os.system",
            "os.popen",
            "os.fork",
            "os.forkpty",
            "os.kill",
            "os.killpg",
            "os.exec*",
            "os.spawn*",
            "os.posix_spawn*",
            "os.register_at_fork",
        ),
        "starts or signals processes",
    ),
}

# Builtins that run or reach arbitrary code, flagged wherever they are read.
FORBIDDEN_BUILTINS: dict[str, str] = {
    "exec": "runs code built at run time",
    "eval": "runs code built at run time",
    "compile": "builds code at run time",
    "__import__": "imports modules dynamically",
    "globals": "reaches module globals by name",
    "locals": "reaches local variables by name",
    "breakpoint": "starts a debugger",
    "__builtins__": "changes Python's builtins",
    "__loader__": "reaches the import machinery",
    "__spec__": "reaches the import machinery",
}

# Attributes that lead from any object to frames, globals or code, flagged wherever they appear.
ESCAPE_ATTRIBUTES = frozenset(
    {
        "__globals__", "__builtins__", "__subclasses__", "__code__", "__closure__",
        "__traceback__", "__import__", "__loader__", "__spec__", "tb_frame", "tb_next",
        "f_back", "f_globals", "f_locals", "f_builtins", "f_code", "gi_frame", "cr_frame",
        "ag_frame", "_getframe",
    }
)  # fmt: skip
# Attributes flagged when read from an imported module or one of its objects.
MODULE_ESCAPE_ATTRIBUTES = frozenset({"__dict__", "__setattr__", "__delattr__"})
SETTERS = frozenset({"setattr", "delattr", "__setattr__", "__delattr__"})

Flag = Callable[[ast.AST, str], None]


def find_tampering(names: Names) -> list[Finding]:
    """Every tampering line of the submission, in line order."""
    findings: dict[tuple[int, str], Finding] = {}

    def flag(node: ast.AST, message: str) -> None:
        line = getattr(node, "lineno", 0)
        findings.setdefault((line, message), Finding(line, message))

    main_guards = {id(n) for s in names.tree.body if is_main_guard(s) for n in ast.walk(s)}
    for node in ast.walk(names.tree):
        if id(node) in main_guards:
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            _check_import(names, node, flag)
        elif isinstance(node, ast.Name):
            if node.id == "__name__" and isinstance(node.ctx, ast.Store):
                flag(node, "assigns __name__")
            why = FORBIDDEN_BUILTINS.get(node.id)
            if why and isinstance(node.ctx, ast.Load) and node.id not in names.assigned:
                flag(node, f"`{node.id}` {why}")
            _check_dotted(names, node, flag)
        elif isinstance(node, (ast.Attribute, ast.Subscript)):
            root = names.root(node)
            if root and isinstance(node.ctx, (ast.Store, ast.Del)):
                verb = "deletes" if isinstance(node.ctx, ast.Del) else "assigns to"
                flag(node, f"`{source(node)}` {verb} an attribute of the imported `{root}`")
            if isinstance(node, ast.Attribute):
                _check_attribute(names, node, node.attr, flag)
                _check_dotted(names, node, flag)
        elif isinstance(node, ast.Call):
            _check_call(names, node, flag)
    return sorted(findings.values(), key=lambda f: (f.line, f.message))


def _forbidden(dotted: str) -> str | None:
    """Why reaching `dotted` (a module or a name in one) is tampering, or None."""
    for table in (FORBIDDEN_IMPORTS, FORBIDDEN_NAMES):
        why = next((why for m, why in table.items() if under(dotted, m)), None)
        if why:
            return why
    if is_private(dotted):
        return "reaches the checks or the grader"
    if under(dotted, "lora_rlhf.tests_lora") and dotted.count(".") >= 2:
        if not dotted.split(".")[2].startswith("test"):
            return "reaches inside the notebook checks (only their test functions may be used)"
    if under(dotted, "lora_rlhf"):  # e.g. lora_rlhf.tests_lora.run_check is a checks function
        obj = library_object(dotted)
        if obj is not MISSING and is_private(home_module(obj)):
            return "reaches the checks or the grader"
    return None


def _check_import(names: Names, node: ast.Import | ast.ImportFrom, flag: Flag) -> None:
    if isinstance(node, ast.Import):  # `import a.b.c` binds `a` but imports a.b.c
        targets = [alias.name for alias in node.names]
    else:
        targets = [target for _, target in import_bindings(node)]
    for target in targets:
        why = _forbidden(target)
        if why:
            flag(node, f"`{source(node)}` {why}")


def _check_dotted(names: Names, node: ast.AST, flag: Flag) -> None:
    for dotted in names.dotted(node):
        why = _forbidden(dotted)
        if why:
            flag(node, f"`{source(node)}` {why}")


def _check_attribute(names: Names, node: ast.AST, attr: str, flag: Flag) -> None:
    if attr in ESCAPE_ATTRIBUTES:
        flag(node, f"`{source(node)}` reaches frames, globals or code objects")
    elif attr in MODULE_ESCAPE_ATTRIBUTES and names.root(node):
        flag(node, f"`{source(node)}` reaches inside the imported `{names.root(node)}`")


def _check_call(names: Names, node: ast.Call, flag: Flag) -> None:
    func = node.func
    name = getattr(func, "id", None) or getattr(func, "attr", "")
    if name in SETTERS and any(names.root(a) for a in node.args):
        flag(node, f"`{source(node)}` changes an attribute of an imported module")
    elif name == "vars" and isinstance(func, ast.Name):
        if not node.args or names.root(node.args[0]):
            flag(node, f"`{source(node)}` reaches module globals by name")
    elif name == "getattr" and isinstance(func, ast.Name) and len(node.args) >= 2:
        attr = getattr_constant(node)
        if attr is not None:
            _check_attribute(names, node, attr, flag)
            _check_dotted(names, node, flag)
        elif names.root(node.args[0]):
            flag(
                node,
                f"`{source(node)}` reads an attribute of an imported module by a computed name",
            )
