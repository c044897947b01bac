"""Reuse of the reference classes: an exercise scores only with the submission's own class.

The library ships the reference implementation (:mod:`lora_rlhf.lessons.section2_lora`). An exercise's class must
be defined in the submission by a ``class`` statement (possibly under another name and aliased)
whose bases, body and helpers never use a reference class: ``from lora_rlhf import Lora``,
``from lora_rlhf.lessons.section2_lora import *`` (without redefining the class), ``class Lora(lora_rlhf.lessons.section2_lora.Lora)``,
``LoraHooks`` building the library's ``Lora`` or a helper function calling it all count as reuse.

Names are resolved the way Python runs the module: top-level code sees the bindings made so far,
function bodies the module's final bindings.
"""

from __future__ import annotations

import ast
import functools
import importlib
import types

from lora_rlhf.grading.names import (
    EXERCISES,
    MISSING,
    REFERENCE_MODULE,
    Env,
    Finding,
    Names,
    bind_import,
    is_main_guard,
    library_object,
    source,
)

Use = tuple[ast.AST, str]  # (where, the reference it denotes)


@functools.cache
def _reference_classes() -> tuple[type, ...]:
    lora = importlib.import_module(REFERENCE_MODULE)
    return tuple(getattr(lora, n) for n in EXERCISES if isinstance(getattr(lora, n, None), type))


def reference(dotted: set[str]) -> str | None:
    """The reference an expression denotes: a class of lora_rlhf.lessons.section2_lora (or a subclass), or it."""
    for d in sorted(dotted):
        if d in {f"lora_rlhf.{ex}" for ex in EXERCISES}:  # `from lora_rlhf import Lora`
            return f"{REFERENCE_MODULE}.{d.rsplit('.', 1)[1]}"
        obj = library_object(d)
        if obj is MISSING:
            continue
        if isinstance(obj, types.ModuleType) and obj.__name__ == REFERENCE_MODULE:
            return REFERENCE_MODULE
        if isinstance(obj, type) and issubclass(obj, _reference_classes()):
            return f"{obj.__module__}.{obj.__qualname__}"
    return None


def _top_level(body: list[ast.stmt]) -> list[ast.stmt]:
    """Top-level statements in run order, looking into top-level if/try/with blocks (whose own
    test is kept as a statement) and skipping ``if __name__ == "__main__":``."""
    out: list[ast.stmt] = []
    for stmt in body:
        if is_main_guard(stmt):
            continue
        out.append(stmt)
        if isinstance(stmt, (ast.If, ast.Try, ast.With)):
            for block in ("body", "orelse", "finalbody"):
                out.extend(_top_level(getattr(stmt, block, []) or []))
            for handler in getattr(stmt, "handlers", []):
                out.extend(_top_level(handler.body))
    return out


def _is_name_assign(stmt: ast.stmt) -> bool:
    return isinstance(stmt, ast.Assign) and all(isinstance(t, ast.Name) for t in stmt.targets)


class _Module:
    def __init__(self, names: Names):
        self.names = names
        self.statements = _top_level(names.tree.body)
        self.final: Env = {}
        self.final_lines: dict[str, int] = {}
        for stmt in self.statements:
            self.bind(stmt, self.final, self.final_lines)

    def bind(self, stmt: ast.stmt, env: Env, lines: dict[str, int]) -> None:
        """Bindings after `stmt` runs: imports and aliases of them → dotted names, else local."""
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            bound = bind_import(stmt, env, replace=True)
        elif isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            env[stmt.name], bound = set(), [stmt.name]
        elif isinstance(stmt, (ast.If, ast.Try, ast.With)):
            bound = []  # their bodies are statements of their own
        else:
            alias = self.names.dotted(stmt.value, env) if isinstance(stmt, ast.Assign) else set()
            bound = [
                n.id
                for n in ast.walk(stmt)
                if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)
            ]
            env.update({n: set(alias) for n in bound})
        lines.update(dict.fromkeys(bound, stmt.lineno))

    def uses(self, stmt: ast.stmt, now: Env) -> tuple[list[Use], set[str]]:
        """Reference uses in a top-level statement, and the names it reads."""
        uses: list[Use] = []
        reads: set[str] = set()
        later = {**self.names.env, **self.final}  # imports inside functions count too

        def visit(node: ast.AST, deferred: bool) -> None:
            if isinstance(node, (ast.Name, ast.Attribute)) and isinstance(node.ctx, ast.Load):
                ref = reference(self.names.dotted(node, later if deferred else now))
                if ref:
                    uses.append((node, ref))
                    return
                if isinstance(node, ast.Name):
                    reads.add(node.id)
                    return
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                for child in (*getattr(node, "decorator_list", []), node.args):
                    visit(child, deferred)  # evaluated when the function is defined
                for child in node.body if isinstance(node.body, list) else [node.body]:
                    visit(child, True)  # run later, with the final bindings
                return
            for child in ast.iter_child_nodes(node):
                visit(child, deferred)

        if isinstance(stmt, (ast.If, ast.Try, ast.With)):
            for part in (
                getattr(stmt, "test", None),
                *(i.context_expr for i in getattr(stmt, "items", [])),
            ):
                if part is not None:
                    visit(part, False)
        else:
            visit(stmt, False)
        return uses, reads


def find_reuse(names: Names) -> dict[str, Finding]:
    """Exercise → why it scores nothing, for every exercise that reuses a reference class."""
    module = _Module(names)
    now: Env = {}
    now_lines: dict[str, int] = {}
    defs: dict[str, ast.stmt] = {}  # top-level name → its last defining statement
    alias_of: dict[str, str] = {}  # `Lora = MyLora` → {"Lora": "MyLora"}
    tainted: dict[str, Use] = {}  # definitions that use a reference (directly or via helpers)
    reads: dict[str, set[str]] = {}
    result: dict[str, Finding] = {}
    for stmt in module.statements:
        uses, read = module.uses(stmt, now)
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined = {stmt.name: None}
        elif _is_name_assign(stmt) and not names.dotted(stmt.value, now):
            value = stmt.value.id if isinstance(stmt.value, ast.Name) else None
            defined = {t.id: value for t in stmt.targets}
        else:
            defined = {}
            alias = _is_name_assign(stmt) or isinstance(stmt, (ast.Import, ast.ImportFrom))
            if uses and not alias:
                # other module-level code using a reference, e.g. `Lora.forward = Ref.forward`
                node, ref = uses[0]
                for ex in EXERCISES:
                    if any(isinstance(n, ast.Name) and n.id == ex for n in ast.walk(stmt)):
                        result.setdefault(
                            ex,
                            Finding(
                                node.lineno,
                                f"`{source(stmt)}` patches {ex} with "
                                f"the library's reference ({ref})",
                            ),
                        )
        for name, value in defined.items():
            defs[name], reads[name] = stmt, read
            alias_of.pop(name, None)
            if value:
                alias_of[name] = value
            tainted.pop(name, None)
            if uses:
                tainted[name] = uses[0]
        module.bind(stmt, now, now_lines)

    changed = True
    while changed:  # a definition that reads a tainted definition is tainted too
        changed = False
        for name, read in reads.items():
            culprit = next(
                (n for n in sorted(read) if n in tainted and not module.final.get(n)), None
            )
            if name not in tainted and culprit:
                tainted[name] = tainted[culprit]
                changed = True

    for ex in EXERCISES:
        if ex in result:
            continue
        if module.final.get(ex):  # bound by an import (or an alias of one)
            ref = reference(module.final[ex])
            what = ref or sorted(module.final[ex])[0]
            reason = "the library's reference class" if ref else "not defined in the submission"
            result[ex] = Finding(
                module.final_lines.get(ex, 0),
                f"{ex} is {what} ({reason}): define `class {ex}` yourself",
            )
            continue
        name, seen = ex, set()
        while name in alias_of and name not in seen:
            seen.add(name)
            name = alias_of[name]
        stmt = defs.get(name)
        if stmt is None:
            continue  # not defined at all: the checks say so
        if not isinstance(stmt, ast.ClassDef):
            result[ex] = Finding(
                stmt.lineno, f"{ex} must be defined by a `class {ex}(...)` statement"
            )
        elif name in tainted:
            node, ref = tainted[name]
            what = f"`{source(node)}` is {ref}" if source(node) != ref else f"`{ref}`"
            result[ex] = Finding(
                node.lineno, f"{ex} builds on the library's reference class: {what}"
            )
    return result
