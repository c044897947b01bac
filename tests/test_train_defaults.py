"""The defaults `lora-rlhf train` plans with: the documented default run, and the sentiment run's
and GRPO's own defaults (docs/training.md, docs/grpo.md), each overridden by an option given. No
model is loaded."""

from __future__ import annotations

import pytest

from lora_rlhf.cli import build_parser
from lora_rlhf.cli.settings import ResumePoint, merge_settings


def planned(*options: str, resume: ResumePoint | None = None) -> dict:
    return merge_settings(build_parser().parse_args(["train", *options]), resume)


def test_the_default_run_is_the_documented_one():
    s = planned()
    assert (s["algo"], s["reward"], s["prefix"], s["phases"], s["gen_len"]) == (
        "ppo", "char_count", "This is", 30, 8,
    )  # fmt: skip
    assert (s["base_lr"], s["kl_coef"], s["kl_target"], s["temperature"]) == (1e-3, 0.2, "off", 1.0)


def test_grpo_trains_the_default_runs_task_with_twice_the_samples():
    s = planned("--algo", "grpo")
    assert s == {**planned(), "algo": "grpo", "batch_size": 32}, "the rest: the default run's"
    assert (s["group_size"], s["advantage"]) == (4, "grpo")


def test_an_option_given_overrides_grpos_batch_size():
    assert planned("--algo", "grpo", "--batch-size", "16")["batch_size"] == 16
    assert planned("--algo", "ppo")["batch_size"] == 16


def test_grpo_sentiment_takes_both_tables_of_defaults():
    s = planned("--algo", "grpo", "--reward", "sentiment")
    assert {k: s[k] for k in SENTIMENT} == SENTIMENT and s["batch_size"] == 32


SENTIMENT = {
    "prefix": "This movie was so", "temperature": 0.7, "phases": 30, "batch_size": 32,
    "minibatches": 8,
}  # fmt: skip


def test_the_sentiment_run_has_its_own_documented_defaults():
    s = planned("--reward", "sentiment")
    assert {k: s[k] for k in SENTIMENT} == SENTIMENT
    assert s == {**planned(), "reward": "sentiment", **SENTIMENT}, "the rest: the default run's"


@pytest.mark.parametrize(("flag", "value", "key"), [
    ("--prefix", "The food was", "prefix"), ("--temperature", "1.0", "temperature"),
    ("--phases", "50", "phases"), ("--batch-size", "16", "batch_size"),
    ("--minibatches", "2", "minibatches"),
])  # fmt: skip
def test_an_option_given_overrides_the_sentiment_default(flag, value, key):
    s = planned("--reward", "sentiment", flag, value)
    assert str(s[key]) == value


def test_a_resumed_run_keeps_its_saved_settings(tmp_path):
    saved = {**planned(), "reward": "sentiment", "prefix": "Hi", "temperature": 1.0, "phases": 30}
    config = {"training": saved, "base_model": saved["model"], "rank": 4, "lora_alpha": 32.0}
    s = planned("--phases", "60", resume=ResumePoint(tmp_path, config, phases_done=30))
    assert (s["prefix"], s["temperature"], s["phases"]) == ("Hi", 1.0, 60)
