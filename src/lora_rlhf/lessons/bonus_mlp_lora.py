# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     name: python3
# ---

# %% [markdown]
# # Bonus — LoRA on the MLP layers
#
# Section 2 adapted only the attention projections. PEFT users usually also adapt the MLP
# (`target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]`):
# in a transformer most of the weights live there. This bonus adds adaptors to the MLP weights of
# every layer, with the same `Lora` module and the same trick: hooks store an input, and add the
# adaptor's output to the matching activation.
#
# The bonus is not part of the graded exercises (its checks carry no points). Do Section 2 first:
# this file uses the library's `Lora` and `TransformerWithValueHeadLora`.
#
# This file is generated from `src/lora_rlhf/lessons/bonus_mlp_lora.py` (`lora-rlhf sync`).

# %%
from __future__ import annotations

import einops
import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens import HookedTransformerConfig
from transformer_lens.hook_points import HookPoint

from lora_rlhf.lessons.section2_lora import FwdHook, Lora, TransformerWithValueHeadLora

# %% [markdown]
# ## Exercise B1 — `MlpLoraHooks`: adaptors on one MLP layer
#
# TransformerLens has two kinds of MLP:
#
# * **plain** (GPT-2, Pythia): `pre = x W_in + b_in`, `post = act(pre)`, `out = post W_out + b_out`;
# * **gated** (Llama, SmolLM2: `cfg.gated_mlp`): `pre = x W_gate`, `pre_linear = x W_in`,
#   `post = act(pre) * pre_linear + b_in`, `out = post W_out + b_out`. Note which is which:
#   **`hook_pre` is the gate's pre-activation** (x·W_gate, Hugging Face's `gate_proj`) and
#   `hook_pre_linear` is x·W_in (`up_proj`); W_out is `down_proj`.
#
# The MLP reads the normalized residual stream `x`, which `blocks.{i}.ln2.hook_normalized`
# exposes. That is true for parallel blocks too (Pythia: attention and MLP both read `resid_pre`,
# normalized by their own norm, `ln1` and `ln2`).
#
# | hook | what it does |
# |---|---|
# | `blocks.{i}.ln2.hook_normalized` | store the MLP input x (`store_hook_mlp_normalized`) |
# | `blocks.{i}.mlp.hook_pre` | add `lora_gate(x)` (gated MLP) or `lora_in(x)` (plain MLP) |
# | `blocks.{i}.mlp.hook_pre_linear` | gated MLP only: add `lora_in(x)` |
# | `blocks.{i}.mlp.hook_post` | store post, the input of W_out (`store_hook_post`) |
# | `blocks.{i}.hook_mlp_out` | add `lora_out(post)` (`lora_hook_mlp_out`) |
#
# Each MLP weight is one matrix, so each adaptor is a `Lora` with **one instance**:
# `lora_in` and `lora_gate` map d_model → d_mlp, `lora_out` maps d_mlp → d_model. A plain MLP has
# no gate: set `lora_gate = None` there. `lora_hook_mlp_pre` serves `hook_pre` and
# `hook_pre_linear`, dispatching on the hook's name; any other name raises `ValueError`.


# %%
class MlpLoraHooks(nn.Module):
    """LoRA adaptors for W_in, W_gate (gated MLPs) and W_out of MLP layer `layer_idx`, by hooks."""

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
        self.gated = bool(cfg.gated_mlp)
        # >>> exercise: MlpLoraHooks.__init__ — lora_in, lora_gate (gated MLPs only, else None), lora_out
        self.lora_in = Lora(cfg.d_model, cfg.d_mlp, rank, lora_alpha, 1, dtype)
        self.lora_gate = (
            Lora(cfg.d_model, cfg.d_mlp, rank, lora_alpha, 1, dtype) if self.gated else None
        )
        self.lora_out = Lora(cfg.d_mlp, cfg.d_model, rank, lora_alpha, 1, dtype)
        # <<< exercise
        self.mlp_normalized: Float[Tensor, "batch pos d_model"] | None = None
        self.post: Float[Tensor, "batch pos d_mlp"] | None = None

    def store_hook_mlp_normalized(
        self, normalized: Float[Tensor, "batch pos d_model"], hook: HookPoint
    ) -> None:
        # >>> exercise: MlpLoraHooks.store_hook_mlp_normalized — keep the MLP input
        self.mlp_normalized = normalized
        # <<< exercise

    def store_hook_post(self, post: Float[Tensor, "batch pos d_mlp"], hook: HookPoint) -> None:
        # >>> exercise: MlpLoraHooks.store_hook_post — keep the input of W_out
        self.post = post
        # <<< exercise

    def lora_hook_mlp_pre(
        self, pre: Float[Tensor, "batch pos d_mlp"], hook: HookPoint
    ) -> Float[Tensor, "batch pos d_mlp"]:
        # >>> exercise: MlpLoraHooks.lora_hook_mlp_pre — add lora_gate or lora_in of the stored input, by hook name
        kind = hook.name.rsplit(".", 1)[-1]
        if kind == "hook_pre":
            adaptor = self.lora_gate if self.gated else self.lora_in
        elif kind == "hook_pre_linear" and self.gated:
            adaptor = self.lora_in
        else:
            raise ValueError(
                f"lora_hook_mlp_pre is for mlp.hook_pre/hook_pre_linear, not {hook.name!r}"
            )
        x = einops.rearrange(self.mlp_normalized, "batch pos d_model -> batch pos 1 d_model")
        delta = einops.rearrange(adaptor(x), "batch pos 1 d_mlp -> batch pos d_mlp")
        return pre + delta.to(pre.dtype)
        # <<< exercise

    def lora_hook_mlp_out(
        self, mlp_out: Float[Tensor, "batch pos d_model"], hook: HookPoint
    ) -> Float[Tensor, "batch pos d_model"]:
        # >>> exercise: MlpLoraHooks.lora_hook_mlp_out — add lora_out of the stored post
        post = einops.rearrange(self.post, "batch pos d_mlp -> batch pos 1 d_mlp")
        delta = einops.rearrange(self.lora_out(post), "batch pos 1 d_model -> batch pos d_model")
        return mlp_out + delta.to(mlp_out.dtype)
        # <<< exercise

    def list_fwd_hooks(self) -> list[FwdHook]:
        """The `(hook_name, fn)` pairs of this layer: five for a gated MLP, four for a plain one."""
        # >>> exercise: MlpLoraHooks.list_fwd_hooks — hook_pre_linear only for gated MLPs
        i = self.layer_idx
        hooks = [
            (f"blocks.{i}.ln2.hook_normalized", self.store_hook_mlp_normalized),
            (f"blocks.{i}.mlp.hook_pre", self.lora_hook_mlp_pre),
        ]
        if self.gated:
            hooks.append((f"blocks.{i}.mlp.hook_pre_linear", self.lora_hook_mlp_pre))
        hooks += [
            (f"blocks.{i}.mlp.hook_post", self.store_hook_post),
            (f"blocks.{i}.hook_mlp_out", self.lora_hook_mlp_out),
        ]
        return hooks
        # <<< exercise


# %%
if __name__ == "__main__":
    from lora_rlhf.checks import mlp_checks

    mlp_checks.testing_mlp_lora_hooks(MlpLoraHooks)

# %% [markdown]
# ## Exercise B2 — `TransformerWithValueHeadMlpLora`: attention and MLP adaptors
#
# Subclass `TransformerWithValueHeadLora`. Its `from_pretrained` calls `setup_lora`, then freezes the
# base weights; extend `setup_lora` to also build `self.mlp_lora` (an `nn.ModuleList` of one
# `MlpLoraHooks` per layer, on the model's device) and to append their hooks to
# `self.lora_fwd_hooks`. Everything that reads `lora_fwd_hooks` (the hooked forward, `generate`,
# `disable_lora`) then sees the MLP adaptors too. Given: `lora_params()` returns both kinds of
# adaptors (so the optimizer trains them), `base_model_params()` neither.


# %%
class TransformerWithValueHeadMlpLora(TransformerWithValueHeadLora):
    """`TransformerWithValueHeadLora` with adaptors on the MLP weights as well (`self.mlp_lora`)."""

    mlp_lora: nn.ModuleList

    def setup_lora(self, lora_alpha: float = 32, rank: int = 4, **kwargs) -> None:
        super().setup_lora(lora_alpha, rank, **kwargs)
        # >>> exercise: TransformerWithValueHeadMlpLora.setup_lora — one MlpLoraHooks per layer, hooks appended
        self.mlp_lora = nn.ModuleList(
            MlpLoraHooks(i, self.cfg, lora_alpha, rank, dtype=self.cfg.dtype)
            for i in range(self.cfg.n_layers)
        ).to(self.cfg.device)
        self.lora_fwd_hooks = self.lora_fwd_hooks + [
            hook for layer in self.mlp_lora for hook in layer.list_fwd_hooks()
        ]
        # <<< exercise

    def base_model_params(self) -> list[nn.Parameter]:
        return [
            p
            for n, p in self.named_parameters()
            if not n.startswith(("lora.", "mlp_lora.", "value_head."))
        ]

    def lora_params(self) -> list[nn.Parameter]:
        return [*self.lora.parameters(), *self.mlp_lora.parameters()]


# %%
if __name__ == "__main__":
    from lora_rlhf.checks import mlp_checks

    mlp_checks.testing_mlp_lora_model(TransformerWithValueHeadMlpLora)
