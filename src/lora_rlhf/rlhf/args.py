"""Section 1: the hyperparameters of a PPO-RLHF run, as one validated dataclass.

Subclass it to add fields (all fields have defaults, so a subclass may add more with defaults);
extend :meth:`RLHFArgs.validate` and call ``super().validate()`` to add checks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from lora_rlhf.models import DEFAULT_MODEL, ModelUnavailableError, check_model_name
from lora_rlhf.rlhf.rewards import REWARDS, RewardFn, reward_fn_char_count, reward_fn_name


def check_lora_settings(lora_alpha: float, **sizes: int) -> None:
    """A clear error for a rank, size or α that cannot make a LoRA adaptor (the lessons' `Lora`,
    `TransformerWithValueHeadLora` and `RLHFArgsLora` call it before building anything)."""
    for name, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not lora_alpha > 0:
        raise ValueError(f"lora_alpha must be > 0, got {lora_alpha!r}")


class ArgsError(ValueError):
    """An invalid RLHFArgs field; the message names the field."""


@dataclass
class RLHFArgs:
    """Hyperparameters of RLHF with PPO (defaults follow the course).

    ``reward_fn`` is a callable ``list[str] -> Tensor[batch]`` or a name from
    :data:`lora_rlhf.rlhf.rewards.REWARDS` (e.g. ``"char_count"``); a name is resolved on construction.
    ``device`` None means :func:`lora_rlhf.models.devices.default_device`.
    """

    seed: int = 1

    use_wandb: bool = False
    wandb_project_name: str = "RLHF"
    wandb_entity: str | None = None

    # Duration of the different phases
    total_phases: int = 100
    batch_size: int = 128
    num_minibatches: int = 4
    batches_per_learning_phase: int = 2

    # Optimization hyperparameters
    base_lr: float = 2e-5
    head_lr: float = 5e-4
    max_grad_norm: float = 1.0
    warmup_steps: int = 20
    final_scale: float = 0.1

    # Computing other PPO loss functions
    clip_coef: float = 0.2
    vf_coef: float = 0.15
    ent_coef: float = 0.001

    # Base model & sampling arguments
    base_model: str = DEFAULT_MODEL
    gen_len: int = 30
    temperature: float = 1.0
    top_k: int | None = 10
    prefix: str = "This is"
    prepend_bos: bool = True

    # RLHF-specific arguments
    kl_coef: float = 2.5
    # None: kl_coef stays fixed (the course). A number: the KL(π ‖ π_ref) per generated token that
    # an adaptive controller steers towards, starting from kl_coef (lora_rlhf.rlhf.kl_control).
    kl_target: float | None = None
    kl_horizon: float = 10000.0
    reward_fn: RewardFn | str = reward_fn_char_count
    normalize_reward: bool = True

    device: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.reward_fn, str):
            if self.reward_fn not in REWARDS:
                raise ArgsError(
                    f"reward_fn: unknown reward function {self.reward_fn!r}; "
                    f"known names: {', '.join(sorted(REWARDS))}."
                )
            self.reward_fn = REWARDS[self.reward_fn]
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ArgsError` naming the first invalid field (subclasses extend this)."""

        def require(ok: bool, field: str, message: str) -> None:
            if not ok:
                raise ArgsError(f"{field}: {message} (got {getattr(self, field)!r}).")

        for field in (
            "total_phases",
            "batch_size",
            "num_minibatches",
            "batches_per_learning_phase",
        ):
            value = getattr(self, field)
            require(isinstance(value, int) and value > 0, field, "must be a positive integer")
        require(self.gen_len > 0, "gen_len", "must be > 0: each sample needs a generated token")
        require(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        require(
            self.total_phases > self.warmup_steps,
            "total_phases",
            f"must be greater than warmup_steps={self.warmup_steps}, or the learning rate "
            "never finishes warming up",
        )
        require(
            self.batch_size % self.num_minibatches == 0,
            "batch_size",
            f"must be divisible by num_minibatches={self.num_minibatches}",
        )
        require(0.0 <= self.final_scale, "final_scale", "must be >= 0")
        require(self.kl_coef >= 0, "kl_coef", "must be >= 0")
        require(
            self.kl_target is None or self.kl_target > 0,
            "kl_target",
            "must be None (a fixed kl_coef) or > 0 nats per generated token",
        )
        require(self.kl_horizon > 0, "kl_horizon", "must be > 0 samples")
        require(self.max_grad_norm > 0, "max_grad_norm", "must be > 0")
        require(self.temperature > 0, "temperature", "must be > 0")
        require(self.top_k is None or self.top_k > 0, "top_k", "must be None or > 0")
        require(callable(self.reward_fn), "reward_fn", "must be callable or a registered name")
        try:
            check_model_name(self.base_model)
        except ModelUnavailableError as err:
            raise ArgsError(f"base_model: {err}") from None

    @property
    def minibatch_size(self) -> int:
        """Samples per minibatch."""
        return self.batch_size // self.num_minibatches

    @property
    def minibatches_per_phase(self) -> int:
        """Optimizer steps per learning phase."""
        return self.num_minibatches * self.batches_per_learning_phase

    @property
    def reward_fn_name(self) -> str:
        return reward_fn_name(self.reward_fn)

    def to_config(self) -> dict[str, Any]:
        """The fields as plain values (the reward function by name), e.g. for wandb or JSON."""
        config = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        config["reward_fn"] = self.reward_fn_name
        return {
            k: v if isinstance(v, (int, float, str, bool, type(None))) else str(v)
            for k, v in config.items()
        }
