"""`lora-rlhf train` with each reward, with the adaptive and the fixed KL coefficient, and the
run outputs that report the KL (console summary, metrics.jsonl's summary line, samples, plot).

Tiny random model (`tiny-llama`), a few phases each, in-process through `lora_rlhf.cli.command.main`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import real_figures

from lora_rlhf.cli.command import main
from lora_rlhf.cli.outputs import read_metrics, read_summary
from lora_rlhf.rlhf.rewards import REWARDS

TINY = [
    "--model", "tiny-llama", "--batch-size", "4", "--minibatches", "2", "--gen-len", "4",
    "--warmup", "0", "--no-progress", "--threads", "1",
]  # fmt: skip
SNAPSHOT = Path(__file__).parent / "data" / "train_fixed_kl_tiny_llama.json"


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def train(out: Path, *options: str, phases: int = 3) -> int:
    return main(["train", *TINY, "--phases", str(phases), "--out", str(out), *options])


@pytest.mark.parametrize("reward", sorted(REWARDS))
def test_each_reward_trains_the_tiny_model(reward, tmp_path, capsys):
    if reward == "sentiment":
        pytest.importorskip("vaderSentiment")
    out = tmp_path / reward
    assert train(out, "--reward", reward) == 0
    metrics = read_metrics(out)
    assert [m["phase"] for m in metrics] == [0, 1, 2]
    assert all(math.isfinite(m["reward_mean"]) and math.isfinite(m["kl"]) for m in metrics)
    samples = json.loads((out / "samples.json").read_text())
    prompt = "This movie was so" if reward == "sentiment" else "This is"
    assert all(prompt in s for s in samples["after"]["samples"])
    scored = REWARDS[reward](samples["after"]["samples"]).tolist()
    assert samples["after"]["rewards"] == pytest.approx(scored)


def test_adaptive_kl_coefficient_follows_the_rule_phase_by_phase(tmp_path):
    target, horizon, batch = 0.01, 8.0, 4
    out = tmp_path / "adaptive"
    options = ["--reward", "length", "--kl-coef", "0.1", "--kl-target", str(target)]
    assert train(out, *options, "--kl-horizon", str(horizon), phases=5) == 0
    metrics = read_metrics(out)
    assert metrics[0]["kl_coef"] == pytest.approx(0.1)
    for before, after in zip(metrics, metrics[1:]):
        error = min(max(before["kl"] / target - 1, -0.2), 0.2)
        expected = before["kl_coef"] * (1 + error * batch / horizon)
        assert after["kl_coef"] == pytest.approx(expected, rel=1e-9)
    # the KL moved it both ways or at least once: the run did exercise the controller
    assert len({round(m["kl_coef"], 12) for m in metrics}) > 1


def test_fixed_coefficient_reproduces_the_run_recorded_before_the_adaptive_kl(tmp_path):
    """The run of tests/data/train_fixed_kl_tiny_llama.json, recorded with the command as it was
    before the KL controller existed (commit ac9b970), again with ``--kl-target off``. The LoRA
    classes and the fast path changed the last bits of the float sums since, so floats are
    compared to a tolerance; the samples and rewards are the same."""
    recorded = json.loads(SNAPSHOT.read_text())
    out = tmp_path / "fixed"
    assert main(["train", *recorded["options"], "--kl-target", "off", "--out", str(out)]) == 0
    metrics = read_metrics(out)
    assert len(metrics) == len(recorded["metrics"])
    for got, want in zip(metrics, recorded["metrics"]):
        assert got["kl_coef"] == want_coef(recorded)
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (want["phase"], key)
    before = json.loads((out / "samples.json").read_text())["before"]["samples"]
    assert before == recorded["samples_before"]


def want_coef(recorded: dict) -> float:
    options = recorded["options"]
    return float(options[options.index("--kl-coef") + 1])


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("runs") / "finished"
    import contextlib
    import io

    console = io.StringIO()
    with contextlib.redirect_stdout(console), real_figures():
        adaptive = ["--kl-target", "0.05", "--kl-horizon", "16"]
        assert train(out, "--reward", "length", *adaptive, phases=6) == 0
    return out, console.getvalue()


def test_metrics_end_with_a_summary_that_carries_the_final_kl(finished):
    out, _ = finished
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["phase"] for m in lines[:-1]] == list(range(6))
    summary = lines[-1]
    assert summary == read_summary(out)
    assert summary["event"] == "summary" and summary["phases_done"] == 6
    kls = [m["kl"] for m in lines[:-1]]
    assert summary["kl_last5"] == pytest.approx(sum(kls[-5:]) / 5)
    after = json.loads((out / "samples.json").read_text())["after"]
    assert summary["kl_final"] == pytest.approx(after["kl"]) and after["kl"] >= 0
    rewards = [m["reward_mean"] for m in lines[:-1]]
    assert summary["reward_last5"] == pytest.approx(sum(rewards[-5:]) / 5)
    assert summary["reward_ratio"] == pytest.approx(summary["reward_last5"] / rewards[0])
    assert summary["kl_coef_final"] == lines[-2]["kl_coef"]


def test_console_summary_gives_the_final_kl(finished):
    out, console = finished
    summary = read_summary(out)
    line = next(x for x in console.splitlines() if x.startswith("KL(π‖π_ref) per generated token"))
    assert f"last 5 phases {summary['kl_last5']:.3f} nats" in line
    assert f"trained policy {summary['kl_final']:.3f}" in line


def test_samples_md_gives_the_kl_after_training(finished):
    out, _ = finished
    after = json.loads((out / "samples.json").read_text())["after"]
    assert (
        f"KL(π‖π_ref) {after['kl']:.3f} nats per generated token"
        in (out / "samples.md").read_text()
    )


def test_reward_curve_has_the_reward_against_kl_panel_beside_it(finished):
    from matplotlib.image import imread

    out, _ = finished
    height, width = imread(out / "reward_curve.png").shape[:2]
    assert width > 2 * height  # two panels side by side, not the single curve's 7 × 5 inches


def test_resume_keeps_the_adaptive_coefficient(finished, tmp_path):
    out, _ = finished
    resumed = tmp_path / "resumed"
    assert main(["train", *TINY, "--resume", str(out), "--phases", "7", "--out", str(resumed)]) == 0
    old, new = read_metrics(out), read_metrics(resumed)
    training = json.loads((out / "adapter_config.json").read_text())["training"]
    error = min(max(old[-1]["kl"] / training["kl_target"] - 1, -0.2), 0.2)
    expected = old[-1]["kl_coef"] * (1 + error * 4 / training["kl_horizon"])
    assert new[-1]["kl_coef"] == pytest.approx(expected, rel=1e-9)


def test_the_summary_reports_the_fresh_samples_mean_reward_and_reward_hacks(tmp_path, capsys):
    from lora_rlhf.rlhf.hacking import count_hacks

    out = tmp_path / "run"
    assert train(out, phases=2) == 0  # char_count '.': the stop rule applies
    console = capsys.readouterr().out
    after = json.loads((out / "samples.json").read_text())["after"]
    summary = read_summary(out)
    hacks = count_hacks(after["samples"], "char_count")
    assert summary["samples_after"] == len(after["samples"]) == 4
    assert summary["reward_after"] == pytest.approx(sum(after["rewards"]) / 4)
    assert summary["hacks_after"] == hacks
    assert f"reward hacks {hacks} of 4" in console
    md = (out / "samples.md").read_text()
    assert md.count("Reward hacks ") == 2 and f"Reward hacks {hacks} of 4" in md
