"""Checks of the Section 2 exercises: probes run the code under test, judges compare with
independent references. See :mod:`lora_rlhf.checks.core`."""

from lora_rlhf.checks.core import CHECKS, Check, CheckFailed, CheckResult, run_check

EXERCISES = ("Lora", "LoraHooks", "TransformerWithValueHeadLora", "RLHFTrainerLora")


def checks_for(exercise: str | None = None) -> list[Check]:
    """Section 2's graded checks of `exercise` (every one when None), in the rubric's order
    (importing :mod:`.all_checks` on first use registers them)."""
    import lora_rlhf.checks.all_checks as all_checks

    return all_checks.checks_for(exercise)


__all__ = ["CHECKS", "EXERCISES", "Check", "CheckFailed", "CheckResult", "checks_for", "run_check"]
