"""GRPO training as the library runs it (lora_rlhf.cli.grpo_trainer): arguments, what a phase keeps
and reports, the KL against the adaptors-off model, and the KL controller."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from lora_rlhf.checks.reference import adaptor_values, assign_layer, base_model, merged_model
from lora_rlhf.cli.grpo_trainer import GRPOTrainer, grpo_args
from lora_rlhf.lessons.section2_lora import RLHFArgsLora
from lora_rlhf.lessons.section3_grpo import GroupMemory, GRPOArgsLora
from lora_rlhf.rlhf.args import ArgsError

TINY = dict(
    base_model="tiny-pythia",
    total_phases=2,
    warmup_steps=0,
    batch_size=8,
    num_minibatches=2,
    gen_len=5,
    base_lr=1e-2,
    reward_fn="length",
    device="cpu",
)


def test_grpo_args_keep_every_field_and_add_the_group():
    args = grpo_args(RLHFArgsLora(**TINY, kl_coef=0.3, seed=5), group_size=2, advantage="rloo")
    assert isinstance(args, GRPOArgsLora)
    assert (args.kl_coef, args.seed, args.batch_size) == (0.3, 5, 8)
    assert (args.group_size, args.advantage) == (2, "rloo")
    assert grpo_args(RLHFArgsLora(**TINY)).group_size == 4


@pytest.mark.parametrize(
    "changes, says",
    [
        (dict(group_size=3), "batch_size (8) must be a multiple of group_size (3)"),
        (dict(group_size=1), "group_size must be an integer >= 2"),
        (dict(advantage="ppo"), "advantage must be 'grpo' or 'rloo'"),
    ],
)
def test_grpo_args_that_cannot_form_groups_are_refused_with_the_field_named(changes, says):
    with pytest.raises(ArgsError, match=says.replace("(", r"\(").replace(")", r"\)")):
        grpo_args(RLHFArgsLora(**TINY), **changes)


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    trainer = GRPOTrainer(RLHFArgsLora(**TINY, lora_alpha=8.0, lora_rank=4), show_progress=False)
    history = trainer.train()
    return trainer, history


def test_a_phase_reports_what_ppo_reports_but_the_value_loss(trained):
    _, history = trained
    assert len(history) == 2
    for metrics in history:
        for key in ("reward_mean", "reward_std", "kl", "kl_k3", "entropy", "objective", "lr"):
            assert torch.isfinite(torch.tensor(metrics[key])), (key, metrics)
        assert metrics["phase_seconds"] >= metrics["rollout_seconds"] > 0
        assert "value_loss" not in metrics


def test_the_policy_has_no_value_head_and_only_the_adaptors_train(trained):
    trainer, _ = trained
    assert trainer.model.value_head is None
    optimized = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in optimized} == {id(p) for p in trainer.model.lora_params()}
    assert trainer.ref_model is trainer.model
    assert any(float(layer.lora_q.B.detach().abs().max()) > 0 for layer in trainer.model.lora)


def test_the_rollout_keeps_log_probs_not_the_reference_logits(trained):
    trainer, _ = trained
    memory = trainer.rollout_phase()
    assert isinstance(memory, GroupMemory)
    gen = trainer.args.gen_len
    assert memory.ref_logprobs.shape == memory.logprobs.shape == (8, gen)
    assert memory.advantages.shape == (8,)
    kept = [v for v in vars(memory).values() if isinstance(v, torch.Tensor)]
    assert all(t.dim() <= 2 for t in kept), "a [batch, gen_len, d_vocab] tensor is kept"


def test_kl_to_reference_is_the_full_vocabulary_kl_of_the_adapted_model_to_the_base():
    trainer = GRPOTrainer(
        RLHFArgsLora(**{**TINY, "base_model": "tiny-llama"}, lora_alpha=8.0, lora_rank=4),
        show_progress=False,
    )
    for i, values in enumerate(adaptor_values(trainer.model.cfg, seed=3)):
        assign_layer(trainer.model.lora[i], values, i)
    ids = torch.randint(
        1, 512, (3, trainer.prefix_len + 5), generator=torch.Generator().manual_seed(2)
    )
    with torch.no_grad():
        p = merged_model("tiny-llama", 3)(ids)[:, -6:-1].double().log_softmax(-1)
        q = base_model("tiny-llama")(ids)[:, -6:-1].double().log_softmax(-1)
    want = (p.exp() * (p - q)).sum(-1).mean()
    assert trainer.kl_to_reference(ids) == pytest.approx(float(want), rel=1e-4, abs=1e-6)
    assert float(want) > 1e-3  # the adaptors do move the policy


@pytest.mark.skipif(
    importlib.util.find_spec("lora_rlhf.rlhf.kl_control") is None, reason="no KL controller yet"
)
def test_an_adaptive_kl_coefficient_steers_beta_as_in_ppo():
    torch.manual_seed(0)
    args = RLHFArgsLora(**{**TINY, "total_phases": 3}, kl_coef=0.1, kl_target=10.0, kl_horizon=8)
    trainer = GRPOTrainer(args, show_progress=False)
    history = trainer.train()
    coefs = [m["kl_coef"] for m in history]
    assert coefs[0] == pytest.approx(0.1)
    assert coefs[1] < coefs[0] and coefs[2] < coefs[1]  # a KL below the target lowers β
    assert trainer.args.kl_coef == pytest.approx(coefs[-1])
