"""The rubric: every registered check, its exercise and its points (they sum to 100).

The points live with the checks (``@check(exercise, points=...)``); this module only orders and
totals them, and prints the table that docs/grading.md shows (``python -m lora_rlhf.grading.rubric``).
"""

from __future__ import annotations

from lora_rlhf.checks import EXERCISES, Check, checks_for


def rubric() -> dict[str, list[Check]]:
    """Exercise name → its checks, in the order students meet them."""
    by_exercise: dict[str, list[Check]] = {name: [] for name in EXERCISES}
    for c in checks_for():
        by_exercise.setdefault(c.exercise, []).append(c)
    return by_exercise


def exercise_points() -> dict[str, float]:
    return {name: sum(c.points for c in checks) for name, checks in rubric().items()}


def markdown_table() -> str:
    """The rubric as a Markdown table (one row per check, a subtotal per exercise)."""
    rows = ["| exercise | check | points | what it checks |", "|---|---|---:|---|"]
    for exercise, checks in rubric().items():
        for c in checks:
            rows.append(f"| {exercise} | `{c.name}` | {c.points:g} | {c.description} |")
        rows.append(f"| **{exercise}** | | **{sum(c.points for c in checks):g}** | |")
    total = sum(exercise_points().values())
    rows.append(f"| **total** | | **{total:g}** | |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
