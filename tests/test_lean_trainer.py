"""lora_rlhf.fast.lean_trainer: the engine's opt-in trains as Section 1's plain trainer does (the
memory-lean kernels stand in for the plain functions only while a phase runs)."""

import pytest
from helpers import tiny_args

import lora_rlhf.fast.ppo_kernels as ppo_kernels
import lora_rlhf.rlhf.ppo as ppo
import lora_rlhf.rlhf.trainer as trainer_module
from lora_rlhf.fast.lean_trainer import (
    KERNELS,
    LeanMemory,
    ppo_kernels_in_trainers,
    with_lean_memory,
)
from lora_rlhf.rlhf.trainer import RLHFTrainer

COMPARED = ("reward_mean", "kl", "entropy", "objective", "value_loss", "clip_frac", "kl_penalty")


def test_the_plain_trainer_calls_section_1_functions():
    for name in KERNELS:
        assert getattr(trainer_module, name) is getattr(ppo, name), name


def test_kernels_stand_in_only_inside_the_block_and_are_put_back_after_an_error():
    with pytest.raises(RuntimeError, match="inside"):
        with ppo_kernels_in_trainers():
            for name in KERNELS:
                assert getattr(trainer_module, name) is getattr(ppo_kernels, name), name
            with ppo_kernels_in_trainers():  # nested: changes nothing, undoes nothing
                pass
            assert trainer_module.get_logprobs is ppo_kernels.get_logprobs
            raise RuntimeError("inside")
    for name in KERNELS:
        assert getattr(trainer_module, name) is getattr(ppo, name), name


def test_with_lean_memory_wraps_once():
    lean = with_lean_memory(RLHFTrainer)
    assert issubclass(lean, LeanMemory) and issubclass(lean, RLHFTrainer)
    assert with_lean_memory(lean) is lean


def test_the_lean_trainer_reaches_the_plain_trainers_metrics():
    """Two phases on tiny-llama from the same seed: the same samples and rewards, and the losses
    equal to float32 rounding (the kernels sum in another order)."""
    plain = RLHFTrainer(tiny_args(), show_progress=False)
    plain.train()
    lean = with_lean_memory(RLHFTrainer)(tiny_args(), show_progress=False)
    lean.train()
    assert lean.sample_history == plain.sample_history
    for got, want in zip(lean.history, plain.history):
        for key in COMPARED:
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), (want["phase"], key)
