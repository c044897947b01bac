"""GRPO bonus checks of `GRPOTrainerLora`: its rollout (the reference is the base model), its
objective on a real minibatch, no value head, and a short run that learns."""

from __future__ import annotations

import math
import statistics
from types import SimpleNamespace

import torch

from lora_rlhf.authoring.implementations import given_class
from lora_rlhf.checks.core import GRPO, CheckFailed, expect
from lora_rlhf.checks.grpo_advantages import grpo_reference, reference_objective, seeded_log_probs
from lora_rlhf.checks.reference import (
    ALPHA,
    RANK,
    adaptor_values,
    assign_layer,
    base_model,
    close,
    max_diff,
    merged_model,
    probe_device,
    seeded,
    seeded_tokens,
)
from lora_rlhf.rlhf.trainer import build_trainer

grpo_check = GRPO.check


# --------------------------------------------------------------------------------------------
# GRPOTrainerLora, on tiny-llama. The adaptors get non-zero values, so the policy differs from
# the reference and each can be told apart from the other.

MODEL, SEED = "tiny-llama", 11
TRAINER_NEEDS = ("GRPOTrainerLora",)


def _args(impl, **overrides):
    args_cls = given_class(impl, "GRPOArgsLora")
    settings = dict(
        base_model=MODEL,
        total_phases=2,
        warmup_steps=0,
        batch_size=8,
        group_size=4,
        num_minibatches=2,
        gen_len=6,
        lora_alpha=ALPHA,
        lora_rank=RANK,
        reward_fn="length",
        device=probe_device(),
    )
    settings.update(overrides)
    return args_cls(**settings)


def _trainer(impl, assign: bool = True, **overrides):
    trainer = build_trainer(impl.GRPOTrainerLora, _args(impl, **overrides), show_progress=False)
    if assign:
        for i, values in enumerate(adaptor_values(trainer.model.cfg, SEED)):
            assign_layer(trainer.model.lora[i], values, i)
    return trainer


def _gen_logprobs(model, ids, prefix_len):
    with torch.no_grad():
        logits = model(ids).double()
    logprobs = torch.log_softmax(logits[:, prefix_len - 1 : -1], dim=-1)
    return logprobs.gather(-1, ids[:, prefix_len:, None]).squeeze(-1)


@grpo_check("GRPOTrainerLora", points=1, needs=TRAINER_NEEDS)
def probe_grpo_trainer_rollout(impl):
    """rollout_phase: reference log-probs are the base model's, the policy's use the adaptors; group advantages."""
    trainer = _trainer(impl)
    memory = trainer.rollout_phase()
    return {
        "ids": memory.sample_ids,
        "prefix_len": trainer.prefix_len,
        "logprobs": memory.logprobs.float(),
        "ref_logprobs": memory.ref_logprobs.float(),
        "advantages": memory.advantages.float(),
        "rewards": torch.as_tensor(trainer.rewards).float(),
    }


@probe_grpo_trainer_rollout.judge
def judge_grpo_trainer_rollout(out):
    ids, prefix_len = out["ids"], out["prefix_len"]
    base = _gen_logprobs(base_model(MODEL), ids, prefix_len)
    policy = _gen_logprobs(merged_model(MODEL, SEED), ids, prefix_len)
    ref = out["ref_logprobs"]
    if not close(ref, base):
        hint = (
            ": these are the policy's — the reference is the plain forward, adaptors off"
            if close(ref, policy)
            else ""
        )
        raise CheckFailed(
            f"the reference log-probs are not the base model's (max diff {max_diff(ref, base):.3g})"
            + hint
        )
    if not close(out["logprobs"], policy):
        hint = (
            ": these are the base model's — run the policy with its LoRA hooks"
            if close(out["logprobs"], base)
            else ""
        )
        raise CheckFailed(
            "the policy's log-probs are not those of the model with its adaptors (max diff "
            f"{max_diff(out['logprobs'], policy):.3g}){hint}"
        )
    rewards = out["rewards"].tolist()
    groups = [rewards[i : i + 4] for i in range(0, len(rewards), 4)]
    want = torch.tensor(grpo_reference(groups, 1e-6))
    expect(
        close(out["advantages"], want, atol=1e-4),
        f"the memory's advantages should be the GRPO group advantages of the rewards {rewards} "
        f"(group_size 4): expected {[round(v, 4) for v in want.tolist()]}",
    )


@grpo_check("GRPOTrainerLora", points=1, needs=TRAINER_NEEDS)
def probe_grpo_trainer_objective(impl):
    """compute_grpo_objective runs the policy with its adaptors and passes the minibatch to the objective."""
    trainer = _trainer(impl)
    gen_len = trainer.args.gen_len
    ids = seeded_tokens(3, trainer.prefix_len + gen_len, 512, seed=60)
    fields = dict(
        sample_ids=ids,
        logprobs=seeded_log_probs((3, gen_len), seed=61, spread=1.0) - 5.5,
        ref_logprobs=seeded_log_probs((3, gen_len), seed=62, spread=1.0) - 5.5,
        advantages=seeded(3, seed=63),
    )
    minibatch_cls = getattr(impl, "GroupMinibatch", None)
    minibatch = (
        minibatch_cls(**fields) if isinstance(minibatch_cls, type) else SimpleNamespace(**fields)
    )
    value = trainer.compute_grpo_objective(minibatch)
    if value.requires_grad:
        value.backward()
    grads = [p.grad for p in trainer.model.lora_params() if p.grad is not None]
    return {
        "value": value.detach().float(),
        "prefix_len": trainer.prefix_len,
        "has_grad": bool(grads) and any(bool(g.abs().sum() > 0) for g in grads),
        "kl_coef": trainer.args.kl_coef,
        "clip_coef": trainer.args.clip_coef,
    }


@probe_grpo_trainer_objective.judge
def judge_grpo_trainer_objective(out):
    gen_len, prefix_len = 6, out["prefix_len"]
    ids = seeded_tokens(3, prefix_len + gen_len, 512, seed=60)
    old = (seeded_log_probs((3, gen_len), seed=61, spread=1.0) - 5.5).double()
    ref = (seeded_log_probs((3, gen_len), seed=62, spread=1.0) - 5.5).double()
    adv = seeded(3, seed=63).double()
    clip, beta = out["clip_coef"], out["kl_coef"]
    want = reference_objective(
        _gen_logprobs(merged_model(MODEL, SEED), ids, prefix_len), old, ref, adv, clip, beta
    )
    got = out["value"]
    if not close(got, want, atol=1e-4):
        base = reference_objective(
            _gen_logprobs(base_model(MODEL), ids, prefix_len), old, ref, adv, clip, beta
        )
        hint = (
            ": it is the base model's — the policy runs with its LoRA hooks"
            if close(got, base, atol=1e-4)
            else ""
        )
        raise CheckFailed(
            f"compute_grpo_objective should be calc_grpo_objective of the policy's log-probs and "
            f"the minibatch (expected {float(want):.6f}, got {float(got):.6f}){hint}"
        )
    expect(out["has_grad"], "the objective's gradient does not reach the LoRA parameters")


@grpo_check("GRPOTrainerLora", points=0.5, needs=TRAINER_NEEDS)
def probe_grpo_trainer_no_value_head(impl):
    """The policy has no value head; the optimizer holds exactly the LoRA parameters."""
    trainer = _trainer(impl, assign=False)
    model = trainer.model
    optimized = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    lora = {id(p) for p in model.lora.parameters()}
    head = getattr(model, "value_head", None)
    return {
        "value_head": head is not None,
        "head_in_optimizer": head is not None
        and bool({id(p) for p in head.parameters()} & optimized),
        "lora_missing": len(lora - optimized),
        "others": len(optimized - lora),
        "ref_is_model": trainer.ref_model is trainer.model,
        "base_trainable": sum(
            p.requires_grad for n, p in model.named_parameters() if not n.startswith("lora.")
        ),
    }


@probe_grpo_trainer_no_value_head.judge
def judge_grpo_trainer_no_value_head(out):
    expect(
        not out["head_in_optimizer"],
        "the optimizer trains a value head: GRPO has none — build the model with use_value_head=False",
    )
    expect(not out["value_head"], "the policy has a value head: build it with use_value_head=False")
    expect(
        out["lora_missing"] == 0, f"{out['lora_missing']} LoRA parameters are not in the optimizer"
    )
    expect(
        out["others"] == 0, f"the optimizer holds {out['others']} parameters that are not LoRA's"
    )
    expect(out["base_trainable"] == 0, f"{out['base_trainable']} base parameters are trainable")
    expect(
        out["ref_is_model"],
        "the reference should be the policy itself (its plain forward has no adaptors), not a copy",
    )


# A short run on tiny-llama in which the reward is easy to raise: the random model's samples hold
# a few copies of one frequent character, and more of them is the reward.
LEARN = dict(
    total_phases=8,
    batch_size=16,
    group_size=4,
    num_minibatches=2,
    batches_per_learning_phase=2,
    gen_len=8,
    base_lr=3e-2,
    lora_alpha=32.0,
    lora_rank=4,
    kl_coef=0.0,
    seed=1,
)


def reward_fn_letter_e(samples: list[str]) -> torch.Tensor:
    """The learning check's reward: how many times 'e' occurs in each sample."""
    return torch.tensor([s.count("e") for s in samples], dtype=torch.float32)


@grpo_check("GRPOTrainerLora", points=1, needs=TRAINER_NEEDS)
def probe_grpo_trainer_learns(impl):
    """A short tiny-llama run raises an easy reward (its mean over the last phases beats the first phases')."""
    torch.manual_seed(0)
    trainer = _trainer(impl, assign=False, reward_fn=reward_fn_letter_e, **LEARN)
    history = trainer.train()
    return {
        "rewards": [float(m["reward_mean"]) for m in history],
        "kl": [float(m.get("kl", math.nan)) for m in history],
    }


@probe_grpo_trainer_learns.judge
def judge_grpo_trainer_learns(out):
    rewards = out["rewards"]
    expect(
        len(rewards) == LEARN["total_phases"],
        f"train() should run {LEARN['total_phases']} phases, recorded {len(rewards)}",
    )
    expect(all(math.isfinite(r) for r in rewards), f"non-finite rewards: {rewards}")
    first, last = statistics.fmean(rewards[:2]), statistics.fmean(rewards[-2:])
    expect(
        last > first + 1.0 and last > 1.3 * first,
        f"the reward did not rise (first two phases {first:.2f}, last two {last:.2f}; per phase "
        f"{[round(r, 2) for r in rewards]}): check the sign of the advantages and that the "
        "objective is maximised",
    )
