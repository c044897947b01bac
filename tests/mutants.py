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


# Method bodies of the solution (src/lora_rlhf/lessons/section2_lora.py), as the edits below find them.
LORA_PRODUCTS = (
    '        x_a = einops.einsum(x, self.A, "... inst d_in, inst d_in rank -> ... inst rank")\n'
    '        x_a_b = einops.einsum(x_a, self.B, "... inst rank, inst rank d_out -> ... inst d_out")\n'
    "        return x_a_b * (self.lora_alpha / self.rank)"
)
QKV_DISPATCH = (
    '        adaptors = {"hook_q": self.lora_q, "hook_k": self.lora_k, "hook_v": self.lora_v}\n'
    '        kind = hook.name.split(".")[-1]\n'
    "        if kind not in adaptors:\n"
    '            raise ValueError(f"lora_hook_qkv serves hook_q, hook_k and hook_v, not {hook.name!r}")\n'
    '        x = einops.rearrange(self.cache_qkv_in, "batch pos d_model -> batch pos 1 d_model")\n'
    "        return qkv_hook_out + adaptors[kind](x)"
)
OUT_HOOK = (
    "        per_head = self.lora_o(self.cache_z)  # [batch, pos, head, d_model]\n"
    "        return attn_out + per_head.sum(dim=-2)"
)


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
        (("return x_a_b * (self.lora_alpha / self.rank)", "return x_a_b"),),
        catches=("lora_forward_formula", "lora_alpha_scaling"),
        says="scaling is missing",
    ),
    Edit(
        "scaling_inverted",
        (("x_a_b * (self.lora_alpha / self.rank)", "x_a_b * (self.rank / self.lora_alpha)"),),
        catches=("lora_forward_formula",),
        says="inverted",
    ),
    Edit(
        "scaling_alpha_only",
        (("x_a_b * (self.lora_alpha / self.rank)", "x_a_b * self.lora_alpha"),),
        catches=("lora_forward_formula",),
        says="α instead of α/r",
    ),
    Edit(
        "x_times_ab",
        (
            (
                LORA_PRODUCTS,
                '        ab = einops.einsum(self.A, self.B, "inst d_in rank, inst rank d_out -> inst d_in d_out")\n'
                '        return einops.einsum(x, ab, "... inst d_in, inst d_in d_out -> ... inst d_out") * (self.lora_alpha / self.rank)',
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
        (("        x = x.to(self.A.dtype)\n", ""),),
        catches=("lora_dtype",),
        says="cast x",
    ),
    Edit(
        "kv_with_n_heads",
        (
            (
                "lora_alpha, self.n_kv_heads, dtype)\n        self.lora_v",
                "lora_alpha, self.n_qo_heads, dtype)\n        self.lora_v",
            ),
            (
                "lora_alpha, self.n_kv_heads, dtype)\n        self.lora_o",
                "lora_alpha, self.n_qo_heads, dtype)\n        self.lora_o",
            ),
        ),
        catches=("hooks_adaptor_shapes", "hooks_merged_tiny_llama"),
        says="key/value heads",
    ),
    Edit(
        "k_v_dispatch_swapped",
        (
            (  # hook_k is served as if it were hook_v and the other way round
                'kind = hook.name.split(".")[-1]',
                'kind = hook.name.split(".")[-1]\n'
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
                '            raise ValueError(f"lora_hook_qkv serves hook_q, hook_k and hook_v, not {hook.name!r}")',
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
                "return qkv_hook_out + adaptors[kind](x)",
                "return adaptors[kind](x)",
            ),
        ),
        catches=("hooks_qkv_dispatch",),
        says="add it to the activation",
    ),
    Edit(
        "heads_averaged",
        (("return attn_out + per_head.sum(dim=-2)", "return attn_out + per_head.mean(dim=-2)"),),
        catches=("hooks_out_summed",),
        says="sum over the head axis",
    ),
    Edit(
        "only_first_head",  # head 0's adaptor output alone, no sum over heads
        (("return attn_out + per_head.sum(dim=-2)", "return attn_out + per_head[..., 0, :]"),),
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
        "value_head_hook_missing",  # the forward pass runs the adaptors but not the value head
        (
            (
                "with self.hooks(fwd_hooks=self.fwd_hooks):\n            logits",
                "with self.hooks(fwd_hooks=self.lora_fwd_hooks):\n            logits",
            ),
        ),
        catches=("model_forward_with_value_head",),
        says="value head",
    ),
    Edit(
        "lora_hooks_not_in_forward",  # the value head runs, the adaptors do not
        (
            (
                "with self.hooks(fwd_hooks=self.fwd_hooks):\n            logits",
                "with self.hooks(fwd_hooks=[self.value_head_hook]):\n            logits",
            ),
        ),
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
                "with self.hooks(fwd_hooks=self.lora_fwd_hooks):\n            return super().generate(tokens, **kwargs)",
                "for name, fn in self.lora_fwd_hooks:\n            self.add_hook(name, fn)\n"
                "        return super().generate(tokens, **kwargs)",
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
        says="LoRA parameters must be trainable",
    ),
    Edit(
        "optimizer_gets_all_params",
        (("        return self.lora_params()\n", "        return self.parameters()\n"),),
        catches=("model_frozen_params", "model_training_step"),
        says="exactly the LoRA parameters",
    ),
]


VARIANTS = [
    Edit(  # the course's own ways: one einsum through A and B, a dispatch by if/elif, einops.reduce
        "course_style",
        (
            (
                LORA_PRODUCTS,
                "        return einops.einsum(\n"
                '            x, self.A, self.B, "... inst d_in, inst d_in rank, inst rank d_out -> ... inst d_out"\n'
                "        ) * (self.lora_alpha / self.rank)",
            ),
            (
                QKV_DISPATCH,
                '        if hook.name.endswith("hook_q"):\n'
                "            lora = self.lora_q\n"
                '        elif hook.name.endswith("hook_k"):\n'
                "            lora = self.lora_k\n"
                '        elif hook.name.endswith("hook_v"):\n'
                "            lora = self.lora_v\n"
                "        else:\n"
                '            raise ValueError(f"unexpected hook {hook.name}")\n'
                "        return qkv_hook_out + lora(self.cache_qkv_in.unsqueeze(-2))",
            ),
            (
                OUT_HOOK,
                "        lora_o = self.lora_o\n"
                "        z_a = einops.einsum(\n"
                '            self.cache_z, lora_o.A, "batch pos head d_head, head d_head rank -> batch pos head rank"\n'
                "        )\n"
                "        per_head = einops.einsum(\n"
                '            z_a, lora_o.B, "batch pos head rank, head rank d_model -> batch pos head d_model"\n'
                "        )\n"
                '        return attn_out + einops.reduce(per_head, "batch pos head d_model -> batch pos d_model", "sum") * (lora_o.lora_alpha / lora_o.rank)',
            ),
        ),
    ),
    Edit(  # the base class's forward_with_value_head (it reads fwd_hooks), generate by keyword
        "inherited_forward_with_value_head",
        (
            (
                "        with self.hooks(fwd_hooks=self.fwd_hooks):\n"
                "            logits = self(tokens)\n"
                "        return logits, self.value_head_output\n",
                "        return super().forward_with_value_head(tokens)\n",
            ),
            (
                "return super().generate(tokens, **kwargs)",
                "return super().generate(input=tokens, **kwargs)",
            ),
        ),
    ),
    Edit(  # torch.einsum, and the sum over heads inside the second contraction
        "torch_einsum_summed_inside",
        (
            (
                LORA_PRODUCTS,
                '        x_a = torch.einsum("...id,idr->...ir", x, self.A) * (self.lora_alpha / self.rank)\n'
                '        return torch.einsum("...ir,iro->...io", x_a, self.B)',
            ),
            (
                OUT_HOOK,
                "        lora_o = self.lora_o\n"
                '        z_a = torch.einsum("bphd,hdr->bphr", self.cache_z.to(lora_o.A.dtype), lora_o.A)\n'
                '        return attn_out + torch.einsum("bphr,hrm->bpm", z_a, lora_o.B) * (lora_o.lora_alpha / lora_o.rank)',
            ),
        ),
    ),
    Edit(  # broadcasting matmuls, and the dispatch written with endswith
        "matmul_broadcasting",
        (
            (
                LORA_PRODUCTS,
                "        x_a = (x.unsqueeze(-2) @ self.A).squeeze(-2)\n"
                "        return (x_a.unsqueeze(-2) @ self.B).squeeze(-2) * (self.lora_alpha / self.rank)",
            ),
            (
                'kind = hook.name.split(".")[-1]',
                "kind = next((k for k in adaptors if hook.name.endswith(k)), hook.name)",
            ),
            (
                '        x = einops.rearrange(self.cache_qkv_in, "batch pos d_model -> batch pos 1 d_model")',
                "        x = self.cache_qkv_in[:, :, None, :]",
            ),
        ),
    ),
    Edit(  # the given hook list edited: z stored before q/k/v are adapted (still before use)
        "hooks_reordered",
        (
            ('(f"blocks.{i}.attn.hook_z", self.store_hook_z),\n', ""),
            (
                '(f"blocks.{i}.ln1.hook_normalized", self.store_hook_attn_normalized),\n',
                '(f"blocks.{i}.ln1.hook_normalized", self.store_hook_attn_normalized),\n'
                '            (f"blocks.{i}.attn.hook_z", self.store_hook_z),\n',
            ),
        ),
    ),
]
