"""The smollm2 cache's weight layout (weights stored as ``F.linear`` receives them, loaded as
permuted views) survives what the library does with a model: moving it, merging the adaptors,
a full fine-tuning step. Each keeps the strides, so no forward copies the weights again.

The tiny models are given the same layout as the embedded SmolLM2 (by the cache's own
conversion functions), which is cheap; the merged SmolLM2 is checked too (slow).
"""

from __future__ import annotations

import torch
from helpers import assert_forward_copies_no_weights, make_lora_model, tokens
from transformer_lens import HookedTransformer

from lora_rlhf.adapters.merge import merge_lora
from lora_rlhf.models import load_model, smollm2_layout


def base_parameters(model: HookedTransformer) -> dict[str, torch.Tensor]:
    """The HookedTransformer's own parameters (not those of adaptors or a value head)."""
    return {
        n: p
        for n, p in model.named_parameters()
        if n.split(".", 1)[0] in smollm2_layout.BASE_MODULES
    }


def in_cache_layout(model: HookedTransformer) -> HookedTransformer:
    """`model` with its base weights laid out as the smollm2 cache lays them out, in place."""
    stored = smollm2_layout.to_stored(base_parameters(model).items())
    model.load_state_dict(smollm2_layout.from_stored(stored), strict=False, assign=True)
    return model


def assert_same_strides(got: HookedTransformer, want: HookedTransformer) -> None:
    want_params = base_parameters(want)
    got_params = base_parameters(got)
    assert got_params.keys() == want_params.keys()
    different = [n for n, p in got_params.items() if p.stride() != want_params[n].stride()]
    assert not different, f"strides differ: {different[:3]}"


def test_tiny_llama_in_the_cache_layout_has_the_same_logits_and_copies_no_weights(device):
    plain = load_model("tiny-llama", device="cpu")
    model = in_cache_layout(load_model("tiny-llama", device="cpu")).to(device, print_details=False)
    # The layout differs (e.g. W_O), but not the values nor what F.linear computes.
    assert model.blocks[0].attn.W_O.stride() != plain.blocks[0].attn.W_O.stride()
    toks = torch.randint(0, plain.cfg.d_vocab, (2, 7))
    with torch.no_grad():
        assert torch.equal(model(toks.to(device)).cpu(), plain(toks))
    assert_same_strides(model, in_cache_layout(plain))  # .to(device) keeps the layout
    assert_forward_copies_no_weights(model)
    assert all(p.requires_grad for p in model.parameters())


def test_merged_model_keeps_the_base_weights_strides(device):
    model = make_lora_model("tiny-llama", device, mlp=True)
    in_cache_layout(model)
    merged = merge_lora(model)
    assert_same_strides(merged, model)
    assert_forward_copies_no_weights(merged)
    base_ptrs = {p.data_ptr() for p in base_parameters(model).values()}
    assert not base_ptrs & {p.data_ptr() for p in merged.parameters()}
    toks = tokens(model)
    with torch.no_grad():
        hooked, _ = model.forward_with_value_head(toks)
        assert (merged(toks) - hooked).abs().max() <= 1e-4


def test_a_full_fine_tuning_step_keeps_the_layout():
    model = in_cache_layout(load_model("tiny-llama", device="cpu"))
    before = {
        n: (p.stride(), p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    toks = torch.randint(0, model.cfg.d_vocab, (2, 7))
    for _ in range(2):
        optimizer.zero_grad()
        model(toks, return_type="loss").backward()
        for n, p in model.named_parameters():
            assert p.grad is not None and p.grad.stride() == before[n][0], n
        optimizer.step()
    for n, p in model.named_parameters():
        stride, data_ptr, value = before[n]
        assert p.stride() == stride and p.data_ptr() == data_ptr, n  # updated in place
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n][2])]
    assert "blocks.0.attn.W_O" in changed and "blocks.1.attn._W_K" in changed
    assert_forward_copies_no_weights(model)


def test_merged_smollm2_keeps_the_cache_layout(smollm2_mlp_lora):
    # smollm2_mlp_lora (conftest.py): the embedded model with attention and MLP adaptors, shared
    model = smollm2_mlp_lora
    with torch.no_grad():
        merged = merge_lora(model)
        assert_same_strides(merged, model)
        assert_forward_copies_no_weights(merged)
    del merged
