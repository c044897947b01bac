"""Run a submission's probes in child processes, with a time limit per check, an overall time limit
and a memory limit; hand each check's outputs (plain data) back to the grading process.

Workers fork from a multiprocessing **fork server** that has imported torch, transformer_lens and
the checks but never run a tensor operation (forking after torch ops risks OpenMP deadlocks), so a
fresh worker costs milliseconds instead of the ~6 s of importing torch. One worker imports the
submission once and runs the requested probes one after the other; the grading process judges
each result while the worker runs the next probe. A probe that hangs is killed at its time limit
and a fresh worker carries on with the remaining checks; so does one that crashes or exits.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import multiprocessing
import os
import secrets
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

import lora_rlhf.grading.timing as timing

PRELOAD = [
    "numpy",
    "torch",
    "einops",
    "jaxtyping",
    "transformer_lens",
    "transformers",
    "lora_rlhf.rlhf.args",
    "lora_rlhf.models",
    "lora_rlhf.rlhf.value_head",
    "lora_rlhf.rlhf.ppo",
    "lora_rlhf.rlhf.trainer",
    "lora_rlhf.lessons.section2_lora",
    "lora_rlhf.tests_lora",
    "lora_rlhf.checks.all_checks",
    "lora_rlhf.grading.worker",
]
MAX_MESSAGE = 256 * 2**20
LOG_TAIL = 1500
_ids = itertools.count()
_START_LOCK = threading.Lock()


@dataclass(frozen=True)
class Limits:
    """Time and memory limits. ``check_timeout=None`` (the default) gives each check its own
    limit, from the reference's measured time (:mod:`.timing`); a number applies to every check
    and to importing the submission."""

    check_timeout: float | None = None  # seconds per check; None: per-check defaults
    total_timeout: float = timing.TOTAL_LIMIT  # seconds for all the probes together
    memory_mb: int = 4096  # address space a worker may add to the pre-imported libraries

    def for_check(self, name: str) -> float:
        return self.check_timeout or timing.check_limit(name)

    @property
    def for_import(self) -> float:
        return self.check_timeout or timing.IMPORT_LIMIT


@dataclass
class Outcome:
    """A probe's outputs, or why there are none (timed out, crashed, ...)."""

    check: str
    outputs: dict[str, Any] | None = None
    failure: str | None = None


def context() -> multiprocessing.context.BaseContext:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def start_server() -> None:
    """Start the fork server now: it imports torch in the background while the caller works.

    The server is a fresh interpreter that imports PRELOAD from its own path: before Python 3.12
    it ignores this process's ``sys.path``, and a module it cannot import is skipped silently, so
    that every worker would import torch itself. It gets this process's path as PYTHONPATH.
    """
    from multiprocessing import forkserver

    context()
    with _START_LOCK:
        saved = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        try:
            forkserver.ensure_running()
        finally:
            if saved is None:
                del os.environ["PYTHONPATH"]
            else:
                os.environ["PYTHONPATH"] = saved


@contextlib.contextmanager
def _main_module_hidden():
    """Start a process without it re-running the caller's ``__main__`` script.

    multiprocessing's forkserver and spawn methods import the parent's main script in the child
    (as ``__mp_main__``); a script that calls :func:`grade` without a ``__name__ == "__main__"``
    guard would then grade again in every worker. The worker needs nothing from it.
    """
    main = sys.modules.get("__main__")
    spec_name = getattr(getattr(main, "__spec__", None), "name", None)
    if main is None or spec_name is not None or getattr(main, "__file__", None) is None:
        yield
        return
    with _START_LOCK:
        path = main.__file__
        del main.__file__
        try:
            yield
        finally:
            main.__file__ = path


class WorkerGone(Exception):
    pass


class ProtocolError(Exception):
    pass


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


class Worker:
    """One child process: imports the submission, runs `checks`' probes, sends their outputs."""

    def __init__(self, path: Path, checks: list[str], memory_mb: int, scratch: Path):
        import lora_rlhf.grading.worker as worker

        self.nonce = secrets.token_hex(16)
        n = next(_ids)
        workdir = scratch / f"worker-{n}"
        workdir.mkdir()
        self.log = scratch / f"worker-{n}.log"
        start_server()
        ctx = context()
        self.conn, child_conn = ctx.Pipe(duplex=False)
        self.process = ctx.Process(
            target=worker.main,
            args=(
                child_conn,
                self.nonce,
                str(path),
                checks,
                memory_mb,
                str(workdir),
                str(self.log),
            ),
            daemon=True,
        )
        with _main_module_hidden():
            self.process.start()  # returns once the fork server has forked it (after preloading)
        self.started = time.monotonic()
        child_conn.close()

    def receive(self, timeout: float) -> tuple[dict, bytes] | None:
        """The next message (header, payload); None after `timeout` seconds without one."""
        from lora_rlhf.grading.worker import decode

        if not wait([self.conn], timeout=max(timeout, 0.0)):
            return None
        try:
            data = self.conn.recv_bytes(MAX_MESSAGE)
        except (EOFError, ConnectionError):
            raise WorkerGone() from None
        except OSError as exc:  # over MAX_MESSAGE
            raise ProtocolError(f"a message could not be read: {exc}") from None
        try:
            header, payload = decode(data)
        except ValueError as exc:
            raise ProtocolError(f"a malformed message ({exc})") from None
        if header.get("nonce") != self.nonce:
            raise ProtocolError("a message without this worker's nonce")
        return header, payload

    def exit_reason(self, during: str) -> str:
        """``the submission exited during <during> (exit code 0)``, ``... crashed ... (SIGSEGV)``."""
        self.process.join(5)
        code = self.process.exitcode
        if code is None:
            verb, detail = "stopped responding", "its connection closed"
        elif code >= 0:
            verb, detail = "exited", f"exit code {code}"
        elif -code == signal.SIGKILL:
            verb, detail = "was killed", "SIGKILL: out of memory?"
        else:
            verb, detail = "crashed", _signal_name(-code)
        return f"the submission {verb} {during} ({detail})"

    def output_tail(self) -> str:
        try:
            text = self.log.read_text(errors="replace").strip()
        except OSError:
            return ""
        return text[-LOG_TAIL:]

    def kill(self) -> None:
        """Kill the worker and everything it started (its own process group)."""
        pid = self.process.pid
        if pid is not None and self.process.exitcode is None:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.process.kill()
        self.process.join(5)
        self.conn.close()


def load_outputs(payload: bytes) -> dict[str, Any]:
    """A probe's outputs: tensors, numbers, strings, lists and dicts only (never arbitrary objects)."""
    import torch

    outputs = torch.load(io.BytesIO(payload), weights_only=True, map_location="cpu")
    if not isinstance(outputs, dict):
        raise TypeError(f"expected a dict, got {type(outputs).__name__}")
    return outputs


def run_probes(
    path: Path, checks: list[str], limits: Limits, emit: Callable[[Outcome], None], scratch: Path
) -> None:
    """Run every check's probe and `emit` one :class:`Outcome` per check, in order."""
    deadline = None  # counted from the first worker's start, not the fork server's start-up
    remaining = list(checks)
    while remaining:
        if deadline is not None and time.monotonic() >= deadline:
            for name in remaining:
                emit(Outcome(name, failure=_over_total(limits)))
            return
        worker = Worker(path, remaining, limits.memory_mb, scratch)
        if deadline is None:
            deadline = worker.started + limits.total_timeout
        try:
            remaining = _drive(worker, remaining, limits, deadline, emit)
        finally:
            worker.kill()


def _over_total(limits: Limits) -> str:
    return f"not graded: the overall time limit of {limits.total_timeout:g} s was reached"


def _drive(
    worker: Worker,
    checks: list[str],
    limits: Limits,
    deadline: float,
    emit: Callable[[Outcome], None],
) -> list[str]:
    """Serve one worker; return the checks a fresh worker should still run (empty: stop)."""

    def fail_all(names: list[str], message: str) -> list[str]:
        for n in names:
            emit(Outcome(n, failure=message))
        return []

    # 1. the submission's import
    try:
        got = worker.receive(min(worker.started + limits.for_import, deadline) - time.monotonic())
    except WorkerGone:
        message = worker.exit_reason("while being imported")
        tail = worker.output_tail()
        return fail_all(checks, message + (f"; its last output:\n{tail}" if tail else ""))
    except ProtocolError as exc:
        return fail_all(checks, f"the grader could not talk to the submission's process: {exc}")
    if got is None:
        if time.monotonic() >= deadline:
            return fail_all(checks, _over_total(limits))
        return fail_all(checks, f"importing the submission timed out after {limits.for_import:g} s")
    header, _ = got
    if header.get("kind") == "import_failed":
        return fail_all(checks, str(header.get("message")))
    if header.get("kind") != "ready":
        return fail_all(checks, "the grader could not talk to the submission's process")

    # 2. one probe after the other
    index, started = 0, time.monotonic()
    while index < len(checks):
        name = checks[index]
        try:
            limit = limits.for_check(name)
            got = worker.receive(min(started + limit, deadline) - time.monotonic())
        except WorkerGone:
            emit(Outcome(name, failure=worker.exit_reason(f"during {name}")))
            return checks[index + 1 :]
        except ProtocolError as exc:
            emit(Outcome(name, failure=f"the submission's process sent {exc} during {name}"))
            return checks[index + 1 :]
        now = time.monotonic()
        if got is None:
            if now >= deadline:
                return fail_all(checks[index:], _over_total(limits))
            emit(Outcome(name, failure=f"timed out after {limit:g} s"))
            return checks[index + 1 :]
        header, payload = got
        kind = header.get("kind")
        if header.get("check") != name or kind not in ("started", "result"):
            emit(
                Outcome(
                    name,
                    failure=f"the submission's process sent an unexpected message during {name}",
                )
            )
            return checks[index + 1 :]
        if kind == "started":
            stamp = header.get("time")
            started = min(float(stamp), now) if isinstance(stamp, (int, float)) else now
            continue
        try:
            outcome = Outcome(name, outputs=load_outputs(payload))
        except Exception as exc:  # noqa: BLE001  (anything but plain data)
            outcome = Outcome(name, failure=f"its outputs could not be read safely ({exc})")
        emit(outcome)
        index, started = index + 1, time.monotonic()
    return []
