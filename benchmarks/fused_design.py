"""Adaptors inside the base's product, against Exercise 2's hooks, with the merged model as a control.

    python benchmarks/fused_design.py                # 30 rounds, ~2 min on 2 cores
    python benchmarks/fused_design.py --rounds 100   # the figures in docs/benchmarks.md

A design experiment behind docs/benchmarks.md ("Adaptors inside the base's product"), beside
the benchmark command. `lora_rlhf.fused.fused_lora` replaces each attention layer's
`calculate_qkv_matrices` for the duration of a block: A_q, A_k and A_v's columns are stacked under
W_Q's rows, so one product `x · [W_Q | A_q A_k A_v]` (the one TransformerLens takes for q anyway,
60 rows wider) gives q and `x A` together; q, k and v each get `(α/r)(x A) B` added in place
before their hook points; W_O's adaptor keeps its two hooks. Measured on the embedded model, batch
8 × 24, adaptors with non-zero B, 2 threads:

1. the whole forward of base, hooks, fused and merged, interleaved (`benchmarks.timing`). The
   merged model computes the same function with no adaptor work at all, so its ratio to the base
   is 1.00 by construction: how far it strays shows the noise of the hour;
2. the time spent computing q, k and v, summed inside single forwards (least over the rounds):
   TransformerLens' `calculate_qkv_matrices` of every layer — for the hooks design with the q/k/v
   hooks it calls, plus the three calls of the store hook — against the fused replacement. This
   sees only the part the fused design changes, and is far steadier than whole-forward ratios.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.models import design_setup  # noqa: E402
from benchmarks.timing import ratio, time_interleaved  # noqa: E402
from lora_rlhf.fused import fused_lora  # noqa: E402
from lora_rlhf.merge import merge_lora  # noqa: E402
from lora_rlhf.value_head import attached_hooks  # noqa: E402


def qkv_seconds(model, tokens, design: str, rounds: int, fused) -> float:
    """Seconds per forward spent computing q, k, v (and storing x, for the hooks): least over
    `rounds` forwards."""
    spent = [0.0]

    def timed(fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            spent[0] += time.perf_counter() - start
            return out

        return wrapper

    hooks = [
        (name, timed(fn) if name.endswith("ln1.hook_normalized") else fn)
        for name, fn in model.lora_fwd_hooks
    ]
    context = {
        "base": lambda: attached_hooks(model, []),
        "hooks": lambda: attached_hooks(model, hooks),
        "fused": fused,
    }[design]
    attns = [block.attn for block in model.blocks]
    best = float("inf")
    with torch.no_grad():
        for _ in range(rounds + 1):  # the first one warms up
            spent[0] = 0.0
            with context():
                saved = [attn.__dict__.get("calculate_qkv_matrices") for attn in attns]
                for attn in attns:  # the fused one when active, else TransformerLens' own
                    attn.calculate_qkv_matrices = timed(attn.calculate_qkv_matrices)
                try:
                    model(tokens)
                finally:
                    for attn, fn in zip(attns, saved, strict=True):
                        attn.__dict__.pop("calculate_qkv_matrices")
                        if fn is not None:
                            attn.calculate_qkv_matrices = fn
            best = min(best, spent[0])
    return best


def main() -> None:
    opts, model, tokens = design_setup(None, __doc__.split("\n\n")[0], rounds=30)
    merged = merge_lora(model)
    fused_context = lambda: fused_lora(model)  # noqa: E731

    def forward(design):
        def run():
            with torch.no_grad():
                if design == "merged":
                    return merged(tokens)
                if design == "hooks":
                    with attached_hooks(model, model.lora_fwd_hooks):
                        return model(tokens)
                if design == "fused":
                    with fused_context():
                        return model(tokens)
                return model(tokens)

        return run

    cases = {design: forward(design) for design in ("base", "hooks", "fused", "merged")}
    hooks, fused, merged_logits = cases["hooks"](), cases["fused"](), cases["merged"]()
    diff = (hooks - fused).abs().max().item()
    assert (hooks - cases["base"]()).abs().max() > 0.1 and diff < 1e-4, diff
    assert (fused - merged_logits).abs().max() < 1e-3
    times = time_interleaved(cases, opts.rounds)
    print(
        f"smollm2-135m, batch 8 x 24, {opts.threads} threads, {opts.rounds} rounds; "
        f"fused vs hooks max |dlogits| {diff:.1e}"
    )
    print("| forward | min ms | median ms | vs base: min/min | paired median (IQR) |")
    print("|---|---|---|---|---|")
    for name, ts in times.items():
        r = ratio(times, name, "base")
        print(
            f"| {name} | {1e3 * min(ts):.0f} | {1e3 * statistics.median(ts):.0f} | {r.best:.3f}x "
            f"| {r.paired:.3f}x ({r.paired_lo:.3f}-{r.paired_hi:.3f}) |"
        )
    r = ratio(times, "fused", "hooks")
    print(f"fused / hooks: {r.best:.3f}x min/min, {r.paired:.3f}x paired")
    print("\ncomputing q, k, v per forward (least over the rounds):")
    for design in ("base", "hooks", "fused"):
        print(
            f"  {design}: {1e3 * qkv_seconds(model, tokens, design, opts.rounds, fused_context):.1f} ms"
        )


if __name__ == "__main__":
    main()
