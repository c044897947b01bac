"""One tensor in memory where a model needs the same values twice.

* **Tied unembedding.** SmolLM2 (like many small models) uses its token embedding as its output
  layer: ``lm_head.weight is embed_tokens.weight``. TransformerLens loads the two as separate
  parameters, and with ``fold_ln`` it also multiplies the final RMSNorm's weight into ``W_U``, so
  that ``W_U`` is a second 108 MiB matrix of (almost) the same numbers. :func:`tie_unembed` undoes
  both: the final norm keeps its weight (``ln_final`` becomes an ``RMSNorm``; its ``hook_normalized``
  is still the unweighted ``x / rms(x)``, which the value head reads) and ``W_U`` becomes a
  transposed *view* of ``W_E``. The logits are then computed as transformers computes them.
  Training code that wants the two as independent parameters (full fine-tuning, which trains
  TransformerLens' separate ``W_E`` and ``W_U``) calls :func:`untie_unembed` first.
* **Rotary tables.** TransformerLens gives every attention layer its own copy of the same
  ``rotary_sin``/``rotary_cos`` buffers (2 × 0.5 MiB per layer at ``n_ctx`` 2048);
  :func:`share_rotary_tables` keeps the first layer's.

A frozen copy of a model (the reference policy of full fine-tuning) can share both again with
:func:`share_frozen_copies`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from transformer_lens import HookedTransformer
from transformer_lens.components import RMSNorm, RMSNormPre


def distinct_tensors(tensors: Iterable[Tensor | None]) -> list[Tensor]:
    """`tensors` without repeats and without ``None``: tensors on the same memory with the same
    number of elements count once (a tied ``W_U``, the view ``W_E.T``, is ``W_E``) — for counting
    the parameters or bytes a model holds."""
    seen: dict[tuple[int, int], Tensor] = {}
    for t in tensors:
        if t is not None:
            seen.setdefault((t.data_ptr(), t.numel()), t)
    return list(seen.values())


def unembed_is_tied(model: HookedTransformer) -> bool:
    """Whether ``W_U`` is ``W_E.T`` itself (the same memory), not a copy."""
    W_E, W_U = model.embed.W_E, model.unembed.W_U
    return (
        W_U.data_ptr() == W_E.data_ptr()
        and W_U.shape == W_E.T.shape
        and W_U.stride() == W_E.T.stride()
    )


def tie_unembed_to_embed(model: HookedTransformer) -> None:
    """``W_U`` becomes the view ``W_E.T`` (for a model whose ``W_U`` already equals ``W_E.T``, e.g. a
    copy of a tied model: not checked here)."""
    W_E = model.embed.W_E
    model.unembed.W_U = nn.Parameter(W_E.detach().T, requires_grad=W_E.requires_grad)


def tie_unembed(model: HookedTransformer, final_norm_weight: Tensor) -> HookedTransformer:
    """Make ``W_U`` a view of ``W_E`` and give ``ln_final`` the final norm's weight (see the module
    docstring). `model` must have ``W_U == diag(final_norm_weight) @ W_E.T`` (what ``fold_ln``
    makes of a tied output layer) and an ``RMSNormPre`` final norm; returns `model`."""
    if not isinstance(model.ln_final, RMSNormPre):
        raise TypeError(f"tie_unembed needs an RMSNormPre ln_final, not {type(model.ln_final)}")
    W_E = model.embed.W_E
    norm = RMSNorm(model.cfg)
    norm.w = nn.Parameter(
        final_norm_weight.detach().to(device=W_E.device, dtype=W_E.dtype),
        requires_grad=W_E.requires_grad,
    )
    model.ln_final = norm
    tie_unembed_to_embed(model)
    model.setup()  # TransformerLens' hook registry: ln_final's hook points are new objects
    return model


def untie_unembed(model: HookedTransformer) -> HookedTransformer:
    """Give a tied model's ``W_U`` its own memory (same values and strides), so that it can be
    trained as a parameter of its own; a no-op on an untied model. Returns `model`."""
    if unembed_is_tied(model):
        W_U = model.unembed.W_U
        model.unembed.W_U = nn.Parameter(
            W_U.detach().clone(memory_format=torch.preserve_format),
            requires_grad=W_U.requires_grad,
        )
    return model


def share_rotary_tables(model: HookedTransformer) -> HookedTransformer:
    """Every attention layer's rotary sin/cos tables become the first layer's (when equal)."""
    blocks = getattr(model, "blocks", [])
    if len(blocks) < 2 or not hasattr(blocks[0].attn, "rotary_sin"):
        return model
    first = blocks[0].attn
    for block in blocks[1:]:
        for name in ("rotary_sin", "rotary_cos"):
            table = getattr(block.attn, name, None)
            shared = getattr(first, name)
            if table is not None and table is not shared and torch.equal(table, shared):
                setattr(block.attn, name, shared)  # a registered buffer: replaced in _buffers
    return model


def share_frozen_copies(model: HookedTransformer) -> HookedTransformer:
    """For a frozen copy (e.g. a reference policy made with ``copy.deepcopy``, which copies tied
    and shared tensors separately): tie ``W_U`` to ``W_E`` again where it equals ``W_E.T`` and share
    the rotary tables. Refuses a model whose unembedding still trains."""
    W_U = model.unembed.W_U
    if W_U.requires_grad:
        raise ValueError("share_frozen_copies is for frozen models: W_U still requires grad")
    if not unembed_is_tied(model) and torch.equal(W_U, model.embed.W_E.T):
        tie_unembed_to_embed(model)
    return share_rotary_tables(model)
