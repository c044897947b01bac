"""The weight of the KL penalty: fixed (the course) or adaptive (Ziegler et al. 2019).

The trainer reads :attr:`KLController.value` as the KL coefficient of each learning phase and,
after it, calls :meth:`KLController.update` with the KL(π ‖ π_ref) per generated token that the
phase's rollout measured.

* :class:`KLController` keeps the coefficient it was given: Section 1's ``kl_coef``.
* :class:`AdaptiveKLController` steers the KL towards a target ("Fine-Tuning Language Models from
  Human Preferences", https://arxiv.org/abs/1909.08593, section 2.2, and TRL's PPO trainer): a KL
  above the target raises the coefficient, one below lowers it, proportionally to the relative
  error, which is clipped to ±0.2 so that one noisy batch cannot swing it far. ``horizon`` says how
  many samples it takes to act on an error: after a rollout of ``n`` samples the coefficient is
  multiplied by ``1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lora_rlhf.rlhf.args import RLHFArgs

# The paper's clip on the relative error: the coefficient moves at most ±20% per horizon.
MAX_RELATIVE_ERROR = 0.2


class KLController:
    """A fixed KL coefficient (the course's ``kl_coef``): :meth:`update` leaves it unchanged."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, kl: float, n_samples: int) -> float:
        """Take a rollout's KL per generated token into account; return the new coefficient."""
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(KLController):
    """A KL coefficient steered towards ``target`` nats per generated token.

    Args:
        kl_coef: the initial coefficient.
        target: the KL(π ‖ π_ref) per generated token to hold.
        horizon: samples over which a relative error is corrected (larger: slower).
    """

    def __init__(self, kl_coef: float, target: float, horizon: float) -> None:
        if not target > 0:
            raise ValueError(f"the KL target must be > 0, got {target!r}")
        if not horizon > 0:
            raise ValueError(f"the KL horizon must be > 0, got {horizon!r}")
        super().__init__(kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, kl: float, n_samples: int) -> float:
        error = kl / self.target - 1.0
        error = min(max(error, -MAX_RELATIVE_ERROR), MAX_RELATIVE_ERROR)
        self.value *= 1.0 + error * n_samples / self.horizon
        return self.value


def make_kl_controller(args: RLHFArgs) -> KLController:
    """Fixed at ``args.kl_coef`` when ``args.kl_target`` is None, else adaptive from it."""
    if args.kl_target is None:
        return KLController(args.kl_coef)
    return AdaptiveKLController(args.kl_coef, args.kl_target, args.kl_horizon)


__all__ = ["AdaptiveKLController", "KLController", "make_kl_controller"]
