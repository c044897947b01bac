"""Name resolution in a submission's AST, shared by the tampering and reuse scans.

A name bound by an import (``import torch.testing as tt``, ``from torch import nn``) or by an
alias of one (``t = torch``) *denotes* a dotted name (``torch.testing``); an expression such as
``tt.assert_close`` then denotes ``torch.testing.assert_close``. A dotted name under ``lora_rlhf``
can be resolved to the library's actual object by importing the library's own modules — never the
submission, never the checks or the grader.
"""

from __future__ import annotations

import ast
import fnmatch
import functools
import importlib
import sys
import types
from dataclasses import dataclass

EXERCISES = ("Lora", "LoraHooks", "TransformerWithValueHeadLora", "RLHFTrainerLora")
REFERENCE_MODULE = "lora_rlhf.lessons.section2_lora"
# The library's modules that hold the checks and the grader.
PRIVATE_MODULES = (
    "lora_rlhf.checks",
    "lora_rlhf.grading",
    "lora_rlhf.authoring.implementations",
    "lora_rlhf.authoring.sync",
    "lora_rlhf.cli.command",
    "lora_rlhf.cli.train",
    "lora_rlhf.cli.train_options",
    "lora_rlhf.cli.settings",
    "lora_rlhf.cli.outputs",
    "lora_rlhf.cli.recorder",
    "lora_rlhf.cli.run_files",
)
MISSING = object()
Env = dict[str, set[str]]  # name → the dotted names it may denote


@dataclass(frozen=True)
class Finding:
    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


def source(node: ast.AST, limit: int = 60) -> str:
    """The node's code, on one line, shortened to `limit` characters."""
    text = ast.unparse(node).replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def under(name: str, prefix: str) -> bool:
    """`name` is `prefix` or inside it (``os.exec*`` patterns allowed)."""
    if "*" in prefix:
        return fnmatch.fnmatchcase(name, prefix) or fnmatch.fnmatchcase(name, prefix + ".*")
    return name == prefix or name.startswith(prefix + ".")


def is_private(dotted: str) -> bool:
    return any(under(dotted, m) for m in PRIVATE_MODULES)


@functools.lru_cache(maxsize=4096)
def library_object(dotted: str):
    """The object a ``lora_rlhf...`` dotted name denotes, or MISSING."""
    if not under(dotted, "lora_rlhf") or is_private(dotted):
        return MISSING
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        name = ".".join(parts[:i])
        try:
            obj = sys.modules.get(name) or importlib.import_module(name)
        except Exception:  # not a module: try its parent
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr, MISSING)
            if obj is MISSING:
                return MISSING
        return obj
    return MISSING


def home_module(obj) -> str:
    """The module that defines `obj` (a module is its own home)."""
    if isinstance(obj, types.ModuleType):
        return obj.__name__
    return getattr(obj, "__module__", None) or ""


def is_main_guard(node: ast.stmt) -> bool:
    """``if __name__ == "__main__":`` — never true when the grader imports the submission."""
    test = getattr(node, "test", None)
    return (
        isinstance(node, ast.If)
        and isinstance(test, ast.Compare)
        and isinstance(test.left, ast.Name)
        and test.left.id == "__name__"
        and len(test.comparators) == 1
        and isinstance(test.comparators[0], ast.Constant)
        and test.comparators[0].value == "__main__"
    )


def import_bindings(node: ast.Import | ast.ImportFrom) -> list[tuple[str, str]]:
    """``(bound name, dotted target)`` pairs; the name is ``"*"`` for a star import."""
    if isinstance(node, ast.Import):  # `import a.b` binds `a`; `import a.b as c` binds a.b
        return [
            (alias.asname, alias.name) if alias.asname else ((top := alias.name.split(".")[0]), top)
            for alias in node.names
        ]
    module = "." * node.level + (node.module or "")
    sep = "." if node.module else ""
    return [
        ("*", module)
        if alias.name == "*"
        else (alias.asname or alias.name, module + sep + alias.name)
        for alias in node.names
    ]


def star_names(module: str) -> list[str]:
    """The names ``from <module> import *`` binds, for the library's own modules."""
    obj = library_object(module)
    if not isinstance(obj, types.ModuleType):
        return []
    names = getattr(obj, "__all__", None)
    return list(names) if names is not None else [n for n in vars(obj) if not n.startswith("_")]


def bind_import(node: ast.Import | ast.ImportFrom, env: Env, replace: bool) -> list[str]:
    """Record what an import binds in `env`; return the bound names."""
    bound = []
    for name, target in import_bindings(node):
        pairs = (
            [(s, f"{target}.{s}") for s in star_names(target)] if name == "*" else [(name, target)]
        )
        for n, t in pairs:
            env[n] = {t} if replace else env.get(n, set()) | {t}
            bound.append(n)
    return bound


class Names:
    """Every name the submission binds, anywhere, to an import or an alias of one."""

    def __init__(self, tree: ast.Module):
        self.tree = tree
        self.env: Env = {}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                bind_import(node, self.env, replace=False)
        for _ in range(3):  # aliases of aliases: `t = torch; tt = t.testing`
            for node in ast.walk(tree):
                if isinstance(node, ast.Assign):
                    targets = self.dotted(node.value)
                    for t in node.targets:
                        if isinstance(t, ast.Name) and targets:
                            self.env.setdefault(t.id, set()).update(targets)
        self.assigned = {
            n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)
        } | {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}

    def dotted(self, node: ast.AST, env: Env | None = None) -> set[str]:
        """The dotted names an expression may denote, when it is an import or an attribute of one."""
        env = self.env if env is None else env
        if isinstance(node, ast.Name):
            return set(env.get(node.id) or ())
        if isinstance(node, ast.Attribute):
            return {f"{base}.{node.attr}" for base in self.dotted(node.value, env)}
        attr = getattr_constant(node)
        if attr is not None:
            return {f"{base}.{attr}" for base in self.dotted(node.args[0], env)}
        return set()

    def root(self, node: ast.AST) -> str | None:
        """The imported name a chain hangs from: ``torch`` in ``torch.a[0].b`` or ``vars(torch)``."""
        while True:
            if isinstance(node, (ast.Attribute, ast.Subscript, ast.Starred)):
                node = node.value
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "type", "vars")
                and node.args
            ):
                node = node.args[0]
            elif isinstance(node, ast.Name):
                return node.id if node.id in self.env else None
            else:
                return None


def getattr_constant(node: ast.AST) -> str | None:
    """``"b"`` for ``getattr(a, "b")``, else None."""
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "getattr"
        and len(node.args) >= 2
        and isinstance(node.args[1], ast.Constant)
        and isinstance(node.args[1].value, str)
    ):
        return node.args[1].value
    return None
