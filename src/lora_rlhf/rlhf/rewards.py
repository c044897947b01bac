"""Section 1: reward functions (text in, one float per sample out) and reward normalisation.

A reward function takes the decoded samples of a rollout and returns a ``[batch]`` float tensor.
``REWARDS`` maps the names accepted by ``RLHFArgs(reward_fn="...")`` to the functions,
``REWARD_DESCRIPTIONS`` says in one line what each rewards, and :func:`check_reward_available`
tells, before anything is loaded, whether a reward's package is installed.
"""

from __future__ import annotations

import functools
import importlib.util
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


class RewardUnavailableError(ImportError):
    """A reward needs a package that is not installed; the message is one line with the fix."""


# reward name -> (importable module it needs, the command that installs it)
REWARD_PACKAGES = {"sentiment": ("vaderSentiment", "pip install vaderSentiment")}


def check_reward_available(name: str) -> None:
    """Raise :class:`RewardUnavailableError` if the reward ``name`` needs a missing package."""
    if name not in REWARD_PACKAGES:
        return
    module, install = REWARD_PACKAGES[name]
    if importlib.util.find_spec(module) is None:
        raise RewardUnavailableError(
            f"the {name} reward needs the {module} package, which is not installed: {install}"
        )


@functools.cache
def _vader():
    check_reward_available("sentiment")
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()  # reads its lexicon from the installed package: offline


def reward_fn_sentiment(generated_sample: list[str]) -> Float[Tensor, " batch"]:
    """Reward each sample with its positive sentiment: VADER's compound score, from -1 (most
    negative) through 0 (neutral) to 1 (most positive).

    VADER (Hutto & Gilbert 2014) is a rule-based scorer: a lexicon of word valences plus rules
    for negation, intensifiers, "but", capitals and "!". It needs the ``vaderSentiment`` package
    (``pip install vaderSentiment``) and no network.
    """
    analyzer = _vader()
    scores = [analyzer.polarity_scores(sample)["compound"] for sample in generated_sample]
    return torch.tensor(scores, dtype=torch.float32)


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
    "sentiment": reward_fn_sentiment,
}

REWARD_DESCRIPTIONS: dict[str, str] = {
    "char_count": "number of times --char (default '.') occurs in the sample",
    "length": "length of the sample in characters",
    "no_char": "minus the number of times --char occurs in the sample",
    "sentiment": "positive sentiment, VADER's compound score in [-1, 1] (needs vaderSentiment)",
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
