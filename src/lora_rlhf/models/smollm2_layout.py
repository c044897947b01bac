"""How the SmolLM2 cache stores the HookedTransformer's weights: each weight TransformerLens
hands to ``F.linear`` in the layout ``F.linear`` receives it in, loaded back as a permuted view of
that storage (same shapes and values), so that TransformerLens' transpose or rearrangement and
``.contiguous()`` are views, not copies, on every forward (:mod:`lora_rlhf.models.smollm2`'s
docstring lists the weights).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from transformer_lens import HookedTransformer

from lora_rlhf.models.sharing import unembed_is_tied

# Top-level modules of a HookedTransformer whose parameters the cache holds.
BASE_MODULES = {"embed", "pos_embed", "blocks", "ln_final", "unembed"}
# How the cache stores the weights that TransformerLens passes to F.linear (module docstring):
# parameter name suffix -> (key suffix, permutation from the parameter to the stored tensor).
LAYOUTS: dict[str, tuple[str, tuple[int, ...]]] = {
    "mlp.W_in": (".T", (1, 0)),  # [d_model, d_mlp] -> [d_mlp, d_model]
    "mlp.W_gate": (".T", (1, 0)),
    "mlp.W_out": (".T", (1, 0)),  # [d_mlp, d_model] -> [d_model, d_mlp]
    "unembed.W_U": (".T", (1, 0)),  # [d_model, d_vocab] -> [d_vocab, d_model]
    # [head, d_model, d_head] -> [head, d_head, d_model], i.e. [(head d_head), d_model]
    "attn.W_Q": (".linear", (0, 2, 1)),
    "attn._W_K": (".linear", (0, 2, 1)),  # grouped-query attention: the K/V heads
    "attn._W_V": (".linear", (0, 2, 1)),
    "attn.W_K": (".linear", (0, 2, 1)),  # (plain attention, were n_kv_heads = n_heads)
    "attn.W_V": (".linear", (0, 2, 1)),
    # [head, d_head, d_model] -> [d_model, head, d_head], i.e. [d_model, (head d_head)]
    "attn.W_O": (".linear", (2, 0, 1)),
}


def layout_of(name: str) -> tuple[str, tuple[int, ...]] | None:
    """How parameter `name` is stored: (key suffix, permutation), None when stored as it is."""
    for suffix, layout in LAYOUTS.items():
        if name == suffix or name.endswith("." + suffix):
            return layout
    return None


def is_tied_copy(model: HookedTransformer, name: str) -> bool:
    """Whether parameter `name` is the tied W_U, a view of W_E (not stored)."""
    return name == "unembed.W_U" and unembed_is_tied(model)


def stored_key(name: str) -> str:
    """The cache key of HookedTransformer parameter `name` (e.g. ``<name>.T``)."""
    layout = layout_of(name)
    return name + layout[0] if layout else name


def to_stored(params: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The HookedTransformer's parameters as the cache stores them (see the module docstring)."""
    out = {}
    for name, param in params:
        layout = layout_of(name)
        t = param.detach().permute(layout[1]) if layout else param.detach()
        out[stored_key(name)] = t.contiguous()
    return out


def from_stored(stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`to_stored`: the parameters, those stored in F.linear's layout as
    permuted views of the stored tensors (so that TransformerLens' transpose or rearrangement
    and ``.contiguous()`` return views of that storage, not copies)."""
    out = {}
    for key, t in stored.items():
        name = key.rsplit(".", 1)[0]
        layout = layout_of(name)
        if layout and key == name + layout[0]:
            inverse = sorted(range(t.dim()), key=layout[1].__getitem__)
            out[name] = t.permute(inverse)
        else:
            out[key] = t
    return out
