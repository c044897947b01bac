"""Section 1: the PPO pieces of RLHF — sampling, advantages, replay memory, losses, optimizer.

Shapes: ``seq = prefix_len + gen_len``. "Generated positions" are the logits/values that predict
the generated tokens, ``[:, -gen_len-1:-1]``. The loss functions accept either full-sequence
tensors (they take the generated positions themselves) or tensors already cut to ``gen_len``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor

if TYPE_CHECKING:
    from lora_rlhf.rlhf.args import RLHFArgs
    from lora_rlhf.rlhf.value_head import HookedTransformerWithValueHead


def gen_positions(
    x: Float[Tensor, "batch seq *rest"], gen_len: int
) -> Float[Tensor, "batch gen_len *rest"]:
    """``x[:, -gen_len-1:-1]`` (the positions predicting the generated tokens), unless ``x`` is
    already ``gen_len`` long."""
    if x.shape[1] == gen_len:
        return x
    if x.shape[1] < gen_len + 1:
        raise ValueError(f"sequence length {x.shape[1]} is too short for gen_len={gen_len}")
    return x[:, -gen_len - 1 : -1]


@torch.no_grad()
def get_samples(
    model: HookedTransformerWithValueHead,
    prompt: str,
    batch_size: int,
    gen_len: int,
    temperature: float,
    top_k: int | None,
    prepend_bos: bool,
    **kwargs,
) -> tuple[Int[Tensor, "batch seq"], list[str]]:
    """Sample ``batch_size`` continuations of ``prompt``, each exactly ``gen_len`` tokens long.

    Calls ``model.generate`` (a subclass may override it, e.g. to run with LoRA hooks); extra
    ``kwargs`` go to it.

    Returns:
        The token ids (prompt included) and the decoded samples.
    """
    prompt_ids = model.to_tokens(prompt, prepend_bos=prepend_bos).squeeze(0)
    batch = einops.repeat(prompt_ids, "seq -> batch seq", batch=batch_size)
    output = model.generate(
        batch,  # positional: the course's generate(self, tokens, **kwargs) names it `tokens`
        max_new_tokens=gen_len,
        temperature=temperature,
        top_k=top_k,
        prepend_bos=prepend_bos,
        verbose=False,
        stop_at_eos=False,  # every sample gets gen_len tokens, so the batch stays rectangular
        **kwargs,
    )
    # generate runs in inference mode; a plain tensor can be fed to a forward pass with autograd.
    sample_ids = output.clone()
    return sample_ids, model.to_string(sample_ids)


@torch.no_grad()
def compute_advantages(
    values: Float[Tensor, "batch seq"],
    rewards: Float[Tensor, " batch"],
    prefix_len: int,
) -> Float[Tensor, "batch gen_len"]:
    """One-step TD residuals ``r_t + V(s_{t+1}) - V(s_t)`` for each generated token.

    The reward comes only at the end and there is no discount: for the last token the target is
    the reward; for the others it is the value of the next state.

    Args:
        values: the value head's estimate at every position.
        rewards: one reward per sample.
        prefix_len: number of prompt tokens (BOS included).
    """
    # state before generated token t is position prefix_len - 1 + t
    target = torch.cat([values[:, prefix_len:-1], rewards[:, None].to(values.dtype)], dim=-1)
    return target - values[:, prefix_len - 1 : -1]


@dataclass
class ReplayMinibatch:
    """One minibatch of rollout data for a PPO update (rows are samples)."""

    sample_ids: Int[Tensor, "minibatch seq"]
    logprobs: Float[Tensor, "minibatch gen_len"]
    advantages: Float[Tensor, "minibatch gen_len"]
    returns: Float[Tensor, "minibatch gen_len"]
    ref_logits: Float[Tensor, "minibatch gen_len d_vocab"]


class ReplayMemory:
    """A rollout's data, served as shuffled minibatches.

    ``returns = advantages + values`` at the generated positions (the targets of the value head).
    Only the generated positions of ``ref_logits`` are kept (the KL penalty reads no others): a
    full-sequence tensor is cut to ``[batch, gen_len, d_vocab]`` on the way in.
    """

    def __init__(
        self,
        args: RLHFArgs,
        sample_ids: Int[Tensor, "batch seq"],
        logprobs: Float[Tensor, "batch gen_len"],
        advantages: Float[Tensor, "batch gen_len"],
        values: Float[Tensor, "batch seq"],
        ref_logits: Float[Tensor, "batch seq d_vocab"] | Float[Tensor, "batch gen_len d_vocab"],
    ) -> None:
        self.args = args
        self.sample_ids = sample_ids
        self.logprobs = logprobs
        self.advantages = advantages
        self.values = values
        # A copy, so that the caller's full-sequence tensor can be freed.
        self.ref_logits = gen_positions(ref_logits, args.gen_len).contiguous()

    @property
    def returns(self) -> Float[Tensor, "batch gen_len"]:
        return self.advantages + gen_positions(self.values, self.args.gen_len)

    def get_minibatches(self) -> _Minibatches:
        """``batches_per_learning_phase`` random partitions of the batch into ``num_minibatches``
        minibatches each: every sample appears once per partition.

        A sequence of minibatches, each gathered from the memory when it is read: a loop over it
        holds one minibatch's copy of the reference logits at a time, not the whole phase's.
        """
        rows = minibatch_indices(
            self.args.batch_size,
            self.args.num_minibatches,
            self.args.batches_per_learning_phase,
            self.sample_ids.device,
        )
        return _Minibatches(self, rows, self.returns)


def minibatch_indices(
    batch_size: int, num_minibatches: int, passes: int, device: torch.device | str
) -> list[Tensor]:
    """The rows of each minibatch: `passes` random partitions of ``range(batch_size)`` into
    `num_minibatches` equal parts, one ``randperm`` per pass (PPO's and GRPO's memories share it,
    so both draw the same random numbers in the same order)."""
    return [
        rows
        for _ in range(passes)
        for rows in torch.randperm(batch_size, device=device).reshape(num_minibatches, -1)
    ]


class _Minibatches(Sequence):
    """The minibatches of a :class:`ReplayMemory`, gathered on access (see ``get_minibatches``)."""

    def __init__(self, memory: ReplayMemory, rows: list[Tensor], returns: Tensor) -> None:
        self._memory, self._rows, self._returns = memory, rows, returns

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i: int | slice) -> ReplayMinibatch | list[ReplayMinibatch]:  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        indices, m = self._rows[i], self._memory  # a list raises IndexError past the end
        return ReplayMinibatch(
            sample_ids=m.sample_ids[indices],
            logprobs=m.logprobs[indices],
            advantages=m.advantages[indices],
            returns=self._returns[indices],
            ref_logits=m.ref_logits[indices],
        )


def get_logprobs(
    logits: Float[Tensor, "batch seq d_vocab"],
    tokens: Int[Tensor, "batch seq"],
    prefix_len: int | None = None,
) -> Float[Tensor, "batch out_len"]:
    """Log-probability the model gives each next token.

    Without ``prefix_len``: ``out[:, i] = log p(tokens[:, i+1] | tokens[:, :i+1])`` for every
    position (``out_len = seq - 1``). With it: only the tokens from ``prefix_len`` on (the
    generated ones), i.e. logits from position ``prefix_len - 1`` on (``out_len = seq - prefix_len``).
    """
    start = 0 if prefix_len is None else prefix_len - 1
    logprobs = logits[:, start:-1].log_softmax(dim=-1)
    next_tokens = tokens[:, start + 1 :]
    return logprobs.gather(dim=-1, index=next_tokens.unsqueeze(-1)).squeeze(-1)


def calc_kl_penalty(
    logits: Float[Tensor, "batch seq d_vocab"],
    ref_logits: Float[Tensor, "batch seq d_vocab"],
    kl_coef: float,
    gen_len: int,
) -> Float[Tensor, ""]:
    """``kl_coef`` times the mean, over samples and generated positions, of KL(π ‖ π_ref) over the
    full vocabulary. Computed from log-softmax, so it stays finite for extreme logits."""
    logprobs = gen_positions(logits, gen_len).log_softmax(dim=-1)
    ref_logprobs = gen_positions(ref_logits, gen_len).log_softmax(dim=-1)
    kl = (logprobs.exp() * (logprobs - ref_logprobs)).sum(dim=-1)
    return kl_coef * kl.mean()


def calc_entropy_bonus(
    logits: Float[Tensor, "batch seq d_vocab"], ent_coef: float, gen_len: int
) -> Float[Tensor, ""]:
    """``ent_coef`` times the mean entropy of the policy at the generated positions."""
    logprobs = gen_positions(logits, gen_len).log_softmax(dim=-1)
    entropy = -(logprobs.exp() * logprobs).sum(dim=-1)
    return ent_coef * entropy.mean()


def calc_value_function_loss(
    values: Float[Tensor, "batch seq"],
    mb_returns: Float[Tensor, "batch gen_len"],
    vf_coef: float,
    gen_len: int,
) -> Float[Tensor, ""]:
    """``0.5 * vf_coef * MSE`` between the value estimates at the generated positions and the
    returns (to be subtracted from the objective)."""
    values = gen_positions(values, gen_len)
    assert values.shape == mb_returns.shape, f"{values.shape=} != {mb_returns.shape=}"
    return 0.5 * vf_coef * (values - mb_returns).pow(2).mean()


def calc_clipped_surrogate_objective(
    logprobs: Float[Tensor, "batch gen_len"],
    mb_logprobs: Float[Tensor, "batch gen_len"],
    mb_advantages: Float[Tensor, "batch gen_len"],
    clip_coef: float,
    gen_len: int,
    eps: float = 1e-8,
) -> Float[Tensor, ""]:
    """PPO's clipped surrogate objective (to be maximised).

    Args:
        logprobs: log-probs of the generated tokens under the current policy.
        mb_logprobs: the same under the policy that sampled them (from the replay memory).
        mb_advantages: advantages; normalised here to mean 0, std 1 over the whole minibatch.
        clip_coef: the probability ratio is clipped to ``[1 - clip_coef, 1 + clip_coef]``.
        gen_len: number of generated tokens (checks the shapes).
        eps: keeps the normalisation finite when all advantages are equal.
    """
    assert logprobs.shape == mb_logprobs.shape == mb_advantages.shape, (
        f"{logprobs.shape=}, {mb_logprobs.shape=}, {mb_advantages.shape=} must match"
    )
    assert logprobs.shape[-1] == gen_len, (
        f"expected {gen_len} generated positions: {logprobs.shape=}"
    )
    ratio = (logprobs - mb_logprobs).exp()
    advantages = (mb_advantages - mb_advantages.mean()) / (mb_advantages.std() + eps)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip_coef, 1 + clip_coef) * advantages
    return torch.minimum(unclipped, clipped).mean()


def get_optimizer(
    model: HookedTransformerWithValueHead, base_lr: float, head_lr: float
) -> torch.optim.Optimizer:
    """AdamW that *maximises*: the model's trainable base parameters at ``base_lr`` (group 0) and
    the value head at ``head_lr`` (group 1)."""
    param_groups = [
        {"params": list(model.get_base_model_trainable_params()), "lr": base_lr},
        {"params": list(model.get_value_head_params()), "lr": head_lr},
    ]
    try:
        # The fused kernel is several times faster on CPU for a full model (torch >= 2.4).
        return torch.optim.AdamW(param_groups, maximize=True, fused=True)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.AdamW(param_groups, maximize=True)


def lr_scale(phase: int, warmup_steps: int, total_phases: int, final_scale: float) -> float:
    """Learning-rate multiplier in ``phase`` (0-based).

    Linear warm-up ``(phase + 1) / (warmup_steps + 1)`` over the first ``warmup_steps`` phases
    (never 0, so no phase is wasted), 1 at phase ``warmup_steps``, then linear decay to
    ``final_scale`` at the last phase, ``total_phases - 1``.
    """
    if phase < warmup_steps:
        return (phase + 1) / (warmup_steps + 1)
    decay_phases = total_phases - 1 - warmup_steps
    if decay_phases <= 0:
        return 1.0
    progress = min(phase - warmup_steps, decay_phases) / decay_phases
    return 1.0 - (1.0 - final_scale) * progress


def get_optimizer_and_scheduler(
    args: RLHFArgs, model: HookedTransformerWithValueHead
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The optimizer of :func:`get_optimizer` and a LambdaLR following :func:`lr_scale`.

    Call ``scheduler.step()`` once per phase.
    """
    optimizer = get_optimizer(model, args.base_lr, args.head_lr)

    def lr_lambda(phase: int) -> float:
        return lr_scale(phase, args.warmup_steps, args.total_phases, args.final_scale)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=lr_lambda)
    return optimizer, scheduler


def clip_fraction(
    logprobs: Float[Tensor, "batch gen_len"],
    mb_logprobs: Float[Tensor, "batch gen_len"],
    clip_coef: float,
) -> float:
    """Fraction of generated tokens whose probability ratio lies outside the clip range."""
    with torch.no_grad():
        ratio = (logprobs - mb_logprobs).exp()
        return ((ratio - 1.0).abs() > clip_coef).float().mean().item()


__all__ = [
    "ReplayMemory",
    "ReplayMinibatch",
    "calc_clipped_surrogate_objective",
    "calc_entropy_bonus",
    "calc_kl_penalty",
    "calc_value_function_loss",
    "clip_fraction",
    "compute_advantages",
    "gen_positions",
    "get_logprobs",
    "get_optimizer",
    "get_optimizer_and_scheduler",
    "get_samples",
    "lr_scale",
]
