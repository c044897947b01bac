"""`--reward sentiment`: VADER's compound score, offline; and the error when VADER is missing.

The expected scores are VADER's own (vaderSentiment 3.3.2) for these sentences; the one-word
case is also worked out by hand from the lexicon: "good" has valence 1.9, and the compound score
normalises a valence sum x as x / sqrt(x² + 15).
"""

from __future__ import annotations

import math
import socket

import pytest
import torch

import lora_rlhf.rlhf.rewards as rewards
from lora_rlhf.cli.command import main
from lora_rlhf.rlhf.rewards import REWARD_DESCRIPTIONS, REWARDS, reward_fn_sentiment

pytest.importorskip("vaderSentiment")

SENTENCES = {
    "positive": ("This movie was great! I loved it.", 0.8516),
    "neutral": ("This movie was released in 2019.", 0.0),
    "negative": ("This movie was terrible and boring.", -0.6597),
}


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("the sentiment reward tried to use the network")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_positive_scores_above_neutral_above_negative(no_network):
    rewards._vader.cache_clear()  # load the lexicon under the fixture
    texts = [text for text, _ in SENTENCES.values()]
    scores = reward_fn_sentiment(texts)
    assert scores.dtype == torch.float32 and scores.shape == (3,)
    positive, neutral, negative = scores.tolist()
    assert positive > neutral > negative


@pytest.mark.parametrize("label", SENTENCES)
def test_scores_are_vaders_compound_values(label):
    text, expected = SENTENCES[label]
    assert reward_fn_sentiment([text]).item() == pytest.approx(expected, abs=1e-6)


def test_one_word_follows_vaders_normalisation_by_hand():
    valence = 1.9  # "good" in vader_lexicon.txt
    assert reward_fn_sentiment(["good"]).item() == pytest.approx(
        valence / math.sqrt(valence**2 + 15), abs=1e-4
    )


def test_sentiment_is_registered_with_a_description():
    assert REWARDS["sentiment"] is reward_fn_sentiment
    assert set(REWARD_DESCRIPTIONS) == set(REWARDS)


def test_missing_package_gives_one_line_with_the_install_command(monkeypatch, capsys, tmp_path):
    real_find_spec = rewards.importlib.util.find_spec
    monkeypatch.setattr(
        rewards.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "vaderSentiment" else real_find_spec(name, *a),
    )
    out = tmp_path / "run"
    assert main(["train", "--model", "tiny-llama", "--reward", "sentiment", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("lora-rlhf train: error: --reward sentiment: ")
    assert "pip install vaderSentiment" in err
    assert not out.exists()


def test_missing_package_in_the_library_raises_with_the_install_command(monkeypatch):
    monkeypatch.setattr(rewards.importlib.util, "find_spec", lambda name, *a: None)
    rewards._vader.cache_clear()
    with pytest.raises(ImportError, match="pip install vaderSentiment"):
        reward_fn_sentiment(["This movie was great"])
    rewards._vader.cache_clear()


def test_reward_list_describes_every_reward(capsys):
    assert main(["train", "--reward", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == sorted(REWARDS)
    for line, name in zip(lines, sorted(REWARDS)):
        assert REWARD_DESCRIPTIONS[name] in line
