"""The notebook-style checks: pass on correct code with a success line, fail with a
message naming the mistake."""

from __future__ import annotations

import pytest
from mutants import MUTANTS

import lora_rlhf.lessons.section2_lora as lora
from lora_rlhf import tests_lora
from lora_rlhf.authoring.implementations import load_impl, repo_root


def test_all_six_check_cells_pass_on_the_library(capsys):
    tests_lora.testing_lora(lora.Lora)
    tests_lora.testing_lora_hooks(lora.LoraHooks)
    tests_lora.testing_lora_hooks_qkv_dispatch_and_out(lora.LoraHooks)
    model = lora.TransformerWithValueHeadLora.from_pretrained("tiny-llama", device="cpu")
    tests_lora.test_lora_fwd_hooks_list(model)
    tests_lora.test_lora_model_forward_methods(model)
    tests_lora.test_rlhf_trainer_lora(lora.RLHFTrainerLora, lora.TransformerWithValueHeadLora)
    out = capsys.readouterr().out
    assert out.count("passed.") == 6
    assert "the RLHFTrainerLora smoke run: passed." in out


def test_every_failing_check_is_listed_with_its_diagnosis(tmp_path):
    mutant = next(m for m in MUTANTS if m.name == "scaling_missing")
    impl = load_impl(mutant.write(tmp_path))
    with pytest.raises(AssertionError) as err:
        tests_lora.testing_lora(impl.Lora)
    listed = [line for line in str(err.value).splitlines() if line.startswith("  ✗ ")]
    assert len(listed) >= 2 and str(err.value).count("α/r scaling is missing") >= 2


def test_stub_fails_with_the_exercise_named():
    stubs = load_impl(repo_root() / "exercises")
    with pytest.raises(NotImplementedError, match="^Exercise Lora.__init__: "):
        tests_lora.testing_lora(stubs.Lora)


def test_a_stub_reached_after_a_failure_keeps_the_failure(tmp_path):
    solved = (repo_root() / "solutions" / "section2_lora.py").read_text()
    start = solved.index("    def forward(self, x")
    end = solved.index("\n\n", solved.index("return", start))
    stubbed = (
        solved[:start]
        + (
            "    def forward(self, x):\n        raise NotImplementedError('Exercise Lora.forward: x')"
        )
        + solved[end:]
    )
    stubbed = stubbed.replace("torch.zeros(", "torch.ones(", 1)  # B no longer starts at zero
    path = tmp_path / "half.py"
    path.write_text(stubbed)
    with pytest.raises(NotImplementedError, match="^Exercise Lora.forward: x") as err:
        tests_lora.testing_lora(load_impl(path).Lora)
    assert "Before it, 1 check failed" in str(err.value) and "lora_init" in str(err.value)


def test_failure_message_names_the_mistake(tmp_path):
    mutant = next(m for m in MUTANTS if m.name == "scaling_missing")
    impl = load_impl(mutant.write(tmp_path))
    with pytest.raises(AssertionError, match="α/r scaling is missing"):
        tests_lora.testing_lora(impl.Lora)


def test_model_checks_need_tiny_llama():
    model = lora.TransformerWithValueHeadLora.from_pretrained("tiny-pythia", device="cpu")
    with pytest.raises(AssertionError, match="tiny-llama"):
        tests_lora.test_lora_fwd_hooks_list(model)
