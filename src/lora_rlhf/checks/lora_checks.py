"""Checks of Exercise 1: `Lora`."""

from __future__ import annotations

import math

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from lora_rlhf.checks.core import CheckFailed, check, expect
from lora_rlhf.checks.reference import close, max_diff, seeded

D_IN, D_OUT, RANK, ALPHA, N_INST = 12, 10, 3, 6.0, 4  # α/r = 2


def _make(Lora, **kw):
    params = dict(d_in=D_IN, d_out=D_OUT, rank=RANK, lora_alpha=ALPHA, n_inst=N_INST)
    params.update(kw)
    return Lora(**params)


def _set(lora, A, B):
    for pname, value in (("A", A), ("B", B)):
        param = getattr(lora, pname, None)
        if not isinstance(param, torch.nn.Parameter):
            raise CheckFailed(f"Lora.{pname} should be an nn.Parameter, got {type(param).__name__}")
        if tuple(param.shape) != tuple(value.shape):
            raise CheckFailed(
                f"Lora.{pname} has shape {tuple(param.shape)}, expected {tuple(value.shape)}"
            )
        with torch.no_grad():
            param.copy_(value.to(param.dtype))


def _reference(x, A, B, scaling):
    """(α/r)·(x A) B per instance, in float64, by explicit loops over instances."""
    x, A, B = x.double(), A.double(), B.double()
    if x.shape[-2] == 1:
        x = x.expand(*x.shape[:-2], A.shape[0], x.shape[-1])
    outs = [x[..., i, :] @ A[i] @ B[i] for i in range(A.shape[0])]
    return torch.stack(outs, dim=-2) * scaling


def _diagnose_scale(actual, expected, alpha, rank) -> str:
    scaling = alpha / rank
    for factor, hint in (
        (1 / scaling, "the α/r scaling is missing"),
        (1 / scaling**2, "the scale is inverted (r/α instead of α/r)"),
        (1 / alpha, "the scale is 1/r instead of α/r"),
        (rank, "the scale is α instead of α/r"),
    ):
        if close(actual, expected * factor, atol=1e-5, rtol=1e-4):
            return f": {hint}"
    return ""


# --------------------------------------------------------------------------------------------
@check("Lora", points=4)
def probe_lora_param_shapes(impl):
    """A is [n_inst, d_in, rank] and B is [n_inst, rank, d_out]; n_inst=None means 1."""
    lora = _make(impl.Lora)
    single = impl.Lora(d_in=D_IN, d_out=D_OUT, rank=RANK, lora_alpha=ALPHA)
    return {
        "params": {n: list(p.shape) for n, p in lora.named_parameters()},
        "single": {n: list(p.shape) for n, p in single.named_parameters()},
    }


@probe_lora_param_shapes.judge
def judge_lora_param_shapes(out):
    want = {"A": [N_INST, D_IN, RANK], "B": [N_INST, RANK, D_OUT]}
    got = out["params"]
    expect(
        set(got) == {"A", "B"},
        f"Lora should have exactly two parameters, A and B; found {sorted(got)}"
        + (" (no bias: the frozen layer already has one)" if len(got) > 2 else ""),
    )
    for name in ("A", "B"):
        expect(
            got[name] == want[name],
            f"Lora.{name} has shape {tuple(got[name])}, expected "
            f"{tuple(want[name])} for d_in={D_IN}, d_out={D_OUT}, rank={RANK}, n_inst={N_INST}",
        )
    expect(
        out["single"].get("A") == [1, D_IN, RANK],
        f"with n_inst=None, A should have shape (1, {D_IN}, {RANK}); got {out['single'].get('A')}",
    )


# --------------------------------------------------------------------------------------------
@check("Lora", points=5)
def probe_lora_init(impl):
    """B starts at zero; A is kaiming_uniform_(a=√5) on its [n_inst, d_in, rank] tensor."""
    torch.manual_seed(0)
    lora = impl.Lora(d_in=64, d_out=48, rank=8, lora_alpha=16, n_inst=4)
    return {"A": lora.A.detach().float().clone(), "B": lora.B.detach().float().clone()}


@probe_lora_init.judge
def judge_lora_init(out):
    A, B = out["A"], out["B"]
    expect(
        bool((B == 0).all()), "B should be initialised to zeros, so the adaptor starts as no change"
    )
    expect(
        bool(A.abs().max() > 0),
        "A is all zeros: then no gradient ever reaches A or B. "
        "Initialise A with nn.init.kaiming_uniform_(A, a=math.sqrt(5))",
    )
    # kaiming_uniform_(a=√5) on [n, d_in, r]: fan_in = d_in·r, bound = 1/sqrt(fan_in)
    bound = 1 / math.sqrt(64 * 8)
    expect(
        float(A.abs().max()) <= bound * (1 + 1e-5),
        f"A exceeds the kaiming_uniform_(a=√5) bound {bound:.4f} (max |A| = {float(A.abs().max()):.4f}): "
        "initialise the whole [n_inst, d_in, rank] tensor with nn.init.kaiming_uniform_(A, a=math.sqrt(5))",
    )
    std, want_std = float(A.std()), bound / math.sqrt(3)
    expect(
        abs(std - want_std) < 0.15 * want_std and float(A.abs().max()) > 0.9 * bound,
        f"A does not look uniform on [-{bound:.4f}, {bound:.4f}] (std {std:.4f}, expected "
        f"{want_std:.4f}): use nn.init.kaiming_uniform_(A, a=math.sqrt(5))",
    )
    expect(abs(float(A.mean())) < 0.1 * bound, "A is not centred on zero")
    expect(
        not torch.equal(A[0], A[1]),
        "every instance of A is identical: initialise them independently",
    )


# --------------------------------------------------------------------------------------------
@check("Lora", points=6)
def probe_lora_forward_formula(impl):
    """forward equals (α/r)·(x A) B per instance, with non-zero B."""
    lora = _make(impl.Lora)
    _set(lora, seeded(N_INST, D_IN, RANK, seed=1), seeded(N_INST, RANK, D_OUT, seed=2))
    x = seeded(2, 3, N_INST, D_IN, seed=3)
    return {"y": lora(x).detach().float()}


@probe_lora_forward_formula.judge
def judge_lora_forward_formula(out):
    expected = _reference(
        seeded(2, 3, N_INST, D_IN, seed=3),
        seeded(N_INST, D_IN, RANK, seed=1),
        seeded(N_INST, RANK, D_OUT, seed=2),
        ALPHA / RANK,
    )
    y = out["y"]
    expect(
        tuple(y.shape) == tuple(expected.shape),
        f"forward of x {(2, 3, N_INST, D_IN)} should return {tuple(expected.shape)}, got {tuple(y.shape)}",
    )
    if not close(y, expected, atol=1e-5):
        raise CheckFailed(
            "forward does not equal (α/r)·(x A) B per instance (max diff "
            f"{max_diff(y, expected):.3g})" + _diagnose_scale(y, expected, ALPHA, RANK)
        )


# --------------------------------------------------------------------------------------------
@check("Lora", points=3)
def probe_lora_alpha_scaling(impl):
    """The output scales with lora_alpha / rank (tried with several α and r)."""
    outs = {}
    for alpha, rank in ((1.0, 2), (16.0, 2), (16.0, 8)):
        lora = impl.Lora(d_in=D_IN, d_out=D_OUT, rank=rank, lora_alpha=alpha, n_inst=1)
        _set(lora, seeded(1, D_IN, rank, seed=4), seeded(1, rank, D_OUT, seed=5))
        outs[f"{alpha}_{rank}"] = lora(seeded(5, 1, D_IN, seed=6)).detach().float()
    return outs


@probe_lora_alpha_scaling.judge
def judge_lora_alpha_scaling(out):
    x = seeded(5, 1, D_IN, seed=6)
    for alpha, rank in ((1.0, 2), (16.0, 2), (16.0, 8)):
        expected = _reference(
            x, seeded(1, D_IN, rank, seed=4), seeded(1, rank, D_OUT, seed=5), alpha / rank
        )
        y = out[f"{alpha}_{rank}"]
        if not close(y, expected, atol=1e-5):
            raise CheckFailed(
                f"with lora_alpha={alpha}, rank={rank} the output is wrong"
                + (
                    _diagnose_scale(y, expected, alpha, rank)
                    or f" (max diff {max_diff(y, expected):.3g})"
                )
            )


# --------------------------------------------------------------------------------------------
@check("Lora", points=3)
def probe_lora_broadcast(impl):
    """An inst axis of size 1 broadcasts over all instances; any other mismatch is an error."""
    lora = _make(impl.Lora)
    _set(lora, seeded(N_INST, D_IN, RANK, seed=7), seeded(N_INST, RANK, D_OUT, seed=8))
    y = lora(seeded(3, 1, D_IN, seed=9)).detach().float()
    try:
        lora(seeded(3, N_INST - 1, D_IN, seed=9))
        mismatch = "no error"
    except Exception as exc:  # any clear error will do
        mismatch = type(exc).__name__
    return {"y": y, "mismatch": mismatch}


@probe_lora_broadcast.judge
def judge_lora_broadcast(out):
    expected = _reference(
        seeded(3, 1, D_IN, seed=9),
        seeded(N_INST, D_IN, RANK, seed=7),
        seeded(N_INST, RANK, D_OUT, seed=8),
        ALPHA / RANK,
    )
    expect(
        tuple(out["y"].shape) == (3, N_INST, D_OUT),
        f"an input [3, 1, d_in] should broadcast to [3, n_inst={N_INST}, d_out]; got {tuple(out['y'].shape)}",
    )
    expect(
        out["mismatch"] != "no error",
        f"an input with {N_INST - 1} instances for a Lora with n_inst={N_INST} should raise an "
        "error (a ValueError, or an assert)",
    )
    scale = _diagnose_scale(out["y"], expected, ALPHA, RANK)
    expect(
        not scale,
        f"an input with an inst axis of size 1 broadcasts, but its output is off by a constant "
        f"factor{scale} (as in lora_forward_formula)",
    )
    expect(
        close(out["y"], expected, atol=1e-5),
        "broadcasting an inst axis of size 1 gives wrong values: "
        "each instance should see the same input",
    )


# --------------------------------------------------------------------------------------------
@check("Lora", points=3)
def probe_lora_dtype(impl):
    """With dtype=float64, the parameters are float64 and x is cast to it."""
    lora = _make(impl.Lora, dtype=torch.float64)
    _set(
        lora,
        seeded(N_INST, D_IN, RANK, seed=10, dtype=torch.float64),
        seeded(N_INST, RANK, D_OUT, seed=11, dtype=torch.float64),
    )
    try:
        y = lora(seeded(2, N_INST, D_IN, seed=12, dtype=torch.float32))
    except RuntimeError as exc:
        raise CheckFailed(
            f"Lora(dtype=torch.float64) failed on a float32 input ({exc}): cast x to "
            "the parameters' dtype (A.dtype) before multiplying"
        ) from None
    return {
        "param_dtypes": [str(p.dtype) for p in lora.parameters()],
        "y_dtype": str(y.dtype),
        "y": y.detach().clone(),
    }


@probe_lora_dtype.judge
def judge_lora_dtype(out):
    expect(
        all(d == "torch.float64" for d in out["param_dtypes"]),
        f"Lora(dtype=torch.float64) should create float64 parameters; got {out['param_dtypes']}",
    )
    expect(
        out["y_dtype"] == "torch.float64",
        f"with dtype=float64 a float32 input should be cast: the output is {out['y_dtype']}",
    )
    expected = _reference(
        seeded(2, N_INST, D_IN, seed=12, dtype=torch.float32).double(),
        seeded(N_INST, D_IN, RANK, seed=10, dtype=torch.float64),
        seeded(N_INST, RANK, D_OUT, seed=11, dtype=torch.float64),
        ALPHA / RANK,
    )
    if not close(out["y"], expected, atol=1e-10, rtol=1e-10):
        scale = _diagnose_scale(out["y"], expected, ALPHA, RANK)
        raise CheckFailed(
            f"the float64 output is off by a constant factor{scale} (as in lora_forward_formula); "
            "the dtype handling itself is right"
            if scale
            else f"float64 output has wrong values (max diff {max_diff(out['y'], expected):.3g})"
        )


# --------------------------------------------------------------------------------------------
class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operation produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for t in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return result


BIG = 512


@check("Lora", points=4)
def probe_lora_xa_then_b(impl):
    """The product is taken as (xA)B: never forming the d_in×d_out matrix AB (FLOPs and sizes)."""
    lora = impl.Lora(d_in=BIG, d_out=BIG, rank=2, lora_alpha=4, n_inst=1)
    _set(lora, seeded(1, BIG, 2, seed=13), seeded(1, 2, BIG, seed=14))
    x = seeded(1, 1, BIG, seed=15)
    with torch.no_grad():
        with FlopCounterMode(display=False) as flops:
            lora(x)
        sizes = _LargestTensor()
        with sizes:
            lora(x)
    return {"flops": int(flops.get_total_flops()), "largest": int(sizes.largest)}


@probe_lora_xa_then_b.judge
def judge_lora_xa_then_b(out):
    xab_flops = 2 * (BIG * 2 + 2 * BIG)  # (xA)B for one token
    expect(
        out["flops"] <= 4 * xab_flops and out["largest"] < BIG * BIG // 4,
        f"forward formed a {BIG}×{BIG}-sized intermediate or used {out['flops']} FLOPs for one token "
        f"(x(AB) order?): compute (x @ A) @ B so no d_in×d_out matrix is ever built "
        f"(expected ≤ {4 * xab_flops} FLOPs, largest tensor {out['largest']} elements)",
    )


# --------------------------------------------------------------------------------------------
@check("Lora", points=2)
def probe_lora_gradients(impl):
    """Gradients reach both A and B (and equal the formula's)."""
    lora = _make(impl.Lora)
    _set(lora, seeded(N_INST, D_IN, RANK, seed=16), seeded(N_INST, RANK, D_OUT, seed=17))
    x = seeded(2, N_INST, D_IN, seed=18)
    w = seeded(2, N_INST, D_OUT, seed=19)
    (lora(x) * w).sum().backward()
    return {
        "gA": None if lora.A.grad is None else lora.A.grad.float().clone(),
        "gB": None if lora.B.grad is None else lora.B.grad.float().clone(),
    }


@probe_lora_gradients.judge
def judge_lora_gradients(out):
    A = seeded(N_INST, D_IN, RANK, seed=16).double().requires_grad_()
    B = seeded(N_INST, RANK, D_OUT, seed=17).double().requires_grad_()
    y = _reference(seeded(2, N_INST, D_IN, seed=18), A, B, ALPHA / RANK)
    (y * seeded(2, N_INST, D_OUT, seed=19).double()).sum().backward()
    for name, want in (("A", A.grad), ("B", B.grad)):
        got = out[f"g{name}"]
        expect(
            got is not None,
            f"no gradient reached Lora.{name}: is it an nn.Parameter used in forward "
            "(not detached, not wrapped in torch.no_grad)?",
        )
        if not close(got, want, atol=1e-5):
            scale = _diagnose_scale(got, want, ALPHA, RANK)
            raise CheckFailed(
                f"the gradient of Lora.{name} is off by a constant factor{scale}"
                if scale
                else f"the gradient of Lora.{name} is wrong (max diff {max_diff(got, want):.3g})"
            )
