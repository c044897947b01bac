"""A check's verdict from what its probe sent back: shared by the grader and the GRPO bonus.

Both reach every verdict the same way, in the grading process: a probe that failed (crash, time or
memory limit, import error) scores 0 with its reason; otherwise the check's judge decides.
"""

from __future__ import annotations

import threading

from lora_rlhf.grading.sandbox import Limits, Outcome

MAX_MESSAGE_CHARS = 2000
MEMORY_SIGNS = (
    "can't allocate memory",
    "not enough memory",
    "Cannot allocate memory",
    "MemoryError",
    "std::bad_alloc",
    "out of memory",
)
# Judges share cached reference models (and run hooks on them): one verdict at a time.
_JUDGE_LOCK = threading.Lock()


def failed_result(check, message: str):
    """The :class:`~lora_rlhf.checks.CheckResult` of a check that scores 0, saying why."""
    from lora_rlhf.checks import CheckResult

    return CheckResult(
        name=check.name,
        exercise=check.exercise,
        passed=False,
        message=message,
        points=0.0,
        max_points=check.points,
    )


def verdict(check, outcome: Outcome, limits: Limits):
    """The check's result from its probe's ``outcome``: the judge's verdict, or the failure's;
    a memory error names the limit, and a long message is cut to :data:`MAX_MESSAGE_CHARS`."""
    from lora_rlhf.checks.core import judge_outputs

    if outcome.failure is not None:
        result = failed_result(check, outcome.failure)
    else:
        with _JUDGE_LOCK:
            result = judge_outputs(check, outcome.outputs)
    if not result.passed and any(sign in result.message for sign in MEMORY_SIGNS):
        result.message += f" — the submission went over the memory limit ({limits.memory_mb} MB)"
    if len(result.message) > MAX_MESSAGE_CHARS:
        result.message = result.message[: MAX_MESSAGE_CHARS - 1] + "…"
    return result
