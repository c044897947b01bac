"""The plumbing the check modules share: one registry class, one loader table, the given classes'
library defaults, and the one minibatch shuffle of PPO's and GRPO's memories."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lora_rlhf.authoring.implementations import (
    SECTIONS,
    ImplementationError,
    given_class,
    load_section,
)
from lora_rlhf.checks.core import Registry, run_check
from lora_rlhf.rlhf.ppo import minibatch_indices


def test_a_registry_keeps_its_checks_apart_by_exercise_in_registration_order():
    reg = Registry("demo")

    @reg.check("first", points=2)
    def probe_doubled(impl):
        """Doubles."""
        return {"y": impl.f(3)}

    @probe_doubled.judge
    def judge_doubled(out):
        assert out["y"] == 6

    @reg.judged("second", probe_doubled)
    def judge_even(out):
        """Even."""
        assert out["y"] % 2 == 0

    assert [c.name for c in reg.for_exercise()] == ["doubled", "even"]
    assert [c.name for c in reg.for_exercise("second")] == ["even"]
    doubled, even = reg.checks["doubled"], reg.checks["even"]
    assert (doubled.points, doubled.description, doubled.needs) == (2, "Doubles.", ("first",))
    assert (even.points, even.description, even.probe) == (0, "Even.", probe_doubled)
    assert run_check(doubled, SimpleNamespace(first=1, f=lambda x: 2 * x)).passed
    assert not run_check(doubled, SimpleNamespace(first=1, f=lambda x: x + 1)).passed


def test_an_unknown_section_is_named_with_the_choices():
    with pytest.raises(
        ImplementationError, match="no section 'nope': choose one of section2, grpo"
    ):
        load_section("nope")


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_every_section_loads_the_library_and_names_its_file(section, tmp_path):
    file_name, module = SECTIONS[section]
    assert load_section(section).__name__ == module
    with pytest.raises(ImplementationError, match=f"this section lives in {file_name}"):
        load_section(section, tmp_path)


def test_a_given_class_left_out_is_the_librarys_and_one_written_is_kept():
    import lora_rlhf.lessons.section2_lora as lesson

    assert given_class(SimpleNamespace(), "RLHFArgsLora") is lesson.RLHFArgsLora
    assert given_class(SimpleNamespace(RLHFArgsLora="not a class"), "RLHFArgsLora") is (
        lesson.RLHFArgsLora
    )

    class Mine:
        pass

    assert given_class(SimpleNamespace(GRPOArgsLora=Mine), "GRPOArgsLora") is Mine


def test_minibatch_rows_are_one_randperm_per_pass_cut_in_equal_parts():
    torch.manual_seed(5)
    rows = minibatch_indices(12, 3, 2, "cpu")
    torch.manual_seed(5)
    expected = [torch.randperm(12) for _ in range(2)]  # the draws a replay memory always made
    assert len(rows) == 6 and all(r.shape == (4,) for r in rows)
    for p in range(2):
        assert torch.equal(torch.cat(rows[3 * p : 3 * p + 3]), expected[p])
        assert sorted(torch.cat(rows[3 * p : 3 * p + 3]).tolist()) == list(range(12))
