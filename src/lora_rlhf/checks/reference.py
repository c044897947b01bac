"""Independent references for the checks: seeded inputs, adaptor values and the merged model.

Nothing here uses the classes under test. The merged model is the ground truth for every
hook-based check: adding α/r·A·B to W_Q, the real grouped ``_W_K``/``_W_V`` and W_O of a freshly
loaded model must give the same logits as the hooks.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from lora_rlhf.checks.core import CheckFailed
from lora_rlhf.models import load_model

ALPHA, RANK = 8.0, 4  # α/r = 2: a missing or inverted scale is visible
ATTN_TARGETS = ("q", "k", "v", "o")


def probe_device() -> str:
    """The device probes run on: the default device that `run_probe` sets (cpu or cuda)."""
    return str(torch.get_default_device())


def seeded(*shape: int, seed: int, scale: float = 1.0, dtype=torch.float32) -> Tensor:
    """The same random tensor on every machine (drawn on the CPU), on the default device."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(*shape, generator=gen, dtype=torch.float64, device="cpu") * scale
    return values.to(dtype=dtype, device=torch.get_default_device())


def seeded_tokens(batch: int, seq: int, d_vocab: int, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, d_vocab, (batch, seq), generator=gen, device="cpu")
    return tokens.to(torch.get_default_device())


def adaptor_shapes(cfg, rank: int = RANK) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Expected (A, B) shapes for the four attention adaptors of one layer."""
    n_kv = cfg.n_key_value_heads or cfg.n_heads
    d_model, d_head, n_heads = cfg.d_model, cfg.d_head, cfg.n_heads
    return {
        "q": ((n_heads, d_model, rank), (n_heads, rank, d_head)),
        "k": ((n_kv, d_model, rank), (n_kv, rank, d_head)),
        "v": ((n_kv, d_model, rank), (n_kv, rank, d_head)),
        "o": ((n_heads, d_head, rank), (n_heads, rank, d_model)),
    }


def adaptor_values(cfg, seed: int, rank: int = RANK, scale: float = 0.1) -> list[dict]:
    """Random non-zero A and B for every layer: ``[{"q": (A, B), ...}, ...]``."""
    layers = []
    for layer in range(cfg.n_layers):
        values = {}
        for j, (target, (a_shape, b_shape)) in enumerate(adaptor_shapes(cfg, rank).items()):
            s = seed * 1000 + layer * 10 + j
            values[target] = (
                seeded(*a_shape, seed=2 * s, scale=scale),
                seeded(*b_shape, seed=2 * s + 1, scale=scale),
            )
        layers.append(values)
    return layers


def assign_adaptor(lora_module, A: Tensor, B: Tensor, where: str) -> None:
    """Copy A and B into a `Lora` under test, explaining a shape mismatch."""
    for pname, value in (("A", A), ("B", B)):
        param = getattr(lora_module, pname, None)
        if not isinstance(param, torch.nn.Parameter):
            raise CheckFailed(
                f"{where}.{pname} should be an nn.Parameter, got {type(param).__name__}"
            )
        if tuple(param.shape) != tuple(value.shape):
            hint = ""
            if where.endswith(("lora_k", "lora_v")) and param.shape[0] != value.shape[0]:
                hint = (
                    f" — this model uses grouped-query attention with {value.shape[0]} key/value "
                    f"heads: K/V adaptors need cfg.n_key_value_heads instances, not n_heads"
                )
            raise CheckFailed(
                f"{where}.{pname} has shape {tuple(param.shape)}, expected {tuple(value.shape)}{hint}"
            )
        with torch.no_grad():
            param.copy_(value.to(param.dtype))


def assign_layer(lora_hooks, values: dict, layer: int | str = "") -> None:
    for target in ATTN_TARGETS:
        module = getattr(lora_hooks, f"lora_{target}", None)
        if module is None:
            raise CheckFailed(f"LoraHooks has no attribute lora_{target}")
        assign_adaptor(module, *values[target], where=f"layer {layer} lora_{target}".strip())


def attention_weights(model: HookedTransformer, layer: int) -> dict[str, Tensor]:
    """The weights each adaptor adapts: W_Q, the real grouped _W_K/_W_V (or W_K/W_V), W_O."""
    attn = model.blocks[layer].attn
    grouped = getattr(attn, "_W_K", None) is not None
    return {
        "q": attn.W_Q,
        "k": attn._W_K if grouped else attn.W_K,
        "v": attn._W_V if grouped else attn.W_V,
        "o": attn.W_O,
    }


@torch.no_grad()
def merge_into(model: HookedTransformer, layers: list[dict], scaling: float) -> HookedTransformer:
    """Add scaling·A[h]·B[h] to every head's W_Q, _W_K/_W_V (real grouped weights) and W_O."""
    for i, values in enumerate(layers):
        targets = attention_weights(model, i)
        for target, weight in targets.items():
            if target not in values:
                continue
            A, B = values[target]
            delta = torch.einsum("hir,hro->hio", A.double(), B.double()) * scaling
            weight.add_(delta.to(device=weight.device, dtype=weight.dtype))
    return model


@torch.no_grad()
def merge_mlp_into(
    model: HookedTransformer, layers: list[dict], scaling: float
) -> HookedTransformer:
    """Add scaling·A·B (one instance: A [1, d_in, r], B [1, r, d_out]) to W_in, W_gate and W_out
    (targets ``mlp_in``, ``mlp_gate``, ``mlp_out``)."""
    weights = {"mlp_in": "W_in", "mlp_gate": "W_gate", "mlp_out": "W_out"}
    for i, values in enumerate(layers):
        for target, (A, B) in values.items():
            weight = getattr(model.blocks[i].mlp, weights[target])
            delta = (A.double()[0] @ B.double()[0]) * scaling
            weight.add_(delta.to(device=weight.device, dtype=weight.dtype))
    return model


@functools.lru_cache(maxsize=4)
def base_model(name: str) -> HookedTransformer:
    """A tiny registry model (deterministic: seeded init), for judges only: never modify it."""
    return load_model(name, device="cpu").requires_grad_(False)


@functools.lru_cache(maxsize=8)
def merged_model(name: str, seed: int, alpha: float = ALPHA, rank: int = RANK) -> HookedTransformer:
    """The base model with the seeded adaptors merged into its weights (judges only)."""
    model = load_model(name, device="cpu").requires_grad_(False)
    return merge_into(model, adaptor_values(model.cfg, seed, rank), alpha / rank)


def close(actual: Tensor, expected: Tensor, atol: float = 1e-4, rtol: float = 1e-4) -> bool:
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    if actual.shape != expected.shape:
        return False
    return bool(torch.allclose(actual.double(), expected.double(), atol=atol, rtol=rtol))


def max_diff(actual: Tensor, expected: Tensor) -> float:
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    if actual.shape != expected.shape:
        return float("inf")
    return float((actual.double() - expected.double()).abs().max())
