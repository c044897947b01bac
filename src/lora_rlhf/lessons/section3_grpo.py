# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     name: python3
# ---

# %% [markdown]
# # Bonus — GRPO with LoRA: no value head, the adaptors-off model as the reference
#
# PPO (Section 1) needs a **value head** to turn one reward per sample into an advantage per
# token, and the value head must itself be learnt. Group-relative policy optimisation (GRPO,
# Shao et al. 2024, DeepSeekMath) drops it: sample a **group** of G completions of the same
# prompt and compare each completion's reward with the others' of its group. The group is the
# baseline; no critic is trained, stored or run.
#
# What stays from Sections 1 and 2: the clipped surrogate, a KL penalty towards the reference
# policy, and LoRA — so the reference is again *the same model with its adaptors off* (its plain
# forward). Without the value head, the policy is the Section 2 model built with
# `use_value_head=False`: the adaptors are the only trained parameters.
#
# The bonus carries optional points only (`lora-rlhf grade` lists them apart from Section 2's
# 100). Do Section 2 first: this file uses the library's `TransformerWithValueHeadLora`. To train
# your own, set `GRPOTrainerLora.model_class` to your class.
#
# This file is generated from `src/lora_rlhf/lessons/section3_grpo.py` (`lora-rlhf sync`).

# %%
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from lora_rlhf.lessons.section2_lora import (
    RLHFArgsLora,
    RLHFTrainerLora,
    TransformerWithValueHeadLora,
)
from lora_rlhf.rlhf.args import ArgsError
from lora_rlhf.rlhf.ppo import (
    calc_entropy_bonus,
    calc_kl_penalty,
    get_logprobs,
    get_optimizer_and_scheduler,
    minibatch_indices,
)

# %% [markdown]
# ## Exercise G1 — group advantages (GRPO and RLOO)
#
# A rollout samples `n_groups · G` completions; rows `[g·G, (g+1)·G)` are group g (G samples of
# the same prompt). Each completion gets **one** advantage, shared by all its tokens:
#
# * **GRPO**: `A_i = (r_i − mean_group) / (std_group + ε)`, where std is the sample standard
#   deviation (Bessel's correction: torch's default `std`, as in TRL and Section 1's
#   `normalize_reward`).
# * **RLOO** (REINFORCE leave-one-out, Ahmadian et al. 2024): `A_i = r_i − mean_{j≠i} r_j`, the
#   reward against the mean of the *other* G − 1 completions, which does not depend on r_i and so
#   keeps the gradient estimate unbiased. (It equals `G/(G−1) · (r_i − mean_group)`.)
#
# **Why per group, not per batch?** Different prompts have different attainable rewards: an easy
# prompt's completions all score high. Subtracting the group's mean asks "better than the other
# tries at *this* prompt?". (The course's task has one prompt, so every group samples it.)
#
# **Why ε?** A group whose rewards are all equal carries no signal: its std is 0, and
# `0 / (0 + ε)` gives the advantage 0 it deserves, where `0 / 0` would poison the update with NaN.
#
# Reshape with einops, `"(group member) -> group member"`, and reduce over `member`.


# %%
def group_advantages(
    rewards: Float[Tensor, " batch"],
    group_size: int,
    method: Literal["grpo", "rloo"] = "grpo",
    eps: float = 1e-6,
) -> Float[Tensor, " batch"]:
    """One advantage per completion: its reward against its group's (rows in groups of `group_size`)."""
    if group_size < 2 or rewards.shape[0] % group_size:
        raise ValueError(
            f"group_size must be >= 2 and divide the batch ({rewards.shape[0]}), got {group_size}"
        )
    if method not in ("grpo", "rloo"):
        raise ValueError(f"method must be 'grpo' or 'rloo', got {method!r}")
    # >>> exercise: group_advantages — GRPO (r − mean)/(std + ε) or RLOO r − mean of the others, per group
    grouped = einops.rearrange(rewards, "(group member) -> group member", member=group_size)
    mean = grouped.mean(dim=-1, keepdim=True)
    if method == "grpo":
        advantages = (grouped - mean) / (grouped.std(dim=-1, keepdim=True) + eps)
    else:
        mean_of_others = (grouped.sum(dim=-1, keepdim=True) - grouped) / (group_size - 1)
        advantages = grouped - mean_of_others
    return einops.rearrange(advantages, "group member -> (group member)")
    # <<< exercise


# %%
if __name__ == "__main__":
    from lora_rlhf import tests_grpo

    tests_grpo.testing_group_advantages(group_advantages)

# %% [markdown]
# ## Exercise G2 — the per-token KL estimator k3
#
# Section 1's penalty summed over the whole vocabulary: `KL(π ‖ π_ref) = Σ_v π(v) log π(v)/π_ref(v)`,
# which needs the reference's full logits kept for every minibatch. GRPO estimates the KL from the
# sampled token alone, with Schulman's **k3** estimator. With `δ = log π_ref(t) − log π(t)` for the
# sampled token t:
#
#     k3 = exp(δ) − δ − 1
#
# * **Unbiased**: under t ~ π, `E[exp(δ)] = Σ_t π_ref(t) = 1`, so `E[k3] = E[−δ] = KL(π ‖ π_ref)`.
# * **Never negative**: `e^x ≥ 1 + x` for every x, so each token's k3 ≥ 0 — unlike the plain
#   log-ratio k1 = −δ, which is unbiased too but negative for half the tokens and much noisier.
#
# It needs only the reference's log-prob of each sampled token: `[batch, gen_len]` numbers per
# rollout instead of `[batch, gen_len, d_vocab]`.


# %%
def calc_kl_k3(
    logprobs: Float[Tensor, "batch gen_len"], ref_logprobs: Float[Tensor, "batch gen_len"]
) -> Float[Tensor, "batch gen_len"]:
    """Per-token k3 estimate of KL(π ‖ π_ref) from the sampled tokens' log-probs."""
    # >>> exercise: calc_kl_k3 — exp(ref − logp) − (ref − logp) − 1, per token
    delta = ref_logprobs - logprobs
    return delta.exp() - delta - 1
    # <<< exercise


# %%
if __name__ == "__main__":
    from lora_rlhf import tests_grpo

    tests_grpo.testing_kl_k3(calc_kl_k3)

# %% [markdown]
# ## Exercise G3 — the GRPO objective
#
# Per generated token t of completion i, with `ratio = exp(logp − old_logp)` (the policy now
# against the policy that sampled, as in PPO) and the completion's advantage `A_i`:
#
#     objective_{i,t} = min(ratio · A_i, clip(ratio, 1 − ε, 1 + ε) · A_i) − β · k3_{i,t}
#
# Average it over the tokens of each completion, then over the completions (DeepSeekMath's
# `1/G Σ_i 1/|o_i| Σ_t`). Our completions all have `gen_len` tokens, so this is the mean over
# every token. We **maximise** it, as Section 1's objective (the optimizer has `maximize=True`):
# the GRPO *loss* is its negative.
#
# Two differences from Section 1's `calc_clipped_surrogate_objective`:
#
# * the advantages are **not** normalised again per minibatch: they already are, per group;
# * the KL penalty sits **inside** the per-token average (k3 of each sampled token), where PPO
#   folded a KL penalty over the whole vocabulary into a separate term.


# %%
def calc_grpo_objective(
    logprobs: Float[Tensor, "batch gen_len"],
    mb_logprobs: Float[Tensor, "batch gen_len"],
    ref_logprobs: Float[Tensor, "batch gen_len"],
    mb_advantages: Float[Tensor, " batch"],
    clip_coef: float,
    kl_coef: float,
) -> Float[Tensor, ""]:
    """The clipped surrogate minus kl_coef · k3, per token, averaged (to be maximised)."""
    # >>> exercise: calc_grpo_objective — clipped surrogate with one advantage per completion, minus β·k3, averaged
    ratio = (logprobs - mb_logprobs).exp()
    advantages = einops.rearrange(mb_advantages, "batch -> batch 1")
    surrogate = torch.minimum(
        ratio * advantages, ratio.clamp(1 - clip_coef, 1 + clip_coef) * advantages
    )
    per_token = surrogate - kl_coef * calc_kl_k3(logprobs, ref_logprobs)
    return per_token.mean(dim=-1).mean()
    # <<< exercise


# %%
if __name__ == "__main__":
    from lora_rlhf import tests_grpo

    tests_grpo.testing_grpo_objective(calc_grpo_objective)

# %% [markdown]
# ## Exercise G4 — `GRPOTrainerLora`
#
# Given: `GRPOArgsLora` (Section 2's arguments plus `group_size` and `advantage`; β = `kl_coef`
# defaults to DeepSeekMath's 0.04, since k3 is a per-token number, not Section 1's summed KL)
# and `GroupMemory`, the rollout's data served as shuffled minibatches, as Section 1's
# `ReplayMemory` but without values, and with the reference's log-probs instead of its logits.
#
# `GRPOTrainerLora` subclasses Section 2's `RLHFTrainerLora`. Its `__init__` (given) is Section
# 2's, but builds the model with `build_model()` and keeps the policy itself as `ref_model`; the
# rest is inherited: the optimizer (no value head: only the adaptors), sampling (`self.sample()`,
# the adapted policy), rewards (`self.compute_rewards`) and the loop (`train`). Write:
#
# * `build_model()`: `self.model_class.from_pretrained(...)` as in Section 2, with
#   `use_value_head=False`.
# * `policy_logits(tokens)`: the policy's logits, i.e. the model run with its adaptors,
#   `self.model.lora_fwd_hooks` (`forward_with_value_head` would also run the value head, which
#   this model does not have). Use `with self.model.hooks(fwd_hooks=...)`.
# * `rollout_phase()`: sample a batch, score it, compute the group advantages
#   (`args.group_size`, `args.advantage`) and the sampled tokens' log-probs under the policy and
#   under the reference — **the plain forward of `self.ref_model`**, adaptors off — all without
#   gradients. Pass what you computed to the given `record_rollout` (it keeps the samples and the
#   phase's statistics) and return a `GroupMemory`.
# * `compute_grpo_objective(minibatch)`: the policy's log-probs of the minibatch's tokens, then
#   `calc_grpo_objective`.


# %%
@dataclass
class GRPOArgsLora(RLHFArgsLora):
    group_size: int = 4
    advantage: Literal["grpo", "rloo"] = "grpo"
    kl_coef: float = 0.04

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.group_size, int) or self.group_size < 2:
            raise ArgsError(f"group_size must be an integer >= 2, got {self.group_size!r}")
        if self.batch_size % self.group_size:
            raise ArgsError(
                f"batch_size ({self.batch_size}) must be a multiple of group_size ({self.group_size})"
            )
        if self.advantage not in ("grpo", "rloo"):
            raise ArgsError(f"advantage must be 'grpo' or 'rloo', got {self.advantage!r}")


@dataclass
class GroupMinibatch:
    sample_ids: Int[Tensor, "minibatch seq"]
    logprobs: Float[Tensor, "minibatch gen_len"]
    ref_logprobs: Float[Tensor, "minibatch gen_len"]
    advantages: Float[Tensor, " minibatch"]


@dataclass
class GroupMemory:
    """A GRPO rollout; `get_minibatches` serves it as PPO's ReplayMemory does."""

    args: GRPOArgsLora
    sample_ids: Int[Tensor, "batch seq"]
    logprobs: Float[Tensor, "batch gen_len"]
    ref_logprobs: Float[Tensor, "batch gen_len"]
    advantages: Float[Tensor, " batch"]

    def get_minibatches(self) -> list[GroupMinibatch]:
        """`batches_per_learning_phase` shuffles of the batch, each cut into `num_minibatches`."""
        args, memory = (
            self.args,
            (self.sample_ids, self.logprobs, self.ref_logprobs, self.advantages),
        )
        return [
            GroupMinibatch(*(t[rows] for t in memory))
            for rows in minibatch_indices(
                args.batch_size,
                args.num_minibatches,
                args.batches_per_learning_phase,
                self.sample_ids.device,
            )
        ]


# %%
class GRPOTrainerLora(RLHFTrainerLora):
    """GRPO with LoRA: no value head; the reference is the policy's own plain forward."""

    args: GRPOArgsLora
    model_class: type[TransformerWithValueHeadLora] = TransformerWithValueHeadLora

    def __init__(self, args: GRPOArgsLora):
        torch.manual_seed(args.seed)
        self.args = args
        self.model = self.build_model()
        self.ref_model = self.model  # its plain forward: the adaptors off
        self.optimizer, self.scheduler = get_optimizer_and_scheduler(args, self.model)
        self.prefix_len = self.model.to_tokens(args.prefix, prepend_bos=args.prepend_bos).shape[-1]

    def build_model(self) -> TransformerWithValueHeadLora:
        args = self.args
        # >>> exercise: GRPOTrainerLora.build_model — the Section 2 LoRA model, without a value head
        return self.model_class.from_pretrained(
            args.base_model,
            lora_alpha=args.lora_alpha,
            rank=args.lora_rank,
            use_value_head=False,
            device=self.device,
            dtype=args.dtype,
        )
        # <<< exercise

    def policy_logits(self, tokens: Int[Tensor, "batch seq"]) -> Float[Tensor, "batch seq d_vocab"]:
        # >>> exercise: GRPOTrainerLora.policy_logits — the forward pass with the LoRA hooks
        with self.model.hooks(fwd_hooks=self.model.lora_fwd_hooks):
            return self.model(tokens)
        # <<< exercise

    def rollout_phase(self) -> GroupMemory:
        args = self.args
        # >>> exercise: GRPOTrainerLora.rollout_phase — sample, score, group advantages, policy and reference log-probs
        sample_ids, samples = self.sample()
        with torch.no_grad():
            logits = self.policy_logits(sample_ids)
            ref_logits = self.ref_model(sample_ids)  # plain forward: adaptors off
        logprobs = get_logprobs(logits, sample_ids, self.prefix_len)
        ref_logprobs = get_logprobs(ref_logits, sample_ids, self.prefix_len)
        rewards = self.compute_rewards(samples)
        advantages = group_advantages(rewards, args.group_size, args.advantage)
        self.record_rollout(samples, rewards, logits, ref_logits, logprobs, ref_logprobs)
        return GroupMemory(args, sample_ids, logprobs, ref_logprobs, advantages.to(logprobs.dtype))
        # <<< exercise

    def compute_grpo_objective(self, minibatch: GroupMinibatch) -> Float[Tensor, ""]:
        args = self.args
        # >>> exercise: GRPOTrainerLora.compute_grpo_objective — the policy's log-probs, then calc_grpo_objective
        logits = self.policy_logits(minibatch.sample_ids)
        logprobs = get_logprobs(logits, minibatch.sample_ids, self.prefix_len)
        return calc_grpo_objective(
            logprobs,
            minibatch.logprobs,
            minibatch.ref_logprobs,
            minibatch.advantages,
            args.clip_coef,
            args.kl_coef,
        )
        # <<< exercise

    @torch.no_grad()
    def record_rollout(
        self,
        samples: list[str],
        rewards: Float[Tensor, " batch"],
        logits: Float[Tensor, "batch seq d_vocab"],
        ref_logits: Float[Tensor, "batch seq d_vocab"],
        logprobs: Float[Tensor, "batch gen_len"],
        ref_logprobs: Float[Tensor, "batch gen_len"],
    ) -> None:
        """Keep the rollout's samples and rewards, and what the phase reports (as Section 1's:
        `kl` is the full-vocabulary KL(π ‖ π_ref) per token, `kl_k3` its k3 estimate)."""
        gen_len = self.args.gen_len
        self.samples, self.rewards = samples, rewards
        self.sample_history.append(samples)
        self._phase_stats = {
            "reward_mean": rewards.mean().item(),
            "reward_std": rewards.std().item(),
            "kl": calc_kl_penalty(logits, ref_logits, 1.0, gen_len).item(),
            "kl_k3": calc_kl_k3(logprobs, ref_logprobs).mean().item(),
            "entropy": calc_entropy_bonus(logits, 1.0, gen_len).item(),
        }

    @torch.no_grad()
    def kl_to_reference(self, sample_ids: Int[Tensor, "batch seq"]) -> float:
        """KL(π ‖ π_ref) per generated token on these samples, as the rollout's `kl` metric."""
        logits, ref_logits = self.policy_logits(sample_ids), self.ref_model(sample_ids)
        return calc_kl_penalty(logits, ref_logits, 1.0, self.args.gen_len).item()

    def learning_phase(self, memory: GroupMemory) -> None:
        """One optimizer step per minibatch, then one scheduler step, as Section 1's."""
        objectives = []
        for minibatch in memory.get_minibatches():
            self.optimizer.zero_grad()
            objective = self.compute_grpo_objective(minibatch)
            objective.backward()
            nn.utils.clip_grad_norm_(self.model.lora_params(), self.args.max_grad_norm)
            self.optimizer.step()
            objectives.append(objective.item())
        self._phase_stats["lr"] = self.optimizer.param_groups[0]["lr"]
        self._phase_stats["objective"] = sum(objectives) / len(objectives)
        self.scheduler.step()


# %%
if __name__ == "__main__":
    from lora_rlhf import tests_grpo

    tests_grpo.testing_grpo_trainer(GRPOTrainerLora)
