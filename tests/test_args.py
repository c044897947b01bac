"""RLHFArgs: the course defaults, reward functions by name, and validation messages."""

import json
from dataclasses import dataclass, fields

import pytest

from lora_rlhf.rlhf.args import ArgsError, RLHFArgs
from lora_rlhf.rlhf.rewards import REWARDS, reward_fn_char_count, reward_fn_length

SPEC_DEFAULTS = dict(
    seed=1,
    use_wandb=False,
    wandb_project_name="RLHF",
    wandb_entity=None,
    total_phases=100,
    batch_size=128,
    num_minibatches=4,
    batches_per_learning_phase=2,
    base_lr=2e-5,
    head_lr=5e-4,
    max_grad_norm=1.0,
    warmup_steps=20,
    final_scale=0.1,
    clip_coef=0.2,
    vf_coef=0.15,
    ent_coef=0.001,
    base_model="smollm2-135m",
    gen_len=30,
    temperature=1.0,
    top_k=10,
    prefix="This is",
    prepend_bos=True,
    kl_coef=2.5,
    normalize_reward=True,
)


def test_defaults_follow_the_spec():
    args = RLHFArgs()
    for name, value in SPEC_DEFAULTS.items():
        assert getattr(args, name) == value, name
    assert args.reward_fn is reward_fn_char_count
    assert args.device is None


def test_derived_sizes():
    args = RLHFArgs(base_model="tiny-llama", batch_size=12, num_minibatches=3)
    assert args.minibatch_size == 4
    assert args.minibatches_per_phase == 3 * args.batches_per_learning_phase


@pytest.mark.parametrize("name", sorted(REWARDS))
def test_reward_fn_by_name_is_resolved(name):
    args = RLHFArgs(base_model="tiny-llama", reward_fn=name)
    assert args.reward_fn is REWARDS[name]
    assert args.reward_fn_name == name


def test_reward_fn_may_be_any_callable():
    def always_one(samples):
        return [1.0] * len(samples)

    assert RLHFArgs(base_model="tiny-llama", reward_fn=always_one).reward_fn is always_one
    assert RLHFArgs(base_model="tiny-llama", reward_fn=reward_fn_length).reward_fn_name == "length"


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(total_phases=10, warmup_steps=10), ["total_phases", "warmup_steps"]),
        (dict(total_phases=5, warmup_steps=20), ["total_phases", "warmup_steps"]),
        (dict(batch_size=10, num_minibatches=4), ["batch_size", "num_minibatches"]),
        (dict(gen_len=0), ["gen_len"]),
        (dict(batch_size=0), ["batch_size"]),
        (dict(reward_fn="no_such_reward"), ["reward_fn", "char_count"]),
        (dict(base_model="no-such-model"), ["base_model", "tiny-llama"]),
    ],
)
def test_invalid_args_raise_a_message_naming_the_field(kwargs, words):
    kwargs = {"base_model": "tiny-llama", **kwargs}
    with pytest.raises(ValueError) as excinfo:
        RLHFArgs(**kwargs)
    assert isinstance(excinfo.value, ArgsError)
    for word in words:
        assert word in str(excinfo.value)


def test_a_subclass_adds_fields_and_checks():
    @dataclass
    class WithRank(RLHFArgs):
        rank: int = 4

        def validate(self) -> None:
            super().validate()
            if self.rank <= 0:
                raise ArgsError("rank: must be > 0")

    args = WithRank(base_model="tiny-llama", rank=8)
    assert args.rank == 8 and args.batch_size == 128
    with pytest.raises(ArgsError, match="rank"):
        WithRank(base_model="tiny-llama", rank=0)
    with pytest.raises(ArgsError, match="batch_size"):
        WithRank(base_model="tiny-llama", batch_size=10, num_minibatches=4)


def test_to_config_is_json_serialisable_with_the_reward_by_name():
    config = RLHFArgs(base_model="tiny-llama").to_config()
    assert set(config) == {f.name for f in fields(RLHFArgs)}
    assert config["reward_fn"] == "char_count"
    json.dumps(config)
