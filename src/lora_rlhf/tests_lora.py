"""Notebook-style checks of the Section 2 exercises: the ``testing_*`` names the course calls.

Each takes the student's class (or model), runs the grader's own checks of that exercise (the
gradient checks included), raises an AssertionError that lists every failing check with its
diagnosis, and prints a success line. The last check function of an exercise runs every graded
check of it, so a green notebook means full marks: a check function fails exactly when the grader
(``lora-rlhf grade``) takes points off its exercise. The same checks run under pytest (``tests/``).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from lora_rlhf.checks.all_checks import checks_for
from lora_rlhf.checks.core import Check
from lora_rlhf.checks.notebook import run_checks as _run
from lora_rlhf.checks.trainer_checks import SMOKE

# Checks whose message names a specific mistake run before the broad comparisons with the merged
# model, so a listed failure starts with its most telling diagnosis.
HOOKS_ORDER = (
    "hooks_adaptor_shapes",
    "hooks_names",
    "hooks_qkv_dispatch",
    "hooks_out_summed",
    "hooks_merged_tiny_llama",
    "hooks_merged_tiny_pythia",
    "hooks_gradients_tiny_llama",
    "hooks_gradients_tiny_pythia",
)
FWD_HOOKS_LIST = ("model_fwd_hooks", "model_frozen_params")


def _ordered(exercise: str, first: tuple[str, ...] = ()) -> list[Check]:
    """Every graded check of `exercise`, those named in `first` first (in that order)."""
    checks = checks_for(exercise)
    rank = {name: i for i, name in enumerate(first)}
    return sorted(checks, key=lambda c: rank.get(c.name, len(rank)))


def testing_lora(Lora) -> None:
    """Every graded check of Lora: shapes, init, the (α/r)·(xA)B formula with non-zero B,
    broadcasting, dtype, the (xA)B order, gradients."""
    _run(_ordered("Lora"), SimpleNamespace(Lora=Lora), "Lora")


def _hooks_impl(LoraHooks):
    return SimpleNamespace(LoraHooks=LoraHooks)


def testing_lora_hooks(LoraHooks) -> None:
    """Every graded check of LoraHooks, specific diagnoses first: adaptor counts and shapes (GQA),
    hook names, q/k/v dispatch, the out-hook, hooked model == merged model, gradients."""
    _run(_ordered("LoraHooks", HOOKS_ORDER), _hooks_impl(LoraHooks), "LoraHooks")


def testing_lora_hooks_qkv_dispatch_and_out(LoraHooks) -> None:
    """q/k/v dispatch by hook name (unknown name → ValueError) and the out-hook summed over heads
    (both also run by testing_lora_hooks)."""
    names = {"hooks_qkv_dispatch", "hooks_out_summed"}
    _run(
        [c for c in checks_for("LoraHooks") if c.name in names],
        _hooks_impl(LoraHooks),
        "LoraHooks dispatch and out-hook",
    )


def test_lora_fwd_hooks_list(model) -> None:
    """fwd_hooks content and length (1 + 6·n_layers), frozen and trainable parameters, of a
    TransformerWithValueHeadLora on tiny-llama (the part of the exercise written by setup_lora)."""
    checks = [c for c in checks_for("TransformerWithValueHeadLora") if c.name in FWD_HOOKS_LIST]
    _run_on_model(checks, model, "fwd_hooks")


def test_lora_model_forward_methods(model) -> None:
    """Every graded check of TransformerWithValueHeadLora on a tiny-llama model: forward_with_value_head,
    plain forward, generate, hook calls and leaks, a training step, gradients, and fwd_hooks."""
    checks = _ordered("TransformerWithValueHeadLora")
    checks = [c for c in checks if c.name not in FWD_HOOKS_LIST] + [
        c for c in checks if c.name in FWD_HOOKS_LIST
    ]
    _run_on_model(checks, model, "TransformerWithValueHeadLora")


def test_rlhf_trainer_lora(
    RLHFTrainerLora, TransformerWithValueHeadLora, RLHFArgsLora=None
) -> None:
    """The graded smoke run: the course's RLHFTrainerLora training the student's model class on
    tiny-llama (2 phases), with the library's RLHFArgsLora unless another is passed."""
    impl = SimpleNamespace(
        RLHFTrainerLora=RLHFTrainerLora,
        TransformerWithValueHeadLora=TransformerWithValueHeadLora,
        RLHFArgsLora=RLHFArgsLora,
    )
    _run(_ordered("RLHFTrainerLora"), impl, "the RLHFTrainerLora smoke run")


def _run_on_model(checks, model, what):
    if getattr(model.cfg, "model_name", None) != "tiny-llama":
        raise AssertionError(
            "these checks compare against tiny-llama references: build the model "
            "with TransformerWithValueHeadLora.from_pretrained('tiny-llama')"
        )
    # Each check builds its model through from_pretrained; use a fresh one of the student's class
    # so checks never see each other's changes.
    impl = SimpleNamespace(TransformerWithValueHeadLora=type(model), LoraHooks=type(model.lora[0]))
    _run(checks, impl, what)


def smoke_run(model_name: str, RLHFTrainerLora, RLHFArgsLora) -> None:
    """The graded smoke run's settings on `model_name` (the notebook's model, any size): two phases
    must train the adaptors of one model that is its own reference."""
    args = RLHFArgsLora(base_model=model_name, **SMOKE)
    trainer = RLHFTrainerLora(args)
    assert trainer.ref_model is trainer.model, (
        "ref_model must be the policy itself: its plain forward is π_ref, no second copy"
    )
    before = [p.detach().clone() for p in trainer.model.lora_params()]
    trainer.train()
    assert any(not torch.equal(p, q) for p, q in zip(trainer.model.lora_params(), before)), (
        "two phases of training changed no adaptor parameter: is the optimizer given lora_params()?"
    )
    print(f"Smoke run on {model_name} finished: the adaptors trained, one copy of the model.")
