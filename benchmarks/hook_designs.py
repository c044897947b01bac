"""The library's adaptor hooks against the course's straightforward ones, on the whole forward.

    python benchmarks/hook_designs.py            # ~2 min on 2 cores
    python benchmarks/hook_designs.py --rounds 30

A design experiment behind docs/benchmarks.md ("What limits the forward overhead"), not part of the
library. Three forwards of the embedded model, batch 8 × 24, adaptors with non-zero B, interleaved:

* ``base``: no hooks;
* ``einsum``: the course's version of the hooks (until 29 Nov also the library's): each of q, k, v
  calls its ``Lora`` on the stored x and adds the result; W_O's adaptor is two einsums and an add;
* ``library``: ``LoraHooks`` as it is now: one ``x @ [A_q A_k A_v]`` per layer, each adaptor's
  heads as one block-diagonal matrix (outside autograd), the products accumulated into the hooks'
  activations, the matrices kept between no-grad forwards until a parameter changes.

Besides the whole-forward ratios it prints the time spent inside each design's hooks (summed within
single forwards, least over the rounds). That sum over-counts a little: the first operation after a
large matrix product runs slowly on this machine whoever issues it, and inside a hook it is ours.
The logits of the two designs are checked against each other.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import einops
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.models import design_setup  # noqa: E402
from benchmarks.timing import time_interleaved  # noqa: E402
from lora_rlhf.lora import LoraHooks  # noqa: E402
from lora_rlhf.value_head import attached_hooks  # noqa: E402


def einsum_hooks(layer: LoraHooks) -> list:
    """The course's hooks for one layer, over the same parameters as ``layer``."""
    kept = {}
    loras = {"hook_q": layer.lora_q, "hook_k": layer.lora_k, "hook_v": layer.lora_v}

    def store(key):
        def hook(act, hook):
            kept[key] = act

        return hook

    def qkv(act, hook):
        x = einops.rearrange(kept["x"], "batch pos d_model -> batch pos 1 d_model")
        return act + loras[hook.name.rsplit(".", 1)[-1]](x)

    def out(act, hook):
        o = layer.lora_o
        z_a = einops.einsum(kept["z"], o.A, "b p head d_head, head d_head r -> b p head r")
        summed = einops.einsum(z_a * o.scaling, o.B, "b p head r, head r d_model -> b p d_model")
        return act + summed

    names = [name for name, _ in layer.list_fwd_hooks()]
    return list(zip(names, [store("x"), qkv, qkv, qkv, store("z"), out], strict=True))


def timed(hooks: list, spent: list) -> list:
    def wrap(fn):
        def hook(act, hook):
            start = time.perf_counter()
            result = fn(act, hook=hook)
            spent[-1] += time.perf_counter() - start
            return result

        return hook

    return [(name, wrap(fn)) for name, fn in hooks]


def main() -> None:
    opts, model, tokens = design_setup(None, __doc__.split("\n\n")[0], rounds=15)
    designs = {
        "einsum": [hook for layer in model.lora for hook in einsum_hooks(layer)],
        "library": model.lora_fwd_hooks,
    }
    spent = {name: [] for name in designs}

    def run(name):
        hooks = timed(designs[name], spent[name]) if name in designs else []

        def forward():
            if name in spent:
                spent[name].append(0.0)
            with torch.no_grad(), attached_hooks(model, hooks):
                return model(tokens)

        return forward

    cases = {name: run(name) for name in ("base", *designs)}
    base, einsum, library = cases["base"](), cases["einsum"](), cases["library"]()
    diff = (library - einsum).abs().max().item()
    assert (einsum - base).abs().max() > 0.1 and diff < 1e-3, diff
    times = time_interleaved(cases, opts.rounds)
    base_min = min(times["base"])
    print(
        f"smollm2-135m, batch 8 x 24, {opts.threads} threads, {opts.rounds} rounds; "
        f"library vs einsum max |dlogits| {diff:.1e}"
    )
    print("| forward | min ms | median ms | vs base (min/min) | paired median | inside hooks |")
    print("|---|---|---|---|---|---|")
    for name, ts in times.items():
        paired = statistics.median(a / b for a, b in zip(ts, times["base"]))
        inside = f"{1e3 * min(spent[name][1:]):.1f} ms" if name in spent else "—"
        print(
            f"| {name} | {1e3 * min(ts):.0f} | {1e3 * statistics.median(ts):.0f} "
            f"| {min(ts) / base_min:.3f}x | {paired:.3f}x | {inside} |"
        )


if __name__ == "__main__":
    main()
