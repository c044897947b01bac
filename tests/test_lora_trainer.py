"""The LoRA trainer: one copy of the weights, the course's smoke run on a tiny and the embedded model."""

from __future__ import annotations

import math

import pytest
import torch

import lora_rlhf.lessons.section2_lora as lora
from lora_rlhf.checks.trainer_checks import SMOKE, smoke_trainer
from lora_rlhf.models import load_model


def _run_recording_reference(trainer):
    seen = []
    rollout_phase = trainer.rollout_phase

    def recording():
        memory = rollout_phase()
        seen.append((memory.sample_ids.clone(), memory.ref_logits.clone()))
        return memory

    trainer.rollout_phase = recording
    return trainer.train(), seen


def test_reference_is_the_policy_itself():
    trainer = smoke_trainer(lora, "tiny-llama")
    assert trainer.ref_model is trainer.model
    n_base = sum(p.numel() for p in trainer.model.base_model_params())
    n_all = sum(p.numel() for p in trainer.model.parameters())
    n_trainer = sum(
        p.numel()
        for p in {
            id(p): p for m in (trainer.model, trainer.ref_model) for p in m.parameters()
        }.values()
    )
    assert n_trainer == n_all < 2 * n_base


def test_optimizer_trains_only_lora_and_value_head():
    trainer = smoke_trainer(lora, "tiny-llama")
    model = trainer.model  # the parameter methods return generators, as the course writes them
    trainable = {id(p) for p in [*model.lora_params(), *model.get_value_head_params()]}
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert in_optimizer == trainable


@pytest.mark.slow
def test_smoke_run_on_the_embedded_model(smollm2):
    """The course's smoke run on SmolLM2-135M (its settings, one thread, no wandb, no progress
    bar; ~20 CPU-seconds, nearly all of it the run's own forward and backward passes): finite
    metrics; the reference logits of both rollouts are the untouched base model's; the
    policy equals the reference before training (B = 0) and differs from it after one phase."""
    trainer = smoke_trainer(lora, "smollm2-135m")
    assert not trainer.args.use_wandb and trainer.ref_model is trainer.model
    history, seen = _run_recording_reference(trainer)
    assert len(history) == SMOKE["total_phases"]
    assert all(math.isfinite(v) for m in history for v in m.values() if isinstance(v, float))
    with torch.no_grad():  # one batch of both rollouts: one pass of the base model
        base_logits = smollm2(torch.cat([ids for ids, _ in seen]))
    gen_len = SMOKE["gen_len"]  # the memory keeps the generated positions of the reference
    torch.testing.assert_close(
        torch.cat([ref_logits for _, ref_logits in seen]),
        base_logits[:, -gen_len - 1 : -1],
        atol=1e-4,
        rtol=1e-4,
    )
    # KL(policy ‖ reference) over each rollout: 0 before any step, 0.4 after the first phase
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert history[1]["kl"] > 1e-3
    assert max(float(layer.lora_q.B.detach().abs().max()) for layer in trainer.model.lora) > 0


def test_base_weights_bitwise_unchanged_by_training():
    trainer = smoke_trainer(lora, "tiny-pythia")
    before = {
        n: p.detach().clone()
        for n, p in trainer.model.named_parameters()
        if not n.startswith(("lora.", "value_head."))
    }
    trainer.train()
    after = dict(trainer.model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)
    fresh = dict(load_model("tiny-pythia", device="cpu").named_parameters())
    assert all(torch.equal(before[n].cpu(), fresh[n]) for n in fresh)
