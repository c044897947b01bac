"""Checks of the Section 2 exercises: probes run the code under test, judges compare with
independent references. See :mod:`lora_rlhf.checks.core`."""

from lora_rlhf.checks.core import CHECKS, Check, CheckFailed, CheckResult, checks_for, run_check

EXERCISES = ("Lora", "LoraHooks", "TransformerWithValueHeadLora", "RLHFTrainerLora")

__all__ = ["CHECKS", "EXERCISES", "Check", "CheckFailed", "CheckResult", "checks_for", "run_check"]
