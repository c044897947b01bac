"""The child side of the grader: import the submission, run the probes, send back plain data.

A worker is forked from the grader's pre-imported fork server (see :mod:`.sandbox`). It never
judges: it sends each probe's outputs, serialised with ``torch.save``, to the grading process,
which loads them with ``torch.load(weights_only=True)`` (tensors, numbers, strings, lists, dicts
only) and reaches the verdict there.

Every message is one ``send_bytes``: a JSON header line, then the payload. The header carries the
worker's nonce and the check it belongs to, so the grading process accepts only the result it is
waiting for, from the worker it started.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import resource
import signal
import sys
import threading
import time
import traceback
from multiprocessing import forkserver
from pathlib import Path

import numpy as np
import torch

from lora_rlhf.authoring.implementations import load_module
from lora_rlhf.checks import all_checks  # noqa: F401  (registers every check)
from lora_rlhf.checks.core import CHECKS, run_probe
from lora_rlhf.checks.grpo_checks import GRPO_CHECKS

SEED = 0


def encode(header: dict, payload: bytes = b"") -> bytes:
    return json.dumps(header).encode() + b"\n" + payload


def decode(message: bytes) -> tuple[dict, bytes]:
    header, _, payload = message.partition(b"\n")
    value = json.loads(header)
    if not isinstance(value, dict):
        raise ValueError("the header is not an object")
    return value, payload


def plain(value, depth: int = 0):
    """A copy holding only what ``torch.load(weights_only=True)`` accepts (plain tensors)."""
    if depth > 20:
        raise TypeError("outputs nested too deeply")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().as_subclass(torch.Tensor).clone()
    if isinstance(value, dict):
        return {str(k): plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v, depth + 1) for v in value]
    raise TypeError(f"the probe returned a {type(value).__name__}, which is not plain data")


def _serialise(outputs) -> bytes:
    buffer = io.BytesIO()
    torch.save(plain(outputs), buffer)
    return buffer.getvalue()


def _vm_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _limit_memory(memory_mb: int) -> None:
    """Address space: what the pre-imported libraries already map, plus `memory_mb`."""
    limit = _vm_bytes() + memory_mb * 2**20
    try:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ValueError, OSError):  # e.g. macOS: best effort
        pass
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ValueError, OSError):
        pass


def _describe(exc: BaseException, path: str) -> str:
    """``called sys.exit(0)`` or ``raised ValueError: ... (at file.py:12)``, pointing at the
    submission's own line when the traceback passes through it."""
    if isinstance(exc, SystemExit):
        return f"called sys.exit({exc.code!r})"
    frames = traceback.extract_tb(exc.__traceback__)
    own = [f for f in frames if f.filename == path] or frames
    where = f" (at {Path(own[-1].filename).name}:{own[-1].lineno})" if own else ""
    return f"raised {type(exc).__name__}: {exc}{where}"


def _die_with_parent() -> None:
    """Linux: be killed when the fork server exits, which it does when the grader dies, so that a
    hanging submission never outlives a grader killed from outside (e.g. by a CI time limit)."""
    # The fork server runs until every holder of its "alive" pipe is gone, and hands that pipe to
    # each child so that the child could use the server too; a worker never does.
    server = getattr(forkserver, "_forkserver", None)
    alive = getattr(server, "_forkserver_alive_fd", None)
    if isinstance(alive, int):
        with contextlib.suppress(OSError):
            os.close(alive)
        server._forkserver_alive_fd = None
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the fork server is already gone
        os._exit(1)


def _thread_lock_for_tqdm() -> None:
    """tqdm's default lock is a multiprocessing semaphore, which a killed worker would leak."""
    try:
        from tqdm import tqdm
    except ImportError:
        return
    tqdm.set_lock(threading.RLock())


def main(
    conn, nonce: str, path: str, check_names: list[str], memory_mb: int, workdir: str, log_path: str
) -> None:
    """Entry point of a worker process (started by :class:`.sandbox.Worker`)."""
    os.setsid()  # its own process group: the grader kills anything the submission starts
    _die_with_parent()
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.chdir(workdir)  # relative writes (a fake results.json) land in a scratch folder
    sys.path[:] = [p for p in sys.path if p not in ("", ".")]
    torch.set_num_threads(1)  # the grading process judges on the other core meanwhile
    _thread_lock_for_tqdm()
    known = {**CHECKS, **GRPO_CHECKS}  # Section 2 and the optional GRPO bonus (.bonus)
    probes = {name: known[name] for name in check_names}  # bound before the submission runs
    _limit_memory(memory_mb)

    def send(kind: str, check: str | None = None, payload: bytes = b"", **extra) -> None:
        header = {"nonce": nonce, "kind": kind, "check": check, "time": time.monotonic(), **extra}
        conn.send_bytes(encode(header, payload))

    try:
        module = load_module(Path(path))
    except BaseException as exc:  # noqa: BLE001  (SystemExit and KeyboardInterrupt included)
        send("import_failed", message=f"the submission {_describe(exc, path)} while being imported")
        os._exit(0)
    send("ready")

    for name in check_names:
        send("started", name)
        random.seed(SEED)
        np.random.seed(SEED)
        torch.manual_seed(SEED)
        try:
            outputs = run_probe(probes[name], module)
        except BaseException as exc:  # noqa: BLE001  (sys.exit inside a method, ...)
            outputs = {"__failed__": f"the submission {_describe(exc, path)} during this check"}
        try:
            payload = _serialise(outputs)
        except BaseException as exc:  # noqa: BLE001
            payload = _serialise({"__error__": f"its outputs cannot be sent back ({exc})"})
        send("result", name, payload)
    send("done")
    os._exit(0)  # no atexit handlers of the submission
