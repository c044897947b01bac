"""Stopping a training run by a signal: Ctrl-C (SIGINT), SIGTERM (``kill``, ``timeout``, batch
schedulers, ``docker stop``) and SIGHUP (the terminal closed) all stop it the same way.

While :class:`StopSignals` is active, each of these signals raises :class:`RunStopped` (a
``KeyboardInterrupt``), so the run's Ctrl-C path saves what was learned. Inside
:meth:`StopSignals.deferred` (writing a checkpoint, appending metrics) the stop waits for the
block to end, so a file is never left half-written by a stop. Once a run is stopping or saving,
further signals are noted and ignored: the save finishes. The exit status is the shell's
convention for a process ended by a signal, 128 + its number: 130 for Ctrl-C, 143 for SIGTERM,
129 for SIGHUP.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
)


class RunStopped(KeyboardInterrupt):
    """A stop signal arrived; ``signum`` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def exit_status(stop: KeyboardInterrupt) -> int:
    """128 + the signal's number (a plain KeyboardInterrupt counts as SIGINT: 130)."""
    return 128 + getattr(stop, "signum", signal.SIGINT)


def signal_name(stop: KeyboardInterrupt) -> str:
    """How the console names the stop: "Ctrl-C", "SIGTERM", "SIGHUP"."""
    signum = getattr(stop, "signum", signal.SIGINT)
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name


class StopSignals:
    """Turns the stop signals into :class:`RunStopped` while active (a context manager).

    Outside the main thread (where Python cannot handle signals) it changes nothing.
    """

    def __init__(self) -> None:
        self._previous: dict[int, object] = {}
        self._deferring = False
        self._pending: int | None = None
        self.ignoring = False  # set once the run is stopping or saving at its end

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.ignoring:
            return
        if self._deferring:
            self._pending = signum
            return
        self.ignoring = True
        raise RunStopped(signum)

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """A block that a stop does not cut short: the stop is raised when it ends."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
        if self._pending is not None and not self.ignoring:
            signum, self._pending = self._pending, None
            self.ignoring = True
            raise RunStopped(signum)


__all__ = ["STOP_SIGNALS", "RunStopped", "StopSignals", "exit_status", "signal_name"]
