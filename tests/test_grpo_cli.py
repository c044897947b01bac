"""`lora-rlhf train --algo grpo`: the outputs of a PPO run (without a value head), exact resume
after Ctrl-C, and bad combinations refused before a model is loaded. Tiny runs on tiny-llama."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import lora_rlhf.cli.train as train_cli
from lora_rlhf.cli.command import main
from lora_rlhf.lessons.section3_grpo import GRPOTrainerLora

TINY = [
    "--algo", "grpo", "--model", "tiny-llama", "--batch-size", "8", "--minibatches", "2",
    "--gen-len", "4", "--warmup", "0", "--no-progress", "--threads", "1",
]  # fmt: skip


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def train(out: Path, *options: str, phases: int = 2) -> int:
    return main(["train", *TINY, "--phases", str(phases), "--out", str(out), *options])


def without_timings(metrics: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if not k.endswith("_seconds")} for m in metrics]


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory) -> Path:
    """An uninterrupted 4-phase GRPO run."""
    out = tmp_path_factory.mktemp("runs") / "whole"
    assert train(out, phases=4) == 0
    return out


def test_a_grpo_run_writes_what_a_ppo_run_writes(whole_run):
    metrics = train_cli.read_metrics(whole_run)
    assert [m["phase"] for m in metrics] == [0, 1, 2, 3]
    for m in metrics:
        assert {"reward_mean", "kl", "kl_k3", "kl_coef", "objective", "lr"} <= set(m)
        assert "value_loss" not in m
    for name in ("reward_curve.png", "samples.md", "trainer_state.pt", "adapter.safetensors"):
        assert (whole_run / name).is_file(), name
    config = json.loads((whole_run / "adapter_config.json").read_text())
    assert config["training"]["algo"] == "grpo" and config["value_head"] is False
    with safe_open(whole_run / "adapter.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("blocks.") and ".lora_" in k for k in keys)


def test_the_trainer_is_grpo_without_a_value_head(tmp_path, monkeypatch):
    trainers = []
    start = train_cli.RunRecorder.start

    def recording_start(self, trainer):
        trainers.append(trainer)
        start(self, trainer)

    monkeypatch.setattr(train_cli.RunRecorder, "start", recording_start)
    assert train(tmp_path / "run", phases=1) == 0
    (trainer,) = trainers
    assert isinstance(trainer, GRPOTrainerLora)
    assert trainer.model.value_head is None and trainer.ref_model is trainer.model


def test_ctrl_c_within_a_phase_drops_it_and_resume_continues_exactly(
    whole_run, tmp_path, monkeypatch
):
    learning_phase = GRPOTrainerLora.learning_phase

    def interrupt_in_phase_2(self, memory):
        learning_phase(self, memory)
        if self.phase == 2:
            raise KeyboardInterrupt

    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(GRPOTrainerLora, "learning_phase", interrupt_in_phase_2)
        assert train(out, phases=4) == train_cli.EXIT_INTERRUPTED
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["phases_done"], config["interrupted"]) == (2, True)
    assert [m["phase"] for m in train_cli.read_metrics(out)] == [0, 1]

    assert main(["train", "--resume", str(out), "--no-progress", "--threads", "1"]) == 0
    resumed = train_cli.read_metrics(out)
    assert [m["phase"] for m in resumed] == [0, 1, 2, 3]
    assert without_timings(resumed) == without_timings(train_cli.read_metrics(whole_run))


def test_group_size_and_advantage_reach_the_trainer_and_are_saved(tmp_path, monkeypatch):
    trainers = []
    start = train_cli.RunRecorder.start
    monkeypatch.setattr(
        train_cli.RunRecorder, "start", lambda self, t: (trainers.append(t), start(self, t))
    )
    out = tmp_path / "run"
    assert train(out, "--group-size", "2", "--advantage", "rloo", phases=1) == 0
    assert (trainers[0].args.group_size, trainers[0].args.advantage) == (2, "rloo")
    training = json.loads((out / "adapter_config.json").read_text())["training"]
    assert (training["group_size"], training["advantage"]) == (2, "rloo")


def test_group_options_without_grpo_are_refused(tmp_path, capsys):
    code = main(["train", "--model", "tiny-llama", "--group-size", "2", "--out", str(tmp_path)])
    assert code == train_cli.EXIT_USAGE
    assert "apply to --algo grpo" in capsys.readouterr().err


def test_a_batch_that_cannot_form_groups_is_refused_before_loading(tmp_path, capsys):
    assert train(tmp_path / "run", "--batch-size", "6") == train_cli.EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert err.startswith("lora-rlhf train: error: --algo grpo:") and "group_size" in err
    assert "\n" not in err and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_resuming_with_another_algorithm_is_refused(whole_run, capsys):
    code = main(["train", "--resume", str(whole_run), "--algo", "ppo", "--phases", "5"])
    assert code == train_cli.EXIT_USAGE
    assert "--algo" in capsys.readouterr().err
