"""Checks of Exercise 2: `LoraHooks`, on a grouped-query-attention config."""

from __future__ import annotations

import functools

import torch
from transformer_lens.hook_points import HookPoint

from lora_rlhf.checks.core import CheckFailed, check, expect
from lora_rlhf.checks.reference import (
    ALPHA,
    ATTN_TARGETS,
    RANK,
    adaptor_shapes,
    adaptor_values,
    assign_layer,
    base_model,
    close,
    max_diff,
    merged_model,
    probe_device,
    seeded,
    seeded_tokens,
)
from lora_rlhf.models import load_model
from lora_rlhf.models.registry import tiny_config

LAYER = 1


def _gqa_cfg():
    return tiny_config("tiny-llama", "cpu", torch.float32)  # 4 query heads, 2 key/value heads


def _hooks(impl, cfg=None, values_seed: int | None = None):
    cfg = cfg or _gqa_cfg()
    hooks = impl.LoraHooks(LAYER, cfg, lora_alpha=ALPHA, rank=RANK)
    if values_seed is not None:
        assign_layer(hooks, adaptor_values(cfg, values_seed)[LAYER], LAYER)
    return hooks


def _hook_point(name: str) -> HookPoint:
    hp = HookPoint()
    hp.name = name
    return hp


# --------------------------------------------------------------------------------------------
@check("LoraHooks", points=4)
def probe_hooks_adaptor_shapes(impl):
    """lora_q/lora_o have n_heads instances, lora_k/lora_v n_key_value_heads; d_model↔d_head."""
    hooks = _hooks(impl)
    return {
        t: [list(getattr(hooks, f"lora_{t}").A.shape), list(getattr(hooks, f"lora_{t}").B.shape)]
        for t in ATTN_TARGETS
    }


@probe_hooks_adaptor_shapes.judge
def judge_hooks_adaptor_shapes(out):
    cfg = _gqa_cfg()
    for target, (a_shape, b_shape) in adaptor_shapes(cfg).items():
        got_a, got_b = tuple(out[target][0]), tuple(out[target][1])
        if (got_a, got_b) == (a_shape, b_shape):
            continue
        hint = ""
        if target in "kv" and got_a[0] == cfg.n_heads:
            hint = (
                f" — this config has grouped-query attention ({cfg.n_heads} query heads, "
                f"{cfg.n_key_value_heads} key/value heads): lora_{target} needs "
                "cfg.n_key_value_heads instances"
            )
        elif target == "o" and got_a[1:] != a_shape[1:]:
            hint = " — lora_o maps d_head → d_model"
        elif target in "qkv" and got_a[1:] != a_shape[1:]:
            hint = f" — lora_{target} maps d_model → d_head"
        raise CheckFailed(
            f"lora_{target}: A {got_a}, B {got_b}; expected A {a_shape}, B {b_shape}{hint}"
        )


# --------------------------------------------------------------------------------------------
@check("LoraHooks", points=2)
def probe_hooks_names(impl):
    """list_fwd_hooks gives the six hook names of its layer, each with a callable."""
    hooks = _hooks(impl).list_fwd_hooks()
    return {"names": [str(n) for n, _ in hooks], "callable": [callable(f) for _, f in hooks]}


@probe_hooks_names.judge
def judge_hooks_names(out):
    i = LAYER
    want = [
        f"blocks.{i}.ln1.hook_normalized",
        f"blocks.{i}.attn.hook_q",
        f"blocks.{i}.attn.hook_k",
        f"blocks.{i}.attn.hook_v",
        f"blocks.{i}.attn.hook_z",
        f"blocks.{i}.hook_attn_out",
    ]
    names = out["names"]
    expect(len(names) == 6, f"list_fwd_hooks should return 6 hooks, got {len(names)}: {names}")
    wrong_layer = [n for n in names if not n.startswith(f"blocks.{i}.")]
    expect(not wrong_layer, f"hooks for layer_idx={i} must be on blocks.{i}.*, got {wrong_layer}")
    expect(sorted(names) == sorted(want), f"expected the hook names {want}, got {names}")
    expect(all(out["callable"]), "every entry of list_fwd_hooks must be a (name, function) pair")


# --------------------------------------------------------------------------------------------
@check("LoraHooks", points=5)
def probe_hooks_qkv_dispatch(impl):
    """lora_hook_qkv adds lora_q/k/v (chosen by hook name) of the stored input; others: ValueError."""
    cfg = _gqa_cfg()
    hooks = _hooks(impl, cfg, values_seed=3)
    n_kv = cfg.n_key_value_heads
    x = seeded(2, 5, cfg.d_model, seed=20)
    stored = hooks.store_hook_attn_normalized(x, _hook_point(f"blocks.{LAYER}.ln1.hook_normalized"))
    outs = {"store_returned": None if stored is None else stored.detach().clone()}
    for kind, heads in (("q", cfg.n_heads), ("k", n_kv), ("v", n_kv)):
        act = seeded(2, 5, heads, cfg.d_head, seed=21)
        res = hooks.lora_hook_qkv(act, _hook_point(f"blocks.{LAYER}.attn.hook_{kind}"))
        outs[kind] = res.detach().float().clone()
    try:
        hooks.lora_hook_qkv(
            seeded(2, 5, cfg.n_heads, cfg.d_head, seed=21),
            _hook_point(f"blocks.{LAYER}.attn.hook_z"),
        )
        outs["unknown"] = "no error"
    except Exception as exc:
        outs["unknown"] = type(exc).__name__
    return outs


def _adaptor(x, A, B):
    return torch.einsum("...d,hdr,hro->...ho", x.double(), A.double(), B.double()) * (ALPHA / RANK)


@probe_hooks_qkv_dispatch.judge
def judge_hooks_qkv_dispatch(out):
    cfg = _gqa_cfg()
    values = adaptor_values(cfg, 3)[LAYER]
    x = seeded(2, 5, cfg.d_model, seed=20)
    if out["store_returned"] is not None:
        expect(
            close(out["store_returned"], x, atol=0),
            "store_hook_attn_normalized must not change "
            "the activation: return None (or it unchanged)",
        )
    for kind, heads in (
        ("q", cfg.n_heads),
        ("k", cfg.n_key_value_heads),
        ("v", cfg.n_key_value_heads),
    ):
        act = seeded(2, 5, heads, cfg.d_head, seed=21)
        expected = act.double() + _adaptor(x, *values[kind])
        got = out[kind]
        if close(got, expected, atol=1e-5):
            continue
        for other in "qkv":
            if other != kind and tuple(values[other][0].shape) == tuple(values[kind][0].shape):
                if close(got, act.double() + _adaptor(x, *values[other]), atol=1e-5):
                    raise CheckFailed(
                        f"hook_{kind} received lora_{other}'s output: dispatch on the hook "
                        f"name (hook.name ends with 'hook_{kind}') to lora_{kind}"
                    )
        if close(got, _adaptor(x, *values[kind]), atol=1e-5):
            raise CheckFailed(
                f"hook_{kind} returned only the adaptor's output: add it to the activation"
            )
        raise CheckFailed(
            f"hook_{kind} should return {kind} + lora_{kind}(stored input) "
            f"(max diff {max_diff(got, expected):.3g})"
        )
    expect(
        out["unknown"] == "ValueError",
        f"lora_hook_qkv called on a hook that is not hook_q/k/v should raise ValueError, got {out['unknown']}",
    )


# --------------------------------------------------------------------------------------------
@check("LoraHooks", points=5)
def probe_hooks_out_summed(impl):
    """lora_hook_out adds lora_o(z) summed over heads to attn_out."""
    cfg = _gqa_cfg()
    hooks = _hooks(impl, cfg, values_seed=4)
    z = seeded(2, 5, cfg.n_heads, cfg.d_head, seed=22)
    stored = hooks.store_hook_z(z, _hook_point(f"blocks.{LAYER}.attn.hook_z"))
    attn_out = seeded(2, 5, cfg.d_model, seed=23)
    res = hooks.lora_hook_out(attn_out, _hook_point(f"blocks.{LAYER}.hook_attn_out"))
    return {
        "out": res.detach().float().clone(),
        "store_returned": None if stored is None else stored.detach().clone(),
    }


@probe_hooks_out_summed.judge
def judge_hooks_out_summed(out):
    cfg = _gqa_cfg()
    A, B = adaptor_values(cfg, 4)[LAYER]["o"]
    z = seeded(2, 5, cfg.n_heads, cfg.d_head, seed=22)
    attn_out = seeded(2, 5, cfg.d_model, seed=23).double()
    per_head = torch.einsum("bphd,hdr,hro->bpho", z.double(), A.double(), B.double()) * (
        ALPHA / RANK
    )
    expected = attn_out + per_head.sum(-2)
    if out["store_returned"] is not None:
        expect(close(out["store_returned"], z, atol=0), "store_hook_z must not change z")
    got = out["out"]
    if close(got, expected, atol=1e-5):
        return
    if close(got, attn_out + per_head.mean(-2), atol=1e-5):
        raise CheckFailed(
            "lora_hook_out averaged lora_o(z) over heads: heads add up in attention's "
            "output, so sum over the head axis"
        )
    if tuple(got.shape) != tuple(expected.shape):
        raise CheckFailed(
            f"lora_hook_out returned shape {tuple(got.shape)}, expected "
            f"{tuple(expected.shape)}: sum lora_o(z) over the head axis"
        )
    raise CheckFailed(
        f"lora_hook_out should return attn_out + Σ_heads lora_o(z) (max diff "
        f"{max_diff(got, expected):.3g})"
    )


# --------------------------------------------------------------------------------------------
def _probe_merged(impl, name: str):
    model = load_model(name, device=probe_device())  # its own copy: never the judges' cached model
    values = adaptor_values(model.cfg, seed=5)
    hooks = []
    for i in range(model.cfg.n_layers):
        lh = impl.LoraHooks(i, model.cfg, lora_alpha=ALPHA, rank=RANK)
        assign_layer(lh, values[i], i)
        hooks.extend(lh.list_fwd_hooks())
    tokens = seeded_tokens(2, 9, model.cfg.d_vocab, seed=6)
    with torch.no_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
    return {"logits": logits.float()}


@functools.lru_cache(maxsize=4)
def _merged_and_base_logits(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits the merged-model judges compare with, the same for every submission: computed
    once per process (judges only read them)."""
    model = merged_model(name, seed=5)
    tokens = seeded_tokens(2, 9, model.cfg.d_vocab, seed=6)
    with torch.no_grad():
        return model(tokens), base_model(name)(tokens)


def _judge_merged(out, name: str):
    expected, base = _merged_and_base_logits(name)
    got = out["logits"]
    if close(got, expected):
        return
    hint = ""
    if close(got, base):
        hint = ": the hooks changed nothing"
    raise CheckFailed(
        f"{name} with the LoRA hooks should equal the same model with α/r·A·B merged into W_Q, "
        f"_W_K, _W_V and W_O (max logit diff {max_diff(got, expected):.3g}){hint}. Check that each "
        "adaptor reads the right input (ln1.hook_normalized for q/k/v, z for the output)."
    )


@check("LoraHooks", points=4)
def probe_hooks_merged_tiny_llama(impl):
    """Hooked tiny-llama (GQA) equals the model with the adaptors merged into its weights."""
    return _probe_merged(impl, "tiny-llama")


@probe_hooks_merged_tiny_llama.judge
def judge_hooks_merged_tiny_llama(out):
    _judge_merged(out, "tiny-llama")


@check("LoraHooks", points=4)
def probe_hooks_merged_tiny_pythia(impl):
    """Hooked tiny-pythia (parallel attention+MLP) equals the merged model."""
    return _probe_merged(impl, "tiny-pythia")


@probe_hooks_merged_tiny_pythia.judge
def judge_hooks_merged_tiny_pythia(out):
    _judge_merged(out, "tiny-pythia")
