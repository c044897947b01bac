"""The LoRA model's forward with the q/k/v adaptors inside the base's own product.

Exercise 2's hooks add each adaptor after TransformerLens has computed the activation: per layer
the store hook runs three times (TransformerLens normalises x once for each of q, k and v), then
``hook_q``, ``hook_k`` and ``hook_v`` each add ``(α/r)·(x A) B``, and the product ``x @ [A_q A_k
A_v]`` is one more small matrix product of its own. On two CPU cores those seven Python calls and
the small product cost more than the adaptors' arithmetic (docs/benchmarks.md, "What limits the
forward overhead").

``fused_lora(model)`` computes the same function with the adaptors' A inside the product
TransformerLens takes anyway: W_Q's rows and the columns of ``[A_q A_k A_v]`` are stacked into one
matrix, so one ``x · [W_Q | A_q A_k A_v]`` gives q and ``x A`` together, and each of q, k and v gets
its ``(x A) B`` added in place before its hook point sees it. W_O's adaptor stays with the layer's
own hooks (``hook_z`` stores z, ``hook_attn_out`` adds ``Σ_h (z_h A_o[h]) B_o[h]``), as do any
other LoRA hooks of the model (the MLP adaptors of ``TransformerWithValueHeadMlpLora``). Per layer:
two attention hook calls instead of eight, and no separate product with A.

Only the layout of the computation changes: the parameters, and so what an optimizer trains,
are the model's ``LoraHooks``. Outside autograd the stacked matrix and the block-diagonal B's are
kept until a parameter is replaced or changed in place; under autograd q, k and v are computed as the hooks compute
them, so gradients reach A and B (an A stacked into W_Q would make autograd form the gradient of
the whole stacked matrix).

Use it for forwards that need no other hook on q, k or v::

    with fused_lora(model):
        logits = model(tokens)          # the LoRA model (= the hooks' forward, = the merged model)
        tokens = HookedTransformer.generate(model, prompt, max_new_tokens=8)

Inside the block the LoRA hooks must not be attached as well (``forward_with_value_head``, the
exercise's ``generate``): the adaptors would be added twice, so a forward that finds hooks on
``hook_q``/``hook_k``/``hook_v`` stops with an error instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.components import GroupedQueryAttention

from lora_rlhf.lora import LoraHooks, _side_by_side, add_low_rank_
from lora_rlhf.value_head import attached_hooks

QKV = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]
# LoraHooks' hooks whose work the fused product does: storing x, and adding to q, k and v.
FUSED_AWAY = ("ln1.hook_normalized", "attn.hook_q", "attn.hook_k", "attn.hook_v")


@contextmanager
def fused_lora(model: HookedTransformer) -> Iterator[None]:
    """Within the block, the model's plain forward computes the LoRA model: q/k/v adaptors inside
    the W_Q product, W_O's adaptor through the layers' own hooks. Everything is undone on the way
    out, also when the block raises."""
    layers = _lora_layers(model)
    attns = [block.attn for block in model.blocks]
    for i, attn in enumerate(attns):
        if "calculate_qkv_matrices" in attn.__dict__:
            raise RuntimeError(
                f"fused_lora: blocks.{i}.attn already has its q/k/v computation replaced "
                "(fused_lora is active on this model already, or something else patched it)"
            )
    # Every other LoRA hook stays: W_O's (hook_z, hook_attn_out) and any beyond attention's,
    # such as the MLP adaptors of TransformerWithValueHeadMlpLora.
    fused_away = {
        (name, fn)
        for layer in layers
        for name, fn in layer.list_fwd_hooks()
        if name.endswith(FUSED_AWAY)
    }
    all_hooks = getattr(model, "lora_fwd_hooks", None)
    if all_hooks is None:
        all_hooks = [hook for layer in layers for hook in layer.list_fwd_hooks()]
    kept_hooks = [hook for hook in all_hooks if hook not in fused_away]
    try:
        for attn, layer in zip(attns, layers, strict=True):
            attn.calculate_qkv_matrices = _fused_qkv(attn, layer)
        with attached_hooks(model, kept_hooks):
            yield
    finally:
        for attn in attns:
            attn.__dict__.pop("calculate_qkv_matrices", None)


def _lora_layers(model: HookedTransformer) -> list[LoraHooks]:
    """The model's per-layer `LoraHooks`, after checking that fusing them is possible."""
    layers = getattr(model, "lora", None)
    if layers is None or len(layers) != model.cfg.n_layers:
        raise TypeError(
            "fused_lora needs a LoRA model (TransformerWithValueHeadLora, `model.lora`: one "
            f"LoraHooks per layer); got {type(model).__name__}"
        )
    if not all(isinstance(layer, LoraHooks) for layer in layers):
        kinds = sorted({type(layer).__name__ for layer in layers})
        raise TypeError(
            f"fused_lora works with the library's LoraHooks (kept matrices, block diagonals); "
            f"this model's layers are {', '.join(kinds)}. Run it with its hooks instead."
        )
    cfg = model.cfg
    unsupported = [
        flag
        for flag in ("use_split_qkv_input", "use_attn_in", "load_in_4bit")
        if getattr(cfg, flag, False)
    ]
    if getattr(cfg, "ungroup_grouped_query_attention", False):
        unsupported.append("ungroup_grouped_query_attention")
    if cfg.positional_embedding_type == "shortformer":  # q/k read x + pos, the hooks' x has none
        unsupported.append("positional_embedding_type='shortformer'")
    if unsupported:
        raise ValueError(
            f"fused_lora does not support cfg.{', cfg.'.join(unsupported)} (TransformerLens then "
            "computes q/k/v another way); run the model with its LoRA hooks instead"
        )
    for i, layer in enumerate(layers):
        dtypes = {lora.A.dtype for lora in (layer.lora_q, layer.lora_k, layer.lora_v)}
        if dtypes != {model.blocks[i].attn.W_Q.dtype}:
            raise ValueError(
                f"fused_lora: layer {i}'s adaptors are {sorted(map(str, dtypes))}, its W_Q "
                f"{model.blocks[i].attn.W_Q.dtype}; the stacked product needs one dtype "
                "(build the adaptors with the model's dtype)"
            )
    return list(layers)


def _stacked(
    W_Q: Tensor, b_Q: Tensor, *As: Tensor
) -> tuple[Float[Tensor, "out d_model"], Float[Tensor, " out"]]:
    """`[W_Q | A_q A_k A_v]` laid out as `F.linear` takes it (one row per output), and its bias
    (zeros for the A columns). W_Q's rows in the order TransformerLens uses: (head, d_head)."""
    A = _side_by_side(*As)  # [d_model, inst·rank], every adaptor's instances side by side
    w_q, b_q = _linear_layout(W_Q, b_Q)
    return torch.cat([w_q, A.T], dim=0), torch.cat([b_q, b_q.new_zeros(A.shape[1])])


def _fused_qkv(attn, layer: LoraHooks) -> QKV:
    """`attn.calculate_qkv_matrices` with `layer`'s q/k/v adaptors inside.

    This runs once per layer in every forward, right after large matrix products, where each
    Python-level step costs several µs (docs/benchmarks.md): everything that does not change
    between forwards — the stacked matrix, the block-diagonal B's, the K/V weights in
    `F.linear`'s layout — is prepared once and rebuilt only when a parameter is replaced or
    changed in place, which one tuple of identities and version counters tells."""
    grouped = isinstance(attn, GroupedQueryAttention)
    k_names = ("_W_K", "_b_K", "_W_V", "_b_V") if grouped else ("W_K", "b_K", "W_V", "b_V")
    loras = (layer.lora_q, layer.lora_k, layer.lora_v)
    # where each parameter lives: a replaced parameter is found there
    owners = [(attn._parameters, "W_Q"), (attn._parameters, "b_Q")]
    owners += [(lora._parameters, name) for name in ("A", "B") for lora in loras]
    owners += [(attn._parameters, name) for name in k_names]
    widths = [lora.n_inst * lora.rank for lora in loras]
    scale = loras[0].scaling
    if any(lora.scaling != scale for lora in loras):
        raise ValueError("fused_lora: lora_q, lora_k and lora_v need the same α/r")
    q_width = attn.W_Q.shape[0] * attn.W_Q.shape[2]
    d_head = attn.cfg.d_head
    points = (attn.hook_q, attn.hook_k, attn.hook_v)
    # [key, prepared matrices, the parameters they were prepared from]: holding the parameters
    # keeps their ids theirs (a freed one's id could be handed to its replacement). Kept on the
    # layer, so that the next `with fused_lora(model)` block finds it too.
    kept: list = layer._kept.setdefault("fused_qkv", [None, None, None])

    def prepare(params: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        W_Q, b_Q, A_q, A_k, A_v, B_q, B_k, B_v, W_K, b_K, W_V, b_V = params
        stacked, bias = _stacked(W_Q, b_Q, A_q, A_k, A_v)
        return (
            stacked,
            bias,
            *(torch.block_diag(*B) for B in (B_q, B_k, B_v)),
            *(_linear_layout(W, b) for W, b in ((W_K, b_K), (W_V, b_V))),
        )

    def qkv(query_input: Tensor, key_input: Tensor, value_input: Tensor):
        for point in points:
            if point._forward_hooks:
                raise RuntimeError(
                    f"fused_lora: hooks are attached at {point.name} while fused_lora adds the "
                    "q/k/v adaptors itself (they would be added twice); inside `with "
                    "fused_lora(model)` run the plain forward, not forward_with_value_head or "
                    "the LoRA model's generate"
                )
        params = tuple([where[name] for where, name in owners])
        if torch.is_grad_enabled():
            return _qkv_under_autograd(
                attn, loras, widths, params, query_input, key_input, value_input
            )
        try:
            key = (torch.is_inference_mode_enabled(), *map(id, params))
            key += tuple([p._version for p in params])
        except RuntimeError:  # inference tensors keep no version counter: prepare every time
            key = None
        if key is None or kept[0] != key:
            kept[:] = key, prepare(params), params
        stacked, bias, B_q, B_k, B_v, (w_k, b_k), (w_v, b_v) = kept[1]
        batch, pos = query_input.shape[:2]
        rows = batch * pos
        both = F.linear(query_input, stacked, bias).view(rows, -1)
        q, x_a = both[:, :q_width], both[:, q_width:]  # q: rows of stride q + A width
        x_q, x_k, x_v = x_a.split_with_sizes(widths, 1)
        q.addmm_(x_q, B_q, alpha=scale)
        k = F.linear(key_input, w_k, b_k)
        k.view(rows, -1).addmm_(x_k, B_k, alpha=scale)
        v = F.linear(value_input, w_v, b_v)
        v.view(rows, -1).addmm_(x_v, B_v, alpha=scale)
        return (
            points[0](q.view(batch, pos, -1, d_head)),
            points[1](k.view(batch, pos, -1, d_head)),
            points[2](v.view(batch, pos, -1, d_head)),
        )

    return qkv


def _linear_layout(W: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """A `[head, d_model, d_head]` weight and its bias as `F.linear` takes them, as
    TransformerLens' `simple_attn_linear` lays them out (rows ordered (head, d_head))."""
    return W.permute(0, 2, 1).reshape(-1, W.shape[1]), b.reshape(-1)


def _qkv_under_autograd(attn, loras, widths, params, query_input, key_input, value_input):
    """q, k and v as the hooks compute them (gradients reach every A and B): the base products,
    one `x @ [A_q A_k A_v]`, and each adaptor's `(x A) B` added by `add_low_rank_`."""
    W_Q, b_Q, A_q, A_k, A_v, _, _, _, W_K, b_K, W_V, b_V = params
    batch, pos = query_input.shape[:2]
    q, k, v = (
        F.linear(x, *_linear_layout(W, b))
        for x, W, b in ((query_input, W_Q, b_Q), (key_input, W_K, b_K), (value_input, W_V, b_V))
    )
    x_a = query_input.reshape(batch * pos, -1) @ _side_by_side(A_q, A_k, A_v)
    parts = x_a.split_with_sizes(widths, 1)
    q, k, v = (add_low_rank_(*args) for args in zip((q, k, v), parts, loras, strict=True))
    d_head = attn.cfg.d_head
    return (
        attn.hook_q(q.view(batch, pos, -1, d_head)),
        attn.hook_k(k.view(batch, pos, -1, d_head)),
        attn.hook_v(v.view(batch, pos, -1, d_head)),
    )
