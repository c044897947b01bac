"""Notebook-style checks of the Section 2 exercises (SPEC §4).

Each takes the student's class (or model), runs every check of that exercise, raises an
AssertionError that says what is wrong, and prints a success line. The same checks run under
pytest (``tests/``) and in the grader (``lora-rlhf grade``).
"""

from __future__ import annotations

from types import SimpleNamespace

from lora_rlhf.checks.core import Check, checks_for, run_check


def _run(checks: list[Check], impl, what: str) -> None:
    failures = []
    for c in checks:
        result = run_check(c, impl)
        stub = result.message.removeprefix("raised not implemented yet: ")
        if stub != result.message:
            # an untouched stub: stop with its own error, which names the exercise to fill in
            raise NotImplementedError(stub)
        if not result.passed:
            failures.append(f"  ✗ {c.name} — {c.description}\n      {result.message}")
    if failures:
        raise AssertionError(
            f"{what}: {len(failures)} of {len(checks)} checks failed\n" + "\n".join(failures)
        )
    print(f"All {len(checks)} checks of {what} passed.")


def testing_lora(Lora) -> None:
    """Shapes, init, the (α/r)·(xA)B formula with non-zero B, broadcasting, dtype, FLOPs, gradients."""
    _run(checks_for("Lora"), SimpleNamespace(Lora=Lora), "Lora")


def _hooks_impl(LoraHooks):
    return SimpleNamespace(LoraHooks=LoraHooks)


def testing_lora_hooks(LoraHooks) -> None:
    """Adaptor counts and shapes (GQA), hook names, and hooked model == merged model."""
    names = {
        "hooks_adaptor_shapes",
        "hooks_names",
        "hooks_merged_tiny_llama",
        "hooks_merged_tiny_pythia",
    }
    _run(
        [c for c in checks_for("LoraHooks") if c.name in names], _hooks_impl(LoraHooks), "LoraHooks"
    )


def testing_lora_hooks_qkv_dispatch_and_out(LoraHooks) -> None:
    """q/k/v dispatch by hook name (unknown name → ValueError) and the out-hook summed over heads."""
    names = {"hooks_qkv_dispatch", "hooks_out_summed"}
    _run(
        [c for c in checks_for("LoraHooks") if c.name in names],
        _hooks_impl(LoraHooks),
        "LoraHooks dispatch and out-hook",
    )


def test_lora_fwd_hooks_list(model) -> None:
    """fwd_hooks content and length (1 + 6·n_layers) of a TransformerWithValueHeadLora on tiny-llama."""
    names = {"model_fwd_hooks", "model_frozen_params"}
    checks = [c for c in checks_for("TransformerWithValueHeadLora") if c.name in names]
    _run_on_model(checks, model, "fwd_hooks")


def test_lora_model_forward_methods(model) -> None:
    """forward_with_value_head, plain forward, generate, hook calls and leaks of a tiny-llama model."""
    names = {
        "model_forward_with_value_head",
        "model_plain_forward_is_base",
        "model_generate",
        "model_hook_calls",
        "model_no_hook_leak",
    }
    checks = [c for c in checks_for("TransformerWithValueHeadLora") if c.name in names]
    _run_on_model(checks, model, "forward methods")


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
