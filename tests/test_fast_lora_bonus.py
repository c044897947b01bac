"""The bonus exercise *Making LoRA fast*: its checks pass the solution, catch broken versions
(wrong values, or right values with more matrix products than the idea needs), pass correct
variants written another way, and stay out of the graded rubric."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora_rlhf.authoring.implementations import load_section
from lora_rlhf.checks import checks_for, run_check
from lora_rlhf.checks.fast_bonus_checks import ProductCounter, fast_checks_for

ROOT = Path(__file__).resolve().parents[1]
SOLUTION = ROOT / "solutions" / "bonus_fast_lora.py"
FAST = fast_checks_for()
BY_NAME = {c.name: c for c in FAST}

# (name, (old, new) in the solution, the check that must fail, a phrase of its message)
MUTANTS = [
    (
        "qkv_three_products",  # right values, one product per adaptor
        (
            "x_a = x @ side_by_side",
            "x_a = torch.cat([x @ einops.rearrange(A, 'i d r -> d (i r)') for A in As], dim=-1)",
        ),
        "qkv_x_a_one_product",
        "took 3 matrix products",
    ),
    (
        "qkv_instances_interleaved",
        (
            '"inst d_model rank -> d_model (inst rank)") for A in As], dim=1',
            '"inst d_model rank -> d_model (rank inst)") for A in As], dim=1',
        ),
        "qkv_x_a_values",
        "split the columns in order",
    ),
    (
        "block_diagonal_blocks_reversed",
        ("return torch.block_diag(*M)", "return torch.block_diag(*M.flip(0))"),
        "block_diagonal_layout",
        "instance h's [a, b] block",
    ),
    (
        "heads_batched_product",  # right values, a batched product: one per head
        (
            "x_a_b = (side_by_side * scale) @ block_diagonal(B)\n    return",
            "return torch.einsum('...ir,iro->...io', x_a, B) * scale\n    return",
        ),
        "heads_x_a_b_one_product",
        "batched product",
    ),
    (
        "heads_scale_missing",
        ("(side_by_side * scale) @ block_diagonal(B)", "side_by_side @ block_diagonal(B)"),
        "heads_x_a_b_values",
        "scale α/r is missing",
    ),
    (
        "out_per_head_products",  # right values, a batched product over the heads first
        (
            "return (z_a * scale) @ stacked",
            "return torch.einsum('...hr,hro->...o', torch.einsum('...hd,hdr->...hr', z, A_o), "
            "B_o) * scale",
        ),
        "out_delta_two_products",
        "two are enough",
    ),
    (
        "q_bias_missing",
        (
            "torch.addmm(bias, x.reshape(-1, x.shape[-1]), stacked)",
            "torch.mm(x.reshape(-1, x.shape[-1]), stacked)",
        ),
        "q_and_x_a_values",
        "b_Q is missing",
    ),
    (
        "q_two_products",  # right values, q and x A from two products
        (
            "torch.addmm(bias, x.reshape(-1, x.shape[-1]), stacked)",
            "torch.cat([x.reshape(-1, x.shape[-1]) @ stacked[:, : n_heads * d_head] + bias[: "
            "n_heads * d_head], x.reshape(-1, x.shape[-1]) @ stacked[:, n_heads * d_head :]], 1)",
        ),
        "q_and_x_a_one_product",
        "took 2 matrix products",
    ),
    (
        "hooks_x_a_in_every_hook",  # right values, x A three times per layer
        ("if self.x_a is None:", "if True:"),
        "fast_hooks_products",
        "x A once for q, k and v",
    ),
    (
        "hooks_out_scale_missing",
        (
            "out_delta(z, self.lora_o.A, self.lora_o.B, self.scale)",
            "out_delta(z, self.lora_o.A, self.lora_o.B, 1.0)",
        ),
        "fast_hooks_merged_tiny_llama",
        "merged into W_Q",
    ),
    (
        "hooks_v_uses_k_adaptor",
        (
            "heads_x_a_b(self.x_a[kind], adaptors[kind].B, self.scale)",
            "heads_x_a_b(self.x_a[kind], (self.lora_q if kind == 'hook_q' else self.lora_k).B, "
            "self.scale)",
        ),
        "fast_hooks_merged_tiny_pythia",
        "merged into W_Q",
    ),
]

# Correct code written differently: every check passes.
VARIANTS = [
    (
        "qkv_with_permute_and_slices",
        (
            "x_a = x @ side_by_side",
            "side_by_side = torch.cat([A.permute(1, 0, 2).reshape(A.shape[1], -1) for A in As], 1)"
            "\n    x_a = torch.matmul(x, side_by_side)",
        ),
    ),
    (
        "block_diagonal_from_zeros",
        (
            "return torch.block_diag(*M)",
            "inst, a, b = M.shape\n    out = M.new_zeros(inst * a, inst * b)\n"
            "    for h in range(inst):\n        out[h * a : (h + 1) * a, h * b : (h + 1) * b] = M[h]\n"
            "    return out",
        ),
    ),
    (
        "heads_scale_after_the_product",
        ("(side_by_side * scale) @ block_diagonal(B)", "side_by_side @ block_diagonal(B) * scale"),
    ),
    (
        "q_bias_added_after_the_product",
        (
            "torch.addmm(bias, x.reshape(-1, x.shape[-1]), stacked)",
            "(x.reshape(-1, x.shape[-1]) @ stacked + bias)",
        ),
    ),
]


def write_changed(tmp_path: Path, name: str, old: str, new: str) -> Path:
    source = SOLUTION.read_text()
    assert source.count(old) == 1, f"{name}: the substitution no longer applies"
    path = tmp_path / f"{name}.py"
    path.write_text(source.replace(old, new))
    return path


def test_fast_checks_carry_no_points_and_stay_out_of_the_graded_rubric():
    assert FAST and all(c.points == 0 for c in FAST)
    assert not {c.name for c in checks_for()} & set(BY_NAME)
    assert {c.exercise for c in FAST} == {"qkv_x_a", "block_diagonal", "q_and_x_a", "FastLoraHooks"}


@pytest.mark.parametrize("check", FAST, ids=lambda c: c.name)
def test_solution_passes(check):
    result = run_check(check, load_section("fast", SOLUTION))
    assert result.passed, result.message


@pytest.mark.parametrize("check", FAST, ids=lambda c: c.name)
def test_untouched_stubs_fail(check):
    result = run_check(check, load_section("fast", ROOT / "exercises"))
    assert not result.passed and "not implemented" in result.message


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m[0])
def test_broken_version_is_caught_with_a_pointed_message(mutant, tmp_path):
    name, (old, new), check_name, says = mutant
    impl = load_section("fast", write_changed(tmp_path, name, old, new))
    result = run_check(BY_NAME[check_name], impl)
    assert not result.passed and says in result.message, result.message


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v[0])
def test_correct_variant_passes_every_check(variant, tmp_path):
    name, (old, new) = variant
    impl = load_section("fast", write_changed(tmp_path, name, old, new))
    failed = [r for r in (run_check(c, impl) for c in FAST) if not r.passed]
    assert not failed, [f"{r.name}: {r.message}" for r in failed]


def test_product_counter_counts_each_matrix_of_a_batched_product():
    a, b = torch.randn(5, 3, 4), torch.randn(5, 4, 2)
    with ProductCounter() as counter:
        a[0] @ b[0]  # one product
        torch.bmm(a, b)  # five
        torch.einsum("nij,njk->nik", a, b)  # five, as a batched product
        torch.addmm(torch.zeros(2), torch.randn(3, 4), torch.randn(4, 2))  # one
        a * 2  # no product
    assert counter.products == 12


def test_fast_hooks_take_fewer_products_than_the_teaching_hooks(capsys):
    import lora_rlhf.lessons.bonus_fast_lora as fast_lora_bonus
    from lora_rlhf.checks.fast_bonus_checks import compare_products
    from lora_rlhf.lessons.section2_lora import LoraHooks

    per_layer = compare_products("tiny-llama", LoraHooks, fast_lora_bonus.FastLoraHooks)
    assert per_layer["fast"] == 6 < per_layer["slow"]
    assert "same logits" in capsys.readouterr().out
