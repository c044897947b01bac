"""Deliberately broken and correctly-rewritten implementations, made by editing `solutions/`.

Each MUTANT is a mistake students make: one text substitution in the solution, the check that
must catch it, and a phrase its failure message must contain (so the message points at the
mistake). Each VARIANT is a correct but differently written solution that must pass every check.
The grader's tests reuse both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOLUTION = ROOT / "solutions" / "section2_lora.py"


# The solution's fast hooks (src/lora_rlhf/lora.py), as the edits below find them.
QKV_HOOK_TAIL = (
    "        x_a = self.shared_x_a()[kind]  # x @ A of this adaptor: [batch·pos, inst·rank]\n"
    "        return add_low_rank_(qkv, x_a, adaptors[kind])"
)
OUT_HOOK_TAIL = (
    "        # Σ_heads inside the contraction: [batch·pos, head·rank] @ [head·rank, d_model],\n"
    "        # added into attn_out.\n"
    "        return add_matmul_(attn_out, z_a, lora_o.B.reshape(-1, lora_o.d_out), lora_o.scaling)"
)
OUT_HOOK_BODY = (
    "        # z_h A_o[h] for every head at once: z's heads side by side, [batch·pos, head·d_head],\n"
    "        # times A_o's heads on a block diagonal gives [batch·pos, head·rank], heads side by side.\n"
    "        z_a = z.reshape(-1, lora_o.n_inst * lora_o.d_in) @ lora_o.block_diagonal_A()\n"
    + OUT_HOOK_TAIL
)
# z_a as the mutants below use it: one [batch·pos, rank] block per head, heads as the batch
PER_HEAD_Z_A = "        per_head_z_a = z_a.view(-1, lora_o.n_inst, lora_o.rank).transpose(0, 1)\n"


@dataclass(frozen=True)
class Edit:
    name: str
    edits: tuple[tuple[str, str], ...]
    catches: tuple[str, ...] = ()  # checks that must fail (mutants)
    says: str = ""  # a phrase the first failing check's message contains
    exercises: tuple[str, ...] = field(default=())  # exercises that lose points (grader tests)

    def apply(self, source: str) -> str:
        for old, new in self.edits:
            count = source.count(old)
            if count != 1:
                raise AssertionError(f"{self.name}: {old!r} occurs {count} times in the solution")
            source = source.replace(old, new)
        return source

    def write(self, directory: Path) -> Path:
        path = directory / f"{self.name}.py"
        path.write_text(self.apply(SOLUTION.read_text()))
        return path


MUTANTS = [
    Edit(
        "b_random_init",
        (("self.B = nn.Parameter(torch.zeros(", "self.B = nn.Parameter(torch.randn("),),
        catches=("lora_init",),
        says="zeros",
    ),
    Edit(
        "a_zero_init",
        (("nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))", "nn.init.zeros_(self.A)"),),
        catches=("lora_init",),
        says="all zeros",
    ),
    Edit(
        "a_init_per_instance",
        (
            (
                "nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))",
                "[nn.init.kaiming_uniform_(a, a=math.sqrt(5)) for a in self.A.data]",
            ),
        ),
        catches=("lora_init",),
        says="bound",
    ),
    Edit(
        "scaling_missing",
        (("x_a = x_a * self.scaling", "x_a = x_a"),),
        catches=("lora_forward_formula", "lora_alpha_scaling"),
        says="scaling is missing",
    ),
    Edit(
        "scaling_inverted",
        (("self.scaling = lora_alpha / rank", "self.scaling = rank / lora_alpha"),),
        catches=("lora_forward_formula",),
        says="inverted",
    ),
    Edit(
        "scaling_alpha_only",
        (("self.scaling = lora_alpha / rank", "self.scaling = lora_alpha"),),
        catches=("lora_forward_formula",),
        says="α instead of α/r",
    ),
    Edit(
        "x_times_ab",
        (
            (
                "        x_a = x_a * self.scaling",
                '        ab = einops.einsum(self.A, self.B, "inst d_in rank, inst rank d_out -> inst d_in d_out")\n'
                '        return einops.einsum(x, ab, "... inst d_in, inst d_in d_out -> ... inst d_out") * self.scaling\n'
                "        x_a = x_a * self.scaling",
            ),
        ),
        catches=("lora_xa_then_b",),
        says="(x @ A) @ B",
    ),
    Edit(
        "one_instance_for_all",
        (
            (
                'x_a = einops.einsum(x, self.A, "... inst d_in, inst d_in rank -> ... inst rank")',
                'x_a = einops.einsum(x, self.A[0], "... inst d_in, d_in rank -> ... inst rank")',
            ),
        ),
        catches=("lora_forward_formula",),
        says="per instance",
    ),
    Edit(
        "no_dtype_cast",
        (("        if self.dtype is not None:\n            x = x.to(self.dtype)\n", ""),),
        catches=("lora_dtype",),
        says="cast x",
    ),
    Edit(
        "kv_with_n_heads",
        (("n_kv_heads = cfg.n_key_value_heads or cfg.n_heads", "n_kv_heads = cfg.n_heads"),),
        catches=("hooks_adaptor_shapes", "hooks_merged_tiny_llama"),
        says="key/value heads",
    ),
    Edit(
        "k_v_dispatch_swapped",
        (
            (  # hook_k is served as if it were hook_v and the other way round
                'kind = hook.name.rsplit(".", 1)[-1]',
                'kind = hook.name.rsplit(".", 1)[-1]\n'
                '        kind = {"hook_k": "hook_v", "hook_v": "hook_k"}.get(kind, kind)',
            ),
        ),
        catches=("hooks_qkv_dispatch",),
        says="dispatch on the hook",
    ),
    Edit(
        "unknown_hook_no_error",
        (
            (
                '            raise ValueError(f"lora_hook_qkv is for hook_q/hook_k/hook_v, not {hook.name!r}")',
                '            kind = "hook_q"',
            ),
        ),
        catches=("hooks_qkv_dispatch",),
        says="ValueError",
    ),
    Edit(
        "qkv_returns_adaptor_only",
        (
            (
                "return add_low_rank_(qkv, x_a, adaptors[kind])",
                "return add_low_rank_(torch.zeros_like(qkv), x_a, adaptors[kind])",
            ),
        ),
        catches=("hooks_qkv_dispatch",),
        says="add it to the activation",
    ),
    Edit(
        "heads_averaged",
        (
            (  # per-head outputs, then the mean over heads instead of the sum
                OUT_HOOK_TAIL,
                PER_HEAD_Z_A
                + "        per_head = torch.bmm(per_head_z_a, lora_o.B) * lora_o.scaling  # [head, N, d_model]\n"
                "        return attn_out + per_head.mean(0).reshape(attn_out.shape)",
            ),
        ),
        catches=("hooks_out_summed",),
        says="sum over the head axis",
    ),
    Edit(
        "only_first_head",
        (
            (  # head 0's adaptor output alone, no sum over heads
                OUT_HOOK_TAIL,
                PER_HEAD_Z_A + "        head_0 = per_head_z_a[0] @ lora_o.B[0] * lora_o.scaling\n"
                "        return attn_out + head_0.reshape(attn_out.shape)",
            ),
        ),
        catches=("hooks_out_summed",),
        says="Σ_heads",
    ),
    Edit(
        "input_not_normalized",
        (
            (
                '(f"blocks.{i}.ln1.hook_normalized", self.store_hook_attn_normalized)',
                '(f"blocks.{i}.hook_resid_pre", self.store_hook_attn_normalized)',
            ),
        ),
        catches=("hooks_names", "hooks_merged_tiny_llama"),
        says="hook names",
    ),
    Edit(
        "missing_last_layer",
        (
            (
                "for i in range(self.cfg.n_layers)\n        ).to",
                "for i in range(self.cfg.n_layers - 1)\n        ).to",
            ),
        ),
        catches=("model_fwd_hooks",),
        says="one LoraHooks per layer",
    ),
    Edit(
        "value_head_hook_missing",
        (("return [*self.lora_fwd_hooks, self.value_head_hook]", "return [*self.lora_fwd_hooks]"),),
        catches=("model_fwd_hooks", "model_forward_with_value_head"),
        says="1 + 6·n_layers",
    ),
    Edit(
        "lora_hooks_not_in_fwd_hooks",
        (("return [*self.lora_fwd_hooks, self.value_head_hook]", "return [self.value_head_hook]"),),
        catches=("model_forward_with_value_head",),
        says="fwd_hooks must include them",
    ),
    Edit(
        "generate_without_hooks",
        (
            (
                "with self.hooks(fwd_hooks=self.lora_fwd_hooks):\n            return super().generate",
                "with self.hooks(fwd_hooks=[]):\n            return super().generate",
            ),
        ),
        catches=("model_generate",),
        says="base model's tokens",
    ),
    Edit(
        "generate_leaves_hooks_on",
        (
            (
                "with self.hooks(fwd_hooks=self.lora_fwd_hooks):\n            return super().generate(*args, **kwargs)",
                "for name, fn in self.lora_fwd_hooks:\n            self.add_hook(name, fn)\n"
                "        return super().generate(*args, **kwargs)",
            ),
        ),
        catches=("model_plain_forward_is_base", "model_hook_calls"),
        says="still registered",
    ),
    Edit(
        "base_not_frozen",
        (("param.requires_grad_(False)", "param.requires_grad_(True)"),),
        catches=("model_frozen_params",),
        says="must be frozen",
    ),
    Edit(
        "everything_frozen",
        (("for param in model.base_model_params():", "for param in model.parameters():"),),
        catches=("model_frozen_params",),
        says="value head must stay trainable",
    ),
    Edit(
        "optimizer_gets_all_params",
        (("        return self.lora_params()\n", "        return list(self.parameters())\n"),),
        catches=("model_frozen_params", "model_training_step"),
        says="exactly the LoRA parameters",
    ),
]


VARIANTS = [
    Edit(
        "einsum_for_b_scaled_at_the_end",
        (
            ("        x_a = x_a * self.scaling", "        pass"),
            (
                "        lead = x_a.shape[:-2]\n"
                "        x_a = x_a.reshape(-1, self.n_inst, self.rank).transpose(0, 1)\n"
                "        x_a_b = torch.bmm(x_a, self.B).transpose(0, 1)\n"
                "        return x_a_b.reshape(*lead, self.n_inst, self.d_out)",
                '        x_a_b = einops.einsum(x_a, self.B, "... inst rank, inst rank d_out -> ... inst d_out")\n'
                "        return x_a_b * self.scaling",
            ),
        ),
    ),
    Edit(
        "torch_einsum",
        (
            (
                'x_a = einops.einsum(x, self.A, "... inst d_in, inst d_in rank -> ... inst rank")',
                'x_a = torch.einsum("...id,idr->...ir", x, self.A)',
            ),
            (
                "        lead = x_a.shape[:-2]\n"
                "        x_a = x_a.reshape(-1, self.n_inst, self.rank).transpose(0, 1)\n"
                "        x_a_b = torch.bmm(x_a, self.B).transpose(0, 1)\n"
                "        return x_a_b.reshape(*lead, self.n_inst, self.d_out)",
                '        return torch.einsum("...ir,iro->...io", x_a, self.B)',
            ),
        ),
    ),
    Edit(
        "matmul_broadcasting",
        (
            (
                'x_a = einops.einsum(x, self.A, "... inst d_in, inst d_in rank -> ... inst rank")',
                "x_a = (x.unsqueeze(-2) @ self.A).squeeze(-2)",
            ),
            (
                "        lead = x_a.shape[:-2]\n"
                "        x_a = x_a.reshape(-1, self.n_inst, self.rank).transpose(0, 1)\n"
                "        x_a_b = torch.bmm(x_a, self.B).transpose(0, 1)\n"
                "        return x_a_b.reshape(*lead, self.n_inst, self.d_out)",
                "        return (x_a.unsqueeze(-2) @ self.B).squeeze(-2)",
            ),
        ),
    ),
    Edit(
        "sum_minus_two_and_endswith",
        (
            (  # the per-head outputs lora_o(z) (scaled), then the sum over heads as its own step
                OUT_HOOK_BODY,
                "        summed = lora_o(z).sum(-2)\n        return attn_out + summed.to(attn_out.dtype)",
            ),
            (
                'kind = hook.name.rsplit(".", 1)[-1]',
                "kind = next((k for k in adaptors if hook.name.endswith(k)), hook.name)",
            ),
            (
                QKV_HOOK_TAIL,
                "        x = self.attn_normalized[:, :, None, :]\n"
                "        return qkv + adaptors[kind](x).to(qkv.dtype)",
            ),
        ),
    ),
    Edit(
        "course_einsum_hooks",
        (
            (  # the course's own version: the Lora modules in the q/k/v hooks, two einsums for W_O
                QKV_HOOK_TAIL,
                '        x = einops.rearrange(self.attn_normalized, "batch pos d_model -> batch pos 1 d_model")\n'
                "        return qkv + adaptors[kind](x).to(qkv.dtype)",
            ),
            (
                OUT_HOOK_BODY,
                "        z_a = einops.einsum(\n"
                '            z, lora_o.A, "batch pos head d_head, head d_head rank -> batch pos head rank"\n'
                "        )\n"
                "        z_a = z_a * lora_o.scaling\n"
                "        summed = einops.einsum(\n"
                '            z_a, lora_o.B, "batch pos head rank, head rank d_model -> batch pos d_model"\n'
                "        )\n"
                "        return attn_out + summed.to(attn_out.dtype)",
            ),
        ),
    ),
    Edit(
        "scale_folded_into_b_and_hooks_reordered",
        (
            ("x_a = x_a * self.scaling", "x_a = x_a * (self.lora_alpha / self.rank)"),
            ('(f"blocks.{i}.attn.hook_z", self.store_hook_z),\n', ""),
            (
                '(f"blocks.{i}.ln1.hook_normalized", self.store_hook_attn_normalized),\n',
                '(f"blocks.{i}.ln1.hook_normalized", self.store_hook_attn_normalized),\n'
                '            (f"blocks.{i}.attn.hook_z", self.store_hook_z),\n',
            ),
        ),
    ),
]
