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


CHECKS: dict[str, Check] = {}


def check(
    exercise: str,
    points: float,
    needs: tuple[str, ...] = (),
    registry: dict[str, Check] | None = None,
):
    """Register a check: decorate the probe, then attach the judge with ``@probe.judge``.
    A bonus section passes its own `registry`, keeping its checks out of the 100 points."""
    registry = CHECKS if registry is None else registry

    def register(probe: Callable[[Any], Outputs]):
        name = probe.__name__.removeprefix("probe_")

        def set_judge(judge: Callable[[Outputs], None]):
            registry[name] = Check(
                name=name,
                exercise=exercise,
                points=points,
                description=(probe.__doc__ or "").strip().splitlines()[0],
                probe=probe,
                judge=judge,
                needs=needs or (exercise,),
            )
            return judge

        probe.judge = set_judge  # type: ignore[attr-defined]
        return probe

    return register


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
    try:
        with torch.device(device):
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


def checks_for(exercise: str | None = None) -> list[Check]:
    from lora_rlhf.checks import all_checks  # registers every check

    # the order of all_checks.MODULES (a test that imports one module first registers it first)
    rank = {module.__name__: i for i, module in enumerate(all_checks.MODULES)}
    ordered = sorted(CHECKS.values(), key=lambda c: rank.get(c.probe.__module__, len(rank)))
    return [c for c in ordered if exercise is None or c.exercise == exercise]


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)
