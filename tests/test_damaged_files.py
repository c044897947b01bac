"""Damaged or missing files of a saved adapter or training run: one line naming the file and what
to do — for `lora-rlhf train --resume`, `load_adapter` and `load_lora_model` — and nothing saved
is overwritten. A damaged newest checkpoint makes `--resume` fall back to the one before it, with
a one-line notice; it never gives a traceback and never silently starts over."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lora_rlhf.adapters.files import AdapterFileError, load_adapter, load_lora_model, save_adapter
from lora_rlhf.cli.command import main
from lora_rlhf.lessons.section2_lora import TransformerWithValueHeadLora

TINY = [
    "--model", "tiny-llama", "--batch-size", "4", "--minibatches", "2", "--gen-len", "4",
    "--warmup", "0", "--no-progress", "--threads", "1",
]  # fmt: skip


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    """A run saved only at its end (no checkpoints): its files are the only copy."""
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(["train", *TINY, "--phases", "1", "--save-every", "0", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def adapter_folder(tmp_path_factory) -> Path:
    model = TransformerWithValueHeadLora.from_pretrained("tiny-llama", lora_alpha=8, rank=4)
    return save_adapter(model, tmp_path_factory.mktemp("adapters") / "adapter")


def a_later_phase(path: Path) -> None:
    """What a kill between replacing trainer_state.pt and adapter_config.json leaves."""
    state = torch.load(path, weights_only=True)
    torch.save({**state, "phase": state["phase"] + 3}, path)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGES = {
    "adapter.safetensors truncated": ("adapter.safetensors", truncate),
    "adapter.safetensors missing": ("adapter.safetensors", Path.unlink),
    "adapter.safetensors not safetensors": (
        "adapter.safetensors",
        lambda p: p.write_text("hello"),
    ),
    "adapter_config.json truncated": ("adapter_config.json", truncate),
    "adapter_config.json not an object": ("adapter_config.json", lambda p: p.write_text("[1]")),
}
RUN_DAMAGES = {
    **DAMAGES,
    "trainer_state.pt truncated": ("trainer_state.pt", truncate),
    "trainer_state.pt missing": ("trainer_state.pt", Path.unlink),
    "trainer_state.pt of a save cut short": ("trainer_state.pt", a_later_phase),
    "metrics.jsonl truncated mid-line": (
        "metrics.jsonl",
        lambda p: p.write_text(p.read_text()[:-9]),
    ),
    "metrics.jsonl missing": ("metrics.jsonl", Path.unlink),
    "samples.json damaged": ("samples.json", lambda p: p.write_text("{")),
}


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def damaged_copy(folder: Path, tmp_path: Path, file: str, damage) -> Path:
    copy = Path(shutil.copytree(folder, tmp_path / folder.name))
    damage(copy / file)
    return copy


@pytest.mark.parametrize("case", RUN_DAMAGES, ids=list(RUN_DAMAGES))
def test_resume_from_a_damaged_run_is_one_line_naming_the_file(case, run_folder, tmp_path, capsys):
    file, damage = RUN_DAMAGES[case]
    folder = damaged_copy(run_folder, tmp_path, file, damage)
    before = snapshot(folder)
    code = main(["train", "--resume", str(folder), "--phases", "3", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert str(folder / file) in err
    assert "restore" in err or "save" in err
    assert snapshot(folder) == before  # nothing saved is overwritten


@pytest.mark.parametrize("case", DAMAGES, ids=list(DAMAGES))
def test_load_adapter_and_load_lora_model_name_the_damaged_file(case, adapter_folder, tmp_path):
    file, damage = DAMAGES[case]
    folder = damaged_copy(adapter_folder, tmp_path, file, damage)
    before = snapshot(folder)
    model = TransformerWithValueHeadLora.from_pretrained("tiny-llama", lora_alpha=8, rank=4)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    for load in (lambda: load_adapter(model, folder), lambda: load_lora_model(folder)):
        with pytest.raises((AdapterFileError, FileNotFoundError)) as info:
            load()
        message = str(info.value)
        assert "\n" not in message and str(folder / file) in message, message
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    assert snapshot(folder) == before


def test_an_intact_run_still_resumes(run_folder, tmp_path):
    folder = Path(shutil.copytree(run_folder, tmp_path / "run"))
    assert main(["train", "--resume", str(folder), "--phases", "2", "--no-progress"]) == 0


# ---------------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "whole"
    assert main(["train", *TINY, "--phases", "4", "--out", str(out)]) == 0
    return out


class Killed(BaseException):
    """Stands in for SIGKILL: no handler of the run catches it, so nothing is saved at the end."""


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory) -> Path:
    """What a run of 4 phases killed in its fourth phase leaves: checkpoints 2 and 3 and the
    metrics of phases 0-2, no save at the end."""
    from lora_rlhf.rlhf.trainer import RLHFTrainer

    learning_phase = RLHFTrainer.learning_phase

    def killed_in_phase_3(self, memory):
        if self.phase == 3:
            raise Killed
        learning_phase(self, memory)

    out = tmp_path_factory.mktemp("runs") / "killed"
    with pytest.MonkeyPatch.context() as m:
        m.setattr(RLHFTrainer, "learning_phase", killed_in_phase_3)
        with pytest.raises(Killed):
            main(["train", *TINY, "--phases", "4", "--out", str(out)])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "phase-000002",
        "phase-000003",
    ]
    assert not (out / "adapter_config.json").exists()
    return out


CHECKPOINT_DAMAGES = {
    "trainer_state.pt truncated": ("trainer_state.pt", truncate),
    "adapter.safetensors not safetensors": ("adapter.safetensors", lambda p: p.write_text("hi")),
    "adapter_config.json truncated": ("adapter_config.json", truncate),
    "metrics.jsonl missing": ("metrics.jsonl", Path.unlink),
}


@pytest.mark.parametrize("case", CHECKPOINT_DAMAGES, ids=list(CHECKPOINT_DAMAGES))
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(
    case, killed_run, whole_run, tmp_path, capsys
):
    from lora_rlhf.cli.outputs import read_metrics

    file, damage = CHECKPOINT_DAMAGES[case]
    folder = Path(shutil.copytree(killed_run, tmp_path / "run"))
    newest = folder / "checkpoints" / "phase-000003"
    damage(newest / file)
    assert main(["train", "--resume", str(folder), "--no-progress", "--threads", "1"]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (notice,) = [line for line in err.splitlines() if str(newest / file) in line]
    assert "resuming from" in notice and notice.endswith("phase-000002 instead")
    (dropped,) = [line for line in err.splitlines() if "dropped" in line]
    assert "1 line(s) past the 2 phases" in dropped  # phase 2's line: it runs again
    strip = lambda ms: [{k: v for k, v in m.items() if "seconds" not in k} for m in ms]  # noqa: E731
    assert strip(read_metrics(folder)) == strip(read_metrics(whole_run))
    assert json.loads((folder / "adapter_config.json").read_text())["phases_done"] == 4


def test_all_checkpoints_damaged_fails_in_one_line_and_overwrites_nothing(
    killed_run, tmp_path, capsys
):
    folder = Path(shutil.copytree(killed_run, tmp_path / "run"))
    for checkpoint in (folder / "checkpoints").iterdir():
        truncate(checkpoint / "trainer_state.pt")
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert main(["train", "--resume", str(folder), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert str(folder / "checkpoints" / "phase-000003" / "trainer_state.pt") in err
    assert "cannot be resumed" in err
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before


def test_a_killed_run_without_any_checkpoint_is_not_silently_started_over(tmp_path, capsys):
    folder = tmp_path / "run"
    (folder / "checkpoints" / ".writing-x").mkdir(parents=True)  # killed in its first checkpoint
    (folder / "metrics.jsonl").write_text("")
    assert main(["train", "--resume", str(folder), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no saved run there (no checkpoint" in err
    assert main(["train", *TINY, "--phases", "1", "--out", str(folder)]) == 2  # nor overwritten
    assert f"continue it with --resume {folder}" in capsys.readouterr().err
