"""A `lora-rlhf train` run survives being stopped: SIGTERM and SIGHUP save like Ctrl-C, and a run
killed at any point (SIGKILL, even half-way through a checkpoint) resumes from its last
checkpoint. Each time, the resumed run ends with the metrics and the adaptors of a run that was
never stopped (same seed). Tiny runs on tiny-llama; a kill needs a process of its own
(tests/stopped_run.py), a handled signal does not.
"""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.forkserver
import os
import signal
import time
from pathlib import Path

import pytest
import stopped_run  # tests/stopped_run.py
import torch
from safetensors.torch import load_file

import lora_rlhf.cli.checkpoint as checkpoint
import lora_rlhf.cli.train as train_cli
from lora_rlhf.cli.checkpoint import list_checkpoints
from lora_rlhf.cli.command import main
from lora_rlhf.grading import sandbox

TINY = [
    "--model", "tiny-llama", "--batch-size", "4", "--minibatches", "2", "--gen-len", "4",
    "--warmup", "0", "--no-progress", "--threads", "1",
]  # fmt: skip
GRPO = ["--algo", "grpo", "--batch-size", "8"]


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def options(out: Path, phases: int, *extra: str) -> list[str]:
    return [*TINY, *extra, "--phases", str(phases), "--out", str(out)]


def resume(out: Path, *extra: str) -> int:
    return main(["train", "--resume", str(out), "--no-progress", "--threads", "1", *extra])


@pytest.fixture(scope="module")
def processes():
    """Starts stopped_run.run in a process of its own, forked from a server that imported torch
    and the library once (a fresh interpreter would spend seconds importing them each time): the
    grader's fork server, the one a worker process has (whichever of the two starts it)."""
    sandbox.start_server()
    return sandbox.context()


def test_the_fork_server_has_imported_torch(processes):
    """Else every process forked from it imports torch itself (~6 s each), as when the server was
    told to preload a module it could not import (Python < 3.12 ignores the caller's sys.path)."""
    process = processes.Process(target=time.sleep, args=(0,))
    process.start()  # the server forks once it has imported what it preloads
    process.join(timeout=120)
    server = multiprocessing.forkserver._forkserver._forkserver_pid
    maps = Path(f"/proc/{server}/maps")
    if not maps.exists():
        pytest.skip("no /proc on this system")
    assert "libtorch" in maps.read_text()


def in_subprocess(processes, point: str, args: list[str], log: Path):
    process = processes.Process(target=stopped_run.run, args=(point, args, str(log)))
    process.start()
    return process


def run_stopped(processes, point: str, args: list[str], log: Path) -> tuple[int, str]:
    """Run until stopped at ``point``: the exit code (−9 for SIGKILL) and the output."""
    process = in_subprocess(processes, point, args, log)
    process.join(timeout=240)
    return process.exitcode, log.read_text()


def without_timings(metrics: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if not k.endswith("_seconds")} for m in metrics]


def phases_done(folder: Path) -> int:
    return json.loads((folder / "adapter_config.json").read_text())["phases_done"]


def assert_same_as_uninterrupted(out: Path, whole: Path) -> None:
    """Same metrics, phase for phase, and bit-identical adaptors and value head."""
    resumed = train_cli.read_metrics(out)
    assert [m["phase"] for m in resumed] == [m["phase"] for m in train_cli.read_metrics(whole)]
    assert without_timings(resumed) == without_timings(train_cli.read_metrics(whole))
    mine, theirs = load_file(out / "adapter.safetensors"), load_file(whole / "adapter.safetensors")
    assert mine.keys() == theirs.keys()
    for key in theirs:
        assert torch.equal(mine[key], theirs[key]), key


@pytest.fixture(scope="module")
def whole_ppo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "whole_ppo"
    assert main(["train", *options(out, 4)]) == 0
    return out


@pytest.fixture(scope="module")
def whole_grpo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "whole_grpo"
    assert main(["train", *options(out, 4, *GRPO)]) == 0
    return out


# ---------------------------------------------------------------------------------- SIGKILL

# point -> (the phases done that --resume continues from, the metrics lines left by the kill)
KILLS = {
    "kill-in-phase:2": (2, 2),  # checkpoint 2 holds phases 0-1; phase 2 is lost
    "kill-in-checkpoint:2": (1, 1),  # checkpoint 2 half-written: checkpoint 1 stands
    "kill-before-metrics:2": (2, 1),  # checkpoint 2 complete, phase 1's line not yet written
}


@pytest.mark.parametrize("point", KILLS)
def test_a_killed_run_resumes_from_its_last_checkpoint_as_if_never_killed(
    point, whole_ppo, tmp_path, processes
):
    out = tmp_path / "run"
    code, err = run_stopped(processes, point, options(out, 4), tmp_path / "run.log")
    assert code == -signal.SIGKILL, err
    expected_done, metrics_lines = KILLS[point]
    assert not (out / "adapter_config.json").exists()  # the kill left no save at the end
    assert [checkpoint.checkpoint_phase(p) for p in list_checkpoints(out)][0] == expected_done
    assert len(train_cli.read_metrics(out)) == metrics_lines  # never past the checkpoint

    assert resume(out) == 0
    assert phases_done(out) == 4
    assert_same_as_uninterrupted(out, whole_ppo)
    assert [checkpoint.checkpoint_phase(p) for p in list_checkpoints(out)] == [4, 3]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]


def test_a_grpo_run_killed_while_writing_a_checkpoint_resumes_as_if_never_killed(
    whole_grpo, tmp_path, processes
):
    out = tmp_path / "run"
    code, err = run_stopped(
        processes, "kill-in-checkpoint:3", options(out, 4, *GRPO), tmp_path / "run.log"
    )
    assert code == -signal.SIGKILL, err
    assert [checkpoint.checkpoint_phase(p) for p in list_checkpoints(out)] == [2, 1]
    assert resume(out) == 0
    assert_same_as_uninterrupted(out, whole_grpo)


# ---------------------------------------------------------------------------------- SIGTERM, SIGHUP


def test_sigterm_saves_everything_then_a_kill_and_two_resumes_end_as_one_run(tmp_path, processes):
    """SIGTERM from outside while training (as `timeout` or a scheduler sends it): exit status
    143 and a complete, resumable folder. That run, resumed and killed half-way through a
    checkpoint, then resumed again, ends as one uninterrupted run."""
    whole = tmp_path / "whole"
    assert main(["train", *options(whole, 10)]) == 0
    out = tmp_path / "run"
    process = in_subprocess(processes, "slow", options(out, 10), tmp_path / "run.log")
    deadline = time.monotonic() + 180
    while len(train_cli.read_metrics(out)) < 2 and process.is_alive():
        assert time.monotonic() < deadline, "the run wrote no metrics"
        time.sleep(0.05)
    process.terminate()  # SIGTERM
    process.join(timeout=120)
    err = (tmp_path / "run.log").read_text()
    assert process.exitcode == 128 + signal.SIGTERM, err
    assert "Interrupted (SIGTERM)" in err
    stopped_at = phases_done(out)
    assert 2 <= stopped_at < 10
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["interrupted"] is True
    for name in ("adapter.safetensors", "trainer_state.pt", "samples.md", "reward_curve.png"):
        assert (out / name).is_file(), name
    assert [m["phase"] for m in train_cli.read_metrics(out)] == list(range(stopped_at))

    killed_at = min(stopped_at + 2, 10)
    resumed = ["--resume", str(out), *TINY[-3:]]
    code, err = run_stopped(
        processes, f"kill-in-checkpoint:{killed_at}", resumed, tmp_path / "resumed.log"
    )
    assert code == -signal.SIGKILL, err
    assert resume(out) == 0
    assert_same_as_uninterrupted(out, whole)
    text = (out / "samples.md").read_text()
    assert "## Before training — rollout of phase 0, untrained adaptors" in text


def test_sighup_stops_within_the_phase_and_saves_like_ctrl_c(whole_ppo, tmp_path, monkeypatch):
    from lora_rlhf.rlhf.trainer import RLHFTrainer

    learning_phase = RLHFTrainer.learning_phase

    def hang_up_in_phase_2(self, memory):
        learning_phase(self, memory)
        if self.phase == 2:
            os.kill(os.getpid(), signal.SIGHUP)

    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(RLHFTrainer, "learning_phase", hang_up_in_phase_2)
        assert main(["train", *options(out, 4)]) == 128 + signal.SIGHUP
    assert phases_done(out) == 2  # the phase under way was dropped
    assert resume(out) == 0
    assert_same_as_uninterrupted(out, whole_ppo)


def test_a_signal_during_a_checkpoint_waits_for_it_to_be_complete(whole_ppo, tmp_path, monkeypatch):
    write_checkpoint = checkpoint.write_checkpoint

    def terminated_while_writing_checkpoint_2(run_folder, phases_done, fill):
        def fill_then_terminate(folder):
            fill(folder)
            if phases_done == 2:  # the files are written, not yet flushed nor renamed
                os.kill(os.getpid(), signal.SIGTERM)

        return write_checkpoint(run_folder, phases_done, fill_then_terminate)

    monkeypatch.setattr(checkpoint, "write_checkpoint", terminated_while_writing_checkpoint_2)
    out = tmp_path / "run"
    assert main(["train", *options(out, 4)]) == 128 + signal.SIGTERM
    assert [checkpoint.checkpoint_phase(p) for p in list_checkpoints(out)] == [2, 1]
    assert phases_done(out) == 2 and len(train_cli.read_metrics(out)) == 2
    assert resume(out) == 0
    assert_same_as_uninterrupted(out, whole_ppo)


def test_signal_handlers_are_given_back_after_the_run(tmp_path):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    assert main(["train", *options(tmp_path / "run", 1)]) == 0
    assert {s: signal.getsignal(s) for s in before} == before


# ---------------------------------------------------------------------------------- --save-every


def test_save_every_n_keeps_metrics_no_further_than_the_checkpoint(tmp_path, whole_ppo, processes):
    out = tmp_path / "run"
    code, err = run_stopped(
        processes, "kill-in-phase:3", options(out, 4, "--save-every", "2"), tmp_path / "run.log"
    )
    assert code == -signal.SIGKILL, err
    assert [checkpoint.checkpoint_phase(p) for p in list_checkpoints(out)] == [2]
    assert len(train_cli.read_metrics(out)) == 2  # phase 2's line waits for checkpoint 4
    assert resume(out) == 0
    assert_same_as_uninterrupted(out, whole_ppo)


def test_save_every_zero_writes_no_checkpoint(tmp_path):
    out = tmp_path / "run"
    assert main(["train", *options(out, 2, "--save-every", "0")]) == 0
    assert not (out / "checkpoints").exists() and phases_done(out) == 2
    assert len(train_cli.read_metrics(out)) == 2


def test_a_negative_save_every_is_refused(tmp_path, capsys):
    assert main(["train", *options(tmp_path / "run", 2, "--save-every", "-1")]) == 2
    assert "--save-every -1: must be >= 0" in capsys.readouterr().err


def test_a_checkpoint_that_cannot_be_written_warns_and_the_run_goes_on(
    whole_ppo, tmp_path, monkeypatch, capsys
):
    write_checkpoint = checkpoint.write_checkpoint

    def disk_full_at_checkpoint_2(run_folder, phases_done, fill):
        if phases_done == 2:
            raise OSError(28, "No space left on device")
        return write_checkpoint(run_folder, phases_done, fill)

    monkeypatch.setattr(checkpoint, "write_checkpoint", disk_full_at_checkpoint_2)
    out = tmp_path / "run"
    assert main(["train", *options(out, 4)]) == 0
    (warning,) = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert "checkpoint 2 not written" in warning and "No space left" in warning
    assert_same_as_uninterrupted(out, whole_ppo)
    assert [checkpoint.checkpoint_phase(p) for p in list_checkpoints(out)] == [4, 3]
