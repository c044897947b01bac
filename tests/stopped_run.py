"""Runs `lora-rlhf train` in a process of its own and stops it at a chosen point, as a kill or a
signal would. tests/test_stopped_runs.py runs :func:`run` in a child of the grader's fork server
(lora_rlhf.grading.sandbox), which has imported torch and the library once. From a shell:

    python tests/stopped_run.py POINT TRAIN_OPTION...

POINT is ``WHAT:N`` (N counts phases done, as checkpoint names do), or ``none``:

* ``kill-in-phase:N`` — SIGKILL during phase N + 1, after its optimizer steps;
* ``kill-in-checkpoint:N`` — SIGKILL half-way through writing checkpoint N: its files are
  written and the first is flushed to the disk, the rest are not and the folder is not renamed;
* ``kill-before-metrics:N`` — SIGKILL after checkpoint N is complete, before metrics.jsonl gets
  its line;
* ``term-in-checkpoint:N`` — SIGTERM half-way through writing checkpoint N (the run must finish
  the checkpoint, then stop);
* ``slow`` — no stop, but every phase takes a further 0.3 s, so that a test can signal the
  process from outside while it trains.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import lora_rlhf.cli.checkpoint as checkpoint
import lora_rlhf.cli.command  # noqa: F401
from lora_rlhf.cli.recorder import RunRecorder
from lora_rlhf.lessons.section3_grpo import GRPOTrainerLora
from lora_rlhf.rlhf.trainer import RLHFTrainer


def _kill(signum: int = signal.SIGKILL) -> None:
    os.kill(os.getpid(), signum)
    time.sleep(5)  # SIGKILL never returns; a handled signal raises within this call


def install(point: str) -> None:
    """Patch the library so that the process stops at ``point``."""
    what, _, n = point.partition(":")
    n = int(n) if n else -1

    for cls in (RLHFTrainer, GRPOTrainerLora):
        learning_phase = cls.learning_phase

        def stopping_learning_phase(self, memory, _original=learning_phase):
            _original(self, memory)
            if what == "kill-in-phase" and self.phase == n:
                _kill()
            if what == "slow":
                time.sleep(0.3)

        cls.learning_phase = stopping_learning_phase

    sync, writing = checkpoint._sync, {"phase": None, "synced": 0}
    write_checkpoint = checkpoint.write_checkpoint

    def watched_write_checkpoint(run_folder, phases_done, fill):
        writing.update(phase=phases_done, synced=0)
        return write_checkpoint(run_folder, phases_done, fill)

    def stopping_sync(path):
        if writing["phase"] == n and writing["synced"] == 1:
            if what == "kill-in-checkpoint":
                _kill()
            if what == "term-in-checkpoint":
                os.kill(os.getpid(), signal.SIGTERM)  # handled: must not cut the write short
        writing["synced"] += 1
        sync(path)

    checkpoint.write_checkpoint = watched_write_checkpoint
    checkpoint._sync = stopping_sync

    append_metrics = RunRecorder._append_metrics

    def stopping_append_metrics(self):
        if what == "kill-before-metrics" and self.trainer.phase == n:
            _kill()
        append_metrics(self)

    RunRecorder._append_metrics = stopping_append_metrics


def run(point: str, options: list[str], log: str | None = None) -> None:
    """``lora-rlhf train OPTIONS`` stopped at ``point``; its output into the file ``log``."""
    from helpers import forked_child

    forked_child(log)
    if point != "none":
        install(point)
    sys.exit(lora_rlhf.cli.command.main(["train", *options]))


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2:])
