"""Where the adaptors learned: the size of every update ΔW = (α/r)·A·B against its base weight.

Each adaptor adds a low-rank matrix to the weight it adapts (:mod:`lora_rlhf.adapters.merge`): one per
head for W_Q and W_O, one per key/value head for the real grouped ``_W_K``/``_W_V``, one for each
MLP weight. The map reports, per layer and target, ‖ΔW‖_F / ‖W‖_F, with ΔW all of that target's
heads together (stacked as the weight stacks them), and the singular values of the largest
updates, which show how few directions an update really uses.

Nothing as large as a weight is formed from A and B: the norm is

    ‖A B‖_F² = tr((AᵀA)(BBᵀ))      (r × r matrices, one per head),

and the singular values come from QR factors: with the heads side by side along the output axis
(q, k, v, MLP in/gate), ΔW = s·[A_1 … A_H]·blockdiag(B_1 … B_H); writing [A_1 … A_H] = Q R and
B_hᵀ = Q_h R_h, ΔW = s·Q·(R·blockdiag(R_1ᵀ … R_Hᵀ))·blockdiag(Q_1ᵀ … Q_Hᵀ) has the singular
values of the small middle matrix (at most H·r wide). W_O stacks its heads along the input axis,
so its ΔWᵀ has that form, with the roles of A and B swapped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor, nn

from lora_rlhf.adapters.contract import ATTN_TARGETS, MLP_TARGETS, adaptor_values

MAP_FILE = "adaptor_map.png"
ROWS_STACKED = ("o", "mlp_out")  # heads stacked along the weight's input axis
TOP = 5  # updates listed as text and drawn in the singular-value panel


@dataclass(frozen=True)
class Update:
    """One layer's update of one target."""

    layer: int
    target: str
    delta_norm: float  # ‖ΔW‖_F, all heads together
    base_norm: float  # ‖W‖_F of the weight it adapts

    @property
    def relative(self) -> float:
        return self.delta_norm / self.base_norm if self.base_norm > 0 else math.nan

    @property
    def label(self) -> str:
        return f"layer {self.layer} {self.target}"


@dataclass
class AdaptorMap:
    """The updates of a model's adaptors: a layers × targets grid, and the largest ones' spectra."""

    n_layers: int
    targets: tuple[str, ...]
    updates: list[Update]  # every (layer, target), largest relative size first
    spectra: dict[tuple[int, str], list[float]] = field(default_factory=dict)  # top updates' σ

    def grid(self) -> list[list[float]]:
        """[layer][target] relative size, NaN where a layer has no adaptor for the target."""
        grid = [[math.nan] * len(self.targets) for _ in range(self.n_layers)]
        for u in self.updates:
            grid[u.layer][self.targets.index(u.target)] = u.relative
        return grid

    def top(self, n: int = TOP) -> list[Update]:
        return self.updates[:n]

    def describe_top(self, n: int = TOP) -> list[str]:
        """One line per largest update: relative size, both norms, and how many singular values
        hold 90% of ‖ΔW‖_F² (when the spectrum was computed)."""
        lines = []
        for i, u in enumerate(self.top(n), 1):
            line = (
                f"{i}. {u.label:<18} ‖ΔW‖/‖W‖ = {u.relative:<9.4g}"
                f"(‖ΔW‖_F {u.delta_norm:.4g}, ‖W‖_F {u.base_norm:.4g}"
            )
            sigma = self.spectra.get((u.layer, u.target))
            if sigma:
                line += f"; 90% of ‖ΔW‖² in {effective_rank(sigma)} of {len(sigma)} directions"
            lines.append(line + ")")
        return lines


def effective_rank(sigma: list[float], share: float = 0.9) -> int:
    """The fewest singular values whose squares hold `share` of the total (0 for a zero update)."""
    energy = [s * s for s in sigma]
    total, running = sum(energy), 0.0
    if total == 0:
        return 0
    for k, e in enumerate(sorted(energy, reverse=True), 1):
        running += e
        if running >= share * total:
            return k
    return len(energy)


def update_norm(
    A: Float[Tensor, "inst d_in r"], B: Float[Tensor, "inst r d_out"], scaling: float
) -> float:
    """‖ΔW‖_F of s·A[h]·B[h] over all instances, from the r × r Gram matrices (float64)."""
    A, B = A.detach().double(), B.detach().double()
    gram_a = A.transpose(-1, -2) @ A  # [inst, r, r]
    gram_b = B @ B.transpose(-1, -2)  # [inst, r, r]
    squared = torch.einsum("irs,isr->", gram_a, gram_b).item()  # Σ_h tr(AᵀA BBᵀ)
    return abs(scaling) * math.sqrt(max(squared, 0.0))


def update_singular_values(
    A: Float[Tensor, "inst d_in r"],
    B: Float[Tensor, "inst r d_out"],
    scaling: float,
    rows_stacked: bool = False,
) -> list[float]:
    """Singular values, largest first, of the instances' updates s·A[h]·B[h] stacked side by side
    along the output axis (or along the input axis when `rows_stacked`, as W_O's heads are)."""
    A, B = A.detach().double(), B.detach().double()
    if rows_stacked:  # ΔWᵀ = s·[B_1ᵀ … B_Hᵀ]·blockdiag(A_1ᵀ … A_Hᵀ)
        A, B = B.transpose(-1, -2), A.transpose(-1, -2)
    side_by_side = torch.cat(list(A), dim=-1)  # [d_in, inst·r]
    _, r_a = torch.linalg.qr(side_by_side)  # [min(d_in, inst·r), inst·r]
    r_bs = [torch.linalg.qr(b.T)[1] for b in B]  # B_hᵀ = Q_h R_h: R_h [min(d_out, r), r]
    middle = r_a @ torch.block_diag(*(r.T for r in r_bs))
    return [abs(scaling) * s for s in torch.linalg.svdvals(middle).tolist()]


def _base_norm(weight: Tensor) -> float:
    """‖W‖_F in float64, one head (or the whole 2-d weight) at a time."""
    parts = weight.detach() if weight.ndim == 3 else weight.detach().unsqueeze(0)
    return math.sqrt(
        sum(torch.linalg.vector_norm(p, dtype=torch.float64).item() ** 2 for p in parts)
    )


def adaptor_map(model: nn.Module, top: int = TOP) -> AdaptorMap:
    """The map of a LoRA model's adaptors (attention, and MLP when present).

    A and B are read from ``model.lora[i].lora_q/k/v/o`` (and ``model.mlp_lora``), α/r through
    :func:`lora_rlhf.adapters.files.scaling_of`; the base weights are the model's own (K and V: the
    grouped ``_W_K``/``_W_V``). The singular values are computed for the `top` largest updates.
    """
    from lora_rlhf.adapters.merge import _adapted_weight

    values = adaptor_values(model)
    updates = []
    for layer, adaptors in enumerate(values):
        for target, (A, B, scaling) in adaptors.items():
            base = _base_norm(_adapted_weight(model, layer, target))
            updates.append(Update(layer, target, update_norm(A, B, scaling), base))
    # largest first; ties (e.g. all zero) keep layer order, then q, k, v, o, MLP
    updates.sort(key=lambda u: -u.relative if not math.isnan(u.relative) else math.inf)
    present = {u.target for u in updates}
    targets = tuple(t for t in ATTN_TARGETS + MLP_TARGETS if t in present)
    spectra = {}
    for u in updates[:top]:
        A, B, scaling = values[u.layer][u.target]
        spectra[(u.layer, u.target)] = update_singular_values(
            A, B, scaling, rows_stacked=u.target in ROWS_STACKED
        )
    return AdaptorMap(len(values), targets, updates, spectra)


def save_adaptor_map(
    model: nn.Module, path, title: str = "Where the adaptors learned"
) -> AdaptorMap:
    """Compute the map of `model`'s adaptors and draw it to the PNG `path`
    (:func:`lora_rlhf.plots.plot_adaptor_map`); returns the map."""
    from lora_rlhf.plots import plot_adaptor_map

    amap = adaptor_map(model)
    plot_adaptor_map(amap, path, title=title)
    return amap
