"""The one notebook runner: every ``testing_*`` function of the course's check modules ends here.

It runs a list of checks (probe and judge, in this process) on the student's functions or classes,
raises an AssertionError listing every failing check with its diagnosis, or, at an untouched stub,
the stub's own NotImplementedError (it names the exercise to fill in); else it prints one line.
"""

from __future__ import annotations

from types import SimpleNamespace

from lora_rlhf.checks.core import Check, run_check


def run_checks(checks: list[Check], impl, title: str) -> None:
    """Run `checks` on `impl` (a module or namespace holding the names they need)."""
    failures = []
    for c in checks:
        result = run_check(c, impl)
        stub = result.message.removeprefix("raised not implemented yet: ")
        if stub != result.message:
            # an untouched stub: stop with its own error, and what already failed before it
            n = len(failures)
            earlier = f"\nBefore it, {n} check{'s' * (n != 1)} failed:\n" if n else ""
            raise NotImplementedError(stub + earlier + "\n".join(failures))
        if not result.passed:
            failures.append(
                f"  ✗ {c.name} ({c.points:g} pts) — {c.description}\n      {result.message}"
            )
    if failures:
        raise AssertionError(
            f"{title}: {len(failures)} of {len(checks)} checks failed\n" + "\n".join(failures)
        )
    print(
        f"All {len(checks)} checks of {title} passed." if len(checks) > 1 else f"{title}: passed."
    )


def run_exercise(checks: list[Check], title: str, **names) -> None:
    """:func:`run_checks` on the student's objects given by name."""
    run_checks(checks, SimpleNamespace(**names), title)
