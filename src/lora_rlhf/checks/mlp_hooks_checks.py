"""MLP bonus checks of `MlpLoraHooks`: adaptor shapes (gated and plain MLP), hook names, dispatch,
the out-hook, and the hooked model against the adaptors merged into the weights; with the
references the model checks share (:func:`mlp_adaptor_values`, :func:`mlp_merged_model`)."""

from __future__ import annotations

import functools

import torch
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from lora_rlhf.checks.core import MLP, CheckFailed, expect
from lora_rlhf.checks.reference import (
    ALPHA,
    RANK,
    adaptor_values,
    assign_adaptor,
    base_model,
    close,
    max_diff,
    merge_into,
    merge_mlp_into,
    seeded,
    seeded_tokens,
)
from lora_rlhf.models import load_model
from lora_rlhf.models.registry import tiny_config

MLP_ATTRS = {"mlp_in": "lora_in", "mlp_gate": "lora_gate", "mlp_out": "lora_out"}
LAYER = 1


def bonus_check(exercise: str, needs: tuple[str, ...] = ()):
    """A 0-point check of the MLP bonus (see :meth:`lora_rlhf.checks.core.Registry.check`)."""
    return MLP.check(exercise, 0, needs)


# --------------------------------------------------------------------------------------------
# References


def mlp_adaptor_shapes(cfg, rank: int = RANK) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Expected (A, B) shapes of the MLP adaptors of one layer (no gate in a plain MLP)."""
    d_model, d_mlp = cfg.d_model, cfg.d_mlp
    shapes = {"mlp_in": ((1, d_model, rank), (1, rank, d_mlp))}
    if cfg.gated_mlp:
        shapes["mlp_gate"] = ((1, d_model, rank), (1, rank, d_mlp))
    shapes["mlp_out"] = ((1, d_mlp, rank), (1, rank, d_model))
    return shapes


def mlp_adaptor_values(cfg, seed: int, rank: int = RANK, scale: float = 0.1) -> list[dict]:
    """Random non-zero A and B of every MLP adaptor: ``[{"mlp_in": (A, B), ...}, ...]``."""
    layers = []
    for layer in range(cfg.n_layers):
        values = {}
        for j, (target, (a_shape, b_shape)) in enumerate(mlp_adaptor_shapes(cfg, rank).items()):
            s = seed * 1000 + layer * 10 + 5 + j
            values[target] = (
                seeded(*a_shape, seed=2 * s, scale=scale),
                seeded(*b_shape, seed=2 * s + 1, scale=scale),
            )
        layers.append(values)
    return layers


def assign_mlp_layer(mlp_hooks, values: dict, layer: int) -> None:
    for target, (A, B) in values.items():
        module = getattr(mlp_hooks, MLP_ATTRS[target], None)
        if module is None:
            raise CheckFailed(
                f"MlpLoraHooks has no adaptor {MLP_ATTRS[target]}"
                + (" (a gated MLP needs lora_gate)" if target == "mlp_gate" else "")
            )
        assign_adaptor(module, A, B, where=f"layer {layer} {MLP_ATTRS[target]}")


@functools.lru_cache(maxsize=8)
def mlp_merged_model(name: str, seed: int, with_attention: bool = False) -> HookedTransformer:
    """The base model with the seeded MLP (and attention) adaptors merged in (judges only)."""
    model = load_model(name, device="cpu").requires_grad_(False)
    if with_attention:
        merge_into(model, adaptor_values(model.cfg, seed, RANK), ALPHA / RANK)
    return merge_mlp_into(model, mlp_adaptor_values(model.cfg, seed), ALPHA / RANK)


def _cfg(name: str):
    return tiny_config(name, "cpu", torch.float32)


def _hooks(impl, name: str, values_seed: int | None = None):
    cfg = _cfg(name)
    hooks = impl.MlpLoraHooks(LAYER, cfg, lora_alpha=ALPHA, rank=RANK)
    if values_seed is not None:
        assign_mlp_layer(hooks, mlp_adaptor_values(cfg, values_seed)[LAYER], LAYER)
    return hooks


def _hook_point(name: str) -> HookPoint:
    hp = HookPoint()
    hp.name = name
    return hp


def _shape(module) -> list | None:
    return None if module is None else [list(module.A.shape), list(module.B.shape)]


# --------------------------------------------------------------------------------------------
@bonus_check("MlpLoraHooks")
def probe_mlp_hooks_adaptor_shapes(impl):
    """lora_in/lora_gate map d_model → d_mlp, lora_out d_mlp → d_model; no gate in a plain MLP."""
    out = {}
    for name in ("tiny-llama", "tiny-pythia"):
        hooks = _hooks(impl, name)
        out[name] = {t: _shape(getattr(hooks, attr, None)) for t, attr in MLP_ATTRS.items()}
    return out


@probe_mlp_hooks_adaptor_shapes.judge
def judge_mlp_hooks_adaptor_shapes(out):
    for name in ("tiny-llama", "tiny-pythia"):
        cfg = _cfg(name)
        want = mlp_adaptor_shapes(cfg)
        for target, attr in MLP_ATTRS.items():
            got = out[name][target]
            if target not in want:
                expect(got is None, f"{name} has a plain MLP (no W_gate): {attr} should be None")
                continue
            expect(
                got is not None,
                f"{name}: {attr} is missing"
                + (
                    " — a gated MLP (cfg.gated_mlp) needs lora_gate" if target == "mlp_gate" else ""
                ),
            )
            a, b = tuple(got[0]), tuple(got[1])
            if (a, b) != want[target]:
                hint = " — one instance: each MLP weight is one matrix" if a[0] != 1 else ""
                raise CheckFailed(
                    f"{name} {attr}: A {a}, B {b}; expected A {want[target][0]}, "
                    f"B {want[target][1]}{hint}"
                )


# --------------------------------------------------------------------------------------------
@bonus_check("MlpLoraHooks")
def probe_mlp_hooks_names(impl):
    """list_fwd_hooks: ln2.hook_normalized, mlp.hook_pre (+ hook_pre_linear if gated), hook_post, hook_mlp_out."""
    return {
        name: [str(n) for n, _ in _hooks(impl, name).list_fwd_hooks()]
        for name in ("tiny-llama", "tiny-pythia")
    }


@probe_mlp_hooks_names.judge
def judge_mlp_hooks_names(out):
    i = LAYER
    for name, gated in (("tiny-llama", True), ("tiny-pythia", False)):
        want = [
            f"blocks.{i}.ln2.hook_normalized",
            f"blocks.{i}.mlp.hook_pre",
            f"blocks.{i}.mlp.hook_post",
            f"blocks.{i}.hook_mlp_out",
        ]
        if gated:
            want.append(f"blocks.{i}.mlp.hook_pre_linear")
        got = out[name]
        if sorted(got) != sorted(want):
            hint = ""
            if gated and f"blocks.{i}.mlp.hook_pre_linear" not in got:
                hint = " — a gated MLP computes x·W_in at mlp.hook_pre_linear"
            elif not gated and f"blocks.{i}.mlp.hook_pre_linear" in got:
                hint = " — a plain MLP has no hook_pre_linear"
            raise CheckFailed(f"{name}: expected the hooks {sorted(want)}, got {sorted(got)}{hint}")


# --------------------------------------------------------------------------------------------
def _adaptor(x, A, B):
    return torch.einsum("...d,hdr,hro->...o", x.double(), A.double(), B.double()) * (ALPHA / RANK)


@bonus_check("MlpLoraHooks")
def probe_mlp_hooks_dispatch(impl):
    """hook_pre adds lora_gate (gated) or lora_in (plain), hook_pre_linear lora_in; others: ValueError."""
    out = {}
    for name in ("tiny-llama", "tiny-pythia"):
        cfg = _cfg(name)
        hooks = _hooks(impl, name, values_seed=3)
        x = seeded(2, 5, cfg.d_model, seed=30)
        hooks.store_hook_mlp_normalized(x, _hook_point(f"blocks.{LAYER}.ln2.hook_normalized"))
        pre = seeded(2, 5, cfg.d_mlp, seed=31)
        kinds = ("hook_pre", "hook_pre_linear") if cfg.gated_mlp else ("hook_pre",)
        for kind in kinds:
            res = hooks.lora_hook_mlp_pre(pre, _hook_point(f"blocks.{LAYER}.mlp.{kind}"))
            out[f"{name}/{kind}"] = res.detach().float().clone()
        try:
            hooks.lora_hook_mlp_pre(pre, _hook_point(f"blocks.{LAYER}.mlp.hook_post"))
            out[f"{name}/unknown"] = "no error"
        except Exception as exc:
            out[f"{name}/unknown"] = type(exc).__name__
    return out


@probe_mlp_hooks_dispatch.judge
def judge_mlp_hooks_dispatch(out):
    for name in ("tiny-llama", "tiny-pythia"):
        cfg = _cfg(name)
        values = mlp_adaptor_values(cfg, 3)[LAYER]
        x = seeded(2, 5, cfg.d_model, seed=30)
        pre = seeded(2, 5, cfg.d_mlp, seed=31).double()
        want = {"hook_pre": "mlp_gate" if cfg.gated_mlp else "mlp_in"}
        if cfg.gated_mlp:
            want["hook_pre_linear"] = "mlp_in"
        for kind, target in want.items():
            got = out[f"{name}/{kind}"]
            if close(got, pre + _adaptor(x, *values[target]), atol=1e-5):
                continue
            attr = MLP_ATTRS[target]
            for other in want.values():
                if other != target and close(got, pre + _adaptor(x, *values[other]), atol=1e-5):
                    raise CheckFailed(
                        f"{name}: mlp.{kind} received {MLP_ATTRS[other]}'s output, expected {attr}'s. "
                        "In TransformerLens' gated MLP, hook_pre is the gate (x·W_gate) and "
                        "hook_pre_linear is x·W_in"
                    )
            if close(got, _adaptor(x, *values[target]), atol=1e-5):
                raise CheckFailed(
                    f"{name}: mlp.{kind} returned only the adaptor's output: add it "
                    "to the activation"
                )
            raise CheckFailed(
                f"{name}: mlp.{kind} should return pre + {attr}(stored input) "
                f"(max diff {max_diff(got, pre + _adaptor(x, *values[target])):.3g})"
            )
        expect(
            out[f"{name}/unknown"] == "ValueError",
            f"{name}: lora_hook_mlp_pre on mlp.hook_post should raise ValueError, got "
            f"{out[f'{name}/unknown']}",
        )


# --------------------------------------------------------------------------------------------
@bonus_check("MlpLoraHooks")
def probe_mlp_hooks_out(impl):
    """lora_hook_mlp_out adds lora_out(post) to the MLP's output."""
    cfg = _cfg("tiny-llama")
    hooks = _hooks(impl, "tiny-llama", values_seed=4)
    post = seeded(2, 5, cfg.d_mlp, seed=32)
    hooks.store_hook_post(post, _hook_point(f"blocks.{LAYER}.mlp.hook_post"))
    mlp_out = seeded(2, 5, cfg.d_model, seed=33)
    res = hooks.lora_hook_mlp_out(mlp_out, _hook_point(f"blocks.{LAYER}.hook_mlp_out"))
    return {"out": res.detach().float().clone()}


@probe_mlp_hooks_out.judge
def judge_mlp_hooks_out(out):
    cfg = _cfg("tiny-llama")
    A, B = mlp_adaptor_values(cfg, 4)[LAYER]["mlp_out"]
    post = seeded(2, 5, cfg.d_mlp, seed=32)
    mlp_out = seeded(2, 5, cfg.d_model, seed=33).double()
    expected = mlp_out + _adaptor(post, A, B)
    got = out["out"]
    if close(got, expected, atol=1e-5):
        return
    if close(got, _adaptor(post, A, B), atol=1e-5):
        raise CheckFailed("lora_hook_mlp_out returned only the adaptor's output: add it to mlp_out")
    raise CheckFailed(
        "lora_hook_mlp_out should return mlp_out + lora_out(post), post being the "
        f"stored input of W_out (max diff {max_diff(got, expected):.3g})"
    )


# --------------------------------------------------------------------------------------------
def _probe_merged(impl, name: str):
    model = load_model(name, device="cpu")  # its own copy: never the judges' cached model
    hooks = []
    for i, values in enumerate(mlp_adaptor_values(model.cfg, seed=5)):
        mh = impl.MlpLoraHooks(i, model.cfg, lora_alpha=ALPHA, rank=RANK)
        assign_mlp_layer(mh, values, i)
        hooks.extend(mh.list_fwd_hooks())
    tokens = seeded_tokens(2, 9, model.cfg.d_vocab, seed=6)
    with torch.no_grad():
        return {"logits": model.run_with_hooks(tokens, fwd_hooks=hooks).float()}


def _judge_merged(out, name: str):
    model = mlp_merged_model(name, seed=5)
    tokens = seeded_tokens(2, 9, model.cfg.d_vocab, seed=6)
    with torch.no_grad():
        expected = model(tokens)
        base = base_model(name)(tokens)
    got = out["logits"]
    if close(got, expected):
        return
    hint = ": the hooks changed nothing" if close(got, base) else ""
    raise CheckFailed(
        f"{name} with the MLP hooks should equal the same model with α/r·A·B merged into W_in, "
        f"W_gate and W_out (max logit diff {max_diff(got, expected):.3g}){hint}. Check that the "
        "adaptors read the right inputs (ln2.hook_normalized for in/gate, mlp.hook_post for out)."
    )


@bonus_check("MlpLoraHooks")
def probe_mlp_hooks_merged_tiny_llama(impl):
    """Hooked tiny-llama (gated MLP) equals the model with the MLP adaptors merged into its weights."""
    return _probe_merged(impl, "tiny-llama")


@probe_mlp_hooks_merged_tiny_llama.judge
def judge_mlp_hooks_merged_tiny_llama(out):
    _judge_merged(out, "tiny-llama")


@bonus_check("MlpLoraHooks")
def probe_mlp_hooks_merged_tiny_pythia(impl):
    """Hooked tiny-pythia (plain MLP, parallel block) equals the merged model."""
    return _probe_merged(impl, "tiny-pythia")


@probe_mlp_hooks_merged_tiny_pythia.judge
def judge_mlp_hooks_merged_tiny_pythia(out):
    _judge_merged(out, "tiny-pythia")
