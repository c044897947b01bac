"""GRPO as `lora-rlhf train --algo grpo` runs it: the bonus lesson's :class:`GRPOTrainerLora`,
fed the command's arguments.

The command builds Section 2's :class:`~lora_rlhf.lessons.section2_lora.RLHFArgsLora` for every algorithm;
:func:`grpo_args` turns them into :class:`~lora_rlhf.lessons.section3_grpo.GRPOArgsLora` (adding the group size and
the kind of advantage), and :class:`GRPOTrainer` accepts either. It also follows the command's
KL coefficient controller (``--kl-target``) when the trainer has one: GRPO's β is the
coefficient of the k3 term, set from the controller before each learning phase and steered by the
rollout's full-vocabulary KL after it, as PPO's is.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lora_rlhf.fast.lean_trainer import LeanMemory
from lora_rlhf.lessons.section2_lora import RLHFArgsLora
from lora_rlhf.lessons.section3_grpo import GroupMemory, GRPOArgsLora, GRPOTrainerLora
from lora_rlhf.rlhf.args import ArgsError
from lora_rlhf.rlhf.trainer import PhaseCallback, seed_everything

DEFAULT_GROUP_SIZE = GRPOArgsLora.group_size
DEFAULT_ADVANTAGE = GRPOArgsLora.advantage


def grpo_args(
    args: RLHFArgsLora,
    group_size: int | None = None,
    advantage: str | None = None,
) -> GRPOArgsLora:
    """`args` as GRPOArgsLora (the same fields; `group_size` and `advantage` added, or kept when
    `args` already has them). Raises ArgsError naming the field when the batch cannot be split
    into groups."""
    if isinstance(args, GRPOArgsLora) and group_size is None and advantage is None:
        return args
    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init}
    fields["group_size"] = group_size or getattr(args, "group_size", DEFAULT_GROUP_SIZE)
    fields["advantage"] = advantage or getattr(args, "advantage", DEFAULT_ADVANTAGE)
    try:
        return GRPOArgsLora(**fields)
    except ArgsError:
        raise
    except ValueError as err:  # RLHFArgsLora's own checks raise plain ValueErrors
        raise ArgsError(str(err)) from None


class GRPOTrainer(LeanMemory, GRPOTrainerLora):
    """:class:`GRPOTrainerLora` taking the command's RLHFArgsLora, with its KL controller, in the
    engine's memory-lean way (:mod:`lora_rlhf.fast.lean_trainer`: the same values)."""

    def __init__(
        self,
        args: RLHFArgsLora,
        on_phase_end: PhaseCallback | None = None,
        show_progress: bool = True,
    ) -> None:
        super().__init__(grpo_args(args))
        # As RLHFTrainer's own __init__: sampling depends on the seed alone, not on what building
        # the model drew (the command seeds again anyway: lora_rlhf.rlhf.trainer.build_trainer).
        seed_everything(args.seed)
        self.on_phase_end, self.show_progress = on_phase_end, show_progress

    @classmethod
    def command_args(cls, args: RLHFArgsLora, settings: dict[str, Any]) -> GRPOArgsLora:
        """The command's arguments as this trainer takes them, with the command's `group_size`
        and `advantage` settings, checked before a model is loaded (ArgsError when the batch
        cannot be split into groups)."""
        return grpo_args(args, settings.get("group_size"), settings.get("advantage"))

    def learning_phase(self, memory: GroupMemory) -> None:
        controller = getattr(self, "kl_controller", None)
        if controller is None:
            super().learning_phase(memory)
            return
        # The lesson's objective reads β from args: this phase's coefficient goes there.
        self.args.kl_coef = controller.value
        super().learning_phase(memory)
        self._phase_stats["kl_coef"] = controller.value
        controller.update(self._phase_stats["kl"], n_samples=self.args.batch_size)
