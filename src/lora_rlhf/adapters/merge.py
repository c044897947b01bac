"""Merge ("bake") the adaptors into the weights: a plain HookedTransformer with the same logits.

Each adaptor adds a low-rank matrix to the weight it adapts, so the adapted model *is* a model
with different weights::

    W_Q[h]   += α/r · A_q[h] B_q[h]        (one term per query head)
    _W_K[g]  += α/r · A_k[g] B_k[g]        (per key/value head: the real grouped weights)
    _W_V[g]  += α/r · A_v[g] B_v[g]
    W_O[h]   += α/r · A_o[h] B_o[h]
    W_in     += α/r · A_in B_in,   W_gate += α/r · A_gate B_gate,   W_out += α/r · A_out B_out

The merged model runs without hooks (as fast as the base model) and can be used anywhere a
HookedTransformer can; it no longer has separate adaptors to train or switch off.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from transformer_lens import HookedTransformer
from transformer_lens.components import RMSNorm

from lora_rlhf.adapters.contract import adaptor_values
from lora_rlhf.models.sharing import share_rotary_tables, tie_unembed_to_embed, unembed_is_tied

MLP_WEIGHTS = {"mlp_in": "W_in", "mlp_gate": "W_gate", "mlp_out": "W_out"}


def _adapted_weight(model: HookedTransformer, layer: int, target: str) -> Tensor:
    """The parameter an adaptor adapts. With grouped-query attention ``W_K``/``W_V`` are
    n_heads-wide expansions computed on every access; the adaptors (one per key/value head)
    belong to the real weights ``_W_K``/``_W_V``."""
    if target in MLP_WEIGHTS:
        return getattr(model.blocks[layer].mlp, MLP_WEIGHTS[target])
    attn = model.blocks[layer].attn
    name = {"q": "W_Q", "k": "W_K", "v": "W_V", "o": "W_O"}[target]
    grouped = getattr(attn, f"_{name}", None)
    return grouped if grouped is not None else getattr(attn, name)


@torch.no_grad()
def merge_adaptors_into(
    model: HookedTransformer, layers: list[dict[str, tuple[Tensor, Tensor]]], scaling: float
) -> HookedTransformer:
    """Add scaling·A[h]·B[h] to the weight each adaptor adapts, in place.

    A: [inst, d_in, r], B: [inst, r, d_out]: one instance per head of the weight it adapts for
    ``q/k/v/o`` (query heads for W_Q and W_O, key/value heads for _W_K and _W_V), one for
    ``mlp_in/mlp_gate/mlp_out`` (W_in, W_gate, W_out). The product is formed in float64, then
    added in the weight's dtype.
    """
    for i, values in enumerate(layers):
        for target, (A, B) in values.items():
            weight = _adapted_weight(model, i, target)
            delta = torch.bmm(A.double(), B.double()) * scaling  # [inst, d_in, d_out]
            weight.add_(delta.reshape(weight.shape).to(device=weight.device, dtype=weight.dtype))
    return model


def _copy(t: Tensor, like: Tensor, device: torch.device) -> Tensor:
    """A copy of `t` with `like`'s dtype, on `device`, with `t`'s strides: a permuted view stays
    one (empty_like's memory_format=torch.preserve_format keeps the strides of a dense tensor)."""
    return torch.empty_like(t, dtype=like.dtype, device=device).copy_(t)


def _plain_copy(model: HookedTransformer) -> HookedTransformer:
    """A HookedTransformer with `model`'s config, tokenizer and base weights (one copy of them).

    Each weight keeps its strides: the embedded SmolLM2 stores the weights that TransformerLens
    passes to ``F.linear`` in ``F.linear``'s layout, as permuted views (see
    :mod:`lora_rlhf.models.smollm2`). Fresh contiguous copies would compute the same logits, but
    TransformerLens would copy them again (~540 MB) on every forward of the merged model.
    """
    cfg = copy.deepcopy(model.cfg)
    init_weights, tokenizer_name = cfg.init_weights, cfg.tokenizer_name
    # Built on the meta device (no memory, nothing initialised): the weights are then assigned.
    # Not re-loading the tokenizer by name (it may need the network): `model`'s is set up already.
    cfg.init_weights, cfg.tokenizer_name = False, None
    with torch.device("meta"):
        merged = HookedTransformer(cfg, tokenizer=None, move_to_device=False)
        if isinstance(model.ln_final, RMSNorm) and not isinstance(merged.ln_final, RMSNorm):
            # a tied unembedding keeps the final norm's weight (lora_rlhf.models.sharing)
            merged.ln_final = RMSNorm(cfg)
            merged.setup()
    cfg.init_weights, cfg.tokenizer_name = init_weights, tokenizer_name
    merged.tokenizer = model.tokenizer
    wanted = merged.state_dict()  # meta tensors: the names and dtypes
    source = model.state_dict()  # references, not copies
    missing = [k for k in wanted if k not in source]
    if missing:
        raise ValueError(f"cannot merge: the model lacks {', '.join(missing[:3])}")
    device = torch.device(cfg.device)
    state = {k: _copy(source[k], like, device) for k, like in wanted.items()}
    # assign=True: the copies (strides and all) become the parameters and buffers, which keep
    # their requires_grad.
    merged.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in (*merged.named_parameters(), *merged.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"cannot merge: no weights for {', '.join(left[:3])}")
    if unembed_is_tied(model):  # one embedding matrix, as in `model`
        tie_unembed_to_embed(merged)
    return share_rotary_tables(merged.eval())


@torch.no_grad()
def merge_lora(model: nn.Module) -> HookedTransformer:
    """A plain HookedTransformer whose weights include the adaptors of `model`.

    `model` (a ``TransformerWithValueHeadLora`` or ``TransformerWithValueHeadMlpLora``) is left
    unchanged; the result is a new model without hooks, LoRA modules or value head, whose logits
    equal ``model.forward_with_value_head(tokens)[0]``. It holds one extra copy of the base
    weights; each adaptor's product A·B is formed once, in float64, and added in place.
    """
    merged = _plain_copy(model)
    # Scale B (in float64) so that adaptors with different α/r merge in one call.
    layers = [
        {t: (A, B.double() * s) for t, (A, B, s) in layer.items()}
        for layer in adaptor_values(model)
    ]
    return merge_adaptors_into(merged, layers, scaling=1.0)
