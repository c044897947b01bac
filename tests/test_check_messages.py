"""Each failure message names a likely cause only when that cause fits the evidence (issue 23):
a wrong gradient is not called "no gradient", a missing α/r is not blamed on broadcasting or
float64, leaked hooks are reported as a leak, and a course-style `assert` is a clear error."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from mutants import MUTANTS
from torch import nn

from lora_rlhf.authoring.implementations import load_impl
from lora_rlhf.checks import CheckFailed, checks_for, run_check
from lora_rlhf.checks.backward_checks import judge_grads, reference_grads

MUTANT = {m.name: m for m in MUTANTS}
CHECKS = {c.name: c for c in checks_for()}


def _mutant(name: str, tmp_path):
    return load_impl(MUTANT[name].write(tmp_path))


def _gradient_message(grads: dict) -> str:
    with pytest.raises(CheckFailed) as err:
        judge_grads({"grads": grads}, "tiny-pythia")
    return str(err.value)


def test_a_gradient_204_percent_off_is_a_wrong_gradient_not_a_missing_one():
    want = reference_grads("tiny-pythia")
    message = _gradient_message({k: -1.04 * v.float() for k, v in want.items()})
    assert "wrong gradient, 204% off" in message
    assert "no gradient" not in message.lower() and "cut off" not in message
    assert "custom torch.autograd.Function" in message


@pytest.mark.parametrize("missing", ["none", "zeros"])
def test_a_none_or_zero_gradient_is_no_gradient(missing):
    want = reference_grads("tiny-pythia")
    grads = {k: v.float() for k, v in want.items()}
    key = next(k for k in grads if k.endswith("lora_o.B") and k.startswith("layer 1 "))
    grads[key] = None if missing == "none" else torch.zeros_like(grads[key])
    message = _gradient_message(grads)
    assert f"{key} (no gradient)" in message and f"No gradient reaches {key}" in message


def test_a_missing_scale_is_not_blamed_on_broadcasting_or_float64(tmp_path):
    impl = _mutant("scaling_missing", tmp_path)
    for name in ("lora_broadcast", "lora_dtype"):
        result = run_check(CHECKS[name], impl)
        assert not result.passed
        assert "α/r scaling is missing" in result.message, result.message
        assert "each instance should see the same input" not in result.message
        assert "float64 output has wrong values" not in result.message


def test_leaked_generate_hooks_are_reported_as_a_leak_not_a_kv_cache_mismatch(tmp_path):
    result = run_check(CHECKS["model_generate"], _mutant("generate_leaves_hooks_on", tmp_path))
    assert not result.passed
    assert "still registered after generate" in result.message
    assert "use_past_kv_cache" not in result.message


class CourseLora(nn.Module):
    """A Lora written the course's way: einops-free broadcasting and an `assert` on the inst axis."""

    def __init__(self, d_in=768, d_out=768, rank=4, lora_alpha=32, n_inst=None, dtype=None):
        super().__init__()
        self.rank, self.d_in, self.d_out = rank, d_in, d_out
        self.n_inst = 1 if n_inst is None else n_inst
        self.lora_alpha, self.dtype = lora_alpha, dtype
        self.A = nn.Parameter(torch.empty(self.n_inst, d_in, rank, dtype=dtype))
        self.B = nn.Parameter(torch.zeros(self.n_inst, rank, d_out, dtype=dtype))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def forward(self, x):
        assert x.shape[-2] in (1, self.n_inst), f"inst axis {x.shape[-2]} vs n_inst {self.n_inst}"
        x = x.to(self.A.dtype).expand(*x.shape[:-2], self.n_inst, self.d_in)
        x_a = torch.einsum("...id,idr->...ir", x, self.A)
        return torch.einsum("...ir,iro->...io", x_a, self.B) * (self.lora_alpha / self.rank)


def test_a_course_style_assert_for_a_wrong_inst_axis_is_a_clear_error():
    impl = SimpleNamespace(Lora=CourseLora)
    for check in [c for c in CHECKS.values() if c.exercise == "Lora"]:
        result = run_check(check, impl)
        assert result.passed, f"{check.name}: {result.message}"


def test_no_error_for_a_wrong_inst_axis_fails_saying_so():
    class Silent(CourseLora):
        def forward(self, x):
            n = x.shape[-2]
            if n not in (1, self.n_inst):
                x = x[..., :1, :]
            return super().forward(x)

    result = run_check(CHECKS["lora_broadcast"], SimpleNamespace(Lora=Silent))
    assert not result.passed and "should raise an error" in result.message
