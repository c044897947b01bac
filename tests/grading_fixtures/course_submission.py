"""A complete, course-shaped submission, written as a student would after reading the exercises.

The grader's tests make their backward-pass mutants and correct variants from this file by small
text edits (tests/backward_mutants.py), so they do not depend on the solution's exact text.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import einops
import torch
from torch import Tensor, nn
from transformer_lens import HookedTransformerConfig
from transformer_lens.hook_points import HookPoint

from lora_rlhf.args import RLHFArgs
from lora_rlhf.models import DEFAULT_MODEL
from lora_rlhf.trainer import RLHFTrainer
from lora_rlhf.value_head import HookedTransformerWithValueHead

FwdHook = tuple[str, Callable]


class Lora(nn.Module):
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
        self.n_inst = 1 if n_inst is None else n_inst
        self.rank, self.lora_alpha, self.dtype = rank, lora_alpha, dtype
        self.A = nn.Parameter(torch.empty(self.n_inst, d_in, rank, dtype=dtype))
        self.B = nn.Parameter(torch.zeros(self.n_inst, rank, d_out, dtype=dtype))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2] not in (1, self.n_inst):
            raise ValueError(f"expected {self.n_inst} instances (or 1), got shape {x.shape}")
        if self.dtype is not None:
            x = x.to(self.dtype)
        x_a = einops.einsum(x, self.A, "... inst d_in, inst d_in rank -> ... inst rank")
        x_a_b = einops.einsum(x_a, self.B, "... inst rank, inst rank d_out -> ... inst d_out")
        return x_a_b * (self.lora_alpha / self.rank)


class LoraHooks(nn.Module):
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
        n_kv = cfg.n_key_value_heads or cfg.n_heads
        self.lora_q = Lora(cfg.d_model, cfg.d_head, rank, lora_alpha, cfg.n_heads, dtype)
        self.lora_k = Lora(cfg.d_model, cfg.d_head, rank, lora_alpha, n_kv, dtype)
        self.lora_v = Lora(cfg.d_model, cfg.d_head, rank, lora_alpha, n_kv, dtype)
        self.lora_o = Lora(cfg.d_head, cfg.d_model, rank, lora_alpha, cfg.n_heads, dtype)
        self.attn_normalized = None
        self.z = None

    def store_hook_attn_normalized(self, normalized: Tensor, hook: HookPoint) -> None:
        self.attn_normalized = normalized

    def store_hook_z(self, z: Tensor, hook: HookPoint) -> None:
        self.z = z

    def lora_hook_qkv(self, qkv: Tensor, hook: HookPoint) -> Tensor:
        if hook.name.endswith("hook_q"):
            lora = self.lora_q
        elif hook.name.endswith("hook_k"):
            lora = self.lora_k
        elif hook.name.endswith("hook_v"):
            lora = self.lora_v
        else:
            raise ValueError(f"unexpected hook {hook.name}")
        x = self.attn_normalized
        return qkv + lora(x.unsqueeze(-2))

    def lora_hook_out(self, attn_out: Tensor, hook: HookPoint) -> Tensor:
        z = self.z
        return attn_out + self.lora_o(z).sum(-2)

    def list_fwd_hooks(self) -> list[FwdHook]:
        i = self.layer_idx
        return [
            (f"blocks.{i}.ln1.hook_normalized", self.store_hook_attn_normalized),
            (f"blocks.{i}.attn.hook_q", self.lora_hook_qkv),
            (f"blocks.{i}.attn.hook_k", self.lora_hook_qkv),
            (f"blocks.{i}.attn.hook_v", self.lora_hook_qkv),
            (f"blocks.{i}.attn.hook_z", self.store_hook_z),
            (f"blocks.{i}.hook_attn_out", self.lora_hook_out),
        ]


class TransformerWithValueHeadLora(HookedTransformerWithValueHead):
    @classmethod
    def from_pretrained(
        cls,
        name: str = DEFAULT_MODEL,
        lora_alpha: float = 32,
        rank: int = 4,
        use_value_head: bool = True,
        device=None,
        dtype=None,
        **kwargs,
    ):
        model = super().from_pretrained(
            name, use_value_head=use_value_head, device=device, dtype=dtype, **kwargs
        )
        for param in model.base_model_params():
            param.requires_grad_(False)
        model.setup_lora(lora_alpha, rank)
        return model

    def setup_lora(self, lora_alpha: float = 32, rank: int = 4) -> None:
        self.lora = nn.ModuleList(
            [LoraHooks(i, self.cfg, lora_alpha, rank) for i in range(self.cfg.n_layers)]
        ).to(self.cfg.device)
        self.lora_fwd_hooks = [hook for layer in self.lora for hook in layer.list_fwd_hooks()]

    @property
    def fwd_hooks(self) -> list[FwdHook]:
        return self.lora_fwd_hooks + [self.value_head_hook]

    def generate(self, *args, **kwargs):
        with self.hooks(fwd_hooks=self.lora_fwd_hooks):
            return super().generate(*args, **kwargs)

    def base_model_params(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith(("lora", "value_head"))]

    def lora_params(self) -> list[nn.Parameter]:
        return list(self.lora.parameters())

    def get_base_model_trainable_params(self) -> list[nn.Parameter]:
        return self.lora_params()


@dataclass
class RLHFArgsLora(RLHFArgs):
    lora_rank: int = 4
    lora_alpha: float = 32
    dtype: torch.dtype | None = None


class RLHFTrainerLora(RLHFTrainer):
    model_class = TransformerWithValueHeadLora

    def build_model(self):
        args = self.args
        return self.model_class.from_pretrained(
            args.base_model,
            lora_alpha=args.lora_alpha,
            rank=args.lora_rank,
            device=self.device,
            dtype=args.dtype,
        )

    def build_ref_model(self):
        return self.model
