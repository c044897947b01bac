"""fused_lora: the q/k/v adaptors inside the W_Q product compute the LoRA model of the hooks.

References: the same model run with its hooks (Exercise 2's way), and the merged model (adaptors
baked into the weights, no hooks at all), on a grouped-query model (tiny-llama: 2 K/V heads for 4
query heads) and a plain multi-head one (tiny-pythia).
"""

from __future__ import annotations

import pytest
import torch
from transformer_lens import HookedTransformer

from lora_rlhf import fused as fused_module
from lora_rlhf.fused import fused_lora
from lora_rlhf.merge import merge_lora
from lora_rlhf.value_head import attached_hooks
from tests.test_merge import MODELS, make_lora_model, tokens


def hooked_logits(model, toks):
    with attached_hooks(model, model.lora_fwd_hooks):
        return model(toks)


@pytest.mark.parametrize("name", MODELS)
def test_fused_forward_is_the_hooks_forward_and_the_merged_model(name, device):
    model = make_lora_model(name, device)
    toks = tokens(model)
    with torch.no_grad():
        base = model(toks)
        hooked = hooked_logits(model, toks)
        with fused_lora(model):
            fused = model(toks)
        merged = merge_lora(model)(toks)
        after = model(toks)
    assert (hooked - base).abs().max() > 0.1, "the adaptors should change the logits"
    torch.testing.assert_close(fused, hooked, rtol=0, atol=1e-5)
    torch.testing.assert_close(fused, merged, rtol=0, atol=1e-4)
    assert torch.equal(after, base), "leaving the block must give back the plain base model"


def test_fused_forward_in_inference_mode_and_with_adaptors_in_the_kv_heads():
    """Only the K/V adaptors non-zero: a fused layer that put k's or v's low-rank update into
    the wrong columns (or skipped the grouped heads) cannot match."""
    model = make_lora_model("tiny-llama")
    with torch.no_grad():
        for layer in model.lora:
            layer.lora_q.B.zero_()
            layer.lora_o.B.zero_()
    toks = tokens(model)
    with torch.inference_mode():
        hooked = hooked_logits(model, toks)
        with fused_lora(model):
            fused = model(toks)
        base = model(toks)
    assert (hooked - base).abs().max() > 0.05
    torch.testing.assert_close(fused, hooked, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_under_autograd_the_gradients_are_the_hooks_gradients(name):
    model = make_lora_model(name)
    toks = tokens(model)

    def grads(run):
        model.zero_grad(set_to_none=True)
        run().pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in model.lora.named_parameters()}

    def fused_run():
        with fused_lora(model):
            return model(toks)

    want = grads(lambda: hooked_logits(model, toks))
    got = grads(fused_run)
    assert want.keys() == got.keys() and all(g.abs().max() > 0 for g in want.values())
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6, msg=n)


def test_a_changed_adaptor_is_seen_by_the_next_fused_forward():
    """The stacked [W_Q | A] is kept between no-grad forwards: an optimizer step on A, or a new
    W_Q, must reach the next one."""
    model = make_lora_model("tiny-llama")
    toks = tokens(model)
    optimizer = torch.optim.SGD(model.lora_params(), lr=0.5)
    with fused_lora(model):
        for _ in range(2):
            with torch.no_grad():
                torch.testing.assert_close(model(toks), hooked_logits_outside(model, toks))
            model.zero_grad()
            model(toks).pow(2).mean().backward()
            optimizer.step()  # changes every A and B in place
        with torch.no_grad():
            model.blocks[0].attn.W_Q.mul_(1.5)
            torch.testing.assert_close(model(toks), hooked_logits_outside(model, toks))


def hooked_logits_outside(model, toks):
    """The hooks' logits while fused_lora is active: step outside it for one forward."""
    attns = [block.attn for block in model.blocks]
    saved = [attn.__dict__.pop("calculate_qkv_matrices") for attn in attns]
    out_hooks = [p for block in model.blocks for p in (block.attn.hook_z, block.hook_attn_out)]
    kept = [dict(p._forward_hooks) for p in out_hooks]
    for p in out_hooks:
        p._forward_hooks.clear()
    try:
        return hooked_logits(model, toks)
    finally:
        for p, hooks in zip(out_hooks, kept):
            p._forward_hooks.update(hooks)
        for attn, fn in zip(attns, saved):
            attn.calculate_qkv_matrices = fn


@pytest.mark.parametrize("use_past_kv_cache", [True, False])
def test_generate_inside_the_block_gives_the_lora_models_tokens(use_past_kv_cache):
    model = make_lora_model("tiny-llama", b_std=0.3)
    prompt = tokens(model, batch=2, seq=4)
    kwargs = dict(max_new_tokens=6, do_sample=False, verbose=False)
    want = model.generate(prompt, use_past_kv_cache=True, **kwargs)  # the exercise's generate
    with fused_lora(model):
        got = HookedTransformer.generate(
            model, prompt, use_past_kv_cache=use_past_kv_cache, **kwargs
        )
    assert torch.equal(got, want)
    assert not torch.equal(HookedTransformer.generate(model, prompt, **kwargs), want)


def test_the_block_undoes_everything_also_when_it_raises():
    model = make_lora_model("tiny-llama")
    toks = tokens(model)
    with torch.no_grad():
        base = model(toks)
        with pytest.raises(KeyError, match="boom"):
            with fused_lora(model):
                raise KeyError("boom")
        assert torch.equal(model(toks), base)
    assert all("calculate_qkv_matrices" not in b.attn.__dict__ for b in model.blocks)
    assert all(not p._forward_hooks for p in model.hook_points())


def test_misuse_stops_with_a_message_that_names_it():
    model = make_lora_model("tiny-llama")
    toks = tokens(model)
    with fused_lora(model):
        with pytest.raises(RuntimeError, match="added twice.*forward_with_value_head"):
            model.forward_with_value_head(toks)
        with pytest.raises(RuntimeError, match="already"):
            with fused_lora(model):
                pass
        with torch.no_grad():
            model(toks)  # still usable after both errors
    with pytest.raises(TypeError, match="needs a LoRA model"):
        with fused_lora(HookedTransformer(model.cfg)):
            pass


def test_unsupported_settings_and_dtypes_are_refused():
    model = make_lora_model("tiny-llama")
    model.cfg.use_attn_in = True
    with pytest.raises(ValueError, match=r"cfg\.use_attn_in.*LoRA hooks instead"):
        with fused_lora(model):
            pass
    model.cfg.use_attn_in = False
    model.lora[1].lora_k.to(torch.float64)
    with pytest.raises(ValueError, match="layer 1's adaptors"):
        with fused_lora(model):
            pass


@pytest.mark.parametrize(
    "mutant",
    ["k_and_v_swapped", "no_scaling", "q_without_adaptor"],
)
def test_the_equality_check_catches_a_wrong_fused_layer(mutant, monkeypatch):
    """Test power: each deliberately wrong fused layer fails the comparison with the hooks."""
    model = make_lora_model("tiny-llama")
    toks = tokens(model)
    original = fused_module._fused_qkv

    def broken(attn, layer):
        if mutant == "k_and_v_swapped":
            layer = _Swapped(layer)
        elif mutant == "no_scaling":
            for lora in (layer.lora_q, layer.lora_k, layer.lora_v):
                lora.scaling = 1.0
        fn = original(attn, layer)
        if mutant != "q_without_adaptor":
            return fn

        def q_plain(q_in, k_in, v_in):
            _, k, v = fn(q_in, k_in, v_in)
            return _plain_q(attn, q_in), k, v

        return q_plain

    with torch.no_grad():
        hooked = hooked_logits(model, toks)
    monkeypatch.setattr(fused_module, "_fused_qkv", broken)
    with torch.no_grad(), fused_lora(model):
        wrong = model(toks)
    assert (wrong - hooked).abs().max() > 1e-3


class _Swapped:
    """A LoraHooks whose lora_k and lora_v trade places."""

    def __init__(self, layer):
        self.lora_q, self.lora_k, self.lora_v = layer.lora_q, layer.lora_v, layer.lora_k
        self._kept = {}


def _plain_q(attn, x):
    W = attn.W_Q
    return torch.nn.functional.linear(
        x, W.permute(0, 2, 1).reshape(-1, W.shape[1]), attn.b_Q.reshape(-1)
    ).view(*x.shape[:2], -1, attn.cfg.d_head)


def test_other_lora_hooks_of_the_model_stay_attached():
    """The MLP adaptors of TransformerWithValueHeadMlpLora are hooks fused_lora does not replace:
    they must still run inside the block (the merged model holds them too)."""
    model = make_lora_model("tiny-llama", mlp=True)
    toks = tokens(model)
    with torch.no_grad():
        with fused_lora(model):
            fused = model(toks)
        torch.testing.assert_close(fused, hooked_logits(model, toks), rtol=0, atol=1e-5)
        torch.testing.assert_close(fused, merge_lora(model)(toks), rtol=0, atol=1e-4)


@pytest.mark.slow  # loads the embedded model
def test_the_embedded_model_fused_equals_its_hooks():
    """The embedded SmolLM2 (weights in the loader's layout, 9 query heads on 3 K/V heads)."""
    model = make_lora_model("smollm2-135m", b_std=0.02)
    toks = tokens(model, batch=2, seq=6)
    with torch.no_grad():
        hooked = hooked_logits(model, toks)
        with fused_lora(model):
            fused = model(toks)
        assert (hooked - model(toks)).abs().max() > 0.1
    torch.testing.assert_close(fused, hooked, rtol=0, atol=1e-4)


def test_a_replaced_parameter_is_seen_by_the_next_fused_forward():
    """A new Parameter object (version counter 0, like the one it replaces) must not be taken
    for the old one: e.g. a student's `lora.B = nn.Parameter(...)` between two forwards."""
    model = make_lora_model("tiny-llama")
    toks = tokens(model)
    with torch.no_grad(), fused_lora(model):
        before = model(toks)
        for layer in model.lora:
            for lora in (layer.lora_q, layer.lora_v):
                new = torch.nn.Parameter(torch.randn_like(lora.B) * 0.3)
                while new._version < lora.B._version:  # the same version number as the old one
                    new.add_(0)
                assert new._version == lora.B._version
                lora.B = new
        after = model(toks)
        want = hooked_logits_outside(model, toks)
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(after, want, rtol=0, atol=1e-5)
