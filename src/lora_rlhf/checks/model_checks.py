"""Checks of Exercise 3: `TransformerWithValueHeadLora` (on tiny-llama, grouped-query attention)."""

from __future__ import annotations

import functools

import torch
from transformer_lens import HookedTransformer

from lora_rlhf.checks.core import CheckFailed, check, expect
from lora_rlhf.checks.hook_counting import HOOK_METHODS, HookCounter, registered_hooks
from lora_rlhf.checks.reference import (
    ALPHA,
    RANK,
    adaptor_values,
    assign_layer,
    base_model,
    close,
    max_diff,
    merged_model,
    probe_device,
    seeded_tokens,
)

MODEL = "tiny-llama"
SEED = 7
GEN = dict(max_new_tokens=6, do_sample=False, verbose=False, stop_at_eos=False)


def _model(impl, assign: bool = True):
    torch.manual_seed(0)
    model = impl.TransformerWithValueHeadLora.from_pretrained(
        MODEL, lora_alpha=ALPHA, rank=RANK, device=probe_device()
    )
    lora = getattr(model, "lora", None)
    if lora is None or len(lora) != model.cfg.n_layers:
        raise CheckFailed(
            f"model.lora should hold one LoraHooks per layer ({model.cfg.n_layers}); "
            f"got {None if lora is None else len(lora)}"
        )
    if assign:
        for i, values in enumerate(adaptor_values(model.cfg, SEED)):
            assign_layer(model.lora[i], values, i)
    return model


def _tokens(seq: int = 8):
    return seeded_tokens(2, seq, 512, seed=8)


@functools.cache
def _reference(kind: str) -> dict[str, torch.Tensor]:
    """The base (``"base"``) or merged (``"merged"``) model's logits and ln_final output on
    ``_tokens()`` and greedy tokens from their first 4: what the judges compare with, the same for
    every submission, so computed once per process (judges only read them)."""
    model = base_model(MODEL) if kind == "base" else merged_model(MODEL, SEED)
    tokens = _tokens()
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter="ln_final.hook_normalized")
        greedy = model.generate(tokens[:, :4], **GEN)
    return {"logits": logits, "normalized": cache["ln_final.hook_normalized"], "greedy": greedy}


# --------------------------------------------------------------------------------------------
@check("TransformerWithValueHeadLora", points=4)
def probe_model_fwd_hooks(impl):
    """fwd_hooks holds 6 LoRA hooks per layer, then the value-head hook (1 + 6·n_layers)."""
    model = _model(impl, assign=False)
    hooks = model.fwd_hooks
    return {
        "names": [str(n) for n, _ in hooks],
        "n_layers": model.cfg.n_layers,
        "lora_names": [str(n) for n, _ in model.lora_fwd_hooks],
        "ranks": [int(layer.lora_q.A.shape[-1]) for layer in model.lora],
    }


@probe_model_fwd_hooks.judge
def judge_model_fwd_hooks(out):
    n = out["n_layers"]
    names = out["names"]
    expect(
        len(names) == 1 + 6 * n,
        f"fwd_hooks should have 1 + 6·n_layers = {1 + 6 * n} entries "
        f"(6 LoRA hooks per layer and the value-head hook), got {len(names)}",
    )
    expect(
        names[-1] == "ln_final.hook_normalized",
        "the value-head hook (ln_final.hook_normalized) "
        f"should come last in fwd_hooks, got {names[-1]!r}",
    )
    for i in range(n):
        layer = [x for x in names if x.startswith(f"blocks.{i}.")]
        expect(
            len(layer) == 6, f"layer {i} should have 6 LoRA hooks in fwd_hooks, got {len(layer)}"
        )
    expect(
        len(out["lora_names"]) == 6 * n,
        f"lora_fwd_hooks should have 6·n_layers = {6 * n} entries, got {len(out['lora_names'])}",
    )
    expect(
        out["ranks"] == [RANK] * n,
        f"from_pretrained(rank={RANK}) should give rank-{RANK} adaptors, got ranks {out['ranks']}",
    )


# --------------------------------------------------------------------------------------------
@check("TransformerWithValueHeadLora", points=4)
def probe_model_frozen_params(impl):
    """Every base parameter frozen; LoRA and value head trainable; the trainable list is LoRA's."""
    model = _model(impl, assign=False)
    names = {id(p): n for n, p in model.named_parameters()}
    return {
        "requires_grad": {n: bool(p.requires_grad) for n, p in model.named_parameters()},
        "trainable": [names.get(id(p), "?") for p in model.get_base_model_trainable_params()],
        "lora_params": [names.get(id(p), "?") for p in model.lora_params()],
        "base_params": [names.get(id(p), "?") for p in model.base_model_params()],
    }


def _is_lora(name: str) -> bool:
    return name.startswith("lora.")


def _is_head(name: str) -> bool:
    return name.startswith("value_head.")


@probe_model_frozen_params.judge
def judge_model_frozen_params(out):
    rg = out["requires_grad"]
    base = [n for n in rg if not _is_lora(n) and not _is_head(n)]
    lora = [n for n in rg if _is_lora(n)]
    expect(
        lora, "no parameter named lora.*: set_up the adaptors as self.lora = nn.ModuleList([...])"
    )
    unfrozen = [n for n in base if rg[n]]
    expect(
        not unfrozen,
        f"base parameters must be frozen (requires_grad=False); still trainable: "
        f"{unfrozen[:3]}{' …' if len(unfrozen) > 3 else ''}",
    )
    expect(
        all(rg[n] for n in lora),
        "LoRA parameters must be trainable (requires_grad=True): freeze only "
        "base_model_params(), not the adaptors",
    )
    expect(all(rg[n] for n in rg if _is_head(n)), "the value head must stay trainable")
    expect(
        sorted(out["trainable"]) == sorted(lora),
        "get_base_model_trainable_params() should return "
        "exactly the LoRA parameters, so the optimizer trains only LoRA + value head; got "
        f"{len(out['trainable'])} params ({sorted(set(out['trainable']) - set(lora))[:3]} are not LoRA)",
    )
    expect(
        sorted(out["lora_params"]) == sorted(lora),
        "lora_params() should return every LoRA parameter",
    )
    expect(
        sorted(out["base_params"]) == sorted(base),
        "base_model_params() should return every parameter except LoRA and value head",
    )


# --------------------------------------------------------------------------------------------
@check("TransformerWithValueHeadLora", points=4)
def probe_model_forward_with_value_head(impl):
    """forward_with_value_head equals the merged model's logits, and its values the value head's."""
    model = _model(impl)
    with torch.no_grad():
        logits, values = model.forward_with_value_head(_tokens())
    if not isinstance(values, torch.Tensor):
        raise CheckFailed(
            f"forward_with_value_head returned {type(values).__name__} as its values: the value "
            "head did not run — run the forward under self.fwd_hooks, which ends with the "
            "value-head hook"
        )
    return {
        "logits": logits.float(),
        "values": values.float(),
        "value_head": {k: v.float().clone() for k, v in model.value_head.state_dict().items()},
    }


@probe_model_forward_with_value_head.judge
def judge_model_forward_with_value_head(out):
    logits, base_logits = _reference("merged")["logits"], _reference("base")["logits"]
    got = out["logits"]
    if not close(got, logits):
        hint = (
            ": the LoRA hooks did not run — fwd_hooks must include them"
            if close(got, base_logits)
            else ""
        )
        raise CheckFailed(
            f"forward_with_value_head logits differ from the model with the adaptors merged "
            f"(max diff {max_diff(got, logits):.3g}){hint}"
        )
    head = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 1))
    head.load_state_dict(out["value_head"])
    with torch.no_grad():
        want = head(_reference("merged")["normalized"]).squeeze(-1)
    expect(
        close(out["values"], want),
        "values should be the value head applied to "
        f"ln_final.hook_normalized of the adapted model (max diff {max_diff(out['values'], want):.3g})",
    )


# --------------------------------------------------------------------------------------------
@check("TransformerWithValueHeadLora", points=4)
def probe_model_plain_forward_is_base(impl):
    """Plain forward and HookedTransformer.generate see no LoRA, even after hooked calls."""
    model = _model(impl)
    tokens = _tokens()
    with torch.no_grad():
        model.forward_with_value_head(tokens)
        model.generate(tokens[:, :4], **GEN)
        plain = model(tokens)
        base_gen = HookedTransformer.generate(model, tokens[:, :4], **GEN)
    return {"plain": plain.float(), "base_gen": base_gen, "left": registered_hooks(model)}


@probe_model_plain_forward_is_base.judge
def judge_model_plain_forward_is_base(out):
    want, want_gen = _reference("base")["logits"], _reference("base")["greedy"]
    expect(
        out["left"] == 0,
        f"{out['left']} hooks are still registered after forward_with_value_head "
        "and generate: add hooks only inside `with self.hooks(fwd_hooks=...)`",
    )
    expect(
        close(out["plain"], want),
        "plain forward must be the base model (the reference policy): "
        f"no LoRA outside forward_with_value_head/generate (max diff {max_diff(out['plain'], want):.3g})",
    )
    expect(
        torch.equal(out["base_gen"], want_gen),
        "HookedTransformer.generate on the LoRA model should "
        "give the base model's tokens: the LoRA hooks belong only in the subclass's generate",
    )


# --------------------------------------------------------------------------------------------
@check("TransformerWithValueHeadLora", points=4)
def probe_model_generate(impl):
    """generate uses the adaptors (= merged model's greedy tokens), with and without KV cache."""
    model = _model(impl)
    prompt = _tokens()[:, :4]
    with torch.no_grad():
        cached = model.generate(prompt, use_past_kv_cache=True, **GEN)
        left = registered_hooks(model)
        uncached = model.generate(prompt, use_past_kv_cache=False, **GEN)
    return {"cached": cached, "uncached": uncached, "left": left}


@probe_model_generate.judge
def judge_model_generate(out):
    want, base = _reference("merged")["greedy"], _reference("base")["greedy"]
    expect(not torch.equal(want, base), "internal: the reference adaptors do not change generation")
    cached = out["cached"]
    # hooks left registered run again (twice over) in the next call: report the leak, not its effect
    expect(
        out.get("left", 0) == 0,
        f"{out.get('left')} hooks are still registered after generate, so the next call runs "
        "them twice: add hooks only inside `with self.hooks(fwd_hooks=...)`",
    )
    if not torch.equal(cached, want):
        if torch.equal(cached, base):
            raise CheckFailed(
                "generate gives the base model's tokens: run the base generate inside "
                "`with self.hooks(fwd_hooks=self.lora_fwd_hooks)`"
            )
        raise CheckFailed("generate's greedy tokens differ from the merged model's")
    expect(
        torch.equal(out["uncached"], want),
        "generate with use_past_kv_cache=False gives different tokens than with the cache",
    )


# --------------------------------------------------------------------------------------------
@check("TransformerWithValueHeadLora", points=3)
def probe_model_hook_calls(impl):
    """The LoRA hooks run in forward_with_value_head and generate, never in plain forward."""
    tokens = _tokens()
    calls = {}
    with HookCounter(impl.LoraHooks) as counter, torch.no_grad():
        model = _model(impl)
        for label, fn in (
            ("forward_with_value_head", lambda: model.forward_with_value_head(tokens)),
            ("forward", lambda: model(tokens)),
            ("generate", lambda: model.generate(tokens[:, :4], **GEN)),
            (
                "HookedTransformer.generate",
                lambda: HookedTransformer.generate(model, tokens[:, :4], **GEN),
            ),
        ):
            counter.reset()
            fn()
            calls[label] = dict(counter.counts)
    return {"calls": calls, "n_layers": model.cfg.n_layers}


@probe_model_hook_calls.judge
def judge_model_hook_calls(out):
    calls, n = out["calls"], out["n_layers"]
    for label in ("forward_with_value_head", "generate"):
        c = calls[label]
        missing = [m for m in HOOK_METHODS if c[m] < n]
        expect(
            not missing, f"during {label} these LoRA hooks ran fewer than once per layer: {missing}"
        )
    # ln1 runs once per q/k/v input in TransformerLens, so the store hook may run 3× per layer.
    c = calls["forward_with_value_head"]
    expect(
        c["lora_hook_qkv"] == 3 * n and c["lora_hook_out"] == n,
        f"one forward_with_value_head should add each adaptor once per layer (q/k/v: {3 * n} calls, "
        f"out: {n}); got {c} — are hooks registered twice?",
    )
    for label in ("forward", "HookedTransformer.generate"):
        expect(
            not any(calls[label].values()),
            f"the LoRA hooks ran during plain {label}: "
            f"{calls[label]} — hooks must not outlive forward_with_value_head/generate",
        )


# --------------------------------------------------------------------------------------------
@check("TransformerWithValueHeadLora", points=2)
def probe_model_no_hook_leak(impl):
    """No hook is left registered when a hooked call raises."""
    tokens = _tokens()
    left = {}
    with HookCounter(impl.LoraHooks) as counter, torch.no_grad():
        model = _model(impl)
        for label, fn in (
            ("forward_with_value_head", lambda: model.forward_with_value_head(tokens)),
            ("generate", lambda: model.generate(tokens[:, :4], **GEN)),
        ):
            counter.reset(fail_on="lora_hook_out")
            try:
                fn()
                raised = False
            except RuntimeError:
                raised = True
            left[label] = {"raised": raised, "left": registered_hooks(model)}
    return left


@probe_model_no_hook_leak.judge
def judge_model_no_hook_leak(out):
    for label, r in out.items():
        expect(r["raised"], f"an exception inside a hook during {label} was swallowed")
        expect(
            r["left"] == 0,
            f"after an exception inside {label}, {r['left']} hooks stayed registered: "
            "use `with self.hooks(fwd_hooks=...)`, which removes them on the way out",
        )


# --------------------------------------------------------------------------------------------
@check("TransformerWithValueHeadLora", points=2)
def probe_model_training_step(impl):
    """A Section 1 optimizer step changes LoRA and value head only; base weights stay bitwise."""
    from lora_rlhf.rlhf.ppo import get_optimizer

    model = _model(impl)
    names = {id(p): n for n, p in model.named_parameters()}
    optimizer = get_optimizer(model, base_lr=1e-2, head_lr=1e-2)
    logits, values = model.forward_with_value_head(_tokens())
    (logits.log_softmax(-1)[..., 0].mean() + values.mean()).backward()
    optimizer.step()
    return {
        "groups": [[names.get(id(p), "?") for p in g["params"]] for g in optimizer.param_groups],
        "base": {
            n: p.detach().clone()
            for n, p in model.named_parameters()
            if not n.startswith(("lora.", "value_head."))
        },
        "lora_B": model.lora[0].lora_q.B.detach().clone(),
    }


@probe_model_training_step.judge
def judge_model_training_step(out):
    opt_names = [n for g in out["groups"] for n in g]
    stray = [n for n in opt_names if not (_is_lora(n) or _is_head(n))]
    expect(
        not stray,
        f"the optimizer holds base parameters {stray[:3]}: "
        "get_base_model_trainable_params() must return only the LoRA parameters",
    )
    expect(any(_is_lora(n) for n in opt_names), "the optimizer holds no LoRA parameter")
    fresh = dict(base_model(MODEL).named_parameters())
    changed = [
        n for n, p in out["base"].items() if n in fresh and not torch.equal(p, fresh[n].detach())
    ]
    expect(not changed, f"base weights changed after a training step: {changed[:3]} — freeze them")
    B0 = adaptor_values(base_model(MODEL).cfg, SEED)[0]["q"][1]
    expect(not torch.equal(out["lora_B"], B0), "a training step did not change the LoRA weights")
