"""Figures of a training run: the reward curve (with the KL to the reference policy below it)
and, next to it, the reward against the KL per phase: how much reward each nat of drift bought;
the adaptor map: where in the model the adaptors changed the weights, and how low-rank; and a
class's grades (score histogram, failures per check) for ``grade-class``'s report.

Drawn with matplotlib's object API (``Figure`` + the Agg canvas), never ``pyplot``: no GUI
backend is touched, so it works headless and never changes the caller's backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def plot_reward_curve(
    history: Sequence[dict[str, Any]],
    path: str | Path,
    title: str = "RLHF with LoRA",
    reward_label: str = "reward",
) -> Path:
    """Save a PNG of the mean reward per phase (± one std) and the KL(π ‖ π_ref) per phase, and,
    on the right, the mean reward against the KL, one point per phase coloured by phase.

    Args:
        history: per-phase metrics with ``phase``, ``reward_mean``, ``reward_std`` and ``kl``
            (the trainer's :attr:`~lora_rlhf.rlhf.trainer.RLHFTrainer.history`).
        path: where to write the PNG.
        title: the figure's title.
        reward_label: the reward axis' label (e.g. ``"count of '.'"``).

    Returns:
        The path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    path = Path(path)
    phases = [m["phase"] for m in history]
    mean = [m["reward_mean"] for m in history]
    std = [m.get("reward_std", 0.0) for m in history]
    kl = [m.get("kl", float("nan")) for m in history]

    fig = Figure(figsize=(11, 5), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, 2, height_ratios=[3, 1], width_ratios=[3, 2])
    ax_reward = fig.add_subplot(grid[0, 0])
    ax_kl = fig.add_subplot(grid[1, 0], sharex=ax_reward)
    ax_tradeoff = fig.add_subplot(grid[:, 1])
    ax_reward.plot(phases, mean, marker="o", markersize=3, label="mean reward")
    ax_reward.fill_between(
        phases,
        [m - s for m, s in zip(mean, std)],
        [m + s for m, s in zip(mean, std)],
        alpha=0.2,
        label="± 1 std over the batch",
    )
    if len(mean) >= 5:
        running = [
            sum(mean[max(0, i - 4) : i + 1]) / len(mean[max(0, i - 4) : i + 1])
            for i in range(len(mean))
        ]
        ax_reward.plot(phases, running, linewidth=2, label="running mean (5 phases)")
    ax_reward.set_ylabel(reward_label)
    ax_reward.tick_params(labelbottom=False)
    fig.suptitle(title)
    ax_reward.grid(alpha=0.3)
    ax_reward.legend(loc="upper left", fontsize="small")

    ax_kl.plot(phases, kl, color="tab:red", marker="o", markersize=2)
    ax_kl.set_ylabel("KL(π ‖ π_ref)")
    ax_kl.set_xlabel("phase")
    ax_kl.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_kl.grid(alpha=0.3)

    ax_tradeoff.plot(kl, mean, color="0.7", linewidth=0.8, zorder=1)
    points = ax_tradeoff.scatter(kl, mean, c=phases, cmap="viridis", s=18, zorder=2)
    fig.colorbar(points, ax=ax_tradeoff, label="phase")
    ax_tradeoff.set_xlabel("KL(π ‖ π_ref) per generated token (nats)")
    ax_tradeoff.set_ylabel(reward_label)
    ax_tradeoff.set_title("reward against KL, per phase", fontsize="medium")
    ax_tradeoff.grid(alpha=0.3)

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def plot_reward_curves(
    runs: dict[str, Sequence[dict[str, Any]]],
    path: str | Path,
    title: str = "RLHF with LoRA",
    reward_label: str = "reward",
) -> Path:
    """Save a PNG comparing the mean reward per phase of several runs (e.g. seeds).

    Args:
        runs: ``{label: history}``, each history as for :func:`plot_reward_curve`.
        path: where to write the PNG.
        title: the figure's title.
        reward_label: the reward axis' label.

    Returns:
        The path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    path = Path(path)
    fig = Figure(figsize=(7, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for label, history in runs.items():
        ax.plot([m["phase"] for m in history], [m["reward_mean"] for m in history], marker="o",
                markersize=3, label=label)  # fmt: skip
    ax.set_xlabel("phase")
    ax.set_ylabel(reward_label)
    ax.set_title(title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def plot_adaptor_map(amap, path: str | Path, title: str = "Where the adaptors learned") -> Path:
    """Save a PNG of an :class:`~lora_rlhf.adapters.adaptor_map.AdaptorMap`: on the left a heatmap of
    ‖ΔW‖_F / ‖W‖_F over layers × targets (log colour scale; the largest updates numbered), on the
    right the singular values of those largest updates (how many directions each really uses).

    Args:
        amap: the map (:func:`lora_rlhf.adapters.adaptor_map.adaptor_map`).
        path: where to write the PNG.
        title: the figure's title.

    Returns:
        The path written.
    """
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LogNorm, Normalize
    from matplotlib.figure import Figure

    path = Path(path)
    grid = np.array(amap.grid(), dtype=float).reshape(amap.n_layers, len(amap.targets))
    height = max(4.5, 0.22 * amap.n_layers + 1.8)
    fig = Figure(figsize=(12, height), layout="constrained")
    FigureCanvasAgg(fig)
    ax_map, ax_sv = fig.subplots(1, 2, width_ratios=[2, 3])
    shown = np.nan_to_num(grid, nan=0.0)
    positive = shown[shown > 0]
    # A log scale: one weight with a small norm can dwarf every other cell on a linear one.
    norm = (
        LogNorm(vmin=max(positive.min(), positive.max() * 1e-3), vmax=positive.max())
        if positive.size
        else Normalize(vmin=0.0, vmax=1.0)
    )
    image = ax_map.imshow(
        np.ma.masked_invalid(np.where(shown > 0, grid, np.nan) if positive.size else grid),
        aspect="auto", cmap="viridis", norm=norm, interpolation="nearest",
    )  # fmt: skip
    fig.colorbar(image, ax=ax_map, label="‖ΔW‖_F / ‖W‖_F", shrink=0.8)
    ax_map.set_xticks(range(len(amap.targets)), amap.targets)
    ax_map.xaxis.tick_top()
    step = 1 if amap.n_layers <= 16 else 2
    ax_map.set_yticks(range(0, amap.n_layers, step))
    ax_map.set_ylabel("layer")
    ax_map.set_title("size of each update, relative to its weight", fontsize="medium")
    top = amap.top()
    if shown.max() > 0:
        for rank, u in enumerate(top, 1):
            x, y = amap.targets.index(u.target), u.layer
            color = "black" if norm(shown[y, x]) > 0.6 else "white"  # legible on viridis
            ax_map.text(x, y, str(rank), ha="center", va="center", color=color,
                        fontsize="small", fontweight="bold")  # fmt: skip

    spectra = [(u, amap.spectra.get((u.layer, u.target))) for u in top]
    spectra = [(u, s) for u, s in spectra if s and s[0] > 0]
    for rank, (u, sigma) in enumerate(spectra, 1):
        ax_sv.semilogy(range(1, len(sigma) + 1), np.maximum(sigma, sigma[0] * 1e-6),
                       marker="o", markersize=3, label=f"{rank}. {u.label}")  # fmt: skip
    if spectra:
        ax_sv.legend(loc="upper right", fontsize="small")
    else:
        ax_sv.text(0.5, 0.5, "all updates are zero", ha="center", va="center",
                   transform=ax_sv.transAxes)  # fmt: skip
    ax_sv.set_xlabel("singular value index")
    ax_sv.set_ylabel("singular value of ΔW")
    ax_sv.set_title("largest updates: singular values", fontsize="medium")
    ax_sv.grid(alpha=0.3, which="both")
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def plot_class_scores(
    scores: Sequence[float],
    max_score: float,
    failures: Sequence[tuple[str, int]],
    path: str | Path,
    title: str = "class scores",
) -> Path:
    """Save a PNG of a class's grades: the score histogram with its mean and median, and beside
    it how many students failed each check, most failed at the top.

    Args:
        scores: one score per student.
        max_score: the most a student can score (the histogram's right edge).
        failures: ``(check, students failing it)`` pairs, most failed first.
        path: where to write the PNG.
        title: the figure's title.

    Returns:
        The path written.
    """
    import statistics

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    path = Path(path)
    height = max(4.5, 0.24 * len(failures) + 1.5)
    fig = Figure(figsize=(12, height), layout="constrained")
    FigureCanvasAgg(fig)
    ax_hist, ax_fail = fig.subplots(1, 2, width_ratios=[2, 3])
    step = max_score / 10
    ax_hist.hist(scores, bins=[i * step for i in range(11)], color="tab:blue", edgecolor="white")
    mean, median = statistics.fmean(scores), statistics.median(scores)
    ax_hist.axvline(mean, color="tab:red", linewidth=2, label=f"mean {mean:.1f}")
    ax_hist.axvline(median, color="tab:orange", linewidth=2, linestyle="--",
                    label=f"median {median:.1f}")  # fmt: skip
    ax_hist.set_xlim(0, max_score * 1.03)  # a median at full marks stays visible
    ax_hist.set_xlabel(f"score (out of {max_score:g})")
    ax_hist.set_ylabel("students")
    ax_hist.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax_hist.set_title(f"scores of {len(scores)} students", fontsize="medium")
    ax_hist.legend(loc="upper left", fontsize="small")
    ax_hist.grid(alpha=0.3, axis="y")

    names = [name for name, _ in failures]
    counts = [count for _, count in failures]
    ax_fail.barh(range(len(names)), counts, color="tab:red")
    ax_fail.set_yticks(range(len(names)), names, fontsize="small")
    ax_fail.invert_yaxis()  # most failed at the top, as in the report's table
    ax_fail.set_xlim(0, len(scores))
    ax_fail.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_fail.set_xlabel("students failing the check")
    ax_fail.set_title("failures per check", fontsize="medium")
    ax_fail.grid(alpha=0.3, axis="x")
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
