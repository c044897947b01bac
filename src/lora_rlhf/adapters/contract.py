"""The adaptor contract: which modules of a LoRA model are its adaptors (by *target* name: q, k,
v, o, mlp_in, mlp_gate, mlp_out; the table is in :mod:`lora_rlhf.adapters.files`), the attributes
every adaptor has (:data:`CONTRACT`), and the switch that turns them off.

The fast path, merging, saving and the PEFT export read a model only through these, so they run a
student's classes as well as the library's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import Tensor, nn

ATTN_TARGETS = ("q", "k", "v", "o")
MLP_TARGETS = ("mlp_in", "mlp_gate", "mlp_out")
MLP_ATTRS = {"mlp_in": "lora_in", "mlp_gate": "lora_gate", "mlp_out": "lora_out"}


# ---------------------------------------------------------------------------------------------
# Listing the adaptors of a model


def layer_adaptors(model: nn.Module) -> list[dict[str, nn.Module]]:
    """One ``{target: Lora}`` dict per layer, in the order of :data:`ATTN_TARGETS` + :data:`MLP_TARGETS`."""
    lora = getattr(model, "lora", None)
    if lora is None:
        raise TypeError(
            f"{type(model).__name__} has no adaptors (no .lora): build it with "
            "TransformerWithValueHeadLora.from_pretrained (or the MLP subclass)"
        )
    layers = [{t: getattr(hooks, f"lora_{t}") for t in ATTN_TARGETS} for hooks in lora]
    for i, hooks in enumerate(getattr(model, "mlp_lora", None) or []):
        for target, attr in MLP_ATTRS.items():
            module = getattr(hooks, attr, None)
            if module is not None:
                layers[i][target] = module
    return layers


def lora_targets(model: nn.Module) -> tuple[str, ...]:
    """The targets the model adapts, e.g. ``("q", "k", "v", "o", "mlp_in", "mlp_gate", "mlp_out")``."""
    present = set().union(*(layer.keys() for layer in layer_adaptors(model)))
    return tuple(t for t in ATTN_TARGETS + MLP_TARGETS if t in present)


# The adaptor contract: what the fast path, merging, saving and PEFT export read from
# every adaptor — the course's own names, which its given Lora.__init__ sets.
CONTRACT = ("A", "B", "rank", "lora_alpha")


class AdaptorContractError(TypeError):
    """An adaptor without the attributes of the contract (:data:`CONTRACT`)."""


def scaling_of(lora: nn.Module) -> float:
    """α/r of one adaptor, read from its ``lora_alpha`` and ``rank`` (AdaptorContractError when
    it lacks one of :data:`CONTRACT`, or when ``rank`` is not A's last axis)."""
    missing = [name for name in CONTRACT if getattr(lora, name, None) is None]
    if missing:
        raise AdaptorContractError(
            f"{type(lora).__name__} has no {', '.join(missing)}: an adaptor keeps A, B, rank and "
            "lora_alpha under these names (Lora.__init__ as the course gives it sets them)"
        )
    if lora.A.shape[-1] != lora.rank:
        raise AdaptorContractError(
            f"{type(lora).__name__} has rank={lora.rank} but its A has shape "
            f"{tuple(lora.A.shape)}: A's last axis is the rank"
        )
    return float(lora.lora_alpha) / lora.rank


def adaptor_values(model: nn.Module) -> list[dict[str, tuple[Tensor, Tensor, float]]]:
    """``[{target: (A, B, α/r)}]`` per layer (the parameters themselves, not copies)."""
    return [
        {t: (lora.A, lora.B, scaling_of(lora)) for t, lora in layer.items()}
        for layer in layer_adaptors(model)
    ]


def rank_and_alpha(model: nn.Module) -> tuple[int, float]:
    loras = [lora for layer in layer_adaptors(model) for lora in layer.values()]
    for lora in loras:
        scaling_of(lora)  # the contract's attributes are there
    pairs = {(int(lo.rank), float(lo.lora_alpha)) for lo in loras}
    if len(pairs) != 1:
        raise ValueError(
            f"the adaptors of this model differ in (rank, lora_alpha): {sorted(pairs)}"
        )
    return pairs.pop()


# ---------------------------------------------------------------------------------------------
# The on/off switch


@contextlib.contextmanager
def disable_lora(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, ``forward_with_value_head`` and ``generate`` run without the adaptors.

    The logits are exactly the base model's: the adaptor hooks are not registered at all
    (``model.lora_fwd_hooks`` is empty inside the block), so nothing is added, not even zeros.
    Blocks nest, and the previous state comes back on exit, also when the block raises::

        with disable_lora(model):
            ref_logits, _ = model.forward_with_value_head(tokens)  # π_ref, value head still on
    """
    if not hasattr(model, "lora_fwd_hooks"):
        raise TypeError(f"{type(model).__name__} has no lora_fwd_hooks: it is not a LoRA model")
    saved = model.lora_fwd_hooks
    model.lora_fwd_hooks = []
    try:
        yield model
    finally:
        model.lora_fwd_hooks = saved


def lora_enabled(model: nn.Module) -> bool:
    """False inside :func:`disable_lora` (or for a model without adaptor hooks)."""
    return bool(getattr(model, "lora_fwd_hooks", None))
