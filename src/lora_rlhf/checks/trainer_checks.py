"""Checks of Exercise 4: the LoRA trainer (the course's smoke run, on tiny-llama)."""

from __future__ import annotations

import math

import torch

from lora_rlhf.authoring.implementations import given_class
from lora_rlhf.checks.core import CheckFailed, check, expect
from lora_rlhf.checks.reference import base_model, close, max_diff, probe_device
from lora_rlhf.rlhf.ppo import gen_positions
from lora_rlhf.rlhf.trainer import build_trainer

# The course's smoke run: two short phases on tiny-llama, no KL penalty.
SMOKE = dict(
    kl_coef=0.0,
    total_phases=2,
    warmup_steps=0,
    base_lr=1e-3,
    batch_size=8,
    num_minibatches=2,
    gen_len=8,
    reward_fn="char_count",
)


def smoke_trainer(impl, model: str = "tiny-llama", **overrides):
    """The submission's RLHFTrainerLora, built as the course builds it (`RLHFTrainerLora(args)`),
    with the submission's RLHFArgsLora (given in the exercise file; the library's when a single
    file leaves it out). A trainer that takes its model class from `model_class` (the library's)
    gets the submission's; the course's names its own."""
    args_cls = given_class(impl, "RLHFArgsLora")
    trainer_cls = impl.RLHFTrainerLora
    if not isinstance(trainer_cls, type):
        raise CheckFailed(f"RLHFTrainerLora should be a class, got {type(trainer_cls).__name__}")

    if hasattr(trainer_cls, "model_class"):

        class Trainer(trainer_cls):
            model_class = impl.TransformerWithValueHeadLora

        trainer_cls = Trainer
    args = args_cls(base_model=model, device=probe_device(), **{**SMOKE, **overrides})
    return build_trainer(trainer_cls, args, show_progress=False)


@check("RLHFTrainerLora", points=10, needs=("RLHFTrainerLora", "TransformerWithValueHeadLora"))
def probe_trainer_smoke_run(impl):
    """The smoke run trains on tiny-llama; the reference is the same model, its logits the base's."""
    trainer = smoke_trainer(impl)
    rollouts = []
    rollout_phase = trainer.rollout_phase

    def recording_rollout():
        memory = rollout_phase()
        rollouts.append({"ids": memory.sample_ids.cpu(), "ref": memory.ref_logits.float().cpu()})
        return memory

    trainer.rollout_phase = recording_rollout
    history = trainer.train()
    n_lora = sum(p.numel() for p in trainer.model.lora_params())
    return {
        "history": [
            {k: float(v) for k, v in m.items() if isinstance(v, (int, float))} for m in history
        ],
        "ref_is_model": trainer.ref_model is trainer.model,
        "rollouts": rollouts,
        "lora_B_max": max(
            float(layer.lora_q.B.detach().abs().max()) for layer in trainer.model.lora
        ),
        "n_lora": n_lora,
    }


@probe_trainer_smoke_run.judge
def judge_trainer_smoke_run(out):
    expect(
        len(out["history"]) == SMOKE["total_phases"],
        f"train() should run {SMOKE['total_phases']} phases, recorded {len(out['history'])}",
    )
    for m in out["history"]:
        bad = [k for k, v in m.items() if not math.isfinite(v)]
        expect(not bad, f"non-finite metrics in phase {m.get('phase')}: {bad}")
    expect(
        out["ref_is_model"],
        "the reference model should be the policy itself (its plain forward has "
        "no adaptors): RLHFTrainerLora.__init__ must set self.ref_model = self.model, not a copy",
    )
    base = base_model("tiny-llama")
    for i, r in enumerate(out["rollouts"]):
        with torch.no_grad():
            want = gen_positions(base(r["ids"]), SMOKE["gen_len"])  # what the memory keeps
        expect(
            close(r["ref"], want),
            f"phase {i}: the reference logits are not the base model's (max "
            f"diff {max_diff(r['ref'], want):.3g}) — LoRA must be off in the plain forward",
        )
    expect(out["lora_B_max"] > 0, "training did not change the LoRA weights (B is still zero)")
