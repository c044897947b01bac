"""GRPO bonus checks of the formulas: group advantages (GRPO and RLOO), the k3 estimator and the
GRPO objective, each against a float64 reference written here from the formula."""

from __future__ import annotations

import statistics

import torch

from lora_rlhf.checks.core import GRPO, CheckFailed, expect
from lora_rlhf.checks.reference import (
    close,
    max_diff,
    seeded,
)

grpo_check = GRPO.check


# --------------------------------------------------------------------------------------------
# Group advantages. Hand-made groups of 4 (the batch mean is 2.25, so a batch-wide baseline or a
# batch-wide std is visible), one of them all equal.

GROUPS = [[1.0, 2.0, 3.0, 6.0], [5.0, 5.0, 5.0, 5.0], [0.0, 0.0, 1.0, 0.0]]
PAIRS = [[1.0, 3.0], [-2.0, 2.0], [4.0, 4.0]]  # groups of two: a layout mix-up shows


def grpo_reference(groups: list[list[float]], eps: float) -> list[float]:
    """GRPO advantages from the formula: (r - group mean) / (group std + eps), in float64."""
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
        want = torch.tensor(grpo_reference(groups, 1e-6))
        if close(got, want, atol=1e-4):
            continue
        flat = [r for g in groups for r in g]
        if close(got, torch.tensor(grpo_reference([flat], 1e-6)), atol=1e-4):
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


def seeded_log_probs(shape, seed, spread):
    """Fixed log-probabilities (all < 0) of `shape`, for the objective probes."""
    return -seeded(*shape, seed=seed, scale=spread).abs() - 0.05


@grpo_check("calc_kl_k3", points=1.5)
def probe_grpo_kl_k3(impl):
    """k3 = exp(ref − logp) − (ref − logp) − 1 per token: values, gradient, ≥ 0, 0 where equal."""
    logprobs = seeded_log_probs((3, 5), seed=40, spread=2.0).requires_grad_(True)
    ref = seeded_log_probs((3, 5), seed=41, spread=2.0)
    k3 = impl.calc_kl_k3(logprobs, ref)
    if k3.requires_grad:  # else the judge reports the missing gradient
        (k3 * seeded(3, 5, seed=42)).sum().backward()
    same = impl.calc_kl_k3(ref.clone(), ref.clone())
    return {"k3": k3.detach().float(), "grad": logprobs.grad, "same": same.detach().float()}


@probe_grpo_kl_k3.judge
def judge_grpo_kl_k3(out):
    logprobs = seeded_log_probs((3, 5), seed=40, spread=2.0).double()
    ref = seeded_log_probs((3, 5), seed=41, spread=2.0).double()
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
    mb_logprobs = seeded_log_probs(tuple(ratios.shape), seed=50, spread=1.5)
    logprobs = mb_logprobs + ratios.log().to(mb_logprobs.device)
    ref = seeded_log_probs(tuple(ratios.shape), seed=51, spread=1.5)
    return logprobs, mb_logprobs, ref, torch.tensor(ADVANTAGES, device=logprobs.device)


def reference_objective(logprobs, mb_logprobs, ref, advantages, clip, beta):
    """The GRPO objective from its formula (clipped surrogate minus beta times k3)."""
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
        want = reference_objective(logprobs, mb_logprobs, ref, adv, CLIP, beta)
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
        return close(got, reference_objective(**kw), atol=1e-5)

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
