"""The KL coefficient: fixed (Section 1) or adaptive (Ziegler et al. 2019, as in TRL's PPO).

The expected values are worked out by hand from the paper's rule
``β ← β · (1 + clip(KL / target − 1, −0.2, 0.2) · n / horizon)``, never from the library's code.
"""

from __future__ import annotations

import pytest

from lora_rlhf.rlhf.args import ArgsError, RLHFArgs
from lora_rlhf.rlhf.kl_control import AdaptiveKLController, KLController, make_kl_controller


def test_fixed_coefficient_never_moves():
    controller = KLController(0.05)
    for kl in (0.0, 0.5, 50.0):
        assert controller.update(kl, n_samples=16) == 0.05
    assert controller.value == 0.05


@pytest.mark.parametrize(
    "kl, expected",
    [
        # over target: error 0.55/0.5 - 1 = 0.1; × (1 + 0.1 · 16/32) = × 1.05
        (0.55, 0.1 * 1.05),
        # under target: error -0.1; × 0.95
        (0.45, 0.1 * 0.95),
        # far over: error 3 clipped to 0.2; × 1.1
        (2.0, 0.1 * 1.1),
        # far under (no KL at all): error -1 clipped to -0.2; × 0.9
        (0.0, 0.1 * 0.9),
        # on target: unchanged
        (0.5, 0.1),
    ],
    ids=["over target", "under target", "clipped above", "clipped below", "on target"],
)
def test_adaptive_update_equals_the_hand_computed_value(kl, expected):
    controller = AdaptiveKLController(0.1, target=0.5, horizon=32)
    assert controller.update(kl, n_samples=16) == pytest.approx(expected, rel=1e-12)
    assert controller.value == pytest.approx(expected, rel=1e-12)


def test_adaptive_updates_compound_and_scale_with_the_batch():
    controller = AdaptiveKLController(0.2, target=1.0, horizon=100)
    controller.update(1.1, n_samples=50)  # error 0.1 · 50/100: × 1.05
    controller.update(0.5, n_samples=10)  # error -0.5 clipped to -0.2, · 10/100: × 0.98
    assert controller.value == pytest.approx(0.2 * 1.05 * 0.98, rel=1e-12)


def test_state_round_trips():
    controller = AdaptiveKLController(0.1, target=0.5, horizon=16)
    controller.update(1.0, n_samples=16)
    other = AdaptiveKLController(0.1, target=0.5, horizon=16)
    other.load_state_dict(controller.state_dict())
    assert other.value == controller.value


@pytest.mark.parametrize("target, horizon", [(0.0, 10), (-1.0, 10), (0.5, 0)])
def test_adaptive_rejects_a_target_or_horizon_that_is_not_positive(target, horizon):
    with pytest.raises(ValueError, match="must be > 0"):
        AdaptiveKLController(0.1, target=target, horizon=horizon)


def test_args_choose_the_controller():
    fixed = make_kl_controller(RLHFArgs(base_model="tiny-llama", kl_coef=0.3))
    assert type(fixed) is KLController and fixed.value == 0.3
    adaptive = make_kl_controller(
        RLHFArgs(base_model="tiny-llama", kl_coef=0.3, kl_target=0.7, kl_horizon=20)
    )
    assert isinstance(adaptive, AdaptiveKLController)
    assert (adaptive.value, adaptive.target, adaptive.horizon) == (0.3, 0.7, 20)


@pytest.mark.parametrize(
    "field, value", [("kl_target", 0.0), ("kl_horizon", -5.0), ("kl_coef", -0.1)]
)
def test_args_reject_bad_kl_settings(field, value):
    with pytest.raises(ArgsError, match=field):
        RLHFArgs(base_model="tiny-llama", **{field: value})
