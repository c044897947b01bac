"""`lora-rlhf train`: outputs, determinism, resume, Ctrl-C, and bad input caught before loading.

Every run uses the tiny random model (`tiny-llama`) with a tiny batch, in-process through
`lora_rlhf.cli.command.main`, so each takes about a second on a laptop CPU.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import real_figures

import lora_rlhf.cli.train as train_cli
from lora_rlhf.authoring.implementations import repo_root
from lora_rlhf.cli.command import main

TINY = [
    "--model", "tiny-llama", "--batch-size", "4", "--minibatches", "2", "--gen-len", "4",
    "--warmup", "0", "--no-progress", "--threads", "1",
]  # fmt: skip
METRIC_KEYS = {
    "phase",
    "reward_mean",
    "reward_std",
    "kl",
    "entropy",
    "clip_frac",
    "value_loss",
    "lr",
    "phase_seconds",
}


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """--threads sets torch's global thread count: give the other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def train(out: Path, *options: str, phases: int = 2) -> int:
    return main(["train", *TINY, "--phases", str(phases), "--out", str(out), *options])


def without_timings(metrics: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if not k.endswith("_seconds")} for m in metrics]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished 3-phase run, shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("runs") / "finished"
    with real_figures():
        assert train(out, phases=3) == 0
    return out


@pytest.fixture
def capture_trainer(monkeypatch) -> list:
    """Collects the trainer of each run (the recorder sees it when training starts)."""
    trainers = []
    start = train_cli.RunRecorder.start

    def recording_start(self, trainer):
        trainers.append(trainer)
        start(self, trainer)

    monkeypatch.setattr(train_cli.RunRecorder, "start", recording_start)
    return trainers


# ---------------------------------------------------------------------------------- outputs


def test_metrics_has_one_line_per_phase_with_the_documented_keys(finished_run):
    metrics = train_cli.read_metrics(finished_run)
    assert [m["phase"] for m in metrics] == [0, 1, 2]
    for m in metrics:
        assert METRIC_KEYS <= m.keys()
        assert all(isinstance(m[k], (int, float)) for k in METRIC_KEYS)


def test_reward_curve_is_a_png_image(finished_run):
    import matplotlib.image

    image = matplotlib.image.imread(finished_run / "reward_curve.png")
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300


def test_samples_show_before_and_after_training(finished_run):
    text = (finished_run / "samples.md").read_text()
    assert "## Before training" in text and "## After training" in text
    assert text.count("\n[") == 2 * 4  # the batch of 4, before and after
    assert "This is" in text


def test_adapter_config_describes_the_run(finished_run):
    import lora_rlhf

    config = json.loads((finished_run / "adapter_config.json").read_text())
    assert config["base_model"] == "tiny-llama"
    assert (config["rank"], config["lora_alpha"]) == (4, 32)
    assert config["targets"] == ["q", "k", "v", "o"]
    assert config["library_version"] == lora_rlhf.__version__
    assert (config["phases_done"], config["seed"]) == (3, 1)
    assert config["value_head"] is True


def test_the_adapter_reloads_to_the_trained_weights(tmp_path, capture_trainer):
    from lora_rlhf.adapters.files import adapter_state_dict, load_lora_model

    assert train(tmp_path / "run") == 0
    trained = adapter_state_dict(capture_trainer[0].model)
    reloaded = adapter_state_dict(load_lora_model(tmp_path / "run", device="cpu"))
    assert trained.keys() == reloaded.keys() and any(k.startswith("value_head.") for k in trained)
    for key, tensor in trained.items():
        torch.testing.assert_close(reloaded[key], tensor, rtol=0, atol=0, msg=key)
    assert max(reloaded[k].abs().max().item() for k in reloaded if k.endswith(".B")) > 0  # trained


def test_summary_gives_the_first_and_last_five_phase_rewards(tmp_path, capsys):
    assert train(tmp_path / "run") == 0
    out = capsys.readouterr().out
    assert "Done: 2 phases" in out
    assert "first phase" in out and "last 5 phases" in out
    assert str(tmp_path / "run" / "adapter.safetensors") in out


# ---------------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_metrics(tmp_path):
    assert train(tmp_path / "a", "--seed", "3") == 0
    assert train(tmp_path / "b", "--seed", "3") == 0
    assert train(tmp_path / "c", "--seed", "4") == 0
    a, b, c = (without_timings(train_cli.read_metrics(tmp_path / n)) for n in "abc")
    assert a == b
    assert a != c  # the seed matters: the comparison above is not vacuous


# ---------------------------------------------------------------------------------- Ctrl-C and resume


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory) -> Path:
    """An uninterrupted 4-phase run: what an interrupted and resumed run must reproduce."""
    out = tmp_path_factory.mktemp("runs") / "whole"
    assert train(out, phases=4) == 0
    return out


def _interrupted_then_resumed(out: Path, whole: Path) -> None:
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["phases_done"], config["interrupted"]) == (2, True)
    assert [m["phase"] for m in train_cli.read_metrics(out)] == [0, 1]
    assert (out / "reward_curve.png").is_file() and (out / "adapter.safetensors").is_file()

    assert main(["train", "--resume", str(out), "--no-progress", "--threads", "1"]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["phases_done"], config["interrupted"]) == (4, False)
    resumed = train_cli.read_metrics(out)
    assert [m["phase"] for m in resumed] == [0, 1, 2, 3]
    assert without_timings(resumed) == without_timings(train_cli.read_metrics(whole))


def test_ctrl_c_after_a_phase_saves_it_and_resume_continues_exactly(
    whole_run, tmp_path, monkeypatch
):
    """Interrupted after phase 1, then resumed == one uninterrupted run (same phases, same numbers)."""
    on_phase_end = train_cli.RunRecorder.on_phase_end

    def interrupt_after_phase_1(self, metrics):
        on_phase_end(self, metrics)
        if metrics["phase"] == 1:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(train_cli.RunRecorder, "on_phase_end", interrupt_after_phase_1)
        assert train(tmp_path / "run", phases=4) == train_cli.EXIT_INTERRUPTED
    _interrupted_then_resumed(tmp_path / "run", whole_run)


def test_ctrl_c_within_a_phase_drops_that_phase_and_resume_continues_exactly(
    whole_run, tmp_path, monkeypatch
):
    """Phase 2's learning steps are taken, then Ctrl-C: the save holds phases 0-1 exactly."""
    from lora_rlhf.rlhf.trainer import RLHFTrainer

    learning_phase = RLHFTrainer.learning_phase

    def interrupt_in_phase_2(self, memory):
        learning_phase(self, memory)
        if self.phase == 2:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(RLHFTrainer, "learning_phase", interrupt_in_phase_2)
        assert train(tmp_path / "run", phases=4) == train_cli.EXIT_INTERRUPTED
    _interrupted_then_resumed(tmp_path / "run", whole_run)


def test_resume_from_the_adapter_file_into_another_folder(finished_run, tmp_path):
    out = tmp_path / "more"
    rc = main(["train", "--resume", str(finished_run / "adapter.safetensors"), "--phases", "4",
               "--out", str(out), "--no-progress", "--threads", "1"])  # fmt: skip
    assert rc == 0
    metrics = train_cli.read_metrics(out)
    assert [m["phase"] for m in metrics] == [0, 1, 2, 3]
    assert without_timings(metrics[:3]) == without_timings(train_cli.read_metrics(finished_run))
    assert json.loads((out / "adapter_config.json").read_text())["phases_done"] == 4


# ---------------------------------------------------------------------------------- --impl


def test_impl_trains_a_students_classes(tmp_path, capture_trainer):
    root = repo_root()
    if root is None:
        pytest.skip("needs the source checkout's solutions/")
    student = tmp_path / "student.py"
    shutil.copy(root / "solutions" / "section2_lora.py", student)
    assert train(tmp_path / "run", "--impl", str(student)) == 0
    model = capture_trainer[0].model
    assert type(model).__module__.startswith("lora_rlhf_submission_")
    config = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert config["impl"] == str(student.resolve())
    assert len(train_cli.read_metrics(tmp_path / "run")) == 2


def test_impl_with_unfinished_exercises_names_the_exercise(tmp_path, capsys):
    root = repo_root()
    if root is None:
        pytest.skip("needs the source checkout's exercises/")
    assert train(tmp_path / "run", "--impl", str(root / "exercises")) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "Exercise TransformerWithValueHeadLora.setup_lora" in err


# ---------------------------------------------------------------------------------- bad input


@pytest.fixture
def no_model_loading(monkeypatch):
    """Any model load fails the test: bad input must be caught before."""

    def load_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    import lora_rlhf.models
    import lora_rlhf.models.registry
    import lora_rlhf.rlhf.value_head

    for module in (lora_rlhf.models, lora_rlhf.models.registry, lora_rlhf.rlhf.value_head):
        monkeypatch.setattr(module, "load_model", load_model)


def _student_without_lora_hooks(tmp_path: Path) -> str:
    path = tmp_path / "incomplete.py"
    path.write_text("class Lora: pass\nclass TransformerWithValueHeadLora: pass\n")
    return str(path)


BAD_INPUTS = {
    "rank zero": (["--rank", "0"], "--rank 0: the LoRA rank must be a positive integer"),
    "negative alpha": (["--alpha", "-1"], "--alpha -1.0: LoRA alpha must be > 0"),
    "unknown model": (["--model", "no-such-model"], "Unknown model name 'no-such-model'"),
    "unknown reward": (["--reward", "happiness"], "--reward happiness: unknown reward; known: char_count"),
    "indivisible batch": (["--batch-size", "6", "--minibatches", "4"], "--batch-size 6: must be divisible by --minibatches 4"),
    "missing impl": (["--impl", "{tmp}/nowhere.py"], "nowhere.py: no such file"),
    "impl lacking a class": (["--impl", "{incomplete}"], "does not define LoraHooks"),
    "out not writable": (["--out", "{tmp}/a_file/run"], "the output folder is not writable"),
    "warmup too long": (["--warmup", "5", "--phases", "5"], "--phases 5: must be greater than --warmup 5"),
    "char with length reward": (["--reward", "length", "--char", "!"], "--char applies to the char_count"),
}  # fmt: skip


@pytest.mark.parametrize("options, message", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_fails_before_loading_with_one_line(
    options, message, tmp_path, capsys, no_model_loading
):
    (tmp_path / "a_file").write_text("not a folder")
    subs = {"tmp": str(tmp_path), "incomplete": _student_without_lora_hooks(tmp_path)}
    options = [o.format(**subs) for o in options]
    if "--out" not in options:
        options += ["--out", str(tmp_path / "out")]
    assert main(["train", "--model", "tiny-llama", "--no-progress", *options]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lora-rlhf train: error: ")
    assert message in err
    assert not (tmp_path / "out").exists()  # nothing created either


def test_out_holding_another_run_is_refused(finished_run, capsys, no_model_loading):
    assert main(["train", "--model", "tiny-llama", "--out", str(finished_run)]) == 2
    assert f"--resume {finished_run}" in capsys.readouterr().err


def test_resume_refuses_another_rank(finished_run, capsys, no_model_loading):
    assert main(["train", "--resume", str(finished_run), "--phases", "9", "--rank", "8"]) == 2
    assert "--rank 8: the resumed run has --rank 4" in capsys.readouterr().err


def test_resume_of_a_finished_run_asks_for_more_phases(finished_run, capsys, no_model_loading):
    assert main(["train", "--resume", str(finished_run)]) == 2
    assert "already did 3 phases; pass --phases N with N > 3" in capsys.readouterr().err


def test_resume_of_a_folder_without_a_run_is_refused(tmp_path, capsys, no_model_loading):
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert (
        "no saved run there (no checkpoint and no adapter_config.json)" in capsys.readouterr().err
    )


def test_plot_reward_curves_compares_runs(finished_run, tmp_path):
    import matplotlib.image

    from lora_rlhf.plots import plot_reward_curves

    history = train_cli.read_metrics(finished_run)
    path = plot_reward_curves({"seed 1": history, "seed 2": history[:2]}, tmp_path / "seeds.png")
    assert matplotlib.image.imread(path).ndim == 3
