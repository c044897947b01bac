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
import os
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


def check_lora_settings(lora_alpha: float, **sizes: int) -> None:
    """A clear error for a rank, size or α that cannot make an adaptor (given, not an exercise)."""
    for name, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not lora_alpha > 0:
        raise ValueError(f"lora_alpha must be > 0, got {lora_alpha!r}")


# %% tags=["parameters"]
# The model the smoke run at the end trains: the embedded model by default. For a quick run set
# the environment variable LORA_RLHF_NOTEBOOK_MODEL=tiny-llama, or change it here.
NOTEBOOK_MODEL = os.environ.get("LORA_RLHF_NOTEBOOK_MODEL", DEFAULT_MODEL)


# %% [markdown]
# ## Exercise 1 — `Lora`: n independent low-rank maps
#
# Build a module holding `n_inst` independent adaptors (one per attention head, later):
#
# * `A: [n_inst, d_in, rank]`, initialised with `nn.init.kaiming_uniform_(A, a=math.sqrt(5))`
#   (the init `nn.Linear` uses), and `B: [n_inst, rank, d_out]`, initialised to **zeros**. With
#   B = 0 the adaptor starts as the identity change: training begins from the pretrained model.
#   (A must not be zero too: then no gradient would ever reach B, nor A.) `n_inst=None` means 1.
#   When `dtype` is given, create both parameters with it.
# * `forward(x: [..., inst, d_in]) -> [..., n_inst, d_out]` computes `(x @ A) @ B · lora_alpha / rank`
#   for every instance, e.g. with two `einops.einsum`s. An `inst` axis of size 1 broadcasts over
#   all instances (einsum does that for you); raise a `ValueError` for any other size that is not
#   `n_inst`. Cast `x` to the parameters' dtype first.
#
# Why **(xA)B** and never **x(AB)**? `A @ B` is a full `d_in × d_out` matrix: forming it costs
# d_in·r·d_out multiply-adds and d_in·d_out memory, which is what LoRA exists to avoid. Multiplying
# x by A first keeps every intermediate of width r.
#
# Why **no bias**? The frozen layer already has its bias; a trainable one would not be low-rank
# and would double what the adaptor can shift.
#
# Why **α/r**? The scale keeps the size of the update roughly independent of the rank, so the
# learning rate need not be re-tuned when r changes. Keep it on the module (under any name).


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
        n_inst = 1 if n_inst is None else n_inst
        check_lora_settings(lora_alpha, d_in=d_in, d_out=d_out, rank=rank, n_inst=n_inst)
        # >>> exercise: Lora.__init__ — create A (kaiming-uniform) and B (zeros), keep the scale α/r
        self.scaling = lora_alpha / rank
        self.A = nn.Parameter(torch.empty(n_inst, d_in, rank, dtype=dtype))
        self.B = nn.Parameter(torch.zeros(n_inst, rank, d_out, dtype=dtype))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        # <<< exercise

    def forward(self, x: Float[Tensor, "... inst d_in"]) -> Float[Tensor, "... n_inst d_out"]:
        # >>> exercise: Lora.forward — (x @ A) @ B · α/r, one map per instance
        n_inst = self.A.shape[0]
        if x.shape[-2] not in (1, n_inst):
            raise ValueError(
                f"Lora with {n_inst} instances got an input of shape {tuple(x.shape)}: its "
                f"second-to-last axis must be {n_inst} (one input per instance) or 1 (broadcast)"
            )
        x = x.to(self.A.dtype)
        x_a = einops.einsum(x, self.A, "... inst d_in, inst d_in rank -> ... inst rank")
        x_a_b = einops.einsum(x_a, self.B, "... inst rank, inst rank d_out -> ... inst d_out")
        return x_a_b * self.scaling
        # <<< exercise


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
# The two stores keep their activation on the module (start them at `None` in `__init__`) and
# return nothing, so the activation passes on unchanged; the two adding hooks return the new
# activation. Shapes: `lora_q` has one instance per query head and maps d_model → d_head;
# `lora_o` has one per query head and maps d_head → d_model.
#
# **Grouped-query attention.** Models such as Llama and SmolLM2 have fewer key/value heads than
# query heads (SmolLM2: 9 query heads share 3 K/V heads). The real weights `_W_K`, `_W_V` have
# `n_key_value_heads` heads, and `hook_k`/`hook_v` see `[batch, pos, n_key_value_heads, d_head]`
# (the sharing happens after the hook). So `lora_k` and `lora_v` get **`cfg.n_key_value_heads`**
# instances (n_heads when that is None): one adaptor per real K/V weight, not per query head.
#
# **One input for every head.** q, k and v all read the same x, `[batch, pos, d_model]`: give it
# an `inst` axis of size 1 (`[batch, pos, 1, d_model]`) and `Lora` broadcasts it over the heads.
#
# **Why sum W_O over heads?** Attention's output is `Σ_h z_h W_O[h]`: every head writes
# into the residual stream and the writes add up. The adaptor of W_O[h] must do the same:
# `Σ_h (α/r) z_h A_o[h] B_o[h]`, i.e. `lora_o(z)` summed over its head axis. (You may also put
# the sum inside the second contraction, `"... head rank, head rank d_model -> ... d_model"`,
# which never forms the per-head `[batch, pos, head, d_model]` outputs.)
#
# `lora_hook_qkv` serves three hook points: dispatch on the hook's name (`hook.name` ends with
# `hook_q`, `hook_k` or `hook_v`), and raise `ValueError` for any other name.
#
# How the library makes these six hooks cheap (fewer, larger products) is the optional bonus
# exercise *Making LoRA fast*; here, write them plainly.


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
        # >>> exercise: LoraHooks.__init__ — four Loras (K/V: one per key/value head), the two stores
        self.layer_idx = layer_idx
        n_kv_heads = cfg.n_key_value_heads or cfg.n_heads
        self.lora_q = Lora(cfg.d_model, cfg.d_head, rank, lora_alpha, cfg.n_heads, dtype)
        self.lora_k = Lora(cfg.d_model, cfg.d_head, rank, lora_alpha, n_kv_heads, dtype)
        self.lora_v = Lora(cfg.d_model, cfg.d_head, rank, lora_alpha, n_kv_heads, dtype)
        self.lora_o = Lora(cfg.d_head, cfg.d_model, rank, lora_alpha, cfg.n_heads, dtype)
        self.attn_normalized: Float[Tensor, "batch pos d_model"] | None = None
        self.z: Float[Tensor, "batch pos n_heads d_head"] | None = None
        # <<< exercise

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
        kind = hook.name.split(".")[-1]
        if kind not in adaptors:
            raise ValueError(f"lora_hook_qkv serves hook_q, hook_k and hook_v, not {hook.name!r}")
        x = einops.rearrange(self.attn_normalized, "batch pos d_model -> batch pos 1 d_model")
        return qkv + adaptors[kind](x)
        # <<< exercise

    def lora_hook_out(
        self, attn_out: Float[Tensor, "batch pos d_model"], hook: HookPoint
    ) -> Float[Tensor, "batch pos d_model"]:
        # >>> exercise: LoraHooks.lora_hook_out — add lora_o(z) summed over heads
        per_head = self.lora_o(self.z)  # [batch, pos, head, d_model]
        return attn_out + per_head.sum(dim=-2)
        # <<< exercise

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
#   layer, with the model's dtype, on the model's device) and `self.lora_fwd_hooks` (all their
#   hooks).
# * `fwd_hooks` (a property, read at call time) is the LoRA hooks followed by the value-head hook,
#   so the inherited `forward_with_value_head` runs the policy with its adaptors.
# * `generate(...)` runs the base class's generate with the LoRA hooks, so samples come from the
#   adapted policy. Use `with self.hooks(fwd_hooks=...)`: hooks never outlive the call, even when
#   it raises.
# * `base_model_params()` (every parameter but the adaptors and the value head), `lora_params()`,
#   and `get_base_model_trainable_params()`, which returns the LoRA parameters, so Section 1's
#   optimizer trains only LoRA + value head.
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
        check_lora_settings(lora_alpha, rank=rank)
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
# `TransformerWithValueHeadLora` (its `model_class`) and returns **the same object** as the
# reference model: the trainer computes reference logits with the model's plain `forward`, which
# has no adaptors.


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

    model_class: type[TransformerWithValueHeadLora] = TransformerWithValueHeadLora

    def build_model(self) -> TransformerWithValueHeadLora:
        # >>> exercise: RLHFTrainerLora.build_model — the LoRA policy with its value head
        return self.model_class.from_pretrained(
            self.args.base_model,
            lora_alpha=self.args.lora_alpha,
            rank=self.args.lora_rank,
            device=self.device,
            dtype=self.args.dtype,
        )
        # <<< exercise

    def build_ref_model(self) -> TransformerWithValueHeadLora:
        # >>> exercise: RLHFTrainerLora.build_ref_model — no copy: the same model
        return self.model
        # <<< exercise


# %% [markdown]
# **The course's smoke run.** Two short phases with your classes: the KL penalty off, a high
# learning rate, rewarding full stops. It checks that everything fits together, not that the
# reward rises (that takes `lora-rlhf train --impl exercises`).


# %%
if __name__ == "__main__":
    _args = RLHFArgsLora(
        base_model=NOTEBOOK_MODEL, kl_coef=0.0, total_phases=2, warmup_steps=0, base_lr=1e-3,
        batch_size=8, num_minibatches=2, gen_len=8,
    )  # fmt: skip
    _trainer = RLHFTrainerLora(_args)
    assert _trainer.ref_model is _trainer.model, (
        "build_ref_model must return the policy itself: its plain forward is π_ref, no second copy"
    )
    _params_before = [p.detach().clone() for p in _trainer.model.lora_params()]
    _trainer.train()
    assert any(
        not torch.equal(p, q) for p, q in zip(_trainer.model.lora_params(), _params_before)
    ), "two phases of training changed no adaptor parameter: is the optimizer given lora_params()?"
    print(f"Smoke run on {NOTEBOOK_MODEL} finished: the adaptors trained, one copy of the model.")
