"""Section 1: a HookedTransformer with a value head, for PPO.

The value head is a small MLP (d_model → 4·d_model → ReLU → 1) that reads the final normalized
residual stream (``ln_final.hook_normalized``) through a forward hook. Plain ``forward`` is the
base language model; ``forward_with_value_head`` runs with the hooks and also returns the values.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from lora_rlhf.models import DEFAULT_MODEL, load_model

VALUE_HEAD_HOOK_NAME = "ln_final.hook_normalized"

FwdHook = tuple[str, Callable]


class HookedTransformerWithValueHead(HookedTransformer):
    """A HookedTransformer plus a value head; build it with :meth:`from_pretrained`."""

    value_head: nn.Sequential | None
    value_head_output: Float[Tensor, "batch seq"] | None

    @classmethod
    def from_pretrained(
        cls,
        name: str = DEFAULT_MODEL,
        use_value_head: bool = True,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        **kwargs,
    ) -> HookedTransformerWithValueHead:
        """Load a registry model (``smollm2-135m``, ``tiny-llama``, ``tiny-pythia`` or a hub name)."""
        model = load_model(name, device=device, dtype=dtype, model_class=cls, **kwargs)
        model.setup_value_head(use_value_head)
        return model

    def setup_value_head(self, use_value_head: bool = True) -> None:
        self.value_head_output = None
        if not use_value_head:
            self.value_head = None
            return
        d_model = self.cfg.d_model
        self.value_head = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.ReLU(), nn.Linear(4 * d_model, 1)
        ).to(device=self.cfg.device, dtype=self.cfg.dtype)

    @property
    def value_head_hook(self) -> FwdHook:
        """``(hook_name, fn)``: stores the value head's output for the hooked forward pass."""

        def calc_and_store_value_head_output(
            resid_post: Float[Tensor, "batch seq d_model"], hook: HookPoint
        ) -> None:
            self.value_head_output = self.value_head(resid_post).squeeze(-1)

        return (VALUE_HEAD_HOOK_NAME, calc_and_store_value_head_output)

    @property
    def fwd_hooks(self) -> list[FwdHook]:
        """Every hook ``forward_with_value_head`` runs with (read at call time)."""
        if getattr(self, "value_head", None) is None:
            raise RuntimeError(
                "This model was built with use_value_head=False: it has no value head."
            )
        return [self.value_head_hook]

    def forward_with_value_head(
        self, tokens: Int[Tensor, "batch seq"]
    ) -> tuple[Float[Tensor, "batch seq d_vocab"], Float[Tensor, "batch seq"]]:
        """Logits of the (hooked) model and the value head's estimate at every position."""
        self.value_head_output = None
        # The hooks are removed on exit, also when the forward pass raises.
        with self.hooks(fwd_hooks=self.fwd_hooks):
            logits = self(tokens)
        assert self.value_head_output is not None, "the value-head hook did not run"
        return logits, self.value_head_output

    def get_base_model_trainable_params(self) -> list[nn.Parameter]:
        """Parameters of the language model (what full fine-tuning trains)."""
        return [p for n, p in self.named_parameters() if not n.startswith("value_head.")]

    def get_value_head_params(self) -> list[nn.Parameter]:
        return list(self.value_head.parameters()) if self.value_head is not None else []
