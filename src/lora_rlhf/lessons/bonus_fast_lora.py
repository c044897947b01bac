# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     name: python3
# ---

# %% [markdown]
# # Bonus — Making LoRA fast
#
# Section 2's hooks compute the right function, plainly: per layer and forward pass, each of
# `lora_q`, `lora_k` and `lora_v` multiplies x by its A, then every head's `x A` by that head's B,
# and `lora_o` does the same per head. The arithmetic is tiny (rank 4 against d_model 576); what
# costs is the *number* of small operations. The library's fast path (`lora-rlhf train --impl
# library`) computes the same function with fewer, larger ones. This bonus teaches its three
# ideas, one exercise each, then puts two of them into hooks:
#
# 1. **one product for q, k and v** — x is multiplied once, by all three A's side by side;
# 2. **every head in one product** — the heads' matrices on the diagonal of one matrix;
# 3. **the adaptors inside W_Q's own product** — x A comes out of the product that computes q.
#
# Each check compares your function with a direct formula in float64 and **counts** the matrix
# products it takes, with `lora_rlhf.checks.fast_bonus_checks.ProductCounter` (a batched product
# of n matrices counts n). Counting, not timing: a count is exact and the same on every machine;
# a timing on a shared laptop is not.
#
# The bonus is not part of the graded exercises (its checks carry no points). Do Section 2 first:
# the last exercise builds on the library's `LoraHooks`.
#
# This file is generated from `src/lora_rlhf/lessons/bonus_fast_lora.py` (`lora-rlhf sync`).

# %%
from __future__ import annotations

import os

import einops
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformerConfig
from transformer_lens.hook_points import HookPoint

from lora_rlhf.lessons.section2_lora import LoraHooks
from lora_rlhf.models import DEFAULT_MODEL

# %% tags=["parameters"]
# The model of the comparison at the end: the embedded model by default. For a quick run set
# the environment variable LORA_RLHF_NOTEBOOK_MODEL=tiny-llama, or change it here.
NOTEBOOK_MODEL = os.environ.get("LORA_RLHF_NOTEBOOK_MODEL", DEFAULT_MODEL)

# %% [markdown]
# ## Exercise F1 — one product for q, k and v
#
# `lora_q`, `lora_k` and `lora_v` all read the same x, the attention input. Multiplying x by each
# A on its own takes three products. Lay every instance's `[d_model, rank]` block of the three A's
# side by side instead, `[d_model, (n_q + n_k + n_v)·rank]`, take **one** product `x @ [A_q A_k A_v]`,
# and split its columns back: first A_q's instances, then A_k's, then A_v's.
#
# `qkv_x_a(x, A_q, A_k, A_v)` returns `(x A_q, x A_k, x A_v)`, each `[batch, pos, inst, rank]`,
# with one matrix product in all. `einops.rearrange(A, "inst d_model rank -> d_model (inst rank)")`
# lays out one A; `torch.cat` puts them side by side; `Tensor.split` cuts the result.


# %%
def qkv_x_a(
    x: Float[Tensor, "batch pos d_model"],
    A_q: Float[Tensor, "n_q d_model rank"],
    A_k: Float[Tensor, "n_k d_model rank"],
    A_v: Float[Tensor, "n_v d_model rank"],
) -> tuple[Tensor, Tensor, Tensor]:
    """`x A` of the q, k and v adaptors, each `[batch, pos, inst, rank]`, from one product."""
    # >>> exercise: qkv_x_a — x @ [A_q A_k A_v] in one product, then split per adaptor and instance
    As = (A_q, A_k, A_v)
    side_by_side = torch.cat(
        [einops.rearrange(A, "inst d_model rank -> d_model (inst rank)") for A in As], dim=1
    )
    x_a = x @ side_by_side
    parts = x_a.split([A.shape[0] * A.shape[2] for A in As], dim=-1)
    return tuple(
        einops.rearrange(part, "... (inst rank) -> ... inst rank", inst=A.shape[0])
        for part, A in zip(parts, As)
    )
    # <<< exercise


# %%
if __name__ == "__main__":
    from lora_rlhf.checks import fast_bonus_checks

    fast_bonus_checks.testing_qkv_x_a(qkv_x_a)

# %% [markdown]
# ## Exercise F2 — every head in one product: block-diagonal matrices
#
# Each head h still needs its own `(x A)_h B_h`. A batched product over the heads does that, but
# runs as one small product per head (9 for SmolLM2's q). Put the heads' matrices on the diagonal
# of one matrix, zeros elsewhere:
#
#     block_diagonal(B) = [[B_0,  0 , …],
#                          [ 0 , B_1, …],      # [inst·rank, inst·d_out]
#                          [ …         ]]
#
# Then `x A` with its heads side by side, `[N, inst·rank]`, times `block_diagonal(B)` is every
# head's `(x A)_h B_h` side by side: **one** product. It multiplies the zeros too (inst times the
# arithmetic); at rank 4 that is still a small product, and one beats nine.
#
# W_O's adaptor uses the same idea from the other side: z's heads side by side, `[N, head·d_head]`,
# times `block_diagonal(A_o)` is every head's `z_h A_o[h]`; and the sum over heads,
# Σ_h (z_h A_o[h]) B_o[h], is one product with the B's stacked *on top of each other*,
# `[head·rank, d_model]`: the contraction sums over heads and rank together. Two products in all.
#
# Write `block_diagonal(M)` (`torch.block_diag` may help), `heads_x_a_b(x_a, B, scale)` (one
# product) and `out_delta(z, A_o, B_o, scale)` (two products).


# %%
def block_diagonal(M: Float[Tensor, "inst a b"]) -> Float[Tensor, "inst_a inst_b"]:
    """The instances of `M` on the diagonal of one `[inst·a, inst·b]` matrix, zeros elsewhere."""
    # >>> exercise: block_diagonal — M[0], M[1], … on the diagonal, zeros elsewhere
    return torch.block_diag(*M)
    # <<< exercise


def heads_x_a_b(
    x_a: Float[Tensor, "... inst rank"], B: Float[Tensor, "inst rank d_out"], scale: float
) -> Float[Tensor, "... inst d_out"]:
    """`scale·(x A)_h B_h` for every instance h, as one product with `block_diagonal(B)`."""
    # >>> exercise: heads_x_a_b — x_a's instances side by side, times block_diagonal(B), in one product
    inst, d_out = B.shape[0], B.shape[2]
    side_by_side = einops.rearrange(x_a, "... inst rank -> ... (inst rank)")
    x_a_b = (side_by_side * scale) @ block_diagonal(B)
    return einops.rearrange(x_a_b, "... (inst d_out) -> ... inst d_out", inst=inst, d_out=d_out)
    # <<< exercise


def out_delta(
    z: Float[Tensor, "... head d_head"],
    A_o: Float[Tensor, "head d_head rank"],
    B_o: Float[Tensor, "head rank d_model"],
    scale: float,
) -> Float[Tensor, "... d_model"]:
    """`scale·Σ_h (z_h A_o[h]) B_o[h]`, in two products."""
    # >>> exercise: out_delta — z @ block_diagonal(A_o), then @ B_o stacked [head·rank, d_model]
    z_a = einops.rearrange(z, "... head d_head -> ... (head d_head)") @ block_diagonal(A_o)
    stacked = einops.rearrange(B_o, "head rank d_model -> (head rank) d_model")
    return (z_a * scale) @ stacked
    # <<< exercise


# %%
if __name__ == "__main__":
    from lora_rlhf.checks import fast_bonus_checks

    fast_bonus_checks.testing_block_diagonal(block_diagonal, heads_x_a_b, out_delta)

# %% [markdown]
# ## Exercise F3 — the adaptors inside W_Q's own product
#
# TransformerLens computes `q = x W_Q + b_Q` as one product over all heads, W_Q's heads side by
# side, `[d_model, n_heads·d_head]`. F1's `x @ [A_q A_k A_v]` is a second product reading the same
# x. Stack both matrices, `[W_Q | A_q A_k A_v]`, and **one** product gives q and every `x A`
# together: its first `n_heads·d_head` columns are q (add b_Q to those only), the rest are F1's.
# The library's fast path does this inside the attention layer, so the hook that stores x and the
# separate product disappear.
#
# `q_and_x_a(x, W_Q, b_Q, A_q, A_k, A_v)` returns `(q, (x A_q, x A_k, x A_v))`, q as
# `[batch, pos, n_heads, d_head]`: one matrix product in all. (`torch.addmm` adds a bias inside
# the product; pad b_Q with zeros for the A columns.)


# %%
def q_and_x_a(
    x: Float[Tensor, "batch pos d_model"],
    W_Q: Float[Tensor, "n_heads d_model d_head"],
    b_Q: Float[Tensor, "n_heads d_head"],
    A_q: Float[Tensor, "n_q d_model rank"],
    A_k: Float[Tensor, "n_k d_model rank"],
    A_v: Float[Tensor, "n_v d_model rank"],
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """q = x W_Q + b_Q and the three adaptors' `x A`, from one product with `[W_Q | A_q A_k A_v]`."""
    # >>> exercise: q_and_x_a — one product with [W_Q | A_q A_k A_v], q's columns get b_Q
    n_heads, d_head = b_Q.shape
    As = (A_q, A_k, A_v)
    a_columns = [einops.rearrange(A, "inst d_model rank -> d_model (inst rank)") for A in As]
    stacked = torch.cat(
        [einops.rearrange(W_Q, "head d_model d_head -> d_model (head d_head)"), *a_columns], dim=1
    )
    bias = torch.cat([b_Q.flatten(), b_Q.new_zeros(stacked.shape[1] - n_heads * d_head)])
    out = torch.addmm(bias, x.reshape(-1, x.shape[-1]), stacked).reshape(*x.shape[:-1], -1)
    q, *parts = out.split([n_heads * d_head] + [a.shape[1] for a in a_columns], dim=-1)
    x_a = tuple(
        einops.rearrange(part, "... (inst rank) -> ... inst rank", inst=A.shape[0])
        for part, A in zip(parts, As)
    )
    return einops.rearrange(q, "... (head d_head) -> ... head d_head", head=n_heads), x_a
    # <<< exercise


# %%
if __name__ == "__main__":
    from lora_rlhf.checks import fast_bonus_checks

    fast_bonus_checks.testing_q_and_x_a(q_and_x_a)

# %% [markdown]
# ## Exercise F4 — fast hooks: F1 and F2 inside a layer
#
# Subclass Section 2's `LoraHooks` (same adaptors, same six hooks) and make the three adding
# hooks cheap:
#
# * `lora_hook_qkv`: the first of the q/k/v hooks to run after a new x was stored computes F1's
#   `qkv_x_a` for all three adaptors and keeps it (`self.x_a`); each hook then adds its
#   adaptor's `heads_x_a_b`. Careful: TransformerLens normalises x once for each of q, k and v, so
#   the store hook runs three times before `hook_q` — computing x A in the store hook would take
#   three products again. Here the store hook only forgets the old `x_a` (given).
# * `lora_hook_out`: add F2's `out_delta` of the stored z.
#
# Per layer that is 1 + 3 + 2 = 6 matrix products for all four adaptors. The scale α/r is
# `self.scale` (given). The last cell counts the products of one forward pass on
# `NOTEBOOK_MODEL` with Section 2's hooks and with yours.


# %%
class FastLoraHooks(LoraHooks):
    """Section 2's adaptors and hooks, computed with one product for q/k/v and block diagonals."""

    def __init__(
        self,
        layer_idx: int,
        cfg: HookedTransformerConfig,
        lora_alpha: float = 32,
        rank: int = 4,
        dtype: torch.dtype | None = None,
    ):
        super().__init__(layer_idx, cfg, lora_alpha, rank, dtype)
        self.scale = self.lora_alpha / self.rank
        self.x_a: dict[str, Tensor] | None = None

    def store_hook_attn_normalized(
        self, normalized: Float[Tensor, "batch pos d_model"], hook: HookPoint
    ) -> None:
        super().store_hook_attn_normalized(normalized, hook)
        self.x_a = None  # a new x: its x A is computed by the next q/k/v hook

    def lora_hook_qkv(
        self, qkv: Float[Tensor, "batch pos head d_head"], hook: HookPoint
    ) -> Float[Tensor, "batch pos head d_head"]:
        kind = hook.name.split(".")[-1]
        adaptors = {"hook_q": self.lora_q, "hook_k": self.lora_k, "hook_v": self.lora_v}
        if kind not in adaptors:
            raise ValueError(f"lora_hook_qkv serves hook_q, hook_k and hook_v, not {hook.name!r}")
        # >>> exercise: FastLoraHooks.lora_hook_qkv — x A once per x (qkv_x_a), then heads_x_a_b
        if self.x_a is None:
            x = self.cache_qkv_in.to(self.lora_q.A.dtype)
            parts = qkv_x_a(x, self.lora_q.A, self.lora_k.A, self.lora_v.A)
            self.x_a = dict(zip(adaptors, parts))
        delta = heads_x_a_b(self.x_a[kind], adaptors[kind].B, self.scale)
        return qkv + delta.to(qkv.dtype)
        # <<< exercise

    def lora_hook_out(
        self, attn_out: Float[Tensor, "batch pos d_model"], hook: HookPoint
    ) -> Float[Tensor, "batch pos d_model"]:
        # >>> exercise: FastLoraHooks.lora_hook_out — add out_delta of the stored z
        z = self.cache_z.to(self.lora_o.A.dtype)
        return attn_out + out_delta(z, self.lora_o.A, self.lora_o.B, self.scale).to(attn_out.dtype)
        # <<< exercise


# %%
if __name__ == "__main__":
    from lora_rlhf.checks import fast_bonus_checks

    fast_bonus_checks.testing_fast_lora_hooks(FastLoraHooks)
    fast_bonus_checks.compare_products(NOTEBOOK_MODEL, LoraHooks, FastLoraHooks)
