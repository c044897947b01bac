"""The bonus exercise: LoRA on the MLP layers (MlpLoraHooks, TransformerWithValueHeadMlpLora),
its checks (their power against broken versions), and the generated bonus files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import make_lora_model, tokens

from lora_rlhf.authoring.implementations import load_section
from lora_rlhf.authoring.sync import render
from lora_rlhf.checks import checks_for, run_check
from lora_rlhf.checks.mlp_checks import bonus_checks_for

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src" / "lora_rlhf" / "lessons" / "bonus_mlp_lora.py"
SOLUTION = ROOT / "solutions" / "bonus_mlp_lora.py"
BONUS = bonus_checks_for()
BY_NAME = {c.name: c for c in BONUS}

# (name, substitution in the solution, a check that must fail, a phrase of its message)
MUTANTS = [
    (
        "gate_and_in_swapped",
        ("adaptor = self.lora_gate if self.gated else self.lora_in", "adaptor = self.lora_in"),
        "mlp_hooks_dispatch",
        "hook_pre is the gate",
    ),
    (
        "out_reads_the_pre_activation",
        (
            '(f"blocks.{i}.mlp.hook_post", self.store_hook_post)',
            '(f"blocks.{i}.mlp.hook_pre", self.store_hook_post)',
        ),
        "mlp_hooks_merged_tiny_pythia",
        "mlp.hook_post",
    ),
    (
        "no_pre_linear_hook",
        (
            "        if self.gated:\n            hooks.append(",
            "        if False:\n            hooks.append(",
        ),
        "mlp_hooks_names",
        "hook_pre_linear",
    ),
    (
        "mlp_hooks_not_appended",
        ("self.lora_fwd_hooks = self.lora_fwd_hooks + [", "_unused = self.lora_fwd_hooks + ["),
        "mlp_model_forward",
        "append the MLP hooks",
    ),
]


def test_bonus_checks_are_not_part_of_the_graded_rubric():
    assert BONUS and all(c.points == 0 for c in BONUS)
    assert not {c.name for c in checks_for()} & set(BY_NAME)
    assert {c.exercise for c in BONUS} == {"MlpLoraHooks", "TransformerWithValueHeadMlpLora"}


@pytest.mark.parametrize("check", BONUS, ids=lambda c: c.name)
def test_solution_passes(check):
    result = run_check(check, load_section("mlp", SOLUTION))
    assert result.passed, result.message


@pytest.mark.parametrize("check", BONUS, ids=lambda c: c.name)
def test_untouched_stubs_fail(check):
    result = run_check(check, load_section("mlp", ROOT / "exercises"))
    assert not result.passed and "not implemented" in result.message


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m[0])
def test_broken_version_is_caught_with_a_pointed_message(mutant, tmp_path):
    name, (old, new), check_name, says = mutant
    source = SOLUTION.read_text()
    assert source.count(old) == 1, f"{name}: the substitution no longer applies"
    path = tmp_path / f"{name}.py"
    path.write_text(source.replace(old, new))
    result = run_check(BY_NAME[check_name], load_section("mlp", path))
    assert not result.passed and says in result.message, result.message


def test_generated_bonus_files_are_up_to_date():
    text = SOURCE.read_text()
    for kind in ("solutions", "exercises"):
        assert (ROOT / kind / "bonus_mlp_lora.py").read_text() == render(
            text, kind, source="src/lora_rlhf/lessons/bonus_mlp_lora.py"
        ), "run `lora-rlhf sync`"


def test_mlp_adaptors_are_trained_and_base_weights_are_not():
    model = make_lora_model("tiny-pythia", mlp=True)
    trainable = {id(p) for p in model.get_base_model_trainable_params()}
    assert {id(p) for p in model.mlp_lora.parameters()} <= trainable
    assert not any(p.requires_grad for p in model.base_model_params())
    assert not trainable & {id(p) for p in model.base_model_params()}


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-pythia"])
def test_generate_with_mlp_adaptors_is_the_same_with_and_without_kv_cache(name):
    model = make_lora_model(name, mlp=True, b_std=0.5)
    prompt = tokens(model, batch=1, seq=4)
    kwargs = dict(max_new_tokens=5, do_sample=False, verbose=False, stop_at_eos=False)
    with torch.no_grad():
        cached = model.generate(prompt, use_past_kv_cache=True, **kwargs)
        uncached = model.generate(prompt, use_past_kv_cache=False, **kwargs)
    assert torch.equal(cached, uncached)
