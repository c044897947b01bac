"""Every exercise check against a chosen implementation, on cpu (and cuda when present).

pytest tests/test_exercises.py                       # the library's classes
pytest tests/test_exercises.py --impl solutions      # the instructor's solutions
pytest tests/test_exercises.py --impl exercises      # your work in exercises/
pytest tests/test_exercises.py --impl my_lora.py     # any submission file or folder
pytest tests/test_exercises.py -k Lora               # one exercise
"""

from __future__ import annotations

import pytest

from lora_rlhf.authoring.implementations import load_impl
from lora_rlhf.checks import checks_for, run_check


@pytest.fixture(scope="session")
def impl(pytestconfig):
    return load_impl(pytestconfig.getoption("--impl"))


@pytest.mark.parametrize("check", checks_for(), ids=lambda c: f"{c.exercise}-{c.name}")
def test_exercise_check(check, impl, device):
    result = run_check(check, impl, device=device)
    assert result.passed, f"{check.description}\n{result.message}"
