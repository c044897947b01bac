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
# **By the end of this section you can:**
# * explain why a fine-tuning update can be low-rank, and write a LoRA adaptor `(α/r)·x A B`;
# * apply adaptors to a frozen TransformerLens model through hooks, grouped-query attention included;
# * use *one* model as both the policy (adaptors on) and PPO's reference policy (adaptors off);
# * train the adaptors with Section 1's PPO loop, and merge them into the weights afterwards.
#
# Section 1's PPO tuned every weight, so its KL penalty needed a second, frozen copy of the model
# as the reference policy π_ref. Here the base weights stay frozen and only small **low-rank
# adaptors** (LoRA, Hu et al. 2021) on W_Q, W_K, W_V and W_O train: a frozen map `x ↦ x W` becomes
# `x ↦ x W + (α/r)·x A B`, with `A: [d_in, r]`, `B: [r, d_out]` and a small rank r. With its
# adaptors switched off the model *is* π_ref: one copy of the weights in memory instead of two.
#
# **Why can the update be low-rank?** A pretrained model already holds the features a new task
# needs; fine-tuning mostly re-weights a few directions, and W_tuned − W is close to low rank
# (Aghajanyan et al. 2020, "intrinsic dimension"; Hu et al. 2021). So A B of rank r ≪ d (here r = 4,
# d = 576) can stand in for it: r·(d_in + d_out) trained numbers per matrix, not d_in·d_out.
#
# **Merging: inference for free.** After training, `W + (α/r) A B` is one matrix of W's shape:
# merged into the weights (`lora_rlhf.adapters.merge`), the tuned model is as fast as the base one.
# In training they stay apart: switching the adaptors off is what gives us π_ref.
#
# You write the eight methods that raise `NotImplementedError`; each exercise ends with the cell
# that checks it. (Generated from `src/lora_rlhf/lessons/section2_lora.py` by `lora-rlhf sync`.)

# %%
from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens import HookedTransformerConfig
from transformer_lens.hook_points import HookPoint

from lora_rlhf.models import DEFAULT_MODEL
from lora_rlhf.models.devices import default_device
from lora_rlhf.rlhf.args import RLHFArgs, check_lora_settings
from lora_rlhf.rlhf.ppo import get_optimizer_and_scheduler
from lora_rlhf.rlhf.trainer import RLHFTrainer
from lora_rlhf.rlhf.value_head import HookedTransformerWithValueHead

FwdHook = tuple[str, Callable]
device = default_device()


# %% tags=["parameters"]
# The smoke run's model at the end: the embedded one (LORA_RLHF_NOTEBOOK_MODEL=tiny-llama: quicker).
NOTEBOOK_MODEL = os.environ.get("LORA_RLHF_NOTEBOOK_MODEL", DEFAULT_MODEL)


# %% [markdown]
# ## Exercise 1 — `Lora`: n independent low-rank maps
#
# `n_inst` independent adaptors (later: one per attention head). `__init__` is given up to the
# sizes it keeps (the fast path, merging and saving read them by these names). You write:
#
# * `A: [n_inst, d_in, rank]` (init `nn.init.kaiming_uniform_(A, a=math.sqrt(5))`, as `nn.Linear`)
#   and `B: [n_inst, rank, d_out]` of **zeros**, both of `dtype`: the adaptor starts as no change,
#   so training begins from the pretrained model (a zero A too would stop every gradient);
# * `forward(x: [..., inst, d_in]) -> [..., n_inst, d_out]`: `(x @ A) @ B · lora_alpha / rank` per
#   instance (two `einops.einsum`s; cast `x` to the parameters' dtype first). An `inst` axis of
#   size 1 is one input for every instance (broadcast it); any other size but `n_inst` is an error.
#
# **Why (xA)B, never x(AB)?** `A @ B` is a full `d_in × d_out` matrix (d_in·r·d_out multiply-adds,
# d_in·d_out memory): what LoRA exists to avoid. x A first keeps every intermediate r wide.
#
# **Why no bias?** The frozen layer has its bias; a trainable one would not be low-rank. **Why
# α/r?** It keeps the update's size roughly independent of r: no new learning rate for a new rank.


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
        self.rank = rank
        self.d_in = d_in
        self.d_out = d_out
        self.n_inst = 1 if n_inst is None else n_inst
        self.lora_alpha = lora_alpha
        self.dtype = dtype
        check_lora_settings(lora_alpha, d_in=d_in, d_out=d_out, rank=rank, n_inst=self.n_inst)
        # >>> exercise: Lora.__init__ — the parameters A (kaiming-uniform) and B (zeros)
        self.A = nn.Parameter(torch.empty(self.n_inst, d_in, rank, dtype=dtype))
        self.B = nn.Parameter(torch.zeros(self.n_inst, rank, d_out, dtype=dtype))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        # <<< exercise

    def forward(self, x: Float[Tensor, "... inst d_in"]) -> Float[Tensor, "... n_inst d_out"]:
        # >>> exercise: Lora.forward — (x @ A) @ B · α/r, one map per instance
        if x.shape[-2] not in (1, self.n_inst):
            raise ValueError(
                f"Lora with {self.n_inst} instances got an input of shape {tuple(x.shape)}: its "
                f"second-to-last axis must be {self.n_inst} (one input per instance) or 1 (broadcast)"
            )
        x = x.to(self.A.dtype)
        x_a = einops.einsum(x, self.A, "... inst d_in, inst d_in rank -> ... inst rank")
        x_a_b = einops.einsum(x_a, self.B, "... inst rank, inst rank d_out -> ... inst d_out")
        return x_a_b * (self.lora_alpha / self.rank)
        # <<< exercise


# %%
if __name__ == "__main__":
    from lora_rlhf import tests_lora

    tests_lora.testing_lora(Lora)

# %% [markdown]
# ## Exercise 2 — `LoraHooks`: adaptors on one attention layer, applied through hooks
#
# TransformerLens exposes every intermediate of attention as a hook point. Layer `i` gets four
# `Lora`s and six hooks:
#
# | hook | what it does |
# |---|---|
# | `blocks.{i}.ln1.hook_normalized` | store the attention input x in `cache_qkv_in` (given) |
# | `blocks.{i}.attn.hook_q` / `hook_k` / `hook_v` | add `lora_q/k/v(x)` to q, k, v (`lora_hook_qkv`) |
# | `blocks.{i}.attn.hook_z` | store z, the per-head attention output, in `cache_z` (given) |
# | `blocks.{i}.hook_attn_out` | add `lora_o(z)` summed over heads (`lora_hook_out`) |
#
# Given: the sizes, the two store hooks (returning nothing, they leave the activation as is) and
# `list_fwd_hooks`. You write the four adaptors (`lora_q`, `lora_o`: one instance per query head,
# d_model → d_head and d_head → d_model) and the two adding hooks, which return the new activation;
# `lora_hook_qkv` dispatches on `hook.name` (`hook_q`, `hook_k`, `hook_v`; else a `ValueError`).
#
# **Grouped-query attention.** Llama and SmolLM2 have fewer key/value heads than query heads
# (SmolLM2: 9 query heads share 3 K/V heads). The real weights `_W_K`, `_W_V` have
# `n_key_value_heads` heads; `W_K`, `W_V` repeat them to one per query head, and `hook_k`/`hook_v`
# see `[batch, pos, n_key_value_heads, d_head]` (the sharing comes after the hook). So `lora_k`
# and `lora_v` get **`n_kv_heads`** instances, one per real K/V weight (the next cell shows both).
# q, k and v all read the same x: as `[batch, pos, 1, d_model]`, `Lora` broadcasts it over heads.
#
# **Why sum W_O over heads?** Attention's output is `Σ_h z_h W_O[h]`: every head writes into the
# residual stream and the writes add up. So the adaptor adds `Σ_h (α/r) z_h A_o[h] B_o[h]`, that
# is `lora_o(z)` summed over its head axis (or the sum inside the second contraction,
# `"... head rank, head rank d_model -> ... d_model"`, never forming per-head outputs).
#
# **Why only attention?** The LoRA paper adapted only the attention projections and found it
# enough for many tasks; it keeps this section short. The MLP holds most of the weights and adapting
# it often helps: the bonus *LoRA on the MLP*. Cheap hooks are the bonus *Making LoRA fast*.

# %%
if __name__ == "__main__":
    _demo = HookedTransformerWithValueHead.from_pretrained(NOTEBOOK_MODEL, use_value_head=False)
    _attn, _cfg = _demo.blocks[0].attn, _demo.cfg
    print(f"{NOTEBOOK_MODEL}: {_cfg.n_heads} query heads, {_cfg.n_key_value_heads} K/V heads")
    print("the real K weight _W_K:", tuple(getattr(_attn, "_W_K", _attn.W_K).shape))
    print("W_K, one per query head:", tuple(_attn.W_K.shape))
    del _demo, _attn, _cfg


# %%
class LoraHooks(nn.Module):
    """LoRA adaptors for W_Q, W_K, W_V and W_O of attention layer `layer_idx`, applied by hooks."""

    # What the store hooks keep for the adding hooks of the same forward pass.
    cache_qkv_in: Float[Tensor, "batch pos d_model"] | None = None
    cache_z: Float[Tensor, "batch pos n_heads d_head"] | None = None

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
        self.rank = rank
        self.lora_alpha = lora_alpha
        self.dtype = dtype
        self.n_qo_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_key_value_heads or cfg.n_heads
        # >>> exercise: LoraHooks.__init__ — lora_q, lora_k, lora_v, lora_o (K/V: n_kv_heads)
        self.lora_q = Lora(cfg.d_model, cfg.d_head, rank, lora_alpha, self.n_qo_heads, dtype)
        self.lora_k = Lora(cfg.d_model, cfg.d_head, rank, lora_alpha, self.n_kv_heads, dtype)
        self.lora_v = Lora(cfg.d_model, cfg.d_head, rank, lora_alpha, self.n_kv_heads, dtype)
        self.lora_o = Lora(cfg.d_head, cfg.d_model, rank, lora_alpha, self.n_qo_heads, dtype)
        # <<< exercise

    def store_hook_attn_normalized(
        self, normalized: Float[Tensor, "batch pos d_model"], hook: HookPoint
    ) -> None:
        self.cache_qkv_in = normalized

    def store_hook_z(self, z: Float[Tensor, "batch pos n_heads d_head"], hook: HookPoint) -> None:
        self.cache_z = z

    def lora_hook_qkv(
        self, qkv_hook_out: Float[Tensor, "batch pos head d_head"], hook: HookPoint
    ) -> Float[Tensor, "batch pos head d_head"]:
        # >>> exercise: LoraHooks.lora_hook_qkv — add lora_q/k/v of the stored input, by hook name
        adaptors = {"hook_q": self.lora_q, "hook_k": self.lora_k, "hook_v": self.lora_v}
        kind = hook.name.split(".")[-1]
        if kind not in adaptors:
            raise ValueError(f"lora_hook_qkv serves hook_q, hook_k and hook_v, not {hook.name!r}")
        x = einops.rearrange(self.cache_qkv_in, "batch pos d_model -> batch pos 1 d_model")
        return qkv_hook_out + adaptors[kind](x)
        # <<< exercise

    def lora_hook_out(
        self, attn_out: Float[Tensor, "batch pos d_model"], hook: HookPoint
    ) -> Float[Tensor, "batch pos d_model"]:
        # >>> exercise: LoraHooks.lora_hook_out — add lora_o(z) summed over heads
        per_head = self.lora_o(self.cache_z)  # [batch, pos, head, d_model]
        return attn_out + per_head.sum(dim=-2)
        # <<< exercise

    def list_fwd_hooks(self) -> list[FwdHook]:
        """The six `(hook_name, fn)` pairs of this layer, in the order the forward pass meets them."""
        i = self.layer_idx
        return [
            (f"blocks.{i}.ln1.hook_normalized", self.store_hook_attn_normalized),
            (f"blocks.{i}.attn.hook_q", self.lora_hook_qkv),
            (f"blocks.{i}.attn.hook_k", self.lora_hook_qkv),
            (f"blocks.{i}.attn.hook_v", self.lora_hook_qkv),
            (f"blocks.{i}.attn.hook_z", self.store_hook_z),
            (f"blocks.{i}.hook_attn_out", self.lora_hook_out),
        ]


# %%
if __name__ == "__main__":
    from lora_rlhf import tests_lora

    tests_lora.testing_lora_hooks(LoraHooks)
    tests_lora.testing_lora_hooks_qkv_dispatch_and_out(LoraHooks)

# %% [markdown]
# ## Exercise 3 — `TransformerWithValueHeadLora`: the policy, its value head and its reference
#
# A subclass of Section 1's `HookedTransformerWithValueHead`. Given: `from_pretrained(name,
# lora_alpha=32, rank=4, ...)` loads the model, calls `setup_lora`, then **freezes every base
# parameter**; `fwd_hooks` is the LoRA hooks, then the value-head hook; the parameter generators
# (iterate once, or wrap in `list(...)`) include `get_base_model_trainable_params()`, which yields
# LoRA's, so Section 1's optimizer trains only LoRA + value head. You write:
#
# * `setup_lora(lora_alpha=32, rank=4)`: `self.lora`, an `nn.ModuleList` of one `LoraHooks` per
#   layer (the model's dtype, on its device), and `self.lora_fwd_hooks`, their hooks layer by layer;
# * `forward_with_value_head(tokens) -> (logits, values)`: one forward pass with `self.fwd_hooks`;
# * `generate(tokens, **kwargs)`: the base class's generate under the LoRA hooks (samples come from
#   the adapted policy). Attach hooks with `with self.hooks(fwd_hooks=...):`, so they never outlive
#   the call, even if it raises.
#
# **Why no second model?** Plain `forward` runs without hooks: it *is* the frozen base model, π_ref.
# The KL penalty compares the hooked forward (π) with the plain forward (π_ref) of one model.


# %%
class TransformerWithValueHeadLora(HookedTransformerWithValueHead):
    """The value-head model with LoRA adaptors on every attention layer; base weights frozen."""

    lora: nn.ModuleList
    lora_fwd_hooks: list[FwdHook]

    @classmethod
    def from_pretrained(
        cls, *args, lora_alpha: float = 32, rank: int = 4, **kwargs
    ) -> TransformerWithValueHeadLora:
        """Load a model (the base class's arguments), add rank-`rank` adaptors to every attention
        layer and freeze the rest (the value head stays trainable)."""
        check_lora_settings(lora_alpha, rank=rank)
        model = super().from_pretrained(*args, **kwargs)
        model.setup_lora(lora_alpha=lora_alpha, rank=rank, **kwargs)
        for param in model.base_model_params():
            param.requires_grad_(False)
        return model

    def setup_lora(self, lora_alpha: float = 32, rank: int = 4, **kwargs) -> None:
        # >>> exercise: TransformerWithValueHeadLora.setup_lora — one LoraHooks per layer, their hooks
        self.lora = nn.ModuleList(
            LoraHooks(i, self.cfg, lora_alpha, rank, dtype=self.cfg.dtype)
            for i in range(self.cfg.n_layers)
        ).to(self.cfg.device)
        self.lora_fwd_hooks = [hook for layer in self.lora for hook in layer.list_fwd_hooks()]
        # <<< exercise

    @property
    def fwd_hooks(self) -> list[FwdHook]:
        return self.lora_fwd_hooks + [self.value_head_hook]

    def forward_with_value_head(
        self, tokens: Int[Tensor, "batch seq"]
    ) -> tuple[Float[Tensor, "batch seq d_vocab"], Float[Tensor, "batch seq"]]:
        # >>> exercise: TransformerWithValueHeadLora.forward_with_value_head — one pass with fwd_hooks
        with self.hooks(fwd_hooks=self.fwd_hooks):
            logits = self(tokens)
        return logits, self.value_head_output
        # <<< exercise

    @torch.no_grad()
    def generate(self, tokens: Int[Tensor, "batch seq"], **kwargs):
        """The base class's `generate`, run with the LoRA hooks (same arguments)."""
        # >>> exercise: TransformerWithValueHeadLora.generate — the base generate under the LoRA hooks
        with self.hooks(fwd_hooks=self.lora_fwd_hooks):
            return super().generate(tokens, **kwargs)
        # <<< exercise

    def base_model_params(self) -> Iterable[nn.Parameter]:
        return (p for n, p in self.named_parameters() if not n.startswith(("lora.", "value_head.")))

    def lora_params(self) -> Iterable[nn.Parameter]:
        return (p for n, p in self.named_parameters() if n.startswith("lora."))

    def get_base_model_trainable_params(self) -> Iterable[nn.Parameter]:
        return self.lora_params()

    def get_value_head_params(self) -> Iterable[nn.Parameter]:
        return self.value_head.parameters() if self.value_head is not None else iter(())


# %%
if __name__ == "__main__":
    from lora_rlhf import tests_lora

    _model = TransformerWithValueHeadLora.from_pretrained("tiny-llama")
    tests_lora.test_lora_fwd_hooks_list(_model)
    tests_lora.test_lora_model_forward_methods(_model)

# %% [markdown]
# ## Training with LoRA, using the same model as the reference policy (given)
#
# `RLHFArgsLora` adds the adaptor's rank, α and dtype. `RLHFTrainerLora` builds a
# `TransformerWithValueHeadLora` and makes **the same object** the reference model: Section 1's
# trainer takes reference logits from `ref_model`'s plain `forward`, which has no adaptors.


# %%
@dataclass
class RLHFArgsLora(RLHFArgs):
    lora_rank: int = 4
    lora_alpha: float = 32
    dtype: torch.dtype | None = None

    def __post_init__(self):
        super().__post_init__()
        check_lora_settings(self.lora_alpha, lora_rank=self.lora_rank)


class RLHFTrainerLora(RLHFTrainer):
    """PPO-RLHF training only the adaptors and the value head; one copy of the base weights."""

    # `lora-rlhf train --impl` sets a submission's class here when the submission has no trainer.
    model_class: type[TransformerWithValueHeadLora] = TransformerWithValueHeadLora

    def __init__(self, args: RLHFArgsLora):
        torch.manual_seed(args.seed)
        self.args = args
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.run_name = f"{args.wandb_project_name}__seed{args.seed}__{stamp}"
        run_device = torch.device(args.device) if args.device else device
        sizes = dict(lora_alpha=args.lora_alpha, rank=args.lora_rank, dtype=args.dtype)
        model = self.model_class.from_pretrained(args.base_model, device=run_device, **sizes)
        self.model = model.to(run_device).train()
        self.ref_model = self.model  # the same object: its plain forward is π_ref
        self.optimizer, self.scheduler = get_optimizer_and_scheduler(self.args, self.model)
        self.prefix_len = self.model.to_tokens(args.prefix, prepend_bos=args.prepend_bos).shape[-1]


# %% [markdown]
# **The course's smoke run.** Two short phases of your classes (no KL penalty, a high learning rate,
# rewarding full stops), graded on tiny-llama, then on `NOTEBOOK_MODEL`: everything fits together.
# (Whether the reward rises takes longer: `lora-rlhf train --impl exercises`.)


# %%
if __name__ == "__main__":
    from lora_rlhf import tests_lora

    tests_lora.test_rlhf_trainer_lora(RLHFTrainerLora, TransformerWithValueHeadLora, RLHFArgsLora)
    tests_lora.smoke_run(NOTEBOOK_MODEL, RLHFTrainerLora, RLHFArgsLora)
