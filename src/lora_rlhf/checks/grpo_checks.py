"""Checks of the GRPO bonus (``section3_grpo.py``): group advantages, the k3 estimator, the GRPO
objective and `GRPOTrainerLora`.

They live in their own registry, :data:`GRPO` (read it with ``GRPO.for_exercise``), not
in :data:`lora_rlhf.checks.core.CHECKS`: ``checks_for()`` stays Section 2's 100-point rubric.
Their points (:data:`BONUS_POINTS` in all) are optional bonus points on top of those 100.
Every judge compares with references written here, in float64, from the formulas (or from the
base and merged tiny models of :mod:`lora_rlhf.checks.reference`); none imports the code it judges.
"""

from __future__ import annotations

import math
import statistics
from types import SimpleNamespace

import torch

from lora_rlhf.authoring.implementations import SECTIONS, given_class
from lora_rlhf.checks.core import CheckFailed, Registry, expect
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

GRPO_FILE = SECTIONS["grpo"][0]
GRPO_EXERCISES = ("group_advantages", "calc_kl_k3", "calc_grpo_objective", "GRPOTrainerLora")
GRPO = Registry("grpo")
GRPO_CHECKS = GRPO.checks  # the names the grader reads
grpo_check = GRPO.check
grpo_checks_for = GRPO.for_exercise


# --------------------------------------------------------------------------------------------
# Group advantages. Hand-made groups of 4 (the batch mean is 2.25, so a batch-wide baseline or a
# batch-wide std is visible), one of them all equal.

GROUPS = [[1.0, 2.0, 3.0, 6.0], [5.0, 5.0, 5.0, 5.0], [0.0, 0.0, 1.0, 0.0]]
PAIRS = [[1.0, 3.0], [-2.0, 2.0], [4.0, 4.0]]  # groups of two: a layout mix-up shows


def _grpo_reference(groups: list[list[float]], eps: float) -> list[float]:
    out = []
    for g in groups:
        mean, std = statistics.fmean(g), statistics.stdev(g)
        out += [(r - mean) / (std + eps) for r in g]
    return out


def _rloo_reference(groups: list[list[float]]) -> list[float]:
    return [r - statistics.fmean(g[:i] + g[i + 1 :]) for g in groups for i, r in enumerate(g)]


def _flat(groups):
    return torch.tensor([r for g in groups for r in g], dtype=torch.float32)


def _advantages(impl, groups, method: str):
    rewards = _flat(groups)
    out = impl.group_advantages(rewards.clone(), len(groups[0]), method)
    return out.detach().float() if isinstance(out, torch.Tensor) else out


@grpo_check("group_advantages", points=1.5)
def probe_grpo_advantages_grpo(impl):
    """GRPO advantages (r − group mean)/(group std + ε) on hand-made groups of 4 and of 2."""
    return {"fours": _advantages(impl, GROUPS, "grpo"), "twos": _advantages(impl, PAIRS, "grpo")}


@probe_grpo_advantages_grpo.judge
def judge_grpo_advantages_grpo(out):
    for key, groups in (("fours", GROUPS), ("twos", PAIRS)):
        got = out[key]
        expect(
            isinstance(got, torch.Tensor) and tuple(got.shape) == (len(groups) * len(groups[0]),),
            f"group_advantages should return one advantage per reward, shape "
            f"[{len(groups) * len(groups[0])}]; got {getattr(got, 'shape', type(got).__name__)}",
        )
        expect(bool(torch.isfinite(got).all()), _NAN_HINT)
        want = torch.tensor(_grpo_reference(groups, 1e-6))
        if close(got, want, atol=1e-4):
            continue
        flat = [r for g in groups for r in g]
        if close(got, torch.tensor(_grpo_reference([flat], 1e-6)), atol=1e-4):
            raise CheckFailed(
                "the advantages use the mean and std of the whole batch: take them per group "
                "(rows [g·G, (g+1)·G) are group g)"
            )
        if close(got, -want, atol=1e-4):
            raise CheckFailed("the advantages have the wrong sign: r − mean, not mean − r")
        population = []
        for g in groups:
            mean, std = statistics.fmean(g), statistics.pstdev(g)
            population += [(r - mean) / (std + 1e-6) for r in g]
        if close(got, torch.tensor(population), atol=1e-4):
            raise CheckFailed(
                "the std is the population std (divides by G): use the sample std "
                "(torch's default, Bessel's correction)"
            )
        centred = [r - statistics.fmean(g) for g in groups for r in g]
        if close(got, torch.tensor(centred), atol=1e-4):
            raise CheckFailed(
                "GRPO divides by the group's std (+ ε): the advantages are only centred"
            )
        raise CheckFailed(
            f"GRPO advantages of the groups {groups} should be {want.tolist()}, got "
            f"{[round(v, 4) for v in got.tolist()]} (max diff {max_diff(got, want):.3g})"
        )


_NAN_HINT = (
    "the advantages contain NaN or inf: a group whose rewards are all equal has std 0 — "
    "divide by (std + ε)"
)


@grpo_check("group_advantages", points=1)
def probe_grpo_advantages_rloo(impl):
    """RLOO advantages r − mean of the other rewards of the group, on hand-made groups."""
    return {"fours": _advantages(impl, GROUPS, "rloo"), "twos": _advantages(impl, PAIRS, "rloo")}


@probe_grpo_advantages_rloo.judge
def judge_grpo_advantages_rloo(out):
    for key, groups in (("fours", GROUPS), ("twos", PAIRS)):
        got = out[key]
        want = torch.tensor(_rloo_reference(groups))
        expect(
            isinstance(got, torch.Tensor) and tuple(got.shape) == tuple(want.shape),
            f"group_advantages(method='rloo') should return shape {list(want.shape)}",
        )
        if close(got, want, atol=1e-4):
            continue
        centred = torch.tensor([r - statistics.fmean(g) for g in groups for r in g])
        if close(got, centred, atol=1e-4):
            raise CheckFailed(
                "RLOO subtracts the mean of the *other* G − 1 rewards, not the group mean "
                "(that is G/(G−1) times larger)"
            )
        if close(got, -want, atol=1e-4):
            raise CheckFailed("the RLOO advantages have the wrong sign: r − mean of the others")
        raise CheckFailed(
            f"RLOO advantages of {groups} should be {want.tolist()}, got "
            f"{[round(v, 4) for v in got.tolist()]}"
        )


@grpo_check("group_advantages", points=0.5)
def probe_grpo_advantages_equal_group(impl):
    """A group whose rewards are all equal gets advantages 0 (finite), for GRPO and RLOO."""
    groups = [[3.0, 3.0, 3.0, 3.0], [-1.0, -1.0, -1.0, -1.0]]
    return {m: _advantages(impl, groups, m) for m in ("grpo", "rloo")}


@probe_grpo_advantages_equal_group.judge
def judge_grpo_advantages_equal_group(out):
    for method in ("grpo", "rloo"):
        got = out[method]
        expect(isinstance(got, torch.Tensor), f"{method}: expected a tensor")
        expect(bool(torch.isfinite(got).all()), f"{method}: {_NAN_HINT}")
        expect(
            bool((got.abs() < 1e-6).all()),
            f"{method}: groups of equal rewards carry no signal; their advantages should be 0, "
            f"got {got.tolist()}",
        )


# --------------------------------------------------------------------------------------------
# k3


def _log_probs(shape, seed, spread):
    return -seeded(*shape, seed=seed, scale=spread).abs() - 0.05


@grpo_check("calc_kl_k3", points=1.5)
def probe_grpo_kl_k3(impl):
    """k3 = exp(ref − logp) − (ref − logp) − 1 per token: values, gradient, ≥ 0, 0 where equal."""
    logprobs = _log_probs((3, 5), seed=40, spread=2.0).requires_grad_(True)
    ref = _log_probs((3, 5), seed=41, spread=2.0)
    k3 = impl.calc_kl_k3(logprobs, ref)
    if k3.requires_grad:  # else the judge reports the missing gradient
        (k3 * seeded(3, 5, seed=42)).sum().backward()
    same = impl.calc_kl_k3(ref.clone(), ref.clone())
    return {"k3": k3.detach().float(), "grad": logprobs.grad, "same": same.detach().float()}


@probe_grpo_kl_k3.judge
def judge_grpo_kl_k3(out):
    logprobs = _log_probs((3, 5), seed=40, spread=2.0).double()
    ref = _log_probs((3, 5), seed=41, spread=2.0).double()
    delta = ref - logprobs
    want = torch.exp(delta) - delta - 1
    got = out["k3"]
    expect(
        tuple(got.shape) == (3, 5),
        f"calc_kl_k3 returns one value per token: shape [3, 5] expected, got {list(got.shape)}",
    )
    if not close(got, want, atol=1e-5):
        if close(got, -delta, atol=1e-5) or close(got, delta, atol=1e-5):
            raise CheckFailed(
                "this is the log-ratio (k1), not k3: k3 = exp(δ) − δ − 1 with δ = ref − logp"
            )
        if close(got, torch.exp(-delta) + delta - 1, atol=1e-5):
            raise CheckFailed("δ has the wrong sign: δ = ref_logprobs − logprobs")
        raise CheckFailed(
            f"k3 should be exp(δ) − δ − 1 with δ = ref − logp (max diff {max_diff(got, want):.3g})"
        )
    expect(bool((got >= 0).all()), "k3 must be ≥ 0 for every token (e^x ≥ 1 + x)")
    expect(
        bool((out["same"].abs() < 1e-6).all()), "k3 of a policy equal to the reference must be 0"
    )
    weights = seeded(3, 5, seed=42).double()
    want_grad = weights * (1 - torch.exp(delta))  # ∂k3/∂logp
    expect(
        out["grad"] is not None and close(out["grad"], want_grad, atol=1e-5),
        "the gradient of k3 with respect to logprobs should be 1 − exp(ref − logp): is a term "
        "detached?",
    )


# --------------------------------------------------------------------------------------------
# The GRPO objective. Ratios chosen so that both sides of the clip are active: a positive
# advantage with a ratio above 1 + ε (clipped, no gradient) and a negative one with a ratio
# below 1 − ε (clipped too), next to tokens where the unclipped term is the smaller.

CLIP, BETA = 0.2, 0.1
RATIOS = [[1.5, 0.9, 1.05], [0.5, 1.1, 0.95], [1.3, 0.7, 1.0], [0.6, 1.25, 1.1]]
ADVANTAGES = [1.0, -1.0, -0.5, 2.0]


def _objective_inputs(square: bool):
    ratios = torch.tensor(RATIOS if not square else [r + [1.3] for r in RATIOS])
    mb_logprobs = _log_probs(tuple(ratios.shape), seed=50, spread=1.5)
    logprobs = mb_logprobs + ratios.log().to(mb_logprobs.device)
    ref = _log_probs(tuple(ratios.shape), seed=51, spread=1.5)
    return logprobs, mb_logprobs, ref, torch.tensor(ADVANTAGES, device=logprobs.device)


def _reference_objective(logprobs, mb_logprobs, ref, advantages, clip, beta):
    ratio = torch.exp(logprobs - mb_logprobs)
    adv = advantages[:, None]
    surrogate = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - clip, 1 + clip) * adv)
    delta = ref - logprobs
    per_token = surrogate - beta * (torch.exp(delta) - delta - 1)
    return per_token.mean(dim=1).mean(dim=0)


@grpo_check("calc_grpo_objective", points=2)
def probe_grpo_objective(impl):
    """The clipped surrogate − β·k3 per token, averaged, with both clip sides active: value and gradient."""
    out = {}
    for key, square, beta in (
        ("3 tokens", False, BETA),
        ("4 tokens", True, BETA),
        ("β=0", False, 0.0),
    ):
        logprobs, mb_logprobs, ref, adv = _objective_inputs(square)
        logprobs.requires_grad_(True)
        value = impl.calc_grpo_objective(logprobs, mb_logprobs, ref, adv, CLIP, beta)
        if value.requires_grad:  # else the judge reports the missing gradient
            value.backward()
        out[key] = {"value": value.detach().float(), "grad": logprobs.grad}
    return out


@probe_grpo_objective.judge
def judge_grpo_objective(out):
    for key, square, beta in (
        ("3 tokens", False, BETA),
        ("4 tokens", True, BETA),
        ("β=0", False, 0.0),
    ):
        logprobs, mb_logprobs, ref, adv = (t.double().cpu() for t in _objective_inputs(square))
        ratio = torch.exp(logprobs - mb_logprobs)
        upper = (ratio > 1 + CLIP) & (adv[:, None] > 0)
        lower = (ratio < 1 - CLIP) & (adv[:, None] < 0)
        assert upper.any() and lower.any(), "the check's inputs must clip on both sides"
        logprobs.requires_grad_(True)
        want = _reference_objective(logprobs, mb_logprobs, ref, adv, CLIP, beta)
        (want_grad,) = torch.autograd.grad(want, logprobs)
        got = out[key]
        expect(
            got["value"].numel() == 1, f"the objective must be a scalar, got {got['value'].shape}"
        )
        if not close(got["value"], want.detach(), atol=1e-5):
            raise CheckFailed(
                _objective_hint(
                    got["value"], logprobs.detach(), mb_logprobs, ref, adv, beta, want.detach()
                )
            )
        expect(
            got["grad"] is not None and close(got["grad"], want_grad, atol=1e-5),
            f"({key}) the objective's value is right but its gradient is not (max diff "
            f"{max_diff(got['grad'], want_grad) if got['grad'] is not None else 'no gradient'}): "
            "clipped tokens must get no gradient from the surrogate (torch.minimum of the two "
            "terms, not a mask on the ratio); nothing may be detached",
        )


def _objective_hint(got, logprobs, mb_logprobs, ref, adv, beta, want) -> str:
    def variant(**changes) -> bool:
        kw = dict(
            logprobs=logprobs,
            mb_logprobs=mb_logprobs,
            ref=ref,
            advantages=adv,
            clip=CLIP,
            beta=beta,
        )
        kw.update(changes)
        return close(got, _reference_objective(**kw), atol=1e-5)

    ratio = torch.exp(logprobs - mb_logprobs)
    adv_col = adv[:, None]
    surrogate = torch.minimum(ratio * adv_col, ratio.clamp(1 - CLIP, 1 + CLIP) * adv_col)
    delta = ref - logprobs
    if variant(advantages=-adv):
        return "the advantages have the wrong sign"
    if variant(beta=-beta) and beta:
        return "the KL term has the wrong sign: subtract β·k3 (we maximise the objective)"
    if variant(beta=0.0) and beta:
        return "the KL penalty β·k3 is missing"
    if variant(advantages=(adv - adv.mean()) / (adv.std() + 1e-8)):
        return (
            "the advantages are normalised again over the minibatch: GRPO's are already "
            "normalised per group, use them as they are"
        )
    if variant(clip=1e9):
        return "the ratio is not clipped: min(ratio·A, clip(ratio, 1 − ε, 1 + ε)·A)"
    if close(
        got, (ratio * adv_col).mean() - beta * (torch.exp(delta) - delta - 1).mean(), atol=1e-5
    ):
        return "the ratio is not clipped: min(ratio·A, clip(ratio, 1 − ε, 1 + ε)·A)"
    if close(
        got,
        torch.maximum(ratio * adv_col, ratio.clamp(1 - CLIP, 1 + CLIP) * adv_col).mean()
        - beta * (torch.exp(delta) - delta - 1).mean(),
        atol=1e-5,
    ):
        return "take the minimum (the pessimistic bound) of the clipped and unclipped terms, not the maximum"
    k1 = surrogate - beta * (-delta)
    if close(got, k1.mean(), atol=1e-5):
        return "the KL term uses the log-ratio (k1): use k3 = exp(δ) − δ − 1"
    if close(got, (surrogate - beta * (torch.exp(delta) - delta - 1)).sum(dim=1).mean(), atol=1e-5):
        return "average over the tokens of each completion (a mean, not a sum)"
    return (
        f"the objective should be mean over completions and tokens of min(ratio·A, "
        f"clip(ratio)·A) − β·k3: expected {float(want):.6f}, got {float(got):.6f}"
    )


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
    want = torch.tensor(_grpo_reference(groups, 1e-6))
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
        logprobs=_log_probs((3, gen_len), seed=61, spread=1.0) - 5.5,
        ref_logprobs=_log_probs((3, gen_len), seed=62, spread=1.0) - 5.5,
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
    old = (_log_probs((3, gen_len), seed=61, spread=1.0) - 5.5).double()
    ref = (_log_probs((3, gen_len), seed=62, spread=1.0) - 5.5).double()
    adv = seeded(3, seed=63).double()
    clip, beta = out["clip_coef"], out["kl_coef"]
    want = _reference_objective(
        _gen_logprobs(merged_model(MODEL, SEED), ids, prefix_len), old, ref, adv, clip, beta
    )
    got = out["value"]
    if not close(got, want, atol=1e-4):
        base = _reference_objective(
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
