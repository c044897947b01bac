"""The check framework: every check is a *probe* and a *judge*.

* ``probe(impl) -> outputs`` runs the implementation under test (a student's classes) on fixed,
  seeded inputs and returns plain data: tensors, numbers, strings, lists and dicts.
* ``judge(outputs)`` compares those outputs with independent references (direct formulas, the
  adaptor merged into the weights of a freshly loaded model) and raises :class:`CheckFailed` with
  a message that names the likely mistake.

In a notebook or under pytest both halves run in one process. The grader runs each probe in a
sandboxed child process and every judge in the grading process itself, which never imports
submission code, so code under test can never reach the verdict.
"""

from __future__ import annotations

import contextlib
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

Outputs = dict[str, Any]


class CheckFailed(AssertionError):
    """A check's verdict: what is wrong, in words a student can act on."""


@dataclass(frozen=True)
class Check:
    name: str
    exercise: str  # "Lora", "LoraHooks", "TransformerWithValueHeadLora", "RLHFTrainerLora"
    points: float
    description: str
    probe: Callable[[Any], Outputs]
    judge: Callable[[Outputs], None]
    needs: tuple[str, ...] = ()  # names the implementation must define for this check


class Registry:
    """One section's checks, by name. Section 2's rubric is :data:`SECTION2`; each bonus section
    keeps its own registry, so its checks never enter the 100 points of Section 2 (``lora_rlhf.checks.checks_for()``)."""

    def __init__(self, section: str) -> None:
        self.section = section
        self.checks: dict[str, Check] = {}

    def _add(self, name, exercise, points, doc, probe, judge, needs) -> None:
        description = (doc or "").strip().splitlines()[0]
        self.checks[name] = Check(
            name, exercise, points, description, probe, judge, needs or (exercise,)
        )

    def check(self, exercise: str, points: float = 0, needs: tuple[str, ...] = ()):
        """Register a check: decorate the probe, then attach the judge with ``@probe.judge``."""

        def register(probe: Callable[[Any], Outputs]):
            name = probe.__name__.removeprefix("probe_")

            def set_judge(judge: Callable[[Outputs], None]):
                self._add(name, exercise, points, probe.__doc__, probe, judge, needs)
                return judge

            probe.judge = set_judge  # type: ignore[attr-defined]
            return probe

        return register

    def judged(self, exercise: str, probe, needs: tuple[str, ...] = (), points: float = 0):
        """Register the decorated judge as a check of `probe`'s outputs, named after the judge
        (several judges may read one probe)."""

        def register(judge: Callable[[Outputs], None]):
            name = judge.__name__.removeprefix("judge_")
            self._add(name, exercise, points, judge.__doc__, probe, judge, needs)
            return judge

        return register

    def for_exercise(self, exercise: str | None = None) -> list[Check]:
        """The checks of `exercise` (every one when None), in the order they were registered."""
        return [c for c in self.checks.values() if exercise is None or c.exercise == exercise]


SECTION2 = Registry("section2")
# The bonus sections' registries (0 points, or optional points on top of Section 2's 100)
GRPO = Registry("grpo")
MLP = Registry("mlp")
FAST = Registry("fast")
CHECKS: dict[str, Check] = SECTION2.checks


def check(exercise: str, points: float, needs: tuple[str, ...] = ()):
    """Register a check of Section 2's rubric (see :meth:`Registry.check`)."""
    return SECTION2.check(exercise, points, needs)


@dataclass
class CheckResult:
    name: str
    exercise: str
    passed: bool
    message: str
    points: float
    max_points: float


def missing_names(impl: Any, check_: Check) -> list[str]:
    return [n for n in check_.needs if getattr(impl, n, None) is None]


def to_cpu(value: Any) -> Any:
    """Outputs as judges see them: tensors detached on the CPU, containers rebuilt."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_cpu(v) for v in value]
    return value


def run_probe(check_: Check, impl: Any, device: str = "cpu") -> Outputs:
    """Run the probe on `device`; an exception from the code under test becomes a recorded error."""
    missing = missing_names(impl, check_)
    if missing:
        return {
            "__failed__": f"not written: the implementation does not define {', '.join(missing)}"
        }
    # The device as a context makes the tensors a probe creates land on it; on cpu, when cpu is
    # already the default, it would only add a dispatch step to every torch call of the probe.
    on_device = (
        contextlib.nullcontext()
        if torch.device(device) == torch.get_default_device()
        else torch.device(device)
    )
    try:
        with on_device:
            return to_cpu(check_.probe(impl))
    except CheckFailed as exc:
        return {"__failed__": str(exc)}
    except NotImplementedError as exc:
        return {"__error__": f"not implemented yet: {exc}"}
    except Exception as exc:  # the code under test may raise anything
        return {"__error__": f"{type(exc).__name__}: {exc}{_where(exc)}"}


def _where(exc: BaseException) -> str:
    """`` (at file.py:12)``: the deepest line of the code under test, rather than of torch, the
    standard library or these checks (fall back to the deepest line of all)."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    libraries = tuple(
        str(Path(m.__file__).resolve().parents[i])
        for m, i in ((torch, 1), (traceback, 0), (sys.modules[__name__], 1))
    )
    own = [f for f in frames if not str(Path(f.filename).resolve()).startswith(libraries)]
    frame = (own or frames)[-1]
    return f" (at {Path(frame.filename).name}:{frame.lineno})"


def judge_outputs(check_: Check, outputs: Outputs) -> CheckResult:
    """Reach the verdict for one check from a probe's outputs (never runs code under test)."""
    if not isinstance(outputs, dict):
        message, passed = "the probe returned no outputs", False
    elif "__error__" in outputs:
        message, passed = f"raised {outputs['__error__']}", False
    elif "__failed__" in outputs:
        message, passed = str(outputs["__failed__"]), False
    else:
        try:
            check_.judge(outputs)
            message, passed = "ok", True
        except CheckFailed as exc:
            message, passed = str(exc), False
        except Exception as exc:  # malformed outputs: a failure, never a pass
            message, passed = f"unexpected outputs ({type(exc).__name__}: {exc})", False
    return CheckResult(
        name=check_.name,
        exercise=check_.exercise,
        passed=passed,
        message=message,
        points=check_.points if passed else 0.0,
        max_points=check_.points,
    )


def run_check(check_: Check, impl: Any, device: str = "cpu") -> CheckResult:
    """Probe (on `device`) and judge in this process (notebooks, pytest)."""
    return judge_outputs(check_, run_probe(check_, impl, device))


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)
