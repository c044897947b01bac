"""Section 1: reward functions (text in, one float per sample out) and reward normalisation.

A reward function takes the decoded samples of a rollout and returns a ``[batch]`` float tensor.
``REWARDS`` maps the names accepted by ``RLHFArgs(reward_fn="...")`` to the functions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from jaxtyping import Float
from torch import Tensor

RewardFn = Callable[[list[str]], Float[Tensor, " batch"]]


def reward_fn_char_count(generated_sample: list[str], char: str = ".") -> Float[Tensor, " batch"]:
    """Reward each sample with the number of times ``char`` occurs in it.

    Args:
        generated_sample: decoded samples (prompt included).
        char: the character (or substring) to count.

    Returns:
        A float32 tensor on the CPU, one reward per sample.
    """
    return torch.tensor([sample.count(char) for sample in generated_sample], dtype=torch.float32)


def reward_fn_length(generated_sample: list[str]) -> Float[Tensor, " batch"]:
    """Reward each sample with its length in characters (prompt included)."""
    return torch.tensor([len(sample) for sample in generated_sample], dtype=torch.float32)


def reward_fn_no_char(generated_sample: list[str], char: str = ".") -> Float[Tensor, " batch"]:
    """Penalise each occurrence of ``char``: the negative of :func:`reward_fn_char_count`."""
    return -reward_fn_char_count(generated_sample, char=char)


def normalize_reward(reward: Float[Tensor, " batch"], eps: float = 1e-5) -> Float[Tensor, " batch"]:
    """Shift and scale rewards to mean 0 and (sample) standard deviation 1.

    Equal rewards carry no signal: they become zeros (their std is 0, and ``eps`` keeps the
    division finite).
    """
    centred = reward - reward.mean()
    # std of a single reward is undefined (NaN); it carries no signal either.
    std = reward.std() if reward.numel() > 1 else reward.new_zeros(())
    return centred / (std + eps)


REWARDS: dict[str, RewardFn] = {
    "char_count": reward_fn_char_count,
    "length": reward_fn_length,
    "no_char": reward_fn_no_char,
}


def get_reward_fn(name: str) -> RewardFn:
    """The reward function registered under ``name`` (see :data:`REWARDS`)."""
    try:
        return REWARDS[name]
    except KeyError:
        raise KeyError(
            f"Unknown reward function {name!r}; known names: {', '.join(sorted(REWARDS))}."
        ) from None


def reward_fn_name(fn: RewardFn) -> str:
    """The registry name of ``fn`` when it has one, else its ``__name__`` (for logs and configs)."""
    for name, registered in REWARDS.items():
        if registered is fn:
            return name
    return getattr(fn, "__name__", repr(fn))
