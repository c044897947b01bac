"""Backward-pass mutants and correct variants, made by small edits of a fixed submission written
the way the course writes it (tests/grading_fixtures/course_submission.py), so they do not depend
on the solution's text. The two store hooks are given code in the course; a student who edits
them (e.g. detaches what they keep) is still caught.

Every MUTANT computes the right forward pass and the wrong gradients, each in its own way; every
VARIANT is a correct rewrite that must pass every check.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

COURSE_SUBMISSION = Path(__file__).parent / "grading_fixtures" / "course_submission.py"

EINSUM_XA = 'x_a = einops.einsum(x, self.A, "... inst d_in, inst d_in rank -> ... inst rank")\n'
SCALED_RETURN = "return x_a_b * (self.lora_alpha / self.rank)\n"
OUT_HOOK = "return attn_out + self.lora_o(z).sum(-2)\n"

# A hand-written scaling whose backward forgets the scale: the forward is exact.
WRONG_BACKWARD = """

class _Scale(t.autograd.Function):
    @staticmethod
    def forward(ctx, t, s):
        return t * s

    @staticmethod
    def backward(ctx, grad):
        return grad, None


FwdHook = tuple[str, Callable]
"""


@dataclass(frozen=True)
class Edit:
    name: str
    edits: tuple[tuple[str, str], ...]
    says: str = ""  # a phrase the gradient check's message contains (mutants)

    def apply(self, source: str | None = None) -> str:
        source = COURSE_SUBMISSION.read_text() if source is None else source
        for old, new in self.edits:
            if source.count(old) != 1:
                raise AssertionError(f"{self.name}: {old!r} occurs {source.count(old)} times")
            source = source.replace(old, new)
        return source

    def write(self, directory: Path) -> Path:
        path = directory / f"{self.name}.py"
        path.write_text(self.apply())
        return path


MUTANTS = [
    Edit(
        "stored_input_detached",
        (("self.cache_qkv_in = normalized\n", "self.cache_qkv_in = normalized.detach()\n"),),
        says="Only earlier layers' gradients are wrong",
    ),
    Edit(
        "z_detached",
        (("self.cache_z = z\n", "self.cache_z = z.detach()\n"),),
        says="flow back through z are lost",
    ),
    Edit(
        "x_a_under_no_grad",
        (("        " + EINSUM_XA, "        with t.no_grad():\n            " + EINSUM_XA),),
        says="No gradient reaches layer 0 lora_q.A",
    ),
    Edit(
        "custom_backward_forgets_scale",
        (
            ("\nFwdHook = tuple[str, Callable]\n", WRONG_BACKWARD),
            (SCALED_RETURN, "return _Scale.apply(x_a_b, self.lora_alpha / self.rank)\n"),
        ),
        says="custom torch.autograd.Function",
    ),
    Edit(
        "b_detached_in_out_hook",
        (
            (
                OUT_HOOK,
                'z_a = einops.einsum(z, self.lora_o.A, "b p h d, h d r -> b p h r")\n'
                '        out = einops.einsum(z_a, self.lora_o.B.detach(), "b p h r, h r m -> b p m")\n'
                "        return attn_out + out * (self.lora_o.lora_alpha / self.lora_o.rank)\n",
            ),
        ),
        says="No gradient reaches layer 0 lora_o.B",
    ),
]

VARIANTS = [
    Edit("as_written", ()),
    Edit(
        "stored_input_cloned",
        (
            ("self.cache_qkv_in = normalized\n", "self.cache_qkv_in = normalized.clone()\n"),
            ("self.cache_z = z\n", "self.cache_z = z.clone()\n"),
        ),
    ),
    Edit(
        "matmul_forms",
        (
            (EINSUM_XA, "x_a = (x.unsqueeze(-2) @ self.A).squeeze(-2)\n"),
            (
                'x_a_b = einops.einsum(x_a, self.B, "... inst rank, inst rank d_out -> ... inst d_out")\n',
                "x_a_b = (x_a.unsqueeze(-2) @ self.B).squeeze(-2)\n",
            ),
        ),
    ),
    Edit(
        "torch_einsum_out_hook",
        (
            (EINSUM_XA, 'x_a = t.einsum("...id,idr->...ir", x, self.A)\n'),
            (
                OUT_HOOK,
                'z_a = t.einsum("bphd,hdr->bphr", z, self.lora_o.A)\n'
                '        out = t.einsum("bphr,hrm->bpm", z_a, self.lora_o.B)\n'
                "        return attn_out + out * (self.lora_o.lora_alpha / self.lora_o.rank)\n",
            ),
        ),
    ),
]
