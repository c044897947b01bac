"""The engine's opt-in for a trainer: the same training in less memory.

Section 1's trainer (:mod:`lora_rlhf.rlhf.trainer`) and the GRPO lesson call Section 1's plain
``get_logprobs``, ``calc_kl_penalty`` and ``calc_entropy_bonus`` (:mod:`lora_rlhf.rlhf.ppo`), as
the course writes them. :func:`with_lean_memory` gives a trainer class whose phases run with
two engine pieces instead, neither of which the lessons need to know about:

* the memory-lean kernels of :mod:`lora_rlhf.fast.ppo_kernels` (the same values, without the
  vocabulary-sized temporaries), bound in place of the plain functions in the library's trainer
  modules (:data:`TRAINER_MODULES`) while a phase or :meth:`kl_to_reference` runs, and put back
  after; a submission's own module is never touched, so its code runs as it is written;
* glibc heap handling (:mod:`lora_rlhf.fast.memory`): the learning phase under ``lean_heap``,
  and freed memory given back after loading, after sampling, and around each step's forward.

``lora-rlhf train`` trains every ``--impl`` and ``--algo`` this way (``lora_rlhf.cli.train``,
``lora_rlhf.cli.grpo_trainer``, and ``lora_rlhf.fast.lora.with_fast_lora``).
tests/test_lean_trainer.py checks that the plain trainer reaches the same metrics.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lora_rlhf.fast.ppo_kernels as ppo_kernels
import lora_rlhf.rlhf.ppo as ppo
from lora_rlhf.fast.memory import lean_heap, release_freed_memory

KERNELS = ("get_logprobs", "calc_kl_penalty", "calc_entropy_bonus")
# The library's modules whose trainer methods call those functions by name (the PPO trainer and
# the GRPO lesson's trainer); only the ones already imported are swapped.
TRAINER_MODULES = ("lora_rlhf.rlhf.trainer", "lora_rlhf.lessons.section3_grpo")


@contextmanager
def ppo_kernels_in_trainers() -> Iterator[None]:
    """Within the block, the trainer modules' plain PPO functions are the memory-lean kernels.
    Only a name still bound to the plain function is swapped (so a nested block changes nothing),
    and each is put back on the way out, also when the block raises."""
    swapped = []
    for module_name in TRAINER_MODULES:
        module = sys.modules.get(module_name)
        if module is None:
            continue
        for name in KERNELS:
            if module.__dict__.get(name) is getattr(ppo, name):
                setattr(module, name, getattr(ppo_kernels, name))
                swapped.append((module, name))
    try:
        yield
    finally:
        for module, name in swapped:
            setattr(module, name, getattr(ppo, name))


class LeanMemory:
    """Mixin before a trainer class (see :func:`with_lean_memory`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        release_freed_memory()  # what loading the weights left free

    def sample(self):
        samples = super().sample()
        release_freed_memory()  # sampling's KV caches, before the rollout's forward
        return samples

    def run_phase(self) -> dict[str, Any]:
        with ppo_kernels_in_trainers():
            return super().run_phase()

    def learning_phase(self, memory) -> None:
        with ppo_kernels_in_trainers(), lean_heap():
            super().learning_phase(memory)
        release_freed_memory()

    def kl_to_reference(self, sample_ids) -> float:
        with ppo_kernels_in_trainers():
            return super().kl_to_reference(sample_ids)

    def compute_rlhf_objective(self, minibatch):
        return _released(super().compute_rlhf_objective, minibatch)

    def compute_grpo_objective(self, minibatch):
        return _released(super().compute_grpo_objective, minibatch)


def _released(objective_of, minibatch):
    """The objective, with what the previous step freed given back before its forward and what
    the forward freed given back before backward allocates the gradients."""
    release_freed_memory()
    objective = objective_of(minibatch)
    release_freed_memory()
    return objective


def with_lean_memory(trainer_class: type) -> type:
    """`trainer_class` (any trainer with Section 1's phases) training with the memory-lean kernels
    and heap handling; the class itself when it already does."""
    if issubclass(trainer_class, LeanMemory):
        return trainer_class
    lean = type(f"Lean{trainer_class.__name__}", (LeanMemory, trainer_class), {})
    lean.__qualname__ = lean.__name__
    lean.__doc__ = f"{trainer_class.__name__}, in less memory (lora_rlhf.fast.lean_trainer)."
    return lean
