"""Section 1: the PPO-RLHF training loop (full fine-tuning against a frozen reference copy).

Each phase: a *rollout* samples a batch from the policy, scores it with the reward function and
stores log-probs, values, advantages and the reference logits in a :class:`ReplayMemory`; a
*learning phase* then takes PPO steps on minibatches of it, maximising
clipped surrogate − value loss + entropy bonus − KL penalty.

Subclass hooks: :meth:`RLHFTrainer.build_model`, :meth:`RLHFTrainer.build_ref_model`,
:meth:`RLHFTrainer.build_optimizer_and_scheduler`, :meth:`RLHFTrainer.compute_rewards`; and
:meth:`RLHFTrainer.run_phase` runs one phase on its own (e.g. to time it). A subclass may also
replace ``__init__`` entirely, as Section 2's course-shaped ``RLHFTrainerLora`` does: whatever
the phases need and its ``__init__`` did not set (device, KL controller, history, progress
settings) is made on first use (see ``_DEFAULTS``).
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from lora_rlhf.models.devices import default_device
from lora_rlhf.models.sharing import share_frozen_copies, untie_unembed
from lora_rlhf.rlhf.args import RLHFArgs
from lora_rlhf.rlhf.kl_control import KLController, make_kl_controller
from lora_rlhf.rlhf.ppo import (
    ReplayMemory,
    ReplayMinibatch,
    calc_clipped_surrogate_objective,
    calc_entropy_bonus,
    calc_kl_penalty,
    calc_value_function_loss,
    clip_fraction,
    compute_advantages,
    gen_positions,
    get_logprobs,
    get_optimizer_and_scheduler,
    get_samples,
)
from lora_rlhf.rlhf.rewards import normalize_reward
from lora_rlhf.rlhf.value_head import HookedTransformerWithValueHead
from lora_rlhf.rlhf.wandb_log import init_wandb, log_wandb

PhaseCallback = Callable[[dict[str, Any]], None]

# Per-minibatch statistics averaged into each phase's metrics.
_LEARNING_STATS = (
    "objective",
    "clipped_surrogate",
    "value_loss",
    "entropy_bonus",
    "kl_penalty",
    "clip_frac",
)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (every device's) random number generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_trainer(
    trainer_class: type[RLHFTrainer],
    args: RLHFArgs,
    on_phase_end: PhaseCallback | None = None,
    show_progress: bool = True,
) -> RLHFTrainer:
    """`trainer_class(args)` (any ``__init__(self, args)``: the library's, a subclass's, the
    course's), then seeded again and given the callback and progress setting. Building a model
    draws from the random number generators (and TransformerLens may reseed them), so sampling
    depends on ``args.seed`` alone only when the generators are seeded after it, as
    :class:`RLHFTrainer`'s own ``__init__`` does."""
    trainer = trainer_class(args)
    seed_everything(args.seed)
    trainer.on_phase_end = on_phase_end
    trainer.show_progress = show_progress
    return trainer


def _model_device(trainer: RLHFTrainer) -> torch.device:
    model = trainer.__dict__.get("model")
    if model is not None:
        param = next(model.parameters(), None)
        if param is not None:
            return param.device
    args = trainer.args
    return torch.device(args.device) if getattr(args, "device", None) else default_device()


# What ``train()`` and the phases need beyond what a subclass's own ``__init__`` sets. Section 2's
# course-shaped ``RLHFTrainerLora.__init__`` sets only args, run_name, model, ref_model, optimizer,
# scheduler and prefix_len (it does not call ``RLHFTrainer.__init__``): the rest is made here, on
# first use, as this class's ``__init__`` would have made it.
_DEFAULTS: dict[str, Callable[[RLHFTrainer], Any]] = {
    "device": _model_device,
    "kl_controller": lambda t: make_kl_controller(t.args),
    "on_phase_end": lambda t: None,
    "show_progress": lambda t: True,
    "phase": lambda t: 0,
    "history": lambda t: [],
    "samples": lambda t: [],
    "rewards": lambda t: None,
    "sample_history": lambda t: [],
    "_phase_stats": lambda t: {},
    "_minibatch_stats": lambda t: [],
    "run_name": lambda t: (
        f"{t.args.wandb_project_name}__seed{t.args.seed}__{time.strftime('%Y%m%d-%H%M%S')}"
    ),
}


class RLHFTrainer:
    """Trains ``args.base_model`` with PPO-RLHF; see the module docstring.

    Attributes:
        model: the policy, a :class:`HookedTransformerWithValueHead`.
        ref_model: the reference policy (its plain forward gives the reference logits).
        optimizer, scheduler: from :meth:`build_optimizer_and_scheduler`.
        kl_controller: the KL coefficient (``kl_controller.value``): fixed at ``args.kl_coef``, or
            adapted after each phase when ``args.kl_target`` is set (:mod:`lora_rlhf.rlhf.kl_control`).
        prefix_len: number of prompt tokens (BOS included).
        history: one metrics dict per finished phase (see :meth:`train`).
        samples, rewards: the latest rollout's decoded samples and raw rewards.
        sample_history: the decoded samples of every rollout so far.
        on_phase_end: called with each phase's metrics (e.g. to write them or a checkpoint).
    """

    def __init__(
        self,
        args: RLHFArgs,
        on_phase_end: PhaseCallback | None = None,
        show_progress: bool = True,
    ) -> None:
        self.args = args
        self.on_phase_end = on_phase_end
        self.show_progress = show_progress
        self.device = torch.device(args.device) if args.device else default_device()
        self.run_name = _DEFAULTS["run_name"](self)

        seed_everything(args.seed)
        self.model = self.build_model()
        self.ref_model = self.build_ref_model()
        # Seed again: building a model may reseed the global RNG (TransformerLens does when its
        # config has a seed), and sampling must depend on args.seed alone.
        seed_everything(args.seed)
        self.optimizer, self.scheduler = self.build_optimizer_and_scheduler()
        self.kl_controller: KLController = make_kl_controller(args)
        prompt_ids = self.model.to_tokens(args.prefix, prepend_bos=args.prepend_bos)
        self.prefix_len: int = prompt_ids.shape[-1]

        self.phase = 0
        self.history: list[dict[str, Any]] = []
        self.samples: list[str] = []
        self.rewards: Float[Tensor, " batch"] | None = None
        self.sample_history: list[list[str]] = []
        self._phase_stats: dict[str, Any] = {}
        self._minibatch_stats: list[dict[str, float]] = []

    def __getattr__(self, name: str) -> Any:
        # Only reached when `name` is not set: a subclass's own __init__ left it out.
        make = _DEFAULTS.get(name)
        if make is None or name == "args" or "args" not in self.__dict__:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        value = make(self)
        setattr(self, name, value)
        return value

    # ------------------------------------------------------------------ extension points

    def build_model(self) -> HookedTransformerWithValueHead:
        """The policy with its value head, on ``self.device`` and in training mode."""
        model = HookedTransformerWithValueHead.from_pretrained(
            self.args.base_model, device=self.device
        )
        # Full fine-tuning trains TransformerLens' W_E and W_U as two parameters: a tied
        # unembedding (the embedded model's) gets its own memory first.
        return untie_unembed(model).train()

    def build_ref_model(self) -> HookedTransformer:
        """A frozen copy of the policy's language model (full fine-tuning changes the policy's
        own weights, so the reference needs its own). Only its plain forward is used. Being
        frozen, it holds its unembedding as a view of its embedding where the two are equal, and
        one rotary table for all layers (``lora_rlhf.models.sharing``)."""
        ref_model = copy.deepcopy(self.model)
        ref_model.setup_value_head(use_value_head=False)
        ref_model.requires_grad_(False)
        return share_frozen_copies(ref_model).eval()

    def build_optimizer_and_scheduler(
        self,
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        return get_optimizer_and_scheduler(self.args, self.model)

    def compute_rewards(self, samples: list[str]) -> Float[Tensor, " batch"]:
        """Raw rewards of the decoded samples (``args.reward_fn``), as float32 on ``self.device``."""
        rewards = self.args.reward_fn(samples)
        return torch.as_tensor(rewards, dtype=torch.float32).to(self.device)

    # ------------------------------------------------------------------ PPO

    def sample(self) -> tuple[Tensor, list[str]]:
        """A batch of samples from the policy, with the run's prompt and sampling settings: the
        token ids ``[batch_size, prefix_len + gen_len]`` and their texts."""
        args = self.args
        return get_samples(
            self.model,
            prompt=args.prefix,
            batch_size=args.batch_size,
            gen_len=args.gen_len,
            temperature=args.temperature,
            top_k=args.top_k,
            prepend_bos=args.prepend_bos,
        )

    @torch.no_grad()
    def kl_to_reference(self, sample_ids: Tensor) -> float:
        """KL(π ‖ π_ref) per generated token of the current policy on these samples (the
        rollout's ``kl`` metric, for samples drawn outside a phase)."""
        logits, _ = self.model.forward_with_value_head(sample_ids)
        ref_logits = self.ref_model(sample_ids)
        return calc_kl_penalty(logits, ref_logits, kl_coef=1.0, gen_len=self.args.gen_len).item()

    def rollout_phase(self) -> ReplayMemory:
        """Sample a batch, score it and store what the learning phase needs."""
        args = self.args
        sample_ids, samples = self.sample()
        with torch.no_grad():
            logits, values = self.model.forward_with_value_head(sample_ids)
            ref_logits = self.ref_model(sample_ids)
            logprobs = get_logprobs(logits, sample_ids, self.prefix_len)
            kl = calc_kl_penalty(logits, ref_logits, kl_coef=1.0, gen_len=args.gen_len)
            entropy = calc_entropy_bonus(logits, ent_coef=1.0, gen_len=args.gen_len)

        rewards = self.compute_rewards(samples)
        normed = normalize_reward(rewards) if args.normalize_reward else rewards
        advantages = compute_advantages(values, normed.to(values.dtype), self.prefix_len)

        self.samples, self.rewards = samples, rewards
        self.sample_history.append(samples)
        self._phase_stats = {
            "reward_mean": rewards.mean().item(),
            "reward_std": rewards.std().item() if rewards.numel() > 1 else 0.0,
            "kl": kl.item(),
            "entropy": entropy.item(),
        }
        return ReplayMemory(
            args=args,
            sample_ids=sample_ids,
            logprobs=logprobs,
            advantages=advantages,
            values=values,
            ref_logits=ref_logits,
        )

    def compute_rlhf_objective(self, minibatch: ReplayMinibatch) -> Float[Tensor, ""]:
        """clipped surrogate − value loss + entropy bonus − KL penalty (to be maximised)."""
        args = self.args
        logits, values = self.model.forward_with_value_head(minibatch.sample_ids)
        logprobs = get_logprobs(logits, minibatch.sample_ids, self.prefix_len)
        gen_logits = gen_positions(logits, args.gen_len)

        clipped_surrogate = calc_clipped_surrogate_objective(
            logprobs, minibatch.logprobs, minibatch.advantages, args.clip_coef, args.gen_len
        )
        value_loss = calc_value_function_loss(values, minibatch.returns, args.vf_coef, args.gen_len)
        entropy_bonus = calc_entropy_bonus(gen_logits, args.ent_coef, args.gen_len)
        kl_coef = self.kl_controller.value
        kl_penalty = calc_kl_penalty(gen_logits, minibatch.ref_logits, kl_coef, args.gen_len)
        objective = clipped_surrogate - value_loss + entropy_bonus - kl_penalty

        self._minibatch_stats.append(
            {
                "objective": objective.item(),
                "clipped_surrogate": clipped_surrogate.item(),
                "value_loss": value_loss.item(),
                "entropy_bonus": entropy_bonus.item(),
                "kl_penalty": kl_penalty.item(),
                "clip_frac": clip_fraction(logprobs, minibatch.logprobs, args.clip_coef),
            }
        )
        return objective

    def learning_phase(self, memory: ReplayMemory) -> None:
        """One optimizer step per minibatch, then one scheduler step."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self._minibatch_stats = []
        for minibatch in memory.get_minibatches():
            self.optimizer.zero_grad()
            objective = self.compute_rlhf_objective(minibatch)
            objective.backward()
            nn.utils.clip_grad_norm_(params, max_norm=self.args.max_grad_norm)
            self.optimizer.step()
        self._phase_stats["lr"] = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        # The coefficient this phase used; then the next phase's, from this rollout's KL.
        self._phase_stats["kl_coef"] = self.kl_controller.value
        self.kl_controller.update(self._phase_stats["kl"], n_samples=self.args.batch_size)
        for key in _LEARNING_STATS:
            values = [stats[key] for stats in self._minibatch_stats]
            self._phase_stats[key] = float(np.mean(values)) if values else float("nan")

    # ------------------------------------------------------------------ loop

    def run_phase(self) -> dict[str, Any]:
        """One rollout and one learning phase; return (and record in :attr:`history`) its metrics."""
        start = time.perf_counter()
        memory = self.rollout_phase()
        rollout_seconds = time.perf_counter() - start
        self.learning_phase(memory)
        metrics = {"phase": self.phase, **self._phase_stats}
        metrics["rollout_seconds"] = rollout_seconds
        metrics["phase_seconds"] = time.perf_counter() - start
        self.history.append(metrics)
        self.phase += 1
        return metrics

    def train(self) -> list[dict[str, Any]]:
        """Run the remaining phases; return :attr:`history`.

        Each phase's metrics: ``phase``, ``reward_mean``, ``reward_std`` (raw rewards), ``kl`` and
        ``entropy`` (unscaled means over the rollout's generated positions), ``value_loss``,
        ``clip_frac``, ``objective`` and the other loss terms (means over minibatches), ``lr``
        (base learning rate used), ``kl_coef`` (the KL coefficient used), ``rollout_seconds``,
        ``phase_seconds``.
        """
        args = self.args
        run = init_wandb(self) if args.use_wandb else None
        try:
            bar = tqdm(
                total=args.total_phases,
                initial=self.phase,
                desc="RLHF",
                unit="phase",
                disable=not self.show_progress,
            )
            with bar:
                while self.phase < args.total_phases:
                    metrics = self.run_phase()
                    recent = [m["reward_mean"] for m in self.history[-10:]]
                    bar.set_postfix(
                        reward=f"{metrics['reward_mean']:.3f}", running=f"{np.mean(recent):.3f}"
                    )
                    bar.update()
                    if run is not None:
                        log_wandb(self, metrics)
                    if self.on_phase_end is not None:
                        self.on_phase_end(metrics)
        finally:
            if run is not None:
                import wandb

                wandb.finish()
        return self.history
