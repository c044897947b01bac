"""The adaptor map (lora_rlhf.adapters.adaptor_map) and `lora-rlhf inspect`.

The map's numbers are compared with ΔW = (α/r)·A[h]·B[h] formed explicitly here, in float64, on
tiny models with hand-set A and B, against the weights each adaptor adapts (the grouped _W_K/_W_V
of grouped-query attention); `inspect` is run on a saved tiny training run.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import real_figures
from torch.overrides import TorchFunctionMode

from lora_rlhf.adapters.adaptor_map import MAP_FILE, adaptor_map
from lora_rlhf.cli.command import main
from lora_rlhf.lessons.bonus_mlp_lora import TransformerWithValueHeadMlpLora
from lora_rlhf.lessons.section2_lora import TransformerWithValueHeadLora
from lora_rlhf.plots import plot_adaptor_map

ALPHA, RANK = 8, 2  # α/r = 4, written out below rather than read from the model
SCALE = ALPHA / RANK
PNG = b"\x89PNG\r\n\x1a\n"
MLP_WEIGHTS = {"mlp_in": "W_in", "mlp_gate": "W_gate", "mlp_out": "W_out"}


def _set_adaptors(model, seed: int = 0) -> None:
    """Hand-set A and B: non-zero, a different scale per layer and target, so that the ranking
    of the updates is not an accident of the initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name and name.endswith((".A", ".B")):
                p.copy_(torch.randn(p.shape, generator=g) * (0.1 + torch.rand(1, generator=g)))


def _explicit(model, layer: int, target: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(ΔW, W) in float64, ΔW formed whole; W the weight the adaptor adapts, as merging does."""
    if target in MLP_WEIGHTS:
        hooks = model.mlp_lora[layer]
        lora = getattr(
            hooks, {"mlp_in": "lora_in", "mlp_gate": "lora_gate"}.get(target, "lora_out")
        )
        weight = getattr(model.blocks[layer].mlp, MLP_WEIGHTS[target])
    else:
        lora = getattr(model.lora[layer], f"lora_{target}")
        attn = model.blocks[layer].attn
        weight = {"q": attn.W_Q, "k": attn._W_K, "v": attn._W_V, "o": attn.W_O}[target]
    delta = SCALE * torch.einsum("hir,hro->hio", lora.A.detach().double(), lora.B.detach().double())
    return delta.reshape(weight.shape), weight.detach().double()


def _stacked(delta: torch.Tensor, target: str) -> torch.Tensor:
    """ΔW as one matrix, heads side by side as the Hugging Face projections hold them."""
    if delta.ndim == 2:
        return delta
    if target == "o":  # [heads, d_head, d_model] -> [heads·d_head, d_model]
        return delta.reshape(-1, delta.shape[-1])
    return delta.permute(1, 0, 2).reshape(delta.shape[1], -1)  # [d_model, heads·d_head]


@pytest.fixture
def llama_lora():
    model = TransformerWithValueHeadLora.from_pretrained("tiny-llama", lora_alpha=ALPHA, rank=RANK)
    _set_adaptors(model)
    return model


def test_the_map_equals_the_float64_formula_with_hand_set_adaptors(llama_lora):
    amap = adaptor_map(llama_lora)
    assert amap.targets == ("q", "k", "v", "o")
    assert len(amap.updates) == llama_lora.cfg.n_layers * 4
    grid = amap.grid()
    expected = {}
    for layer in range(llama_lora.cfg.n_layers):
        for column, target in enumerate(amap.targets):
            delta, weight = _explicit(llama_lora, layer, target)
            expected[(layer, target)] = (delta.norm() / weight.norm()).item()
            assert grid[layer][column] == pytest.approx(expected[(layer, target)], rel=1e-10)
    ranking = sorted(expected, key=expected.get, reverse=True)
    assert [(u.layer, u.target) for u in amap.updates] == ranking


def test_the_largest_updates_singular_values_equal_the_explicit_svd(llama_lora):
    amap = adaptor_map(llama_lora)
    assert len(amap.spectra) == 5 and {u.target for u in amap.top()} >= {"o"}
    for u in amap.top():
        delta, _ = _explicit(llama_lora, u.layer, u.target)
        full = torch.linalg.svdvals(_stacked(delta, u.target))
        sigma = torch.tensor(amap.spectra[(u.layer, u.target)], dtype=torch.float64)
        assert len(sigma) <= RANK * delta.shape[0]  # at most heads × r directions
        assert sigma.tolist() == pytest.approx(full[: len(sigma)].tolist(), rel=1e-9, abs=1e-9)
        assert full[len(sigma) :].abs().max() < 1e-9  # the rest of ΔW's spectrum is zero


def test_k_and_v_are_measured_against_the_real_grouped_weights(llama_lora):
    cfg = llama_lora.cfg
    assert cfg.n_key_value_heads < cfg.n_heads  # grouped-query attention
    amap = adaptor_map(llama_lora)
    by_cell = {(u.layer, u.target): u for u in amap.updates}
    for layer in range(cfg.n_layers):
        attn = llama_lora.blocks[layer].attn
        for target, grouped, expanded in (("k", attn._W_K, attn.W_K), ("v", attn._W_V, attn.W_V)):
            u = by_cell[(layer, target)]
            assert u.base_norm == pytest.approx(grouped.double().norm().item(), rel=1e-10)
            # the n_heads-wide expansion repeats each key/value head n_heads / n_kv times
            wider = expanded.double().norm().item()
            assert wider == pytest.approx(
                u.base_norm * math.sqrt(cfg.n_heads / cfg.n_key_value_heads), rel=1e-6
            )


def test_mlp_adaptors_are_mapped_too():
    model = TransformerWithValueHeadMlpLora.from_pretrained(
        "tiny-llama", lora_alpha=ALPHA, rank=RANK
    )
    _set_adaptors(model, seed=1)
    amap = adaptor_map(model)
    assert amap.targets == ("q", "k", "v", "o", "mlp_in", "mlp_gate", "mlp_out")
    grid = amap.grid()
    for layer in range(model.cfg.n_layers):
        for column, target in enumerate(amap.targets):
            delta, weight = _explicit(model, layer, target)
            assert grid[layer][column] == pytest.approx(
                (delta.norm() / weight.norm()).item(), rel=1e-10
            )
    mlp_top = next(u for u in amap.updates if u.target in MLP_WEIGHTS)
    spectrum = adaptor_map(model, top=len(amap.updates)).spectra[(mlp_top.layer, mlp_top.target)]
    delta, _ = _explicit(model, mlp_top.layer, mlp_top.target)
    assert spectrum == pytest.approx(torch.linalg.svdvals(delta)[:RANK].tolist(), rel=1e-9)


def test_all_zero_B_gives_an_all_zero_map(tmp_path):
    model = TransformerWithValueHeadLora.from_pretrained("tiny-llama", lora_alpha=ALPHA, rank=RANK)
    assert any(lora.A.abs().sum() > 0 for lora in model.lora[0].children())  # A is not zero
    amap = adaptor_map(model)  # B starts at zero
    assert all(value == 0.0 for row in amap.grid() for value in row)
    assert all(u.delta_norm == 0.0 and u.base_norm > 0 for u in amap.updates)
    assert all(s == 0.0 for sigma in amap.spectra.values() for s in sigma)
    assert plot_adaptor_map(amap, tmp_path / "zero.png").read_bytes().startswith(PNG)


class _LargestTensor(TorchFunctionMode):
    """Records the most elements of any tensor a torch function returns, except views of the
    model's own parameters (reading a weight forms nothing)."""

    def __init__(self, model):
        super().__init__()
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.most = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.params:
                self.most = max(self.most, t.numel())
        return out


def test_no_tensor_larger_than_one_heads_product_is_formed(llama_lora):
    cfg = llama_lora.cfg
    with _LargestTensor(llama_lora) as seen:
        adaptor_map(llama_lora)
    assert 0 < seen.most <= cfg.d_model * cfg.d_head
    # the whole stacked ΔW_Q would be n_heads times that
    assert cfg.d_model * cfg.d_head * cfg.n_heads > cfg.d_model * cfg.d_head


# ------------------------------------------------------------------------------ lora-rlhf inspect

TINY_RUN = [
    "train", "--model", "tiny-llama", "--batch-size", "4", "--minibatches", "2", "--gen-len", "4",
    "--warmup", "0", "--no-progress", "--threads", "1", "--phases", "3", "--base-lr", "1e-2",
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A saved tiny run, and the map of its trained model as it was in memory at the end."""
    from lora_rlhf.cli.recorder import RunRecorder

    out = tmp_path_factory.mktemp("run") / "run"
    trainers = []
    original = RunRecorder.start

    def recording_start(self, trainer):
        trainers.append(trainer)
        return original(self, trainer)

    threads = torch.get_num_threads()
    RunRecorder.start = recording_start
    try:
        with real_figures():
            assert main([*TINY_RUN, "--out", str(out)]) == 0
    finally:
        RunRecorder.start = original
        torch.set_num_threads(threads)
    return out, adaptor_map(trainers[0].model)


def _printed_top(text: str) -> list[str]:
    return [
        line.strip()
        for line in text.splitlines()
        if line.strip()[:2] in {f"{i}." for i in range(1, 6)}
    ]


def test_every_run_draws_its_adaptor_map(tiny_run):
    out, amap = tiny_run
    assert (out / MAP_FILE).read_bytes().startswith(PNG)
    assert amap.top()[0].delta_norm > 0  # trained: the picture is not of zeros


@pytest.mark.parametrize("what", ["folder", "adapter.safetensors"])
def test_inspect_prints_the_same_top_five_as_the_runs_own_map(tiny_run, what, tmp_path, capsys):
    out, amap = tiny_run
    path = out if what == "folder" else out / "adapter.safetensors"
    assert main(["inspect", str(path), "--out", str(tmp_path / "map.png")]) == 0
    printed = capsys.readouterr().out
    assert _printed_top(printed) == [line.strip() for line in amap.describe_top()]
    assert len(_printed_top(printed)) == 5
    assert (tmp_path / "map.png").read_bytes().startswith(PNG)


def test_inspect_of_a_missing_path_is_one_line_and_fails(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nowhere")]) != 0
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "nowhere" in captured.err
    assert "Traceback" not in captured.err and captured.out == ""


def test_inspect_of_a_truncated_adapter_is_one_line_and_fails(tiny_run, tmp_path, capsys):
    out, _ = tiny_run
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for name in ("adapter_config.json", "adapter.safetensors"):
        (damaged / name).write_bytes((out / name).read_bytes())
    weights = damaged / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    assert main(["inspect", str(weights)]) != 0
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and str(weights) in captured.err
    assert "truncated" in captured.err and "Traceback" not in captured.err
    assert not (damaged / MAP_FILE).exists()
