"""Notebook-style checks of the GRPO bonus (``section3_grpo.py``), as :mod:`lora_rlhf.tests_lora`
has them for Section 2.

Each takes the student's function or class, runs every check of that exercise (from
:mod:`lora_rlhf.checks.grpo_checks`), raises an AssertionError that says what is wrong (or the
stub's own NotImplementedError), and prints a success line.
"""

from __future__ import annotations

import sys

from lora_rlhf.checks.grpo_checks import GRPO
from lora_rlhf.checks.notebook import run_exercise


def _run_exercise(exercise: str, **names) -> None:
    run_exercise(GRPO.for_exercise(exercise), exercise, **names)


def testing_group_advantages(group_advantages) -> None:
    """GRPO and RLOO advantages on hand-made groups, and groups of equal rewards."""
    _run_exercise("group_advantages", group_advantages=group_advantages)


def testing_kl_k3(calc_kl_k3) -> None:
    """k3 against its formula in float64, its gradient, ≥ 0 and 0 for equal policies."""
    _run_exercise("calc_kl_k3", calc_kl_k3=calc_kl_k3)


def testing_grpo_objective(calc_grpo_objective) -> None:
    """The objective and its gradient against a direct formula, both clip sides active."""
    _run_exercise("calc_grpo_objective", calc_grpo_objective=calc_grpo_objective)


def testing_grpo_trainer(GRPOTrainerLora) -> None:
    """Rollout (reference = base model), objective, no value head, and a short run that learns.

    The trainer's own module supplies ``GRPOArgsLora`` and ``GroupMinibatch`` when it defines them."""
    module = sys.modules.get(GRPOTrainerLora.__module__)
    names = {
        n: getattr(module, n) for n in ("GRPOArgsLora", "GroupMinibatch") if hasattr(module, n)
    }
    _run_exercise("GRPOTrainerLora", GRPOTrainerLora=GRPOTrainerLora, **names)
