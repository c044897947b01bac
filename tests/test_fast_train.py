"""`lora-rlhf train --impl library` trains through the fast path; any other `--impl` trains the
submission's own classes as they are. Tiny model, two phases, in-process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lora_rlhf.cli.train as train_cli
from lora_rlhf.authoring.implementations import repo_root
from lora_rlhf.cli.command import main

TINY = [
    "--model", "tiny-llama", "--batch-size", "4", "--minibatches", "2", "--gen-len", "4",
    "--warmup", "0", "--no-progress", "--threads", "1", "--phases", "2", "--seed", "1",
]  # fmt: skip


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def trainers(monkeypatch) -> list:
    """The trainer of each run, as the recorder sees it when training starts."""
    seen = []
    start = train_cli.RunRecorder.start

    def recording_start(self, trainer):
        seen.append(trainer)
        start(self, trainer)

    monkeypatch.setattr(train_cli.RunRecorder, "start", recording_start)
    return seen


def runs_fast(model) -> bool:
    return "generate" in model.__dict__ and all(
        "calculate_qkv_matrices" in block.attn.__dict__ for block in model.blocks
    )


def metrics(out: Path) -> list[dict]:
    phases = train_cli.read_metrics(out)
    return [{k: v for k, v in m.items() if not k.endswith("_seconds")} for m in phases]


def test_library_trains_fast_and_solutions_train_the_lesson_to_the_same_run(tmp_path, trainers):
    if repo_root() is None:
        pytest.skip("needs the source checkout's solutions/")
    assert main(["train", *TINY, "--impl", "library", "--out", str(tmp_path / "lib")]) == 0
    assert main(["train", *TINY, "--impl", "solutions", "--out", str(tmp_path / "sol")]) == 0
    assert trainers[0].sample_history == trainers[1].sample_history  # the same samples
    library, solutions = (t.model for t in trainers)
    assert runs_fast(library)
    assert not runs_fast(solutions)
    assert type(solutions).__module__.startswith("lora_rlhf_submission_")
    # The same function: the same rewards, and losses equal to float32 rounding.
    fast, lesson = metrics(tmp_path / "lib"), metrics(tmp_path / "sol")
    assert len(fast) == len(lesson) == 2
    for got, want in zip(fast, lesson):
        assert got.keys() == want.keys()
        for key, value in want.items():
            if isinstance(value, float):
                assert got[key] == pytest.approx(value, rel=1e-3, abs=1e-5), key
            else:
                assert got[key] == value, key
