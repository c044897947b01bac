"""The GRPO bonus (section3_grpo): its checks pass the solutions, fail the untouched stubs, catch
every deliberately broken version (forward and backward) with a message that points at the
mistake, and pass correct rewrites; the generated files are up to date; the points are a bonus."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from lora_rlhf.authoring.implementations import load_section
from lora_rlhf.authoring.sync import render
from lora_rlhf.checks import checks_for, run_check
from lora_rlhf.checks.grpo_checks import GRPO_CHECKS, grpo_checks_for

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src" / "lora_rlhf" / "lessons" / "section3_grpo.py"
SOLUTION = ROOT / "solutions" / "section3_grpo.py"
CHECKS = grpo_checks_for()


@dataclass(frozen=True)
class Edit:
    name: str
    edits: tuple[tuple[str, str], ...]
    catches: tuple[str, ...] = ()  # checks that must fail (mutants)
    says: str = ""  # a phrase of the first failing check's message

    def write(self, directory: Path) -> Path:
        source = SOLUTION.read_text()
        for old, new in self.edits:
            assert source.count(old) == 1, f"{self.name}: {old!r} no longer occurs once"
            source = source.replace(old, new)
        path = directory / f"{self.name}.py"
        path.write_text(source)
        return path


GROUP_MEAN = "mean = grouped.mean(dim=-1, keepdim=True)"
GROUP_STD = "(grouped.std(dim=-1, keepdim=True) + eps)"
K3 = "return delta.exp() - delta - 1"
SURROGATE = "ratio * advantages, ratio.clamp(1 - clip_coef, 1 + clip_coef) * advantages"
PER_TOKEN = "per_token = surrogate - kl_coef * calc_kl_k3(logprobs, ref_logprobs)"

MUTANTS = [
    Edit(
        "group_mean_over_the_whole_batch",
        ((GROUP_MEAN, "mean = grouped.mean()"), (GROUP_STD, "(grouped.std() + eps)")),
        catches=("grpo_advantages_grpo",),
        says="whole batch",
    ),
    Edit(
        "std_without_eps",
        ((GROUP_STD, "grouped.std(dim=-1, keepdim=True)"),),
        catches=("grpo_advantages_grpo", "grpo_advantages_equal_group"),
        says="std 0",
    ),
    Edit(
        "population_std",
        ((GROUP_STD, "(grouped.std(dim=-1, keepdim=True, correction=0) + eps)"),),
        catches=("grpo_advantages_grpo",),
        says="population std",
    ),
    Edit(
        "advantage_sign_flipped",
        (("advantages = (grouped - mean) /", "advantages = (mean - grouped) /"),),
        catches=("grpo_advantages_grpo", "grpo_trainer_rollout", "grpo_trainer_learns"),
        says="wrong sign",
    ),
    Edit(
        "rloo_with_the_group_mean",
        (("advantages = grouped - mean_of_others", "advantages = grouped - mean"),),
        catches=("grpo_advantages_rloo",),
        says="other",
    ),
    Edit(
        "groups_laid_out_across_the_batch",
        (
            (
                'rearrange(rewards, "(group member) -> group member"',
                'rearrange(rewards, "(member group) -> group member"',
            ),
        ),
        catches=("grpo_advantages_grpo", "grpo_advantages_rloo"),
        says="should be",
    ),
    Edit("k1_instead_of_k3", ((K3, "return -delta"),), catches=("grpo_kl_k3",), says="k1"),
    Edit(
        "k3_with_delta_reversed",
        (("delta = ref_logprobs - logprobs", "delta = logprobs - ref_logprobs"),),
        catches=("grpo_kl_k3", "grpo_objective"),
        says="wrong sign",
    ),
    Edit(
        "no_clipping",
        ((SURROGATE, "ratio * advantages, ratio * advantages"),),
        catches=("grpo_objective",),
        says="not clipped",
    ),
    Edit(
        "maximum_instead_of_minimum",
        (("surrogate = torch.minimum(", "surrogate = torch.maximum("),),
        catches=("grpo_objective",),
        says="minimum",
    ),
    Edit(
        "advantages_normalised_again",
        (
            (
                'advantages = einops.rearrange(mb_advantages, "batch -> batch 1")',
                "advantages = einops.rearrange((mb_advantages - mb_advantages.mean()) / "
                '(mb_advantages.std() + 1e-8), "batch -> batch 1")',
            ),
        ),
        catches=("grpo_objective",),
        says="normalised again",
    ),
    Edit(
        "kl_added_not_subtracted",
        ((PER_TOKEN, PER_TOKEN.replace("surrogate - kl_coef", "surrogate + kl_coef")),),
        catches=("grpo_objective",),
        says="KL term has the wrong sign",
    ),
    Edit(
        "tokens_summed",
        (("return per_token.mean(dim=-1).mean()", "return per_token.sum(dim=-1).mean()"),),
        catches=("grpo_objective",),
        says="a mean, not a sum",
    ),
    # backward: the value is right, the gradient is not
    Edit(
        "ratio_detached",
        (
            (
                "ratio = (logprobs - mb_logprobs).exp()",
                "ratio = (logprobs - mb_logprobs).exp().detach()",
            ),
        ),
        catches=("grpo_objective",),
        says="gradient",
    ),
    Edit(
        "kl_term_detached",
        ((PER_TOKEN, PER_TOKEN.replace("calc_kl_k3(logprobs,", "calc_kl_k3(logprobs.detach(),")),),
        catches=("grpo_objective",),
        says="gradient",
    ),
    Edit(
        "k3_detached",
        ((K3, "return (delta.exp() - delta - 1).detach()"),),
        catches=("grpo_kl_k3",),
        says="gradient",
    ),
    # the trainer
    Edit(
        "reference_with_adaptors_on",
        (
            (
                "ref_logits = self.ref_model(sample_ids)",
                "ref_logits = self.policy_logits(sample_ids)",
            ),
        ),
        catches=("grpo_trainer_rollout",),
        says="adaptors off",
    ),
    Edit(
        "policy_without_adaptors",
        (
            (
                "with self.model.hooks(fwd_hooks=self.model.lora_fwd_hooks):\n"
                "            return self.model(tokens)",
                "return self.model(tokens)",
            ),
        ),
        catches=("grpo_trainer_rollout", "grpo_trainer_objective"),
        says="LoRA hooks",
    ),
    Edit(
        "value_head_still_trained",
        (("use_value_head=False,", "use_value_head=True,"),),
        catches=("grpo_trainer_no_value_head",),
        says="value head",
    ),
    Edit(
        "rloo_in_the_rollout_regardless",
        (
            (
                "advantages = group_advantages(rewards, args.group_size, args.advantage)",
                'advantages = group_advantages(rewards, args.group_size, "rloo")',
            ),
        ),
        catches=("grpo_trainer_rollout",),
        says="group advantages",
    ),
    Edit(
        "objective_minimised",
        (
            (
                "            objective.backward()\n",
                "            (-objective).backward()\n",
            ),
        ),
        catches=("grpo_trainer_learns",),
        says="did not rise",
    ),
]

VARIANTS = [
    Edit(
        "torch_views_and_closed_form_rloo",
        (
            (
                'grouped = einops.rearrange(rewards, "(group member) -> group member", '
                "member=group_size)",
                "grouped = rewards.view(-1, group_size)",
            ),
            (
                "mean_of_others = (grouped.sum(dim=-1, keepdim=True) - grouped) / (group_size - 1)\n"
                "        advantages = grouped - mean_of_others",
                "advantages = (grouped - mean) * group_size / (group_size - 1)",
            ),
            (
                'return einops.rearrange(advantages, "group member -> (group member)")',
                "return advantages.flatten()",
            ),
            (K3, "return torch.expm1(delta) - delta"),
        ),
    ),
    Edit(
        "where_clip_flat_mean_and_run_with_hooks",
        (
            (
                SURROGATE,
                "ratio * advantages, torch.where(ratio > 1 + clip_coef, 1 + clip_coef, "
                "torch.where(ratio < 1 - clip_coef, 1 - clip_coef, ratio)) * advantages",
            ),
            ("return per_token.mean(dim=-1).mean()", "return per_token.sum() / per_token.numel()"),
            (
                "with self.model.hooks(fwd_hooks=self.model.lora_fwd_hooks):\n"
                "            return self.model(tokens)",
                "return self.model.run_with_hooks(tokens, fwd_hooks=self.model.lora_fwd_hooks)",
            ),
        ),
    ),
]
BY_NAME = {c.name: c for c in CHECKS}


def test_the_grpo_checks_are_bonus_points_outside_section_2s_rubric():
    assert not {c.name for c in checks_for()} & set(GRPO_CHECKS)
    assert sum(c.points for c in CHECKS) == 10
    assert {c.exercise for c in CHECKS} == {
        "group_advantages",
        "calc_kl_k3",
        "calc_grpo_objective",
        "GRPOTrainerLora",
    }


def test_there_are_enough_mutants_and_variants():
    assert len(MUTANTS) >= 6 and len(VARIANTS) >= 2
    assert {c for m in MUTANTS for c in m.catches} <= set(BY_NAME)


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.name)
def test_library_passes(check):
    result = run_check(check, load_section("grpo", "library"))
    assert result.passed, result.message


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.name)
def test_solution_passes(check):
    result = run_check(check, load_section("grpo", SOLUTION))
    assert result.passed, result.message


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.name)
def test_untouched_stubs_fail(check):
    result = run_check(check, load_section("grpo", ROOT / "exercises"))
    assert not result.passed and "not implemented" in result.message, result.message


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m.name)
def test_mutant_is_caught_with_a_pointed_message(mutant, tmp_path):
    impl = load_section("grpo", mutant.write(tmp_path))
    results = [run_check(BY_NAME[name], impl) for name in mutant.catches]
    assert not any(r.passed for r in results), [(r.name, r.passed) for r in results]
    assert mutant.says in results[0].message, results[0].message


@pytest.fixture(scope="module")
def variant_impls(tmp_path_factory):
    d = tmp_path_factory.mktemp("grpo_variants")
    return {v.name: load_section("grpo", v.write(d)) for v in VARIANTS}


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.name)
@pytest.mark.parametrize("variant", [v.name for v in VARIANTS])
def test_correct_variant_passes(variant, check, variant_impls):
    result = run_check(check, variant_impls[variant])
    assert result.passed, f"{variant} failed {check.name}: {result.message}"


def test_generated_files_are_up_to_date():
    text = SOURCE.read_text()
    for kind in ("solutions", "exercises"):
        assert (ROOT / kind / "section3_grpo.py").read_text() == render(
            text, kind, source="src/lora_rlhf/lessons/section3_grpo.py"
        ), "run `lora-rlhf sync`"
        assert (ROOT / kind / "section3_grpo.ipynb").is_file(), "run `lora-rlhf sync`"


def test_every_exercise_stub_names_its_exercise():
    stubs = (ROOT / "exercises" / "section3_grpo.py").read_text()
    for exercise in ("group_advantages", "calc_kl_k3", "calc_grpo_objective", "GRPOTrainerLora"):
        assert f'NotImplementedError("Exercise {exercise}' in stubs
    assert "delta.exp() - delta - 1" not in stubs and "use_value_head=False," not in stubs


@pytest.mark.parametrize("kind", ["solutions", "exercises"])
def test_the_generated_files_pass_the_graders_tampering_scan(kind):
    from lora_rlhf.grading import static

    assert static.scan(ROOT / kind / "section3_grpo.py").tampering == []
