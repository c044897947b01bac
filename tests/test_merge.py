"""merge_lora: a plain HookedTransformer with the adaptors baked into its weights, same logits."""

from __future__ import annotations

import pytest
import torch
from helpers import ALPHA, RANK, SMOLLM2_ATOL, make_lora_model, tokens
from transformer_lens import HookedTransformer

from lora_rlhf.adapters.merge import merge_lora
from lora_rlhf.lessons.section2_lora import TransformerWithValueHeadLora

MODELS = ["tiny-llama", "tiny-pythia"]


@pytest.mark.parametrize("mlp", [False, True], ids=["attn", "attn+mlp"])
@pytest.mark.parametrize("name", MODELS)
def test_merged_logits_equal_hooked_logits(name, mlp, device):
    model = make_lora_model(name, device, mlp=mlp)
    toks = tokens(model)
    with torch.no_grad():
        hooked, _ = model.forward_with_value_head(toks)
        merged = merge_lora(model)(toks)
        base = model(toks)
    assert (hooked - base).abs().max() > 0.1, "the adaptors should change the logits"
    assert (merged - hooked).abs().max() <= 1e-4


def test_merged_model_is_a_plain_hooked_transformer():
    model = make_lora_model("tiny-llama", mlp=True)
    merged = merge_lora(model)
    assert type(merged) is HookedTransformer
    assert not any(
        n.startswith(("lora", "mlp_lora", "value_head")) for n, _ in merged.named_modules()
    )
    assert all(not hp._forward_hooks for hp in merged.hook_dict.values())
    assert merged.tokenizer is model.tokenizer and merged.cfg.model_name == "tiny-llama"


def test_merge_leaves_the_lora_model_unchanged():
    model = make_lora_model("tiny-llama", mlp=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merge_lora(model)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_merge_adds_the_kv_adaptors_to_the_real_grouped_weights():
    model = make_lora_model("tiny-llama")  # 4 query heads, 2 key/value heads
    merged = merge_lora(model)
    attn, merged_attn, lora = model.blocks[1].attn, merged.blocks[1].attn, model.lora[1]
    for weight, adaptor in (
        ("W_Q", lora.lora_q),
        ("_W_K", lora.lora_k),
        ("_W_V", lora.lora_v),
        ("W_O", lora.lora_o),
    ):
        delta = torch.einsum("hir,hro->hio", adaptor.A, adaptor.B) * ALPHA / RANK
        expected = getattr(attn, weight) + delta
        torch.testing.assert_close(getattr(merged_attn, weight), expected, atol=1e-6, rtol=0)
    assert merged_attn._W_K.shape == (2, 64, 16)


def test_merge_adds_the_mlp_adaptors_to_w_in_w_gate_and_w_out():
    model = make_lora_model("tiny-llama", mlp=True)
    merged = merge_lora(model)
    for attr, weight in (("lora_in", "W_in"), ("lora_gate", "W_gate"), ("lora_out", "W_out")):
        lora = getattr(model.mlp_lora[0], attr)
        expected = getattr(model.blocks[0].mlp, weight) + lora.A[0] @ lora.B[0] * ALPHA / RANK
        torch.testing.assert_close(
            getattr(merged.blocks[0].mlp, weight), expected, atol=1e-6, rtol=0
        )


def test_merge_with_zero_adaptors_is_the_base_model():
    model = TransformerWithValueHeadLora.from_pretrained("tiny-pythia", device="cpu")  # B = 0
    toks = tokens(model)
    with torch.no_grad():
        assert torch.equal(merge_lora(model)(toks), model(toks))


@pytest.mark.slow
def test_merged_smollm2_logits_equal_hooked_logits(smollm2_mlp_lora):
    # smollm2_mlp_lora (conftest.py): make_lora_model("smollm2-135m", mlp=True, b_std=0.02)
    model = smollm2_mlp_lora
    toks = tokens(model, seq=6)
    with torch.no_grad():
        hooked, _ = model.forward_with_value_head(toks)
        merged = merge_lora(model)
        got = merged(toks)
    del merged
    assert (hooked - model(toks)).abs().max() > 0.1
    assert (got - hooked).abs().max() <= SMOLLM2_ATOL


@pytest.mark.slow
def test_merged_smollm2_equals_hooked_in_float64():
    """Without fp32 rounding the merge is exact: α/r·A·B added to W_Q, _W_K, _W_V, W_O, W_in,
    W_gate and W_out of the embedded model gives the hooked model's logits to ~1e-13."""
    model = make_lora_model("smollm2-135m", mlp=True, b_std=0.01, dtype=torch.float64)
    toks = tokens(model, batch=1, seq=6)
    with torch.no_grad():
        hooked, _ = model.forward_with_value_head(toks)
        base = model(toks)
        got = merge_lora(model)(toks)
    assert hooked.dtype == got.dtype == torch.float64
    assert (hooked - base).abs().max() > 0.1, "the adaptors should change the logits"
    assert (got - hooked).abs().max() <= 1e-9


@pytest.mark.parametrize("name", MODELS)
def test_the_library_merge_equals_the_checks_reference_merge(name):
    """The library's merge is its own code; the checks' reference merge is the oracle."""
    from lora_rlhf.adapters.merge import merge_adaptors_into
    from lora_rlhf.checks.reference import adaptor_values as seeded_values
    from lora_rlhf.checks.reference import merge_into
    from lora_rlhf.models import load_model

    ours, reference = load_model(name, device="cpu"), load_model(name, device="cpu")
    layers = seeded_values(ours.cfg, seed=4, scale=0.3)
    merge_adaptors_into(ours, layers, scaling=2.0)
    merge_into(reference, layers, scaling=2.0)
    mine, theirs = ours.state_dict(), reference.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert any(
        not torch.equal(v, load_model(name, device="cpu").state_dict()[k]) for k, v in mine.items()
    )


def test_the_library_merge_does_not_import_the_checks():
    import ast
    from pathlib import Path

    import lora_rlhf.adapters.merge

    tree = ast.parse(Path(lora_rlhf.adapters.merge.__file__).read_text())
    modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
    }
    assert not {m for m in modules if m and m.startswith(("lora_rlhf.checks", "lora_rlhf.grading"))}


@pytest.mark.parametrize("name", MODELS)
def test_the_library_mlp_merge_equals_the_checks_reference_mlp_merge(name):
    from lora_rlhf.adapters.merge import merge_adaptors_into
    from lora_rlhf.checks import reference
    from lora_rlhf.models import load_model

    ours, theirs = load_model(name, device="cpu"), load_model(name, device="cpu")
    cfg, gen = ours.cfg, torch.Generator().manual_seed(5)
    targets = {"mlp_in": (cfg.d_model, cfg.d_mlp), "mlp_out": (cfg.d_mlp, cfg.d_model)}
    if cfg.gated_mlp:
        targets["mlp_gate"] = (cfg.d_model, cfg.d_mlp)
    layers = [
        {
            t: (torch.randn(1, i, 4, generator=gen), torch.randn(1, 4, o, generator=gen))
            for t, (i, o) in targets.items()
        }
        for _ in range(cfg.n_layers)
    ]
    merge_adaptors_into(ours, layers, 0.5)
    reference.merge_mlp_into(theirs, layers, 0.5)
    assert all(
        torch.allclose(v, theirs.state_dict()[k], atol=1e-6) for k, v in ours.state_dict().items()
    )
