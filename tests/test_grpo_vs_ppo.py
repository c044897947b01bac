"""`benchmarks/grpo_vs_ppo.py` trains through `lora-rlhf train` itself: the same trainer classes,
the same metrics for the same seed, and a finished run folder of the same settings is reused.
Tiny runs on tiny-llama (one phase each)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import ForkedPython

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lora_rlhf.cli.train as train_cli  # noqa: E402
from benchmarks import grpo_vs_ppo  # noqa: E402
from lora_rlhf.cli.command import build_parser, main  # noqa: E402
from lora_rlhf.cli.grpo_trainer import GRPOTrainer  # noqa: E402
from lora_rlhf.cli.outputs import read_metrics  # noqa: E402
from lora_rlhf.lessons.section2_lora import RLHFTrainerLora  # noqa: E402

TINY = [
    "--model", "tiny-llama", "--phases", "1", "--warmup", "0", "--batch-size", "8",
    "--minibatches", "2", "--gen-len", "4",
]  # fmt: skip
# what the plain command's trainer must be, per algorithm: the teaching class run fast
EXPECTED = {"ppo": RLHFTrainerLora, "grpo": GRPOTrainer}


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def without_timings(metrics: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if not k.endswith("_seconds")} for m in metrics]


@pytest.mark.parametrize("algo", sorted(EXPECTED))
def test_the_benchmark_runs_the_command_with_the_commands_trainer(algo, tmp_path):
    argv = grpo_vs_ppo.command(algo, 3, tmp_path / "run", 1, TINY)
    assert argv[:3] == [sys.executable, "-m", "lora_rlhf.cli.train"]
    args = build_parser().parse_args(["train", *argv[3:]])
    plan = train_cli.prepare(args)
    trainer_class = plan.trainer_class
    above = trainer_class.__mro__[: trainer_class.__mro__.index(EXPECTED[algo])]
    assert {c.__module__ for c in above} <= {
        "lora_rlhf.fast.lora",
        "lora_rlhf.fast.lean_trainer",
    }, "the teaching class, with only the engine's subclasses on top"
    assert trainer_class.__name__ == f"Fast{EXPECTED[algo].__name__}", "the fast path"
    assert plan.threads == 1 and plan.settings["seed"] == 3 and plan.settings["algo"] == algo
    assert "--threads" not in grpo_vs_ppo.command(algo, 3, tmp_path, None, TINY), (
        "left out, the command's own thread count"
    )


@pytest.fixture(scope="module")
def benchmark_runs(tmp_path_factory) -> Path:
    """The benchmark's own runs of its commands, each `python -m lora_rlhf.cli.train …` in a
    process of its own (forked from a server that has imported torch: helpers.ForkedPython;
    test_architecture runs that module in a fresh interpreter)."""
    runs_dir = tmp_path_factory.mktemp("bench")
    with pytest.MonkeyPatch.context() as m:
        m.setattr(grpo_vs_ppo.subprocess, "Popen", ForkedPython)
        grpo_vs_ppo.main(["--runs-dir", str(runs_dir), "--seeds", "2", "--threads", "1",
                          "--out", str(runs_dir / "out.json"), "--", *TINY])  # fmt: skip
    return runs_dir


@pytest.mark.parametrize("algo", sorted(EXPECTED))
def test_the_first_phase_equals_the_commands_for_the_same_seed(algo, benchmark_runs, tmp_path):
    record = json.loads((benchmark_runs / "out.json").read_text())
    (run,) = [r for r in record["runs"] if r["algo"] == algo]
    out = tmp_path / "command"
    options = ["--algo", algo, "--seed", "2", "--threads", "1", "--no-progress", *TINY]
    assert main(["train", *options, "--out", str(out)]) == 0
    want = without_timings(read_metrics(out))
    got = without_timings(read_metrics(run["folder"]))
    assert len(want) == 1 and got == want


def test_a_finished_run_of_the_same_settings_is_reused_and_another_is_not(benchmark_runs):
    settings = grpo_vs_ppo.planned_settings("grpo", 2, TINY)
    found = grpo_vs_ppo.find_run(benchmark_runs, settings)
    assert found is not None and found.name.startswith("grpo_s2")
    other = grpo_vs_ppo.planned_settings("grpo", 2, [*TINY, "--kl-coef", "0.1"])
    assert grpo_vs_ppo.find_run(benchmark_runs, other) is None
    assert (
        grpo_vs_ppo.find_run(benchmark_runs, grpo_vs_ppo.planned_settings("grpo", 3, TINY)) is None
    )


def test_the_summary_gives_each_algorithm_its_spread_over_seeds():
    def run(algo, seed, first, last5, kl):
        return {"algo": algo, "seed": seed, "reward_first": first, "reward_last5": last5,
                "reward_ratio": last5 / first, "kl_last5": kl, "reward_after": last5,
                "phase_seconds": 10.0, "hacks_after": seed, "samples_after": 16}  # fmt: skip

    runs = [
        run("ppo", 1, 0.5, 1.5, 0.4),
        run("ppo", 2, 0.5, 0.9, 0.6),
        run("grpo", 1, 0.25, 1.0, 1.1),
    ]
    table = grpo_vs_ppo.aggregate(runs)
    assert list(table) == ["ppo", "grpo"]
    assert table["ppo"]["reward_last5"] == {"mean": pytest.approx(1.2), "min": 0.9, "max": 1.5}
    assert table["ppo"]["at_least_2x"] == 0.5 and table["grpo"]["at_least_2x"] == 1.0
    assert table["ppo"]["hacks_after"] == 3 and table["ppo"]["samples_after"] == 32
    assert "| PPO | 1, 2 | 0.50 (0.50–0.50) | 1.20 (0.90–1.50) |" in grpo_vs_ppo.report(table)
