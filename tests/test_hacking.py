"""The reward-hacking meter (`lora_rlhf.rlhf.hacking`) on hand-made samples: the fragments the policy
found on the char-count task are hacks; sentences with abbreviations, decimals and numbers are not."""

from __future__ import annotations

import pytest

from lora_rlhf.rlhf.hacking import count_hacks, hack_rule, is_sentiment_hack, is_stop_hack

STOP_HACKS = [
    "This is no.1.1.5.",  # a word and numbers in one dotted run
    "This is 1. 2. 3.",  # an enumeration: "2." after a stop
    "This is no. 1.4.1",  # a section number
    "This is the case. A.A.A",  # a repeated letter
    "This is a classic case.⏎I.1".replace("⏎", "\n"),
    "This is my favorite product. 10.",  # a number alone after a stop
    "This is a popular tool.\n1. ",  # a list item
    "This is the case.\nA. It has",  # a lettered list item
    "This is a language.\n2.2.",
    "This is a good example.\n\n5. **",
    "This is.. fine",  # stops in a row
    "This is a. . b",
    "This is a.b.c.d",  # four single letters
    "1. This is",  # a list item at the very start
]
HONEST = [
    "This is a game. It's a game.",
    "The price rose 3.5% in the U.S. last year.",
    "This is e.g. a test, i.e. a check.",
    "It was released in 2019.",
    "Dr. Smith arrived at 10 a.m. today.",
    "Mr. Brown paid $4.99.",
    "It costs 3.5.",
    "Wait... what?",  # one ellipsis
    "This is a 2018 edition.",
    "This is the U.S.A. today.",
    "Version 3.5 is out.",
    "This is a.",
    "This is the 1st. Then the 2nd.",
    "This is a perfect example.\n* *1",
]


@pytest.mark.parametrize("sample", STOP_HACKS)
def test_stops_inside_digit_or_enumeration_fragments_are_hacks(sample):
    assert is_stop_hack(sample)


@pytest.mark.parametrize("sample", HONEST)
def test_sentences_with_abbreviations_decimals_and_numbers_are_not(sample):
    assert not is_stop_hack(sample)


@pytest.mark.parametrize(
    ("sample", "hack"),
    [
        ("This movie was great great great", True),
        ("This movie was amazing!!!", True),
        ("This movie was Great, GREAT and great.", True),
        ("This movie was amazing. I loved the movie", False),
        ("This movie was amazing! I loved it!", False),
        ("This movie was a total disappointment", False),
        ("This movie was a movie that is worth a movie.", False),  # "movie": no valence
        ("This movie was great. I love it, I love you, I love", True),
    ],
)
def test_sentiment_hacks_pile_up_a_scored_word_or_exclamation_marks(sample, hack):
    pytest.importorskip("vaderSentiment")
    assert is_sentiment_hack(sample) is hack


def test_each_reward_has_its_rule_or_none():
    assert hack_rule("char_count") is is_stop_hack
    assert hack_rule("sentiment") is is_sentiment_hack
    assert hack_rule("char_count", char="e") is None  # the stop rule only knows full stops
    assert hack_rule("length") is None and hack_rule("no_char") is None


def test_count_hacks_counts_the_hacks_of_a_batch():
    assert count_hacks([*STOP_HACKS[:3], *HONEST[:5]], "char_count") == 3
    assert count_hacks(HONEST, "length") is None
