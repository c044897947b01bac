"""How far fusing the adaptors per layer gets the LoRA forward toward the base model's.

    python benchmarks/fused_hooks.py            # ~2 min on 2 cores
    python benchmarks/fused_hooks.py --rounds 5

A design experiment behind docs/benchmarks.md's "what limits the forward overhead", not part of
the library: the course's ``LoraHooks`` (what the trainer runs) against the same adaptors computed
with the fewest operations the six hook points allow — one ``x @ [A_q A_k A_v]`` per layer, each
of q, k, v updated by one ``addmm`` with a block-diagonal B (α/r folded into it), W_O's adaptor as
``z @ blockdiag(A_o)`` then one ``addmm`` into attn_out. Both run with ``attached_hooks`` on the
embedded model, batch 8 × 24, adaptors with non-zero B; the fused logits are checked against the
course's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.timing import time_interleaved  # noqa: E402
from lora_rlhf.lora import LoraHooks, TransformerWithValueHeadLora  # noqa: E402
from lora_rlhf.value_head import attached_hooks  # noqa: E402


def _block_diag(t: torch.Tensor) -> torch.Tensor:
    """[n, a, b] -> the [n·a, n·b] block-diagonal matrix of the n blocks."""
    return torch.block_diag(*t.unbind(0))


class FusedLayer:
    """The adaptors of one ``LoraHooks`` (same parameters), applied with fewer, larger operations."""

    def __init__(self, layer: LoraHooks):
        self.layer = layer
        self.split = [layer.lora_q.n_inst, layer.lora_k.n_inst, layer.lora_v.n_inst]

    def store_x(self, x, hook):
        q, k, v = self.layer.lora_q, self.layer.lora_k, self.layer.lora_v
        A = torch.cat([q.A, k.A, v.A]).transpose(0, 1).reshape(x.shape[-1], -1)  # [d, (inst r)]
        x_a = x.reshape(-1, x.shape[-1]) @ A
        self.x_a = x_a.split([n * q.rank for n in self.split], dim=1)

    def _add(self, t, x_a, lora):
        flat = torch.addmm(
            t.reshape(x_a.shape[0], -1), x_a, _block_diag(lora.B), alpha=lora.scaling
        )
        return flat.view(t.shape)

    def add_q(self, q, hook):
        return self._add(q, self.x_a[0], self.layer.lora_q)

    def add_k(self, k, hook):
        return self._add(k, self.x_a[1], self.layer.lora_k)

    def add_v(self, v, hook):
        return self._add(v, self.x_a[2], self.layer.lora_v)

    def store_z(self, z, hook):
        self.z_a = z.reshape(-1, z.shape[-2] * z.shape[-1]) @ _block_diag(self.layer.lora_o.A)

    def add_out(self, out, hook):
        o = self.layer.lora_o
        flat = torch.addmm(
            out.reshape(self.z_a.shape[0], -1), self.z_a, o.B.flatten(0, 1), alpha=o.scaling
        )
        return flat.view(out.shape)

    def hooks(self):
        """The course's six hook points (``LoraHooks.list_fwd_hooks``, same order), these functions."""
        names = [name for name, _ in self.layer.list_fwd_hooks()]
        fns = [self.store_x, self.add_q, self.add_k, self.add_v, self.store_z, self.add_out]
        return list(zip(names, fns, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--threads", type=int, default=2)
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    torch.manual_seed(0)
    model = TransformerWithValueHeadLora.from_pretrained("smollm2-135m", rank=4, lora_alpha=32)
    with torch.no_grad():
        for name, param in model.lora.named_parameters():
            if name.endswith(".B"):
                param.normal_(std=0.02)
    model.eval()
    tokens = torch.randint(0, model.cfg.d_vocab, (8, 24))
    fused = [hook for layer in model.lora for hook in FusedLayer(layer).hooks()]

    def run(hooks):
        def forward():
            with torch.no_grad(), attached_hooks(model, hooks):
                return model(tokens)

        return forward

    cases = {"base": run([]), "course": run(model.lora_fwd_hooks), "fused": run(fused)}
    course, got, base = cases["course"](), cases["fused"](), cases["base"]()
    diff = (got - course).abs().max().item()
    assert (course - base).abs().max() > 0.1 and diff < 1e-3, diff
    times = time_interleaved(cases, opts.rounds)
    base_min = min(times["base"])
    print(
        f"batch 8 x 24, {opts.threads} threads, {opts.rounds} rounds; fused vs course max |dlogits| {diff:.1e}"
    )
    print("| forward | min ms | median ms | vs base (min/min) | paired median |")
    print("|---|---|---|---|---|")
    for name, ts in times.items():
        paired = statistics.median(a / b for a, b in zip(ts, times["base"]))
        print(
            f"| {name} | {1e3 * min(ts):.0f} | {1e3 * statistics.median(ts):.0f} "
            f"| {min(ts) / base_min:.3f}x | {paired:.3f}x |"
        )


if __name__ == "__main__":
    main()
