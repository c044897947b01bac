# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     name: python3
# ---

# %% [markdown]
# # Section 2 — LoRA inside RLHF
#
# In Section 1 PPO fine-tuned every weight of the policy, so the KL penalty needed a second,
# frozen copy of the model as the reference policy π_ref. Here we freeze the base weights and
# train only small **low-rank adaptors** (LoRA, Hu et al. 2021) on the attention projections
# W_Q, W_K, W_V and W_O. Because the base weights never change, *the same model with its adaptors
# switched off* is π_ref: one copy of the weights in memory instead of two.
#
# A LoRA adaptor replaces a frozen map `x ↦ x W` by `x ↦ x W + (α/r) · x A B` where
# `A: [d_in, r]` and `B: [r, d_out]` with a small rank `r`. Only A and B are trained.
#
# This file is generated from `src/lora_rlhf/lora.py` (`lora-rlhf sync`); each exercise ends with
# the check that tests it. Run a check by running the cell, or run the pytest suite.

# %%
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import einops
import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens import HookedTransformerConfig
from transformer_lens.hook_points import HookPoint

from lora_rlhf import tests_lora
from lora_rlhf.args import RLHFArgs
from lora_rlhf.models import DEFAULT_MODEL
from lora_rlhf.trainer import RLHFTrainer
from lora_rlhf.value_head import HookedTransformerWithValueHead

FwdHook = tuple[str, Callable]

# %% [markdown]
# ## Exercise 1 — `Lora`: n independent low-rank maps
#
# Build a module holding `n_inst` independent adaptors (one per attention head, later):
#
# * `A: [n_inst, d_in, rank]`, initialised with `nn.init.kaiming_uniform_(A, a=math.sqrt(5))`
#   (the init `nn.Linear` uses), and `B: [n_inst, rank, d_out]`, initialised to **zeros**. With
#   B = 0 the adaptor starts as the identity change: training begins from the pretrained model.
#   (A must not be zero too: then no gradient would ever reach B, nor A.)
# * `forward(x: [..., inst, d_in]) -> [..., n_inst, d_out]` computes `(x @ A) @ B · lora_alpha / rank`
#   for every instance. An `inst` axis of size 1 broadcasts over all instances; any other size
#   that is not `n_inst` is an error. When `dtype` is given, cast `x` to it first.
#
# Why **(xA)B** and never **x(AB)**? `A @ B` is a full `d_in × d_out` matrix: forming it costs
# d_in·r·d_out multiply-adds and d_in·d_out memory, which is what LoRA exists to avoid. Multiplying
# x by A first keeps every intermediate of width r.
#
# **A shared input.** When the `inst` axis is 1 (q, k and v all read the same x), do not copy x
# once per instance: put every A side by side, `[d_in, n_inst·rank]`, and take one matrix product
# `x @ [A_1 … A_n]`, then split its columns back into instances.
#
# Why **no bias**? The frozen layer already has its bias; a trainable one would not be low-rank
# and would double what the adaptor can shift.
#
# Why **α/r**? The scale keeps the size of the update roughly independent of the rank, so the
# learning rate need not be re-tuned when r changes. *Where* you multiply by it is free to choose
# (it is a scalar); the cheapest place is the rank-wide `x @ A`, not the d_out-wide result.
#
# **Every instance at once.** `(x A) B` for all instances is one batched matrix product with the
# instances as its batch: `[inst, N, rank] @ [inst, rank, d_out]` (`torch.bmm`), or the einsum
# `"... inst rank, inst rank d_out -> ... inst d_out"`, which computes the same with more copying.
# The adaptors run inside every forward pass of the policy: on the embedded model these two
# choices cut the time of a layer's six hooks by 8–13% (same outputs, bit for bit;
# docs/benchmarks.md).


# %%
class Lora(nn.Module):
    """`n_inst` independent rank-`rank` adaptors mapping d_in → d_out (scaled by α/r)."""

    def __init__(
        self,
        d_in: int = 768,
        d_out: int = 768,
        rank: int = 4,
        lora_alpha: float = 32,
        n_inst: int | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        _check_positive_int(
            rank=rank, d_in=d_in, d_out=d_out, n_inst=1 if n_inst is None else n_inst
        )
        if not lora_alpha > 0:
            raise ValueError(f"lora_alpha must be > 0, got {lora_alpha!r}")
        # >>> exercise: Lora.__init__ — create A (kaiming-uniform) and B (zeros), store the scale
        self.n_inst = 1 if n_inst is None else n_inst
        self.d_in, self.d_out, self.rank = d_in, d_out, rank
        self.lora_alpha = lora_alpha
        self.scaling = lora_alpha / rank
        self.dtype = dtype
        self.A = nn.Parameter(torch.empty(self.n_inst, d_in, rank, dtype=dtype))
        self.B = nn.Parameter(torch.zeros(self.n_inst, rank, d_out, dtype=dtype))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        # <<< exercise
        self._kept: dict = {}  # what kept_outside_autograd keeps: the block-diagonal A and B

    def forward(self, x: Float[Tensor, "... inst d_in"]) -> Float[Tensor, "... n_inst d_out"]:
        # >>> exercise: Lora.forward — (x @ A) @ B · α/r, one map per instance
        if x.shape[-2] not in (1, self.n_inst):
            raise ValueError(
                f"Lora with n_inst={self.n_inst} got input of shape {tuple(x.shape)}: the "
                f"second-to-last axis must be {self.n_inst} (one input per instance) or 1 (broadcast)."
            )
        if self.dtype is not None:
            x = x.to(self.dtype)
        if x.shape[-2] == 1 < self.n_inst:
            # One x for all instances: one GEMM x @ [A_1 … A_n], not n_inst copies of x (~5× faster).
            A_all = einops.rearrange(self.A, "inst d_in rank -> d_in (inst rank)")
            x_a = einops.rearrange(x @ A_all, "... 1 (inst rank) -> ... inst rank", rank=self.rank)
        else:
            x_a = einops.einsum(x, self.A, "... inst d_in, inst d_in rank -> ... inst rank")
        x_a = x_a * self.scaling  # α/r on the narrow tensor: rank numbers per instance, not d_out
        # (x A) B for all instances in one batched matmul, the instances as its batch:
        # [inst, N, rank] @ [inst, rank, d_out] (an einsum does the same with more copying).
        lead = x_a.shape[:-2]
        x_a = x_a.reshape(-1, self.n_inst, self.rank).transpose(0, 1)
        x_a_b = torch.bmm(x_a, self.B).transpose(0, 1)
        return x_a_b.reshape(*lead, self.n_inst, self.d_out)
        # <<< exercise

    def block_diagonal_A(self) -> Float[Tensor, "inst_d_in inst_rank"]:
        """Every instance's A on the diagonal of one `[inst·d_in, inst·rank]` matrix, zeros
        elsewhere: `x.flatten(-2) @ it` is every instance's `x_i A_i` side by side, in one plain
        matrix product instead of a batched one. Outside autograd kept until A changes."""
        # (`_parameters[...]`, not `self.A`: nn.Module's attribute lookup is a Python call, and
        # this runs in every hook call.)
        return kept_outside_autograd(self._kept, "A", (self._parameters["A"],), _block_diag)

    def block_diagonal_B(self) -> Float[Tensor, "inst_rank inst_d_out"]:
        """Every instance's B on the diagonal of one `[inst·rank, inst·d_out]` matrix:
        `x_a @ it` (x_a: every instance's x A side by side) is every instance's `x_a B` side by
        side. Outside autograd kept until B changes."""
        return kept_outside_autograd(self._kept, "B", (self._parameters["B"],), _block_diag)


def _check_positive_int(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


# %%
if __name__ == "__main__":
    tests_lora.testing_lora(Lora)

# %% [markdown]
# ## Exercise 2 — `LoraHooks`: adaptors on one attention layer, applied through hooks
#
# TransformerLens exposes every intermediate of the attention layer as a hook point. For layer
# `i` we add four `Lora`s and six hooks:
#
# | hook | what it does |
# |---|---|
# | `blocks.{i}.ln1.hook_normalized` | store the attention input x (`store_hook_attn_normalized`) |
# | `blocks.{i}.attn.hook_q` / `hook_k` / `hook_v` | add `lora_q/k/v(x)` to q, k, v (`lora_hook_qkv`) |
# | `blocks.{i}.attn.hook_z` | store z, the per-head attention output (`store_hook_z`) |
# | `blocks.{i}.hook_attn_out` | add `lora_o(z)` summed over heads (`lora_hook_out`) |
#
# Shapes: `lora_q` has one instance per query head and maps d_model → d_head; `lora_o` has one per
# query head and maps d_head → d_model.
#
# **Grouped-query attention.** Models such as Llama and SmolLM2 have fewer key/value heads than
# query heads (SmolLM2: 9 query heads share 3 K/V heads). The real weights `_W_K`, `_W_V` have
# `n_key_value_heads` heads, and `hook_k`/`hook_v` see `[batch, pos, n_key_value_heads, d_head]`
# (the sharing happens after the hook). So `lora_k` and `lora_v` get **`cfg.n_key_value_heads`**
# instances (n_heads when that is None): one adaptor per real K/V weight, not per query head.
#
# **Why sum W_O's adaptor over heads?** Attention's output is `Σ_h z_h W_O[h]`: every head writes
# into the residual stream and the writes add up. The adaptor of W_O[h] must do the same:
# `Σ_h (α/r) z_h A_o[h] B_o[h]`.
#
# **Sum inside the contraction.** You still write this sum, but not as a separate step:
# `lora_o(z)` would return one d_model-wide output *per head*, a `[batch, pos, head, d_model]`
# tensor (n_heads times the size of attn_out), only for it to be summed over `head` at once. Use
# `lora_o`'s A, B and α/r directly instead: first `z_a = z A_o` per head, `[batch, pos, head, rank]`,
# then put the sum into the second contraction,
# `"batch pos head rank, head rank d_model -> batch pos d_model"`: `head` is in both inputs and not
# in the output, so einsum sums over it. It is the same Σ_h, still (xA)B, without materialising
# `[batch, pos, head, d_model]`: one `[.., head·rank] @ [head·rank, d_model]` product. (Cast z to
# the adaptor's dtype first, as `Lora.forward` casts x.)
#
# `lora_hook_qkv` serves three hook points: dispatch on the hook's name (`hook.name` ends with
# `hook_q`, `hook_k` or `hook_v`), and raise `ValueError` for any other name. Hooks that store
# return nothing (the activation is unchanged); hooks that add return the new activation.
#
# **Making the hooks cheap** (read this after a first version works). `qkv + adaptors[kind](x)`
# and the two einsums above are correct, and the checks accept them. But the adaptors run inside
# every forward pass of the policy, and on a CPU what a layer's hooks cost is not their arithmetic
# (2–3% of the layer's) but the number of operations, and the Python around each. Four changes,
# given below as helpers, cut the time spent inside the hooks by about half on the embedded model
# (docs/benchmarks.md):
#
# * **One product for q, k and v.** The three adaptors read the same x, so `shared_x_a` puts their
#   A's side by side, `[d_model, (9 + 3 + 3)·rank]`, and takes `x @ A` once per layer for all
#   three hooks (the first of them computes it, the other two reuse it).
# * **Per-head products as one plain product.** A batched product over the heads that writes into
#   each head's slice of q runs as one small product per head. Put the heads' B's on the diagonal
#   of one `[head·rank, head·d_head]` matrix instead (`Lora.block_diagonal_B`, zeros elsewhere):
#   `x_a @ it` is every head's `x_a B` side by side, in one product. It multiplies the zeros too
#   (9× the arithmetic of the batched product, ~0.6% of the layer's), and is cheaper all the same.
#   W_O's adaptor does the same with A_o (`block_diagonal_A`).
# * **Add inside the matmul.** `add_low_rank_(act, x_a, lora)` computes `act + (α/r)·x_a B` as
#   one `addmm_`: the product is accumulated straight into the activation the hook received, with
#   no temporary and no separate addition. Writing into a hook's activation is safe here: it is
#   the fresh output of a linear map, which autograd does not keep (a hook that kept the same
#   tensor before ours, e.g. a cache's, sees the sum too). `add_matmul_` does the same for W_O's
#   `[N, head·rank] @ [head·rank, d_model]`.
# * **Nothing rebuilt that has not changed.** Outside autograd (sampling, the reference pass) the
#   side-by-side and block-diagonal matrices are kept between forward passes until a parameter
#   changes (`kept_outside_autograd`). Under autograd they are built anew each pass (the graph
#   must reach the parameters), and q, k and v use a batched product instead: the block-diagonal
#   B's zeros would cost their share again in the backward pass.


def add_low_rank_(
    act: Float[Tensor, "... inst d_out"], x_a: Float[Tensor, "n inst_rank"], lora: Lora
) -> Float[Tensor, "... inst d_out"]:
    """`act + (α/r)·(x_a B)` for every instance of `lora`, accumulated into `act` (returned).

    `x_a` is `x @ A` for the n = batch·pos rows of `act`, every instance's `rank` columns side by
    side. Outside autograd: one plain matrix product with `lora.block_diagonal_B()`, accumulated
    into `act` by the product itself (`addmm_`). Under autograd: one batched product with the
    instances as its batch (`baddbmm_`; the block-diagonal B's zeros would cost their share again
    in the backward pass, and the matrix would be rebuilt every forward). A new tensor instead when
    `act` cannot be written (another dtype than the adaptor's, not contiguous, an inference tensor
    outside inference mode, a leaf that needs grad)."""
    rows = x_a.shape[0]
    writable = _writable(act, lora.B.dtype)
    if writable and not torch.is_grad_enabled():
        act.view(rows, -1).addmm_(x_a, lora.block_diagonal_B(), alpha=lora.scaling)
        return act
    # [inst, n, rank] @ [inst, rank, d_out]: the instances as the batch
    x_a = x_a.view(rows, lora.n_inst, lora.rank).transpose(0, 1)
    if writable:
        act.view(rows, lora.n_inst, lora.d_out).transpose(0, 1).baddbmm_(
            x_a, lora.B, alpha=lora.scaling
        )
        return act
    delta = torch.bmm(x_a, lora.B).transpose(0, 1).reshape(act.shape)
    return act + (delta * lora.scaling).to(act.dtype)


def add_matmul_(
    act: Float[Tensor, "... d_out"],
    a: Float[Tensor, "n k"],
    b: Float[Tensor, "k d_out"],
    scale: float,
) -> Float[Tensor, "... d_out"]:
    """`act + scale·(a @ b)`, `act`'s leading axes flattened to the n rows of `a`; accumulated into
    `act` (one `addmm_`) when it can be written, as in `add_low_rank_`."""
    if _writable(act, b.dtype):
        act.view(-1, b.shape[-1]).addmm_(a, b, alpha=scale)
        return act
    return act + (torch.mm(a, b) * scale).reshape(act.shape).to(act.dtype)


def _writable(act: Tensor, dtype: torch.dtype) -> bool:
    if act.dtype != dtype or not act.is_contiguous() or (act.is_leaf and act.requires_grad):
        return False
    return not act.is_inference() or torch.is_inference_mode_enabled()


def kept_outside_autograd(
    kept: dict, name: str, params: tuple[Tensor, ...], build: Callable[..., Tensor]
) -> Tensor:
    """`build(*params)`, kept in `kept[name]` between calls outside autograd until one of `params`
    is replaced or changed in place; under autograd built anew each call (its graph must reach
    the parameters). A change is seen through each tensor's identity, storage and version
    counter, so one made through `.data` (which has a counter of its own) is not."""
    if torch.is_grad_enabled():
        return build(*params)
    key = [torch.is_inference_mode_enabled()]
    try:
        for p in params:  # (a loop, not a comprehension: this runs in every hook call)
            key += (id(p), p.data_ptr(), p._version)
    except RuntimeError:  # inference tensors keep no version counter
        return build(*params)
    entry = kept.get(name)
    if entry is not None and entry[1] == key:  # entry[0] keeps the params alive: ids stay theirs
        return entry[2]
    value = build(*params)
    kept[name] = (params, key, value)
    return value


def _block_diag(param: Float[Tensor, "inst d_in d_out"]) -> Float[Tensor, "inst_d_in inst_d_out"]:
    return torch.block_diag(*param)


def _side_by_side(*As: Float[Tensor, "inst d_in rank"]) -> Float[Tensor, "d_in inst_rank"]:
    return torch.cat([A.permute(1, 0, 2) for A in As], dim=1).flatten(1)


_PLAIN_ATTRIBUTES = frozenset({"attn_normalized", "z", "_x_a"})


# %%
class LoraHooks(nn.Module):
    """LoRA adaptors for W_Q, W_K, W_V and W_O of attention layer `layer_idx`, applied by hooks."""

    def __init__(
        self,
        layer_idx: int,
        cfg: HookedTransformerConfig,
        lora_alpha: float = 32,
        rank: int = 4,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.layer_idx = layer_idx
        # >>> exercise: LoraHooks.__init__ — four Loras (K/V: one per key/value head)
        n_kv_heads = cfg.n_key_value_heads or cfg.n_heads
        self.lora_q = Lora(cfg.d_model, cfg.d_head, rank, lora_alpha, cfg.n_heads, dtype)
        self.lora_k = Lora(cfg.d_model, cfg.d_head, rank, lora_alpha, n_kv_heads, dtype)
        self.lora_v = Lora(cfg.d_model, cfg.d_head, rank, lora_alpha, n_kv_heads, dtype)
        self.lora_o = Lora(cfg.d_head, cfg.d_model, rank, lora_alpha, cfg.n_heads, dtype)
        # <<< exercise
        self.attn_normalized: Float[Tensor, "batch pos d_model"] | None = None
        self.z: Float[Tensor, "batch pos n_heads d_head"] | None = None
        self._x_a: tuple = ()  # (x, grad mode, {kind: x @ A}) of the last shared_x_a
        self._kept: dict = {}  # what kept_outside_autograd keeps: [A_q A_k A_v]

    def __setattr__(self, name: str, value) -> None:
        # What the hooks store runs 4-5 times per layer and forward pass: a plain attribute,
        # without nn.Module's checks for parameters, buffers and modules (a third of a store's time).
        if name in _PLAIN_ATTRIBUTES:
            self.__dict__[name] = value
        else:
            super().__setattr__(name, value)

    def store_hook_attn_normalized(
        self, normalized: Float[Tensor, "batch pos d_model"], hook: HookPoint
    ) -> None:
        # >>> exercise: LoraHooks.store_hook_attn_normalized — keep the attention input
        self.attn_normalized = normalized
        # <<< exercise

    def store_hook_z(self, z: Float[Tensor, "batch pos n_heads d_head"], hook: HookPoint) -> None:
        # >>> exercise: LoraHooks.store_hook_z — keep z
        self.z = z
        # <<< exercise

    def lora_hook_qkv(
        self, qkv: Float[Tensor, "batch pos head d_head"], hook: HookPoint
    ) -> Float[Tensor, "batch pos head d_head"]:
        # >>> exercise: LoraHooks.lora_hook_qkv — add lora_q/k/v of the stored input, by hook name
        adaptors = {"hook_q": self.lora_q, "hook_k": self.lora_k, "hook_v": self.lora_v}
        kind = hook.name.rsplit(".", 1)[-1]
        if kind not in adaptors:
            raise ValueError(f"lora_hook_qkv is for hook_q/hook_k/hook_v, not {hook.name!r}")
        x_a = self.shared_x_a()[kind]  # x @ A of this adaptor: [batch·pos, inst·rank]
        return add_low_rank_(qkv, x_a, adaptors[kind])
        # <<< exercise

    def lora_hook_out(
        self, attn_out: Float[Tensor, "batch pos d_model"], hook: HookPoint
    ) -> Float[Tensor, "batch pos d_model"]:
        # >>> exercise: LoraHooks.lora_hook_out — add lora_o(z) summed over heads, inside the contraction
        lora_o = self.lora_o
        z = self.z.to(lora_o.A.dtype)
        # z_h A_o[h] for every head at once: z's heads side by side, [batch·pos, head·d_head],
        # times A_o's heads on a block diagonal gives [batch·pos, head·rank], heads side by side.
        z_a = z.reshape(-1, lora_o.n_inst * lora_o.d_in) @ lora_o.block_diagonal_A()
        # Σ_heads inside the contraction: [batch·pos, head·rank] @ [head·rank, d_model],
        # added into attn_out.
        return add_matmul_(attn_out, z_a, lora_o.B.reshape(-1, lora_o.d_out), lora_o.scaling)
        # <<< exercise

    def shared_x_a(self) -> dict[str, Float[Tensor, "n inst_rank"]]:
        """`x @ A` of lora_q, lora_k and lora_v for the stored input x, by hook kind, each
        `[batch·pos, inst·rank]` (every instance's rank columns side by side; α/r not yet applied):
        one matrix product `x @ [A_q A_k A_v]` for all three, taken by the first of the three
        hooks and reused by the other two (the same stored x, the same grad mode). Outside
        autograd `[A_q A_k A_v]` is kept between forward passes until an A changes."""
        x = self.attn_normalized
        grad = torch.is_grad_enabled()
        kept = self._x_a
        if kept and kept[0] is x and kept[1] is grad:
            return kept[2]
        loras = (self.lora_q, self.lora_k, self.lora_v)
        As = tuple([lora._parameters["A"] for lora in loras])
        A = kept_outside_autograd(self._kept, "A_qkv", As, _side_by_side)
        rows = x.reshape(-1, x.shape[-1])
        x_a = (rows if rows.dtype == A.dtype else rows.to(A.dtype)) @ A
        widths = [lora.n_inst * lora.rank for lora in loras]
        parts = dict(zip(("hook_q", "hook_k", "hook_v"), x_a.split_with_sizes(widths, 1)))
        self._x_a = (x, grad, parts)
        return parts

    def list_fwd_hooks(self) -> list[FwdHook]:
        """The six `(hook_name, fn)` pairs of this layer, in the order the forward pass meets them."""
        # >>> exercise: LoraHooks.list_fwd_hooks — six (name, fn) pairs
        i = self.layer_idx
        return [
            (f"blocks.{i}.ln1.hook_normalized", self.store_hook_attn_normalized),
            (f"blocks.{i}.attn.hook_q", self.lora_hook_qkv),
            (f"blocks.{i}.attn.hook_k", self.lora_hook_qkv),
            (f"blocks.{i}.attn.hook_v", self.lora_hook_qkv),
            (f"blocks.{i}.attn.hook_z", self.store_hook_z),
            (f"blocks.{i}.hook_attn_out", self.lora_hook_out),
        ]
        # <<< exercise


# %%
if __name__ == "__main__":
    tests_lora.testing_lora_hooks(LoraHooks)
    tests_lora.testing_lora_hooks_qkv_dispatch_and_out(LoraHooks)

# %% [markdown]
# ## Exercise 3 — `TransformerWithValueHeadLora`: the policy, its value head and its reference
#
# Subclass Section 1's `HookedTransformerWithValueHead`:
#
# * `from_pretrained(name, lora_alpha, rank, ...)` loads the model, **freezes every base
#   parameter**, then calls `setup_lora`.
# * `setup_lora(lora_alpha, rank)` builds `self.lora` (an `nn.ModuleList` of one `LoraHooks` per
#   layer, on the model's device) and `self.lora_fwd_hooks` (all their hooks).
# * `fwd_hooks` (a property, read at call time) is the LoRA hooks followed by the value-head hook,
#   so the inherited `forward_with_value_head` runs the policy with its adaptors.
# * `generate(...)` runs the base class's generate with the LoRA hooks, so samples come from the
#   adapted policy. Use `with self.hooks(fwd_hooks=...)`: hooks never outlive the call, even when
#   it raises.
# * `base_model_params()`, `lora_params()`, and `get_base_model_trainable_params()`, which returns
#   the LoRA parameters, so Section 1's optimizer trains only LoRA + value head.
#
# **Why no second model?** Plain `forward` runs without any hook: it *is* the frozen base model,
# π_ref. The KL penalty compares the hooked forward (π) with the plain forward (π_ref) of one model.


# %%
class TransformerWithValueHeadLora(HookedTransformerWithValueHead):
    """The value-head model with LoRA adaptors on every attention layer; base weights frozen."""

    lora: nn.ModuleList
    lora_fwd_hooks: list[FwdHook]

    @classmethod
    def from_pretrained(
        cls,
        name: str = DEFAULT_MODEL,
        lora_alpha: float = 32,
        rank: int = 4,
        use_value_head: bool = True,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        **kwargs,
    ) -> TransformerWithValueHeadLora:
        """Load `name`, freeze its weights and add rank-`rank` adaptors to every attention layer."""
        _check_positive_int(rank=rank)
        if not lora_alpha > 0:
            raise ValueError(f"lora_alpha must be > 0, got {lora_alpha!r}")
        # >>> exercise: TransformerWithValueHeadLora.from_pretrained — load, freeze, set up LoRA
        model = super().from_pretrained(
            name, use_value_head=use_value_head, device=device, dtype=dtype, **kwargs
        )
        for param in model.base_model_params():
            param.requires_grad_(False)
        model.setup_lora(lora_alpha, rank)
        return model
        # <<< exercise

    def setup_lora(self, lora_alpha: float = 32, rank: int = 4) -> None:
        # >>> exercise: TransformerWithValueHeadLora.setup_lora — one LoraHooks per layer
        self.lora = nn.ModuleList(
            LoraHooks(i, self.cfg, lora_alpha, rank, dtype=self.cfg.dtype)
            for i in range(self.cfg.n_layers)
        ).to(self.cfg.device)
        self.lora_fwd_hooks = [hook for layer in self.lora for hook in layer.list_fwd_hooks()]
        # <<< exercise

    @property
    def fwd_hooks(self) -> list[FwdHook]:
        # >>> exercise: TransformerWithValueHeadLora.fwd_hooks — LoRA hooks, then the value-head hook
        return [*self.lora_fwd_hooks, self.value_head_hook]
        # <<< exercise

    def generate(self, *args, **kwargs):
        """The base class's `generate`, run with the LoRA hooks (same arguments)."""
        # >>> exercise: TransformerWithValueHeadLora.generate — base generate under the LoRA hooks
        with self.hooks(fwd_hooks=self.lora_fwd_hooks):
            return super().generate(*args, **kwargs)
        # <<< exercise

    def base_model_params(self) -> list[nn.Parameter]:
        # >>> exercise: TransformerWithValueHeadLora.base_model_params — all but LoRA and value head
        return [p for n, p in self.named_parameters() if not n.startswith(("lora.", "value_head."))]
        # <<< exercise

    def lora_params(self) -> list[nn.Parameter]:
        # >>> exercise: TransformerWithValueHeadLora.lora_params — every adaptor parameter
        return list(self.lora.parameters())
        # <<< exercise

    def get_base_model_trainable_params(self) -> list[nn.Parameter]:
        # >>> exercise: TransformerWithValueHeadLora.get_base_model_trainable_params — LoRA only
        return self.lora_params()
        # <<< exercise


# %%
if __name__ == "__main__":
    _model = TransformerWithValueHeadLora.from_pretrained("tiny-llama")
    tests_lora.test_lora_fwd_hooks_list(_model)
    tests_lora.test_lora_model_forward_methods(_model)

# %% [markdown]
# ## Exercise 4 — train with LoRA, using the same model as the reference policy
#
# `RLHFArgsLora` adds the adaptor's rank, α and dtype. `RLHFTrainerLora` builds a
# `TransformerWithValueHeadLora` and returns **the same object** as the reference model: the
# trainer computes reference logits with the model's plain `forward`, which has no adaptors.


# %%
@dataclass
class RLHFArgsLora(RLHFArgs):
    lora_rank: int = 4
    lora_alpha: float = 32
    dtype: torch.dtype | None = None

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.lora_rank, int) or self.lora_rank < 1:
            raise ValueError(f"lora_rank must be a positive integer, got {self.lora_rank!r}")
        if not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha must be > 0, got {self.lora_alpha!r}")


class RLHFTrainerLora(RLHFTrainer):
    """PPO-RLHF training only the adaptors and the value head; one copy of the base weights."""

    model_class: type[TransformerWithValueHeadLora] = TransformerWithValueHeadLora

    def build_model(self) -> TransformerWithValueHeadLora:
        args = self.args
        # >>> exercise: RLHFTrainerLora.build_model — the LoRA policy with its value head
        return self.model_class.from_pretrained(
            args.base_model,
            lora_alpha=args.lora_alpha,
            rank=args.lora_rank,
            device=self.device,
            dtype=args.dtype,
        )
        # <<< exercise

    def build_ref_model(self) -> TransformerWithValueHeadLora:
        # >>> exercise: RLHFTrainerLora.build_ref_model — no copy: the same model
        return self.model
        # <<< exercise
