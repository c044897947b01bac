"""The backward-pass checks: gradients of every adaptor parameter through the whole model.

Mutants keep the forward pass exact and break the gradients, each in its own way; the checks must
fail them with a message naming the mistake, and pass correct rewrites. The judges' reference (the
merged float64 model and the chain rule) is itself checked against finite differences.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from backward_mutants import COURSE_SUBMISSION, MUTANTS, VARIANTS

from lora_rlhf.authoring.implementations import load_impl
from lora_rlhf.checks import CHECKS, backward_checks, checks_for, run_check
from lora_rlhf.checks.reference import ALPHA, RANK, adaptor_values, merge_into
from lora_rlhf.models import load_model

GRADIENT_CHECKS = ("hooks_gradients_tiny_llama", "hooks_gradients_tiny_pythia", "model_gradients")
FORWARD_CHECKS = (
    "lora_forward_formula",
    "hooks_merged_tiny_llama",
    "hooks_merged_tiny_pythia",
    "model_forward_with_value_head",
)
UNDER_TEST = (
    "lora_rlhf.lessons.section2_lora",
    "lora_rlhf.fast.lora",
    "lora_rlhf.adapters.merge",
    "lora_rlhf.adapters.files",
)


@pytest.fixture(scope="module")
def impls(tmp_path_factory):
    d = tmp_path_factory.mktemp("backward")
    return {e.name: load_impl(e.write(d)) for e in (*MUTANTS, *VARIANTS)}


def test_the_gradient_checks_are_registered_with_points():
    names = {c.name for c in checks_for()}
    assert set(GRADIENT_CHECKS) <= names
    assert all(CHECKS[n].points > 0 for n in GRADIENT_CHECKS)
    assert len(MUTANTS) >= 3


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m.name)
def test_a_backward_mutant_keeps_the_forward_and_fails_every_gradient_check(mutant, impls):
    impl = impls[mutant.name]
    for name in FORWARD_CHECKS:
        result = run_check(CHECKS[name], impl)
        assert result.passed, f"{mutant.name} should have a right forward pass: {result.message}"
    for name in GRADIENT_CHECKS:
        result = run_check(CHECKS[name], impl)
        assert not result.passed, f"{mutant.name} passed {name}"
        assert mutant.says in result.message, result.message
        assert "layer " in result.message  # names the adaptor


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_a_correct_variant_passes_every_check(variant, impls):
    for check in checks_for():
        if check.exercise == "RLHFTrainerLora":
            continue  # the smoke run is the same code in every variant (and the slowest check)
        result = run_check(check, impls[variant.name])
        assert result.passed, f"{variant.name} failed {check.name}: {result.message}"


def _merged_loss(name: str, layers: list[dict]) -> float:
    model = load_model(name, device="cpu").to(torch.float64, print_details=False)
    merge_into(model, layers, ALPHA / RANK)
    head = {k: v.double() for k, v in backward_checks.value_head_weights(model.cfg.d_model).items()}
    tokens = backward_checks._tokens(model.cfg.d_vocab)
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=backward_checks.VALUE_HOOK)
        hidden = torch.relu(cache[backward_checks.VALUE_HOOK] @ head["0.weight"].T + head["0.bias"])
        values = (hidden @ head["2.weight"].T + head["2.bias"]).squeeze(-1)
        return float(backward_checks.loss_of(logits, values, tokens))


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-pythia"])
@pytest.mark.parametrize(
    "param",
    [
        (0, "q", 0, (1, 5, 2)),
        (0, "k", 1, (1, 2, 7)),
        (1, "v", 0, (0, 3, 1)),
        (0, "o", 1, (3, 1, 9)),
    ],
)
def test_the_reference_gradient_equals_finite_differences(name, param):
    layer, target, which, index = param  # which: 0 = A, 1 = B
    want = backward_checks.reference_grads(name)[f"layer {layer} lora_{target}.{'AB'[which]}"]
    cfg = load_model(name, device="cpu").cfg
    eps, losses = 1e-5, []
    for sign in (1, -1):
        layers = adaptor_values(cfg, backward_checks.SEED, scale=backward_checks.SCALE)
        layers = [{t: tuple(x.double() for x in ab) for t, ab in lay.items()} for lay in layers]
        layers[layer][target][which][index] += sign * eps
        losses.append(_merged_loss(name, layers))
    numeric = (losses[0] - losses[1]) / (2 * eps)
    assert abs(numeric) > 1e-6  # an entry that matters
    assert numeric == pytest.approx(float(want[index]), rel=1e-5, abs=1e-9)


def test_the_references_import_no_library_code_under_test():
    for module in (backward_checks, __import__("lora_rlhf.checks.reference").checks.reference):
        tree = ast.parse(Path(module.__file__).read_text())
        imported = {
            n.module if isinstance(n, ast.ImportFrom) else a.name
            for n in ast.walk(tree)
            if isinstance(n, (ast.Import, ast.ImportFrom))
            for a in n.names
        }
        assert not {m for m in imported if m and m.startswith(UNDER_TEST)}, module.__name__


def test_no_checks_module_imports_library_code_under_test_at_module_level():
    """Judges run module-level code only; probes may build the library's Section 1 model."""
    folder = Path(backward_checks.__file__).parent
    for path in folder.glob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {
            n.module if isinstance(n, ast.ImportFrom) else a.name
            for n in tree.body
            if isinstance(n, (ast.Import, ast.ImportFrom))
            for a in n.names
        }
        assert not {m for m in imported if m and m.startswith(UNDER_TEST)}, path.name


@pytest.mark.parametrize("check", GRADIENT_CHECKS)
def test_the_gradient_checks_pass_the_reference_on_every_device(check, device):
    """Probes on cuda (float32, its own kernels) against the float64 CPU reference."""
    result = run_check(CHECKS[check], load_impl("library"), device=device)
    assert result.passed, result.message


def test_a_model_run_under_no_grad_fails_the_model_gradient_check_saying_so(tmp_path):
    path = tmp_path / "no_grad_model.py"
    path.write_text(
        COURSE_SUBMISSION.read_text()
        + "\n\nclass TransformerWithValueHeadLora(TransformerWithValueHeadLora):\n"
        "    def forward_with_value_head(self, tokens):\n"
        "        with t.no_grad():\n"
        "            return super().forward_with_value_head(tokens)\n"
    )
    impl = load_impl(path)
    assert run_check(CHECKS["model_forward_with_value_head"], impl).passed
    result = run_check(CHECKS["model_gradients"], impl)
    assert not result.passed and "torch.no_grad()" in result.message
