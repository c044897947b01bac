"""Checks of the bonus exercise *Making LoRA fast* (``bonus_fast_lora.py``).

Each exercise is judged twice: its values against a direct formula in float64 (per-instance
einsums, an explicitly built block-diagonal matrix, the adaptors merged into a freshly loaded
model's weights), and the number of matrix products it takes, counted by :class:`ProductCounter`
while the code runs. Counting, never timing: a count is exact and the same on every machine.

The checks live in their own registry, :data:`FAST` (read it with ``FAST.for_exercise``),
not in :data:`lora_rlhf.checks.core.CHECKS`: they carry 0 points and stay out of the graded rubric.
"""

from __future__ import annotations

import torch

from lora_rlhf.authoring.implementations import SECTIONS
from lora_rlhf.checks.core import FAST, CheckFailed, expect
from lora_rlhf.checks.counting import ProductCounter
from lora_rlhf.checks.notebook import run_exercise
from lora_rlhf.checks.reference import (
    ALPHA,
    RANK,
    adaptor_values,
    assign_layer,
    base_model,
    close,
    max_diff,
    merged_model,
    seeded,
    seeded_tokens,
)
from lora_rlhf.models import load_model

FAST_FILE = SECTIONS["fast"][0]
FAST_CHECKS = FAST.checks
fast_checks_for = FAST.for_exercise
fast_check = FAST.judged  # several judges read one probe; 0 points each


def _counted(fn, *args):
    with ProductCounter() as counter:
        out = fn(*args)
    return out, counter.products


def _f64(*shape: int, seed: int) -> torch.Tensor:
    return seeded(*shape, seed=seed, dtype=torch.float64)


def _expect_close(got, expected, what: str, hint: str = "") -> None:
    expect(
        tuple(got.shape) == tuple(expected.shape),
        f"{what} has shape {tuple(got.shape)}, expected {tuple(expected.shape)}",
    )
    expect(
        close(got, expected, atol=1e-9, rtol=1e-9),
        f"{what} differs from the direct formula (max diff {max_diff(got, expected):.3g}){hint}",
    )


# --------------------------------------------------------------------------------------------
# F1: qkv_x_a — one product for q, k and v. Three query heads, two key/value heads (GQA).

N_Q, N_KV, D_MODEL, R, D_HEAD = 3, 2, 12, 2, 4


def _qkv_inputs():
    x = _f64(2, 3, D_MODEL, seed=101)
    As = (_f64(N_Q, D_MODEL, R, seed=102), _f64(N_KV, D_MODEL, R, seed=103))
    return x, As + (_f64(N_KV, D_MODEL, R, seed=104),)


def _per_instance_x_a(x, A):
    return torch.einsum("bpd,idr->bpir", x, A)


def _judge_x_a_parts(parts, x, As, what: str) -> None:
    expect(len(parts) == 3, f"{what} should return three tensors (x A_q, x A_k, x A_v)")
    for part, A, name in zip(parts, As, ("q", "k", "v")):
        _expect_close(
            part,
            _per_instance_x_a(x, A),
            f"{what}'s x A_{name}",
            ": split the columns in order — A_q's instances, then A_k's, then A_v's, each "
            "instance's rank columns together",
        )


def probe_qkv_x_a(impl):
    x, As = _qkv_inputs()
    parts, products = _counted(impl.qkv_x_a, x, *As)
    return {"parts": list(parts), "products": products}


@fast_check("qkv_x_a", probe_qkv_x_a)
def judge_qkv_x_a_values(out):
    """qkv_x_a returns x·A per instance of each adaptor (n_q ≠ n_kv, float64)."""
    x, As = _qkv_inputs()
    _judge_x_a_parts(out["parts"], x, As, "qkv_x_a")


@fast_check("qkv_x_a", probe_qkv_x_a)
def judge_qkv_x_a_one_product(out):
    """qkv_x_a takes exactly one matrix product for all three adaptors."""
    n = out["products"]
    expect(
        n != 0,
        "qkv_x_a took no matrix product: x @ [A_q A_k A_v] is one (a broadcast multiply-and-sum "
        "forms a d_model times larger tensor first)",
    )
    expect(
        n == 1,
        f"qkv_x_a took {n} matrix products; one is enough: put the three A's side by side, "
        "[d_model, (n_q + n_k + n_v)·rank], and multiply x by that once",
    )


# --------------------------------------------------------------------------------------------
# F2: block-diagonal products


def _explicit_block_diagonal(M):
    inst, a, b = M.shape
    out = torch.zeros(inst * a, inst * b, dtype=M.dtype)
    for h in range(inst):
        out[h * a : (h + 1) * a, h * b : (h + 1) * b] = M[h]
    return out


def probe_block_diagonal(impl):
    return {"matrix": impl.block_diagonal(_f64(3, 2, 5, seed=201))}


@fast_check("block_diagonal", probe_block_diagonal)
def judge_block_diagonal_layout(out):
    """block_diagonal puts M[h] at rows h·a…, columns h·b…, zeros elsewhere."""
    _expect_close(
        out["matrix"],
        _explicit_block_diagonal(_f64(3, 2, 5, seed=201)),
        "block_diagonal(M)",
        ": instance h's [a, b] block belongs at rows h·a to (h+1)·a, columns h·b to (h+1)·b",
    )


F2_NEEDS = ("block_diagonal", "heads_x_a_b", "out_delta")
SCALE = 2.0  # α/r = 2: a missing or inverted scale is visible


def _heads_inputs():
    return _f64(2, 3, N_Q, R, seed=211), _f64(N_Q, R, D_HEAD, seed=212)


def probe_heads_x_a_b(impl):
    x_a, B = _heads_inputs()
    delta, products = _counted(impl.heads_x_a_b, x_a, B, SCALE)
    return {"delta": delta, "products": products}


@fast_check("block_diagonal", probe_heads_x_a_b, F2_NEEDS)
def judge_heads_x_a_b_values(out):
    """heads_x_a_b is scale·(x A)_h B_h for every instance h."""
    x_a, B = _heads_inputs()
    expected = torch.einsum("...ir,iro->...io", x_a, B) * SCALE
    hint = ""
    if close(out["delta"], expected / SCALE, atol=1e-9):
        hint = ": the scale α/r is missing"
    _expect_close(out["delta"], expected, "heads_x_a_b", hint)


@fast_check("block_diagonal", probe_heads_x_a_b, F2_NEEDS)
def judge_heads_x_a_b_one_product(out):
    """heads_x_a_b takes one matrix product for all instances (a batched product counts n)."""
    n = out["products"]
    expect(
        n == 1,
        f"heads_x_a_b took {n} matrix products (a batched product over {N_Q} instances counts "
        f"{N_Q}); one is enough: x_a's instances side by side times block_diagonal(B)",
    )


def _out_inputs():
    return (
        _f64(2, 3, N_Q, D_HEAD, seed=221),
        _f64(N_Q, D_HEAD, R, seed=222),
        _f64(N_Q, R, D_MODEL, seed=223),
    )


def probe_out_delta(impl):
    z, A_o, B_o = _out_inputs()
    delta, products = _counted(impl.out_delta, z, A_o, B_o, SCALE)
    return {"delta": delta, "products": products}


@fast_check("block_diagonal", probe_out_delta, F2_NEEDS)
def judge_out_delta_values(out):
    """out_delta is scale·Σ_h (z_h A_o[h]) B_o[h], summed over heads."""
    z, A_o, B_o = _out_inputs()
    per_head = torch.einsum("...hr,hro->...ho", torch.einsum("...hd,hdr->...hr", z, A_o), B_o)
    expected = per_head.sum(-2) * SCALE
    hint = ""
    if tuple(out["delta"].shape) == tuple(per_head.shape):
        hint = " — sum over the heads: attention's output is Σ_h z_h W_O[h]"
    _expect_close(out["delta"], expected, "out_delta", hint)


@fast_check("block_diagonal", probe_out_delta, F2_NEEDS)
def judge_out_delta_two_products(out):
    """out_delta takes at most two matrix products."""
    n = out["products"]
    expect(
        n <= 2,
        f"out_delta took {n} matrix products; two are enough: z's heads side by side times "
        "block_diagonal(A_o), then times B_o stacked as [head·rank, d_model]",
    )


# --------------------------------------------------------------------------------------------
# F3: the adaptors inside W_Q's product


def _q_inputs():
    x, As = _qkv_inputs()
    return x, _f64(N_Q, D_MODEL, D_HEAD, seed=301), _f64(N_Q, D_HEAD, seed=302), As


def probe_q_and_x_a(impl):
    x, W_Q, b_Q, As = _q_inputs()
    (q, parts), products = _counted(impl.q_and_x_a, x, W_Q, b_Q, *As)
    return {"q": q, "parts": list(parts), "products": products}


@fast_check("q_and_x_a", probe_q_and_x_a)
def judge_q_and_x_a_values(out):
    """q_and_x_a gives q = x W_Q + b_Q per head and each adaptor's x A."""
    x, W_Q, b_Q, As = _q_inputs()
    expected = torch.einsum("bpd,hde->bphe", x, W_Q) + b_Q
    hint = ""
    if close(out["q"], expected - b_Q, atol=1e-9):
        hint = ": b_Q is missing"
    _expect_close(out["q"], expected, "q_and_x_a's q", hint)
    _judge_x_a_parts(out["parts"], x, As, "q_and_x_a")


@fast_check("q_and_x_a", probe_q_and_x_a)
def judge_q_and_x_a_one_product(out):
    """q_and_x_a takes one matrix product for q and all three x A."""
    n = out["products"]
    expect(
        n == 1,
        f"q_and_x_a took {n} matrix products; one is enough: x times [W_Q | A_q A_k A_v] "
        "(W_Q's heads side by side), with b_Q added to q's columns only",
    )


# --------------------------------------------------------------------------------------------
# F4: FastLoraHooks on a whole model, against the adaptors merged into its weights

SEED = 7
PRODUCTS_PER_LAYER = 6  # 1 (x @ [A_q A_k A_v]) + 3 (one per q, k, v) + 2 (W_O's adaptor)


def _hooked_forward(hooks_class, name: str, seed: int = SEED):
    """Logits and matrix products of one forward with `hooks_class` on every layer (seeded A, B)
    and of the same forward without hooks."""
    model = load_model(name, device="cpu")  # its own copy: never the judges' cached model
    hooks = []
    for i, values in enumerate(adaptor_values(model.cfg, seed)):
        layer = hooks_class(i, model.cfg, lora_alpha=ALPHA, rank=RANK)
        assign_layer(layer, values, i)
        hooks.extend(layer.list_fwd_hooks())
    tokens = seeded_tokens(2, 9, model.cfg.d_vocab, seed=seed)
    with torch.no_grad():
        logits, products = _counted(lambda: model.run_with_hooks(tokens, fwd_hooks=hooks))
        _, base_products = _counted(lambda: model(tokens))
    return {
        "logits": logits.float(),
        "products": products,
        "base_products": base_products,
        "n_layers": model.cfg.n_layers,
    }


def _judge_merged(out, name: str):
    tokens = seeded_tokens(2, 9, base_model(name).cfg.d_vocab, seed=SEED)
    with torch.no_grad():
        expected = merged_model(name, SEED)(tokens)
        base = base_model(name)(tokens)
    got = out["logits"]
    if close(got, expected):
        return
    hint = ": the hooks changed nothing" if close(got, base) else ""
    raise CheckFailed(
        f"{name} with FastLoraHooks should equal the model with α/r·A·B merged into W_Q, W_K, "
        f"W_V and W_O (max logit diff {max_diff(got, expected):.3g}){hint}"
    )


def probe_fast_hooks_tiny_llama(impl):
    return _hooked_forward(impl.FastLoraHooks, "tiny-llama")


def probe_fast_hooks_tiny_pythia(impl):
    return _hooked_forward(impl.FastLoraHooks, "tiny-pythia")


@fast_check("FastLoraHooks", probe_fast_hooks_tiny_llama)
def judge_fast_hooks_merged_tiny_llama(out):
    """Hooked tiny-llama (GQA) equals the model with the adaptors merged into its weights."""
    _judge_merged(out, "tiny-llama")


@fast_check("FastLoraHooks", probe_fast_hooks_tiny_pythia)
def judge_fast_hooks_merged_tiny_pythia(out):
    """Hooked tiny-pythia equals the model with the adaptors merged into its weights."""
    _judge_merged(out, "tiny-pythia")


@fast_check("FastLoraHooks", probe_fast_hooks_tiny_llama)
def judge_fast_hooks_products(out):
    """FastLoraHooks' four adaptors take at most 6 matrix products per layer."""
    per_layer = (out["products"] - out["base_products"]) / out["n_layers"]
    expect(
        per_layer <= PRODUCTS_PER_LAYER,
        f"FastLoraHooks' adaptors took {per_layer:g} matrix products per layer; "
        f"{PRODUCTS_PER_LAYER} are enough: x A once for q, k and v (qkv_x_a in the first q/k/v "
        "hook after a new x, not in each hook or in the store hook, which runs three times), "
        "one heads_x_a_b per q/k/v hook, two for out_delta",
    )


# --------------------------------------------------------------------------------------------
# Notebook-style entry points (called at the end of each bonus exercise)


def _run(exercise: str, what: str, **functions) -> None:
    run_exercise(FAST.for_exercise(exercise), what, **functions)


def testing_qkv_x_a(qkv_x_a) -> None:
    _run("qkv_x_a", "qkv_x_a", qkv_x_a=qkv_x_a)


def testing_block_diagonal(block_diagonal, heads_x_a_b, out_delta) -> None:
    _run(
        "block_diagonal",
        "block_diagonal, heads_x_a_b and out_delta",
        block_diagonal=block_diagonal,
        heads_x_a_b=heads_x_a_b,
        out_delta=out_delta,
    )


def testing_q_and_x_a(q_and_x_a) -> None:
    _run("q_and_x_a", "q_and_x_a", q_and_x_a=q_and_x_a)


def testing_fast_lora_hooks(FastLoraHooks) -> None:
    _run("FastLoraHooks", "FastLoraHooks", FastLoraHooks=FastLoraHooks)


def compare_products(name: str, slow_class, fast_class) -> dict[str, float]:
    """Print the matrix products of one forward pass of `name` with each hooks class (same
    adaptors, non-zero B), per layer beyond the base model's; fail if the logits differ."""
    rows = {"slow": _hooked_forward(slow_class, name), "fast": _hooked_forward(fast_class, name)}
    slow, fast = rows["slow"], rows["fast"]
    # float32 rounds differently in another order of products, and through a deep model the
    # difference grows with the logits' size: compare relative to it
    tolerance = 1e-4 * max(1.0, float(slow["logits"].abs().max()))
    if max_diff(fast["logits"], slow["logits"]) > tolerance:
        raise AssertionError(
            f"{fast_class.__name__} and {slow_class.__name__} give different logits on {name} "
            f"(max diff {max_diff(fast['logits'], slow['logits']):.3g})"
        )
    per_layer = {k: (r["products"] - r["base_products"]) / r["n_layers"] for k, r in rows.items()}
    print(
        f"{name}: matrix products per layer for the four adaptors — "
        f"{slow_class.__name__}: {per_layer['slow']:g}, {fast_class.__name__}: "
        f"{per_layer['fast']:g} (the base model: {slow['base_products'] / slow['n_layers']:g}); "
        "same logits."
    )
    return per_layer
