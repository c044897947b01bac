"""The fast path of `LoraHooks` (one x @ [A_q A_k A_v] per layer, products accumulated into the
hook's activation, block-diagonal B's and A_o, all kept outside autograd) against a plain reference.

The reference is written here, independently of the library: per-head einsums in float64 over the
same parameters, applied through the same six hook points and adding a new tensor each time.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lora_rlhf.lora as lora_module
from lora_rlhf.lora import LoraHooks, add_low_rank_, add_matmul_
from lora_rlhf.value_head import attached_hooks
from tests.test_merge import make_lora_model, tokens

NAMES = ["tiny-llama", "tiny-pythia"]
QKV = "bpd,hdr,hro->bpho"  # x A_h B_h for every head h
OUT = "bphd,hdr,hro->bpo"  # Σ_h z_h A_h B_h


def reference_hooks(model) -> list:
    """The adaptors of `model` as plain hooks: x A B (α/r) per head in float64, new tensors."""
    hooks = []
    for layer in model.lora:
        store: dict = {}

        def keep(key, store=store):
            def hook(act, hook):
                store[key] = act

            return hook

        def add(lora, key, pattern, store=store):
            def hook(act, hook):
                inp = store[key].double()
                delta = torch.einsum(pattern, inp, lora.A.double(), lora.B.double())
                return act + (delta * lora.scaling).to(act.dtype)

            return hook

        i = layer.layer_idx
        hooks += [
            (f"blocks.{i}.ln1.hook_normalized", keep("x")),
            (f"blocks.{i}.attn.hook_q", add(layer.lora_q, "x", QKV)),
            (f"blocks.{i}.attn.hook_k", add(layer.lora_k, "x", QKV)),
            (f"blocks.{i}.attn.hook_v", add(layer.lora_v, "x", QKV)),
            (f"blocks.{i}.attn.hook_z", keep("z")),
            (f"blocks.{i}.hook_attn_out", add(layer.lora_o, "z", OUT)),
        ]
    return hooks


def run(model, hooks, toks):
    with attached_hooks(model, hooks):
        return model(toks)


@pytest.mark.parametrize("name", NAMES)
def test_forward_matches_reference_with_and_without_grad(name):
    model = make_lora_model(name)
    toks = tokens(model)
    with torch.no_grad():
        want = run(model, reference_hooks(model), toks)
        base = model(toks)
        got_no_grad = run(model, model.lora_fwd_hooks, toks)
    got_grad = run(model, model.lora_fwd_hooks, toks)
    assert (want - base).abs().max() > 1e-2, "the adaptors must change the logits for this test"
    torch.testing.assert_close(got_no_grad, want, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got_grad.detach(), want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_gradients_match_reference(name):
    """Writing into the hook's activation must not change any gradient (nor break backward)."""
    model = make_lora_model(name)
    toks = tokens(model)
    grads = {}
    for which, hooks in (("ref", reference_hooks(model)), ("lib", model.lora_fwd_hooks)):
        model.zero_grad(set_to_none=True)
        for _ in range(2):  # twice: nothing from the first graph may be reused by the second
            model.zero_grad(set_to_none=True)
            logits = run(model, hooks, toks)
            (logits.float().pow(2).mean()).backward()
        grads[which] = [p.grad.clone() for p in model.lora_params()]
    for want, got in zip(grads["ref"], grads["lib"], strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


def test_kept_matrices_follow_parameter_changes():
    """Outside autograd the side-by-side A and the block-diagonal B's and A_o are kept between
    forwards; an in-place change of a parameter, a replaced parameter, an optimizer step and
    inference mode must all be seen by the next forward."""
    model = make_lora_model("tiny-llama")
    toks = tokens(model)
    layer = model.lora[0]

    def check():
        with torch.no_grad():
            want = run(model, reference_hooks(model), toks)
            got = run(model, model.lora_fwd_hooks, toks)
        # a stale A is off by O(1); float32 against float64 by ~1e-5
        torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-3)

    check()
    for lora, name in ((layer.lora_k, "A"), (layer.lora_q, "B"), (layer.lora_o, "A")):
        with torch.no_grad():
            getattr(lora, name).mul_(3.0)  # in place: a new version of the same tensor
        check()
    for lora, name in ((layer.lora_v, "A"), (layer.lora_v, "B"), (layer.lora_o, "A")):
        replacement = torch.randn_like(getattr(lora, name))
        while replacement._version < getattr(lora, name)._version:  # same version number
            replacement.add_(0)
        setattr(lora, name, nn.Parameter(replacement))  # replaced
        check()
    with torch.no_grad():  # an optimizer step on every A
        opt = torch.optim.SGD(model.lora_params(), lr=0.5)
        for p in model.lora_params():
            p.grad = torch.randn_like(p)
        opt.step()
    check()
    with torch.inference_mode():
        want = run(model, reference_hooks(model), toks)
        got = run(model, model.lora_fwd_hooks, toks)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-3)
    # after an inference-mode forward, autograd still works
    run(model, model.lora_fwd_hooks, toks).float().mean().backward()
    assert all(p.grad is not None for p in model.lora_params())


def test_shared_product_is_computed_once_per_stored_input(monkeypatch):
    cfg = make_lora_model("tiny-llama").cfg
    hooks = LoraHooks(0, cfg, rank=2)
    calls = []
    original = lora_module._side_by_side

    def counting(*As):
        calls.append(1)
        return original(*As)

    monkeypatch.setattr(lora_module, "_side_by_side", counting)  # under autograd: once per product

    class Point:
        def __init__(self, name):
            self.name = name

    x = torch.randn(2, 3, cfg.d_model)
    hooks.store_hook_attn_normalized(x, Point("blocks.0.ln1.hook_normalized"))
    n_kv = cfg.n_key_value_heads
    for kind, heads in (("q", cfg.n_heads), ("k", n_kv), ("v", n_kv)):
        act = torch.randn(2, 3, heads, cfg.d_head)
        hooks.lora_hook_qkv(act, Point(f"blocks.0.attn.hook_{kind}"))
    assert len(calls) == 1, "q, k and v of one stored input share one x @ [A_q A_k A_v]"
    hooks.store_hook_attn_normalized(x.clone(), Point("blocks.0.ln1.hook_normalized"))
    hooks.lora_hook_qkv(torch.randn(2, 3, cfg.n_heads, cfg.d_head), Point("blocks.0.attn.hook_q"))
    assert len(calls) == 2, "a new stored input needs a new product"


@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "no_grad"])
@pytest.mark.parametrize("case", ["in place", "other dtype", "not contiguous", "leaf needing grad"])
def test_add_helpers_in_place_and_fallback(case, grad):
    """`add_low_rank_`/`add_matmul_` write into the activation when they can, return a new
    tensor otherwise, and give the same numbers either way, with autograd (a batched product) and
    without (one product with the block-diagonal B)."""
    torch.manual_seed(0)
    lora = LoraHooks(0, make_lora_model("tiny-llama").cfg, rank=2).lora_q
    with torch.no_grad():
        lora.B.normal_()
    n, inst, d_out = 6, lora.n_inst, lora.d_out
    act = torch.randn(2, 3, inst, d_out)
    if case == "other dtype":
        act = act.double()
    elif case == "not contiguous":
        act = torch.randn(2, 3, d_out, inst).transpose(-1, -2)
    elif case == "leaf needing grad":
        act.requires_grad_(True)
    # the instances' rank columns side by side, cut out of a wider product as shared_x_a does
    x_a = torch.randn(n, inst * lora.rank + 3)[:, 1 : 1 + inst * lora.rank]
    want = act.detach().double() + lora.scaling * torch.einsum(
        "nir,iro->nio", x_a.double().view(n, inst, lora.rank), lora.B.detach().double()
    ).reshape(act.shape)
    before = act.detach().clone()
    with torch.set_grad_enabled(grad):
        got = add_low_rank_(act, x_a, lora)
    torch.testing.assert_close(got.detach().double(), want, atol=1e-5, rtol=1e-5)
    assert (got is act) == (case == "in place")
    if case != "in place":
        assert torch.equal(act.detach(), before), "a fallback must leave the activation alone"

    if case == "in place":
        out, a, b = torch.randn(n, d_out), torch.randn(n, 5), torch.randn(5, d_out)
        want_out = out + 0.5 * a @ b
        with torch.set_grad_enabled(grad):
            got_out = add_matmul_(out, a, b, 0.5)
        assert got_out is out
        torch.testing.assert_close(got_out, want_out)


def test_block_diagonals():
    """`block_diagonal_A/B` against a hand-built block matrix; kept outside autograd (the same
    tensor until the parameter changes), built anew under autograd with gradients reaching it."""
    torch.manual_seed(0)
    lora = LoraHooks(0, make_lora_model("tiny-llama").cfg, rank=2).lora_o
    with torch.no_grad():
        lora.B.normal_()
    inst, d_in, rank, d_out = lora.n_inst, lora.d_in, lora.rank, lora.d_out
    want_a = torch.zeros(inst * d_in, inst * rank)
    want_b = torch.zeros(inst * rank, inst * d_out)
    for i in range(inst):
        want_a[i * d_in : (i + 1) * d_in, i * rank : (i + 1) * rank] = lora.A[i].detach()
        want_b[i * rank : (i + 1) * rank, i * d_out : (i + 1) * d_out] = lora.B[i].detach()
    with torch.no_grad():
        first = lora.block_diagonal_B()
        assert torch.equal(lora.block_diagonal_A(), want_a)
        assert torch.equal(first, want_b)
        assert lora.block_diagonal_B() is first, "kept while B is unchanged"
        lora.B.add_(1.0)
        assert torch.equal(lora.block_diagonal_B(), want_b + (want_b != 0)), "an in-place change"
    built = lora.block_diagonal_B()
    assert built.requires_grad and built is not lora.block_diagonal_B()
    built.sum().backward()
    torch.testing.assert_close(lora.B.grad, torch.ones_like(lora.B))
