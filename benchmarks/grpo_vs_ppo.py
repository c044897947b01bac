"""GRPO against PPO over seeds, each run being the command itself: `lora-rlhf train --algo A --seed N`.

    python -m benchmarks.grpo_vs_ppo --runs-dir runs/grpo_vs_ppo --threads 1 \\
        --out docs/grpo/grpo_vs_ppo.json --plot docs/grpo/grpo_vs_ppo.png

Every run is ``python -m lora_rlhf.cli.train --algo A --seed N --out DIR [--threads T] [options]``
in a fresh process: the trainer classes, the fast path, the defaults (the algorithm's own
included) and the threads are the command's, because it *is* the command (``--threads`` is passed
through as given; left out, the command uses torch's). At most ``--jobs`` run at a time.

``--runs-dir`` holds the run folders. A folder there whose saved settings (``adapter_config.json``)
are the settings the command would use for (algorithm, seed, options), and which finished every
phase, is reused instead of run again, whatever its name; so the runs of a sweep made with the
plain command are the benchmark's runs. Only what is missing runs.

Reported per algorithm (mean, and the min-max over the seeds): the first phase's reward, the mean
reward of the last five phases, their ratio and the fraction of seeds at ≥ 2×, the mean KL(π ‖
π_ref) per generated token of the last five phases, the mean reward of the 16 fresh samples after
training and how many of them are reward hacks (:mod:`lora_rlhf.rlhf.hacking`), and the mean phase
time. ``--plot`` draws every run in one reward-against-KL scatter.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ALGOS = ("ppo", "grpo")
THRESHOLD = 2.0  # the course's bar: last-5 reward at least twice the first phase's


def command(algo: str, seed: int, out: Path, threads: int | None, options: list[str]) -> list[str]:
    """The `lora-rlhf train` command line of one run (run with this Python)."""
    argv = [sys.executable, "-m", "lora_rlhf.cli.train", "--algo", algo, "--seed", str(seed)]
    argv += ["--out", str(out), "--no-progress", *options]
    return argv + ([] if threads is None else ["--threads", str(threads)])


def planned_settings(algo: str, seed: int, options: list[str]) -> dict[str, Any]:
    """The settings `lora-rlhf train` would train with (what its adapter_config.json saves)."""
    from lora_rlhf.cli.command import build_parser

    args = build_parser().parse_args(["train", "--algo", algo, "--seed", str(seed), *options])
    from lora_rlhf.cli.settings import merge_settings

    return merge_settings(args, None)


def finished_run(folder: Path, settings: dict[str, Any]) -> bool:
    """Whether ``folder`` holds a run of exactly ``settings`` that did all its phases."""
    from lora_rlhf.cli.outputs import read_summary

    config_path = folder / "adapter_config.json"
    if not config_path.is_file():
        return False
    config = json.loads(config_path.read_text())
    summary = read_summary(folder)
    return (
        config.get("training") == settings
        and not config.get("interrupted")
        and summary is not None
        and summary["phases_done"] == settings["phases"]
    )


def find_run(runs_dir: Path, settings: dict[str, Any]) -> Path | None:
    if not runs_dir.is_dir():
        return None
    return next((d for d in sorted(runs_dir.iterdir()) if finished_run(d, settings)), None)


def _number(value: float | None) -> float:
    return math.nan if value is None else value  # metrics.jsonl writes NaN as null


def run_record(folder: Path) -> dict[str, Any]:
    """One finished run, read back from its folder."""
    from lora_rlhf.cli.outputs import read_metrics, read_summary
    from lora_rlhf.rlhf.hacking import count_hacks

    config = json.loads((folder / "adapter_config.json").read_text())
    s, phases, summary = config["training"], read_metrics(folder), read_summary(folder)
    after = json.loads((folder / "samples.json").read_text())["after"]
    rewards = [m["reward_mean"] for m in phases]
    running = [statistics.fmean(rewards[max(0, i - 4) : i + 1]) for i in range(len(rewards))]
    return {
        "algo": s["algo"],
        "seed": s["seed"],
        "folder": str(folder),
        "phases": len(phases),
        "reward_first": _number(summary["reward_first"]),
        "reward_last5": _number(summary["reward_last5"]),
        "reward_ratio": _number(summary["reward_ratio"]),
        "lowest_running5_after_10": min(running[10:], default=None),
        "kl_last5": _number(summary["kl_last5"]),
        "kl_final": _number(summary["kl_final"]),
        "reward_after": statistics.fmean(after["rewards"]),
        "samples_after": len(after["samples"]),
        # recomputed, so that runs saved before the meter existed count the same way
        "hacks_after": count_hacks(after["samples"], s["reward"], s["char"]),
        "phase_seconds": statistics.fmean(m["phase_seconds"] for m in phases),
        "rewards": rewards,
        "kl": [m["kl"] for m in phases],
    }


def run_missing(jobs: list[tuple[str, list[str], Path]], parallel: int) -> None:
    """Run the commands, ``parallel`` at a time; stop at the first that fails."""
    pending, running = list(jobs), []
    while pending or running:
        while pending and len(running) < parallel:
            name, argv, log = pending.pop(0)
            print(f"running {name}: {' '.join(argv[1:])} (load {os.getloadavg()[0]:.2f})")
            log.parent.mkdir(parents=True, exist_ok=True)
            proc = subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT)
            running.append((name, proc, log))
        time.sleep(1)
        for item in list(running):
            name, proc, log = item
            if proc.poll() is None:
                continue
            running.remove(item)
            if proc.returncode:
                for _, other, _ in running:
                    other.terminate()
                raise SystemExit(f"{name} failed (exit {proc.returncode}); its output: {log}")
            print(f"finished {name} (load {os.getloadavg()[0]:.2f})")


def spread(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}


def aggregate(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per algorithm: the spread over its seeds of each figure, and the share of seeds at ≥ 2×."""
    table = {}
    for algo in sorted({r["algo"] for r in runs}, key=ALGOS.index):
        mine = [r for r in runs if r["algo"] == algo]
        row = {"seeds": [r["seed"] for r in mine]}
        for key in ("reward_first", "reward_last5", "reward_ratio", "kl_last5", "reward_after"):
            row[key] = spread([r[key] for r in mine])
        row["phase_seconds"] = spread([r["phase_seconds"] for r in mine])
        row["at_least_2x"] = sum(r["reward_ratio"] >= THRESHOLD for r in mine) / len(mine)
        hacks = [r["hacks_after"] for r in mine]
        row["hacks_after"] = None if None in hacks else sum(hacks)
        row["samples_after"] = sum(r["samples_after"] for r in mine)
        table[algo] = row
    return table


def report(table: dict[str, dict[str, Any]]) -> str:
    def cell(d: dict[str, float], digits: int = 2) -> str:
        return f"{d['mean']:.{digits}f} ({d['min']:.{digits}f}–{d['max']:.{digits}f})"

    lines = [
        "| algo | seeds | first phase | last 5 phases | ratio | ≥ 2× | KL, last 5 | after training "
        "| reward hacks after | s/phase |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for algo, row in table.items():
        hacks = "n/a" if row["hacks_after"] is None else f"{row['hacks_after']}"
        lines.append(
            f"| {algo.upper()} | {', '.join(map(str, row['seeds']))} | {cell(row['reward_first'])} "
            f"| {cell(row['reward_last5'])} | ×{cell(row['reward_ratio'])} "
            f"| {row['at_least_2x']:.0%} | {cell(row['kl_last5'])} | {cell(row['reward_after'])} "
            f"| {hacks} of {row['samples_after']} | {cell(row['phase_seconds'], 1)} |"
        )
    return "\n".join(lines)


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    """Every run as one point: the last five phases' mean reward against their mean KL."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for i, algo in enumerate(sorted({r["algo"] for r in runs}, key=ALGOS.index)):
        mine = [r for r in runs if r["algo"] == algo]
        xs, ys = [r["kl_last5"] for r in mine], [r["reward_last5"] for r in mine]
        ax.scatter(xs, ys, color=f"C{i}", marker="os"[i % 2], label=algo.upper())
        for r, x, y in zip(mine, xs, ys):
            ax.annotate(str(r["seed"]), (x, y), textcoords="offset points", xytext=(4, 3))
    ax.set_xlabel("KL(π ‖ π_ref) per generated token, last 5 phases (nats)")
    ax.set_ylabel("mean reward, last 5 phases")
    ax.set_title("Every run (numbers: seeds)")
    ax.legend()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    p.add_argument("--algos", nargs="+", choices=ALGOS, default=list(ALGOS))
    p.add_argument("--runs-dir", type=Path, default=Path("runs/grpo_vs_ppo"),
                   help="run folders: finished runs of the same settings are reused")  # fmt: skip
    p.add_argument("--threads", type=int, help="passed to the command (default: torch's)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time")
    p.add_argument("--out", type=Path, help="write every run and the summary here (JSON)")
    p.add_argument("--plot", type=Path, help="the reward-against-KL scatter (PNG)")
    p.add_argument("--no-run", action="store_true", help="report the finished runs only")
    p.add_argument("options", nargs=argparse.REMAINDER,
                   help="after --: more `lora-rlhf train` options, the same for every run")  # fmt: skip
    opts = p.parse_args(argv)
    options = [o for o in opts.options if o != "--"]

    wanted, jobs = [], []
    for algo in opts.algos:
        for seed in opts.seeds:
            settings = planned_settings(algo, seed, options)
            folder = find_run(opts.runs_dir, settings)
            if folder is None and not opts.no_run:
                folder = opts.runs_dir / f"{algo}_s{seed}_{time.strftime('%Y%m%d-%H%M%S')}"
                argv = command(algo, seed, folder, opts.threads, options)
                jobs.append((f"{algo} seed {seed}", argv, folder.with_suffix(".log")))
            wanted.append(folder)
    run_missing(jobs, opts.jobs)
    runs = [run_record(folder) for folder in wanted if folder is not None]
    if not runs:
        raise SystemExit(f"no finished runs in {opts.runs_dir} (leave out --no-run to run them)")
    for r in runs:
        hacks = "n/a" if r["hacks_after"] is None else f"{r['hacks_after']}/{r['samples_after']}"
        print(
            f"{r['algo']:4} seed {r['seed']}: reward {r['reward_first']:.3f} -> "
            f"{r['reward_last5']:.3f} (×{r['reward_ratio']:.2f}), KL last 5 {r['kl_last5']:.3f}, "
            f"after {r['reward_after']:.3f}, hacks {hacks}, {r['phase_seconds']:.1f} s/phase"
        )
    table = aggregate(runs)
    print(report(table))
    if opts.out:
        opts.out.parent.mkdir(parents=True, exist_ok=True)
        record = {"options": options, "threads": opts.threads, "summary": table, "runs": runs}
        opts.out.write_text(json.dumps(record, indent=1) + "\n")
    if opts.plot:
        plot(runs, opts.plot)


if __name__ == "__main__":
    main()
