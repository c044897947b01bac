"""Damaged or missing files of a saved adapter or training run: one line naming the file and what
to do — for `lora-rlhf train --resume`, `load_adapter` and `load_lora_model` — and nothing saved
is overwritten."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from lora_rlhf.adapters import AdapterFileError, load_adapter, load_lora_model, save_adapter
from lora_rlhf.cli import main
from lora_rlhf.lora import TransformerWithValueHeadLora

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
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(["train", *TINY, "--phases", "1", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def adapter_folder(tmp_path_factory) -> Path:
    model = TransformerWithValueHeadLora.from_pretrained("tiny-llama", lora_alpha=8, rank=4)
    return save_adapter(model, tmp_path_factory.mktemp("adapters") / "adapter")


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
