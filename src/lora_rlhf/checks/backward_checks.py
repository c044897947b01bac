"""Checks of the backward pass: the gradient of every adaptor parameter, through the whole model.

A forward pass can be right while its gradients are wrong — a stored input that was detached, an
``x @ A`` taken under ``torch.no_grad()``, a B copied out of autograd, a hand-written backward —
and such an adaptor trains wrongly. These probes run a loss that uses both the logits and the
values, with non-zero B, and send back the gradient of every A and B.

The judges' reference uses no hooks at all: the adaptors are merged into the weights of a freshly
loaded model in float64, autograd gives the loss's gradient with respect to each merged weight W,
and the chain rule through ``W = W_base + s·A·B`` gives ``∂L/∂A = s·(∂L/∂W) Bᵀ`` and
``∂L/∂B = s·Aᵀ (∂L/∂W)`` for each head.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from lora_rlhf.checks.core import CheckFailed, check
from lora_rlhf.checks.reference import (
    ALPHA,
    ATTN_TARGETS,
    RANK,
    adaptor_values,
    assign_layer,
    attention_weights,
    merge_into,
    probe_device,
    seeded,
    seeded_tokens,
)
from lora_rlhf.models import load_model

SEED = 11  # adaptor values
SCALE = 0.5  # large enough that the adaptors carry a good share of each gradient
VALUE_HEAD_SEED = 12
VALUE_HOOK = "ln_final.hook_normalized"
RTOL = 1e-3  # relative error (in norm) allowed per parameter: float32 hooks vs float64 reference


# --------------------------------------------------------------------------------------------
# Shared inputs: tokens, value-head weights, the loss
def _tokens(d_vocab: int) -> Tensor:
    return seeded_tokens(2, 9, d_vocab, seed=13)


def value_head_weights(d_model: int) -> dict[str, Tensor]:
    """Seeded weights for Section 1's value head (Linear d→4d, ReLU, Linear 4d→1)."""
    s = VALUE_HEAD_SEED * 100
    return {
        "0.weight": seeded(4 * d_model, d_model, seed=s, scale=d_model**-0.5),
        "0.bias": seeded(4 * d_model, seed=s + 1, scale=0.1),
        "2.weight": seeded(1, 4 * d_model, seed=s + 2, scale=(4 * d_model) ** -0.5),
        "2.bias": seeded(1, seed=s + 3, scale=0.1),
    }


def loss_of(logits: Tensor, values: Tensor, tokens: Tensor) -> Tensor:
    """Next-token cross-entropy on the logits plus a squared error on the values."""
    logprobs = logits.log_softmax(-1)[:, :-1]
    nll = -logprobs.gather(-1, tokens[:, 1:, None]).mean()
    target = seeded(*values.shape, seed=14, dtype=values.dtype)
    return nll + 0.5 * ((values - target) ** 2).mean()


def _set_value_head(model) -> None:
    head = getattr(model, "value_head", None)
    if head is None:
        raise CheckFailed("the model has no value head (build it with use_value_head=True)")
    weights = value_head_weights(model.cfg.d_model)
    with torch.no_grad():
        for name, param in head.named_parameters():
            param.copy_(weights[name].to(param.dtype))


def _backward(loss: Tensor, where: str) -> None:
    if not loss.requires_grad:
        raise CheckFailed(
            f"{where} gives logits and values that do not require grad: no gradient can reach "
            "the adaptors (is something run under torch.no_grad() or torch.inference_mode(), "
            "or detached?)"
        )
    loss.backward()


def _grads(lora_layers) -> dict[str, Tensor | None]:
    """``{"layer 0 lora_q.A": grad or None, ...}``: every adaptor parameter's gradient."""
    out = {}
    for i, hooks in enumerate(lora_layers):
        for target in ATTN_TARGETS:
            module = getattr(hooks, f"lora_{target}")
            for pname in ("A", "B"):
                grad = getattr(module, pname).grad
                out[f"layer {i} lora_{target}.{pname}"] = None if grad is None else grad.float()
    return out


# --------------------------------------------------------------------------------------------
# Probes
def _probe_hooks(impl, name: str) -> dict:
    """The submission's LoraHooks on every layer of Section 1's value-head model."""
    from lora_rlhf.rlhf.value_head import HookedTransformerWithValueHead

    model = HookedTransformerWithValueHead.from_pretrained(name, device=probe_device())
    model.requires_grad_(False)
    _set_value_head(model)
    values = adaptor_values(model.cfg, SEED, scale=SCALE)
    layers, hooks = [], []
    for i in range(model.cfg.n_layers):
        lh = impl.LoraHooks(i, model.cfg, lora_alpha=ALPHA, rank=RANK)
        assign_layer(lh, values[i], i)
        layers.append(lh)
        hooks.extend(lh.list_fwd_hooks())
    tokens = _tokens(model.cfg.d_vocab)
    with model.hooks(fwd_hooks=[*hooks, model.value_head_hook]):
        logits = model(tokens)
    _backward(loss_of(logits, model.value_head_output, tokens), f"{name} with the LoRA hooks")
    return {"grads": _grads(layers)}


def _probe_model(impl, name: str) -> dict:
    """The submission's TransformerWithValueHeadLora, through its forward_with_value_head."""
    torch.manual_seed(0)
    model = impl.TransformerWithValueHeadLora.from_pretrained(
        name, lora_alpha=ALPHA, rank=RANK, device=probe_device()
    )
    lora = getattr(model, "lora", None)
    if lora is None or len(lora) != model.cfg.n_layers:
        raise CheckFailed(f"model.lora should hold one LoraHooks per layer ({model.cfg.n_layers})")
    for i, values in enumerate(adaptor_values(model.cfg, SEED, scale=SCALE)):
        assign_layer(lora[i], values, i)
    _set_value_head(model)
    tokens = _tokens(model.cfg.d_vocab)
    logits, values = model.forward_with_value_head(tokens)
    if not isinstance(values, Tensor):
        raise CheckFailed(
            f"forward_with_value_head returned {type(values).__name__} as its values: the value "
            "head did not run, so no gradient through the values can be compared"
        )
    _backward(loss_of(logits, values, tokens), "forward_with_value_head")
    return {"grads": _grads(lora)}


# --------------------------------------------------------------------------------------------
# The reference: autograd on the merged float64 model, then the chain rule through s·A·B
@functools.lru_cache(maxsize=4)
def reference_grads(name: str) -> dict[str, Tensor]:
    """∂L/∂A and ∂L/∂B of every adaptor, from the merged model (no hooks), in float64."""
    model = (
        load_model(name, device="cpu").to(torch.float64, print_details=False).requires_grad_(False)
    )
    layers = adaptor_values(model.cfg, SEED, scale=SCALE)
    scaling = ALPHA / RANK
    merge_into(model, layers, scaling)
    weights = [attention_weights(model, i) for i in range(model.cfg.n_layers)]
    for layer in weights:
        for w in layer.values():
            w.requires_grad_(True)
    head = {k: v.double() for k, v in value_head_weights(model.cfg.d_model).items()}
    captured = {}

    def keep(resid: Tensor, hook) -> None:
        captured["resid"] = resid

    tokens = _tokens(model.cfg.d_vocab)
    logits = model.run_with_hooks(tokens, fwd_hooks=[(VALUE_HOOK, keep)])
    hidden = torch.relu(captured["resid"] @ head["0.weight"].T + head["0.bias"])
    values = (hidden @ head["2.weight"].T + head["2.bias"]).squeeze(-1)
    loss_of(logits, values, tokens).backward()
    out = {}
    for i, (layer, vals) in enumerate(zip(weights, layers)):
        for target in ATTN_TARGETS:
            A, B = (v.double() for v in vals[target])
            dW = layer[target].grad  # [inst, d_in, d_out]
            out[f"layer {i} lora_{target}.A"] = scaling * dW @ B.transpose(-1, -2)
            out[f"layer {i} lora_{target}.B"] = scaling * A.transpose(-1, -2) @ dW
    return out


def relative_error(got: Tensor, want: Tensor) -> float:
    return float((got.double() - want).norm() / want.norm().clamp_min(1e-30))


NO_GRADIENT = float("inf")  # the parameter's .grad is None, or zero where the reference's is not
ZERO = 1e-6  # a gradient this small next to the reference's (relative, in norm) is none at all


def _why(wrong: dict[str, float], layers: int) -> str:
    """What the pattern of wrong gradients usually means (a cause is named only when it fits)."""
    last = f"layer {layers - 1} "
    if all(not k.startswith(last) for k in wrong):
        return (
            "Only earlier layers' gradients are wrong: the gradient that flows back through a "
            "later layer's adaptor into its input is lost. Use the stored activation itself "
            "(cache_qkv_in, kept by store_hook_attn_normalized and read by lora_hook_qkv): "
            "no .detach(), .data or torch.no_grad()"
        )
    if not any(k.startswith(last + "lora_o.") for k in wrong):
        return (
            "lora_o's own gradients are right but the ones that flow back through z are lost: "
            "use z itself (cache_z, kept by store_hook_z and read by lora_hook_out): no "
            ".detach(), .data or torch.no_grad()"
        )
    cut = [k for k, e in wrong.items() if e == NO_GRADIENT]
    if cut:
        return (
            f"No gradient reaches {cut[0]}: it is cut off from autograd (.detach(), .data, "
            "torch.no_grad() around x @ A, or a copy of the parameter)"
        )
    return (
        "The gradients are there but wrong: they differ from the chain rule through "
        "(α/r)·(x A) B. Check any custom torch.autograd.Function's backward, a scale applied "
        "outside autograd, and that every step is a differentiable torch op"
    )


def _said(err: float) -> str:
    return "no gradient" if err == NO_GRADIENT else f"wrong gradient, {err:.0%} off"


def judge_grads(out: dict, name: str) -> None:
    want = reference_grads(name)
    got = out["grads"]
    wrong: dict[str, float] = {}
    for key, ref in want.items():
        g = got.get(key)
        if g is None:
            wrong[key] = NO_GRADIENT
            continue
        if tuple(g.shape) != tuple(ref.shape):
            raise CheckFailed(f"{key}.grad has shape {tuple(g.shape)}, expected {tuple(ref.shape)}")
        err, scale = relative_error(g, ref), float(ref.norm())
        if scale > 0 and float(g.double().norm()) <= ZERO * scale:
            wrong[key] = NO_GRADIENT
        elif not err <= RTOL:  # NaN counts as wrong
            wrong[key] = err
    if not wrong:
        return
    layers = 1 + max(int(k.split()[1]) for k in want)
    first = next(iter(wrong))
    shown = ", ".join(f"{k} ({_said(e)})" for k, e in list(wrong.items())[:4])
    more = f" and {len(wrong) - 4} more" if len(wrong) > 4 else ""
    raise CheckFailed(
        f"{name}: the gradient of {first} is wrong — {shown}{more}, against the merged model's "
        f"chain rule. {_why(wrong, layers)}."
    )


# --------------------------------------------------------------------------------------------
@check("LoraHooks", points=3)
def probe_hooks_gradients_tiny_llama(impl):
    """Gradients of every A and B through hooked tiny-llama (logits and values) equal the merged model's."""
    return _probe_hooks(impl, "tiny-llama")


@probe_hooks_gradients_tiny_llama.judge
def judge_hooks_gradients_tiny_llama(out):
    judge_grads(out, "tiny-llama")


@check("LoraHooks", points=3)
def probe_hooks_gradients_tiny_pythia(impl):
    """Gradients of every A and B through hooked tiny-pythia (logits and values) equal the merged model's."""
    return _probe_hooks(impl, "tiny-pythia")


@probe_hooks_gradients_tiny_pythia.judge
def judge_hooks_gradients_tiny_pythia(out):
    judge_grads(out, "tiny-pythia")


@check("TransformerWithValueHeadLora", points=3)
def probe_model_gradients(impl):
    """forward_with_value_head's gradients reach every A and B as in the merged model (tiny-pythia)."""
    return _probe_model(impl, "tiny-pythia")


@probe_model_gradients.judge
def judge_model_gradients(out):
    judge_grads(out, "tiny-pythia")
