"""The library's fast path: a Section 2 model's adaptors, the same function in fewer, larger operations.

The teaching classes (:mod:`lora_rlhf.lessons.section2_lora`) apply each layer's adaptors through six hooks: the
store hook runs three times (TransformerLens normalises x once for each of q, k and v), each of
``hook_q``, ``hook_k``, ``hook_v`` runs the ``Lora`` module, and ``hook_attn_out`` forms one
d_model-wide output per head before summing them. On a CPU those Python calls and small products
cost more than the adaptors' arithmetic (docs/benchmarks.md). The fast path computes the same:

* **q/k/v inside the base product.** Each attention layer's ``calculate_qkv_matrices`` is replaced:
  W_Q's rows and the columns of ``[A_q A_k A_v]`` are stacked into one matrix, so one
  ``x · [W_Q | A_q A_k A_v]`` gives q and ``x A`` for all three adaptors, and each of q, k and v
  gets ``(α/r)(x A) B`` added before its hook point sees it — no hook call at all.
* **Heads as one block-diagonal product.** ``(x A) B`` for every head at once is one plain
  ``[rows, head·r] @ [head·r, head·d_out]`` product with the heads' B on the diagonal; W_O's adaptor
  (two hooks: store z, add ``Σ_h (z_h A_o[h]) B_o[h]``) takes ``z @ blockdiag(A_o)`` the same way
  and sums over heads inside its second product.
* **Nothing rebuilt that has not changed, nothing copied that can be added in place.** Outside
  autograd (sampling, the rollout's forward) the stacked and block-diagonal matrices are kept until
  a parameter is replaced or changed in place, and products are accumulated into the activation
  (``addmm_``). Under autograd they are built anew each pass, so gradients reach every A and B.

Only the adaptor contract is read (:func:`lora_rlhf.adapters.contract.scaling_of`) —
``model.lora[i].lora_q/k/v/o``, each with ``A``, ``B``, ``rank`` and ``lora_alpha`` — so it runs
the library's classes and a student's alike.

``fast_lora(model)`` switches it on for a block, ``install_fast_lora`` for good (it returns the
undo). In between, ``forward_with_value_head`` and ``generate`` run fast, their hooks attached by
:func:`lora_rlhf.fast.hooks.attached_hooks`; plain ``forward`` stays the base model (π_ref).
``with_fast_lora(trainer_class)`` gives the trainer whose model runs this way: what
``lora-rlhf train --impl library`` trains (any other ``--impl``
trains the submission's own classes as they are).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformer_lens.components import GroupedQueryAttention

from lora_rlhf.adapters.contract import scaling_of
from lora_rlhf.fast.hooks import use_attached_hooks
from lora_rlhf.fast.lean_trainer import with_lean_memory
from lora_rlhf.lessons.section2_lora import RLHFTrainerLora

# The teaching hooks of layer i whose work the fast path does (any other LoRA hook, e.g. the MLP
# bonus's, stays as it is).
ATTN_HOOKS = ("ln1.hook_normalized", "attn.hook_q", "attn.hook_k", "attn.hook_v")
OUT_HOOKS = ("attn.hook_z", "hook_attn_out")
UNSUPPORTED = ("use_split_qkv_input", "use_attn_in", "load_in_4bit", "use_qk_norm")


@contextmanager
def fast_lora(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, `model.forward_with_value_head` and `model.generate` run the adaptors
    through the fast path; everything is undone on the way out, also when the block raises."""
    undo = install_fast_lora(model)
    try:
        yield model
    finally:
        undo()


def install_fast_lora(model: nn.Module) -> Callable[[], None]:
    """Run `model`'s adaptors through the fast path from now on; returns the function undoing it."""
    layers = _adaptor_layers(model)
    teaching = model.lora_fwd_hooks
    fast = [FastLayer(i, model.blocks[i].attn, layer) for i, layer in enumerate(layers)]
    done = {f"blocks.{i}.{name}" for i in range(len(layers)) for name in ATTN_HOOKS + OUT_HOOKS}
    hooks = [hook for layer in fast for hook in layer.out_hooks()]
    hooks += [(name, fn) for name, fn in teaching if name not in done]  # e.g. MLP adaptors
    _check_fwd_hooks_read_lora_fwd_hooks(model, hooks, teaching)

    def fast_while(method: str):
        original = getattr(type(model), method)

        def run(*args, **kwargs):
            if model.lora_fwd_hooks is not teaching:  # switched off (disable_lora) or replaced
                return original(model, *args, **kwargs)
            model.lora_fwd_hooks = hooks
            for layer in fast:
                layer.active = True
            try:
                return original(model, *args, **kwargs)
            finally:
                for layer in fast:
                    layer.active = False
                model.lora_fwd_hooks = teaching

        run.__doc__ = original.__doc__
        return run

    for layer in fast:
        layer.attn.calculate_qkv_matrices = layer.qkv
    model.forward_with_value_head = fast_while("forward_with_value_head")
    model.generate = fast_while("generate")
    undo_hooks = use_attached_hooks(model)

    def undo() -> None:
        for layer in fast:
            layer.attn.__dict__.pop("calculate_qkv_matrices", None)
        for method in ("forward_with_value_head", "generate"):
            model.__dict__.pop(method, None)
        undo_hooks()

    return undo


def with_fast_lora(trainer_class: type[RLHFTrainerLora]) -> type[RLHFTrainerLora]:
    """`trainer_class` (RLHFTrainerLora or a subclass) whose model runs its adaptors through the
    fast path, installed as soon as its `__init__` has built the model; it trains in the engine's
    memory-lean way too (:func:`lora_rlhf.fast.lean_trainer.with_lean_memory`)."""

    class Fast(with_lean_memory(trainer_class)):
        def __init__(self, args, *more, **kwargs):
            super().__init__(args, *more, **kwargs)
            install_fast_lora(self.model)

    Fast.__name__ = Fast.__qualname__ = f"Fast{trainer_class.__name__}"
    Fast.__doc__ = f"{trainer_class.__name__}, its adaptors run through lora_rlhf.fast.lora."
    return Fast


FastRLHFTrainerLora = with_fast_lora(RLHFTrainerLora)


# ---------------------------------------------------------------------------------------------


class FastLayer:
    """One attention layer's adaptors, computed the fast way while `active`."""

    def __init__(self, index: int, attn: nn.Module, layer: nn.Module):
        self.index, self.attn, self.active = index, attn, False
        self.loras = [getattr(layer, f"lora_{t}") for t in "qkvo"]
        scales = {scaling_of(lora) for lora in self.loras}
        ranks = {lora.rank for lora in self.loras}
        if len(ranks) != 1 or len(scales) != 1:
            raise ValueError(
                f"fast_lora: the adaptors of one layer differ in rank or α/r: {ranks}, {scales}"
            )
        self.scale = scales.pop()
        grouped = isinstance(attn, GroupedQueryAttention)
        kv = ("_W_K", "_b_K", "_W_V", "_b_V") if grouped else ("W_K", "b_K", "W_V", "b_V")
        self.weights = ("W_Q", "b_Q", *kv)
        self.widths = [lora.A.shape[0] * lora.A.shape[-1] for lora in self.loras[:3]]
        self.z: Tensor | None = None
        self.kept: dict[str, tuple] = {}  # name -> (key, prepared matrices, params kept alive)

    def params(self) -> tuple[Tensor, ...]:
        """W_Q, b_Q, K/V weights and biases, then A_q, A_k, A_v, B_q, B_k, B_v."""
        attn = self.attn._parameters
        qkv = self.loras[:3]
        return (
            *[attn[n] for n in self.weights],
            *[lora._parameters["A"] for lora in qkv],
            *[lora._parameters["B"] for lora in qkv],
        )

    def kept_outside_autograd(self, name: str, params: tuple, build: Callable) -> tuple:
        """`build(*params)`, kept until a parameter is replaced or changed in place. Holding the
        parameters keeps their ids theirs (a freed one's id could go to its replacement)."""
        try:
            key = (torch.is_inference_mode_enabled(), *map(id, params))
            key += tuple([p._version for p in params])
        except RuntimeError:  # inference tensors keep no version counter
            return build(*params)
        entry = self.kept.get(name)
        if entry is None or entry[0] != key:
            entry = self.kept[name] = (key, build(*params), params)
        return entry[1]

    def qkv(self, query_input: Tensor, key_input: Tensor, value_input: Tensor):
        """`attn.calculate_qkv_matrices`, with the q/k/v adaptors inside while active."""
        attn = self.attn
        if not self.active:
            return type(attn).calculate_qkv_matrices(attn, query_input, key_input, value_input)
        points = (attn.hook_q, attn.hook_k, attn.hook_v)
        for point in points:
            if point._forward_hooks:
                raise RuntimeError(
                    f"fast_lora: hooks are attached at {point.name} while the fast path adds the "
                    "q/k/v adaptors itself (they would be added twice): the model's fwd_hooks and "
                    "generate must use self.lora_fwd_hooks, read at call time"
                )
        batch, pos = query_input.shape[:2]
        rows = batch * pos
        params = self.params()
        if torch.is_grad_enabled():
            q, k, v = self._qkv_under_autograd(params, query_input, key_input, value_input)
        else:
            stacked, bias, w_k, b_k, w_v, b_v, *Bs = self.kept_outside_autograd(
                "qkv", params, _prepare_qkv
            )
            both = F.linear(query_input, stacked, bias).view(rows, -1)
            q_width = both.shape[1] - sum(self.widths)
            q, x_a = both[:, :q_width], both[:, q_width:]  # q: rows of stride q + A width
            k, v = F.linear(key_input, w_k, b_k), F.linear(value_input, w_v, b_v)
            for act, x_a_part, B in zip((q, k, v), x_a.split(self.widths, 1), Bs):
                act.view(rows, -1).addmm_(x_a_part, B, alpha=self.scale)
        d_head = attn.cfg.d_head
        return tuple(p(t.view(batch, pos, -1, d_head)) for p, t in zip(points, (q, k, v)))

    def _qkv_under_autograd(self, params, query_input, key_input, value_input):
        """q, k, v with a graph to every A and B: per-head `(x A) B` as one batched product."""
        W_Q, b_Q, W_K, b_K, W_V, b_V, *As_and_Bs = params
        As, Bs = As_and_Bs[:3], As_and_Bs[3:]
        inputs = (query_input, key_input, value_input)
        qkv = [F.linear(x, *_linear_layout(W, b)) for x, (W, b) in zip(inputs, _pairs(params))]
        rows = query_input.shape[0] * query_input.shape[1]
        x_a = query_input.reshape(rows, -1) @ _side_by_side(*As)
        for act, x_a_part, B in zip(qkv, x_a.split(self.widths, 1), Bs):
            n_inst, rank, d_out = B.shape
            x_a_part = x_a_part.view(rows, n_inst, rank).transpose(0, 1)  # [inst, rows, rank]
            act.view(rows, n_inst, d_out).transpose(0, 1).baddbmm_(x_a_part, B, alpha=self.scale)
        return qkv

    def out_hooks(self) -> list[tuple[str, Callable]]:
        """Store z; add `Σ_h (α/r)(z_h A_o[h]) B_o[h]` to attn_out, the sum inside the product."""
        lora_o, i = self.loras[3], self.index

        def store_z(z: Tensor, hook) -> None:
            self.z = z

        def add_out(attn_out: Tensor, hook) -> Tensor:
            z, A, B = self.z, lora_o._parameters["A"], lora_o._parameters["B"]
            n_inst, d_head, rank = A.shape
            rows = attn_out.numel() // attn_out.shape[-1]
            B_all = B.reshape(n_inst * rank, -1)  # [head·rank, d_model]: Σ_h inside the product
            grad = torch.is_grad_enabled()
            if grad:  # the block diagonal's zeros would cost their share again backwards
                z_a = torch.bmm(z.reshape(rows, n_inst, d_head).transpose(0, 1), A)
                z_a = z_a.transpose(0, 1).reshape(rows, n_inst * rank)
            else:
                A_diag = self.kept_outside_autograd("A_o", (A,), _block_diag)
                z_a = z.reshape(rows, n_inst * d_head) @ A_diag
            if (
                grad
                or not attn_out.is_contiguous()
                or (attn_out.is_inference() and not torch.is_inference_mode_enabled())
            ):
                return attn_out + ((z_a @ B_all) * self.scale).view(attn_out.shape)
            attn_out.view(rows, -1).addmm_(z_a, B_all, alpha=self.scale)
            return attn_out

        return [(f"blocks.{i}.attn.hook_z", store_z), (f"blocks.{i}.hook_attn_out", add_out)]


def _pairs(params: tuple[Tensor, ...]) -> list[tuple[Tensor, Tensor]]:
    """(W, b) of q, k and v from `FastLayer.params()`."""
    return [(params[0], params[1]), (params[2], params[3]), (params[4], params[5])]


def _prepare_qkv(*params: Tensor) -> tuple[Tensor, ...]:
    """Everything the q/k/v product needs that changes only with the parameters: `[W_Q | A_q A_k
    A_v]` in `F.linear`'s layout and its bias (zeros for the A columns), K and V's weights in that
    layout, and each adaptor's B as one block-diagonal matrix."""
    (w_q, b_q), (w_k, b_k), (w_v, b_v) = (_linear_layout(W, b) for W, b in _pairs(params))
    As, Bs = params[6:9], params[9:12]
    A = _side_by_side(*As)  # [d_model, inst·rank], every adaptor's instances side by side
    stacked = torch.cat([w_q, A.T], dim=0)
    bias = torch.cat([b_q, b_q.new_zeros(A.shape[1])])
    return (stacked, bias, w_k, b_k, w_v, b_v, *(torch.block_diag(*B) for B in Bs))


def _block_diag(param: Tensor) -> Tensor:
    """`[inst, d_in, d_out]` as one `[inst·d_in, inst·d_out]` matrix, instances on the diagonal."""
    return torch.block_diag(*param)


def _linear_layout(W: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """A `[head, d_model, d_head]` weight and its bias as `F.linear` takes them, as
    TransformerLens' `simple_attn_linear` lays them out (rows ordered (head, d_head))."""
    return W.permute(0, 2, 1).reshape(-1, W.shape[1]), b.reshape(-1)


def _side_by_side(*As: Tensor) -> Tensor:
    """`[inst, d_in, rank]` adaptors as one `[d_in, Σ inst·rank]` matrix."""
    return torch.cat([A.permute(1, 0, 2).flatten(1) for A in As], dim=1)


# ---------------------------------------------------------------------------------------------


def _adaptor_layers(model: nn.Module) -> list[nn.Module]:
    """The model's per-layer adaptors, after checking that the fast path can run them."""
    layers = getattr(model, "lora", None)
    if layers is None or len(layers) != model.cfg.n_layers or not hasattr(model, "lora_fwd_hooks"):
        raise TypeError(
            "fast_lora needs a Section 2 LoRA model (model.lora: one LoraHooks per layer, "
            f"model.lora_fwd_hooks); got {type(model).__name__}"
        )
    if "generate" in model.__dict__:
        raise RuntimeError("fast_lora is installed on this model already")
    cfg = model.cfg
    unsupported = [flag for flag in UNSUPPORTED if getattr(cfg, flag, False)]
    if getattr(cfg, "ungroup_grouped_query_attention", False):
        unsupported.append("ungroup_grouped_query_attention")
    if cfg.positional_embedding_type == "shortformer":  # q/k read x + pos, the hooks' x has none
        unsupported.append("positional_embedding_type='shortformer'")
    if unsupported:
        raise ValueError(
            f"fast_lora does not support cfg.{', cfg.'.join(unsupported)} (TransformerLens then "
            "computes q/k/v another way); run the model with its LoRA hooks instead"
        )
    for i, layer in enumerate(layers):
        loras = [getattr(layer, f"lora_{t}", None) for t in "qkvo"]
        if any(
            getattr(lora, "A", None) is None or getattr(lora, "B", None) is None for lora in loras
        ):
            raise TypeError(f"fast_lora: model.lora[{i}] lacks lora_q/k/v/o with A and B")
        dtypes = {lora.A.dtype for lora in loras} | {model.blocks[i].attn.W_Q.dtype}
        if len(dtypes) != 1:
            raise ValueError(
                f"fast_lora: layer {i}'s adaptors and weights are {sorted(map(str, dtypes))}; "
                "the fast path needs one dtype (build the adaptors with the model's dtype)"
            )
    return list(layers)


def _check_fwd_hooks_read_lora_fwd_hooks(model, fast_hooks, teaching) -> None:
    """The fast path swaps `model.lora_fwd_hooks`; a `fwd_hooks` built another way would still
    run the teaching hooks, and add the adaptors twice."""
    model.lora_fwd_hooks = fast_hooks
    try:
        names = [name for name, _ in model.fwd_hooks]
    except RuntimeError:  # no value head: forward_with_value_head cannot run anyway
        return
    finally:
        model.lora_fwd_hooks = teaching
    if names[: len(fast_hooks)] != [name for name, _ in fast_hooks]:
        raise TypeError(
            "fast_lora: model.fwd_hooks does not start with model.lora_fwd_hooks read at call "
            "time, so the fast path cannot replace the teaching hooks"
        )
