"""Test power: the checks fail every deliberately broken implementation with a message that
points at the mistake, pass every correct rewrite, fail the untouched stubs, pass the solutions."""

from __future__ import annotations

import pytest
from mutants import MUTANTS, ROOT, VARIANTS

from lora_rlhf.authoring.implementations import load_impl
from lora_rlhf.checks import checks_for, run_check

ALL_CHECKS = checks_for()
BY_NAME = {c.name: c for c in ALL_CHECKS}


def test_there_are_enough_mutants_and_variants():
    assert len(MUTANTS) >= 15 and len(VARIANTS) >= 3
    assert {c for m in MUTANTS for c in m.catches} <= set(BY_NAME)


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m.name)
def test_mutant_is_caught(mutant, tmp_path):
    impl = load_impl(mutant.write(tmp_path))
    results = {name: run_check(BY_NAME[name], impl) for name in mutant.catches}
    for name, result in results.items():
        assert not result.passed, f"{mutant.name} passed {name}"
    first = results[mutant.catches[0]]
    assert mutant.says in first.message, (
        f"{mutant.name}: message does not point at the mistake: {first.message}"
    )


@pytest.fixture(scope="module")
def variant_impls(tmp_path_factory):
    d = tmp_path_factory.mktemp("variants")
    return {v.name: load_impl(v.write(d)) for v in VARIANTS}


@pytest.mark.parametrize("check", ALL_CHECKS, ids=lambda c: c.name)
@pytest.mark.parametrize("variant", [v.name for v in VARIANTS])
def test_correct_variant_passes(variant, check, variant_impls):
    result = run_check(check, variant_impls[variant])
    assert result.passed, f"{variant} failed {check.name}: {result.message}"


@pytest.mark.parametrize("check", ALL_CHECKS, ids=lambda c: c.name)
def test_untouched_stubs_fail(check):
    result = run_check(check, load_impl(ROOT / "exercises"))
    assert not result.passed, f"{check.name} passes on the untouched stubs"
    assert "not implemented" in result.message or "raised" in result.message


@pytest.mark.parametrize("check", ALL_CHECKS, ids=lambda c: c.name)
def test_solutions_pass(check):
    result = run_check(check, load_impl(ROOT / "solutions"))
    assert result.passed, result.message
