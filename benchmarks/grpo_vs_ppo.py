"""GRPO against PPO on the default task of `lora-rlhf train`, with the same wall-clock budget.

    python -m benchmarks.grpo_vs_ppo --budget 240 --seeds 1 2 3 --out docs/training/grpo_vs_ppo.json

For each seed, one PPO and one GRPO run start together, each in a fresh process on one thread
(``--threads``), so that both see the same load from the rest of the machine. Each runs the
command's default settings (``lora_rlhf.train_settings.DEFAULTS``: 30 phases, its learning-rate
schedule, its KL coefficient controller) and stops after the first phase that ends past the
budget (or after the 30 phases). Recorded per run: the phases done, the reward of the first
phase and the mean of the last five, the KL(π ‖ π_ref) per generated token of the last rollout
(full vocabulary for both), the mean phase time (and its rollout part), the peak resident memory
of training (VmHWM, reset after the model is loaded) and of the whole process, and the
machine's load average (``os.getloadavg``) at the start and the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _vm_hwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10
    return float("nan")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := current RSS
        return True
    except OSError:
        return False


def child(algo: str, seed: int, budget: float, threads: int) -> dict:
    import torch

    from lora_rlhf.train_settings import DEFAULTS, build_args
    from lora_rlhf.trainer import build_trainer

    torch.set_num_threads(threads)
    settings = dict(DEFAULTS, algo=algo, seed=seed)
    args = build_args(settings, "cpu", False, "benchmark")
    if algo == "grpo":
        from lora_rlhf.grpo_trainer import GRPOTrainer as trainer_class
    else:
        from lora_rlhf.lora import RLHFTrainerLora as trainer_class

    load_avg_start = os.getloadavg()
    start = time.perf_counter()
    trainer = build_trainer(trainer_class, args, show_progress=False)
    load_seconds = time.perf_counter() - start
    load_peak = _vm_hwm_mb()
    reset = _reset_peak()
    start = time.perf_counter()
    history = []
    while trainer.phase < args.total_phases and time.perf_counter() - start < budget:
        history.append(trainer.run_phase())
    seconds = time.perf_counter() - start
    rewards = [m["reward_mean"] for m in history]
    trained = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    return {
        "algo": algo,
        "seed": seed,
        "budget_s": budget,
        "threads": threads,
        "phases": len(history),
        "train_seconds": seconds,
        "load_seconds": load_seconds,
        "reward_first": rewards[0],
        "reward_last5": statistics.fmean(rewards[-5:]),
        "kl_last": history[-1]["kl"],
        "kl_coef_last": history[-1].get("kl_coef", args.kl_coef),
        "phase_seconds": statistics.fmean(m["phase_seconds"] for m in history),
        "rollout_seconds": statistics.fmean(m["rollout_seconds"] for m in history),
        "train_peak_rss_mb": _vm_hwm_mb() if reset else float("nan"),
        "load_peak_rss_mb": load_peak,
        "trained_params": sum(p.numel() for p in trained),
        "load_avg_start": load_avg_start,
        "load_avg_end": os.getloadavg(),
        "rewards": rewards,
        "kl": [m["kl"] for m in history],
    }


def plot(runs: list[dict], path: Path) -> None:
    """Reward per phase of every run: PPO dashed, GRPO solid, one colour per seed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    seeds = sorted({r["seed"] for r in runs})
    for r in runs:
        colour = f"C{seeds.index(r['seed'])}"
        style = "-" if r["algo"] == "grpo" else "--"
        ax.plot(r["rewards"], style, color=colour, marker="o", markersize=3,
                label=f"{r['algo'].upper()} seed {r['seed']}")  # fmt: skip
    ax.set_xlabel(f"phase (each run stopped after the first past {runs[0]['budget_s']:.0f} s)")
    ax.set_ylabel("mean reward (count of '.')")
    ax.set_title("GRPO (solid) against PPO (dashed), same wall-clock budget")
    ax.legend(ncols=3, fontsize="small")
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=240.0, help="training seconds per run")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--out", type=Path, help="write every run's results here (JSON)")
    p.add_argument("--plot", type=Path, help="draw the --out results into this PNG (no runs)")
    p.add_argument("--child", choices=("ppo", "grpo"), help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=1, help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.child:
        print(json.dumps(child(opts.child, opts.seed, opts.budget, opts.threads)))
        return
    if opts.plot:
        plot(json.loads(opts.out.read_text()), opts.plot)
        return

    runs = []
    for seed in opts.seeds:
        procs = {
            algo: subprocess.Popen(
                [sys.executable, "-m", "benchmarks.grpo_vs_ppo", "--child", algo]
                + ["--seed", str(seed), "--budget", str(opts.budget)]
                + ["--threads", str(opts.threads)],
                stdout=subprocess.PIPE,
                text=True,
                env={**os.environ, "OMP_NUM_THREADS": str(opts.threads)},
            )
            for algo in ("ppo", "grpo")
        }
        for algo, proc in procs.items():
            out, _ = proc.communicate()
            if proc.returncode:
                raise SystemExit(f"{algo} seed {seed} failed (exit {proc.returncode})")
            run = json.loads(out.strip().splitlines()[-1])
            runs.append(run)
            print(
                f"seed {seed} {algo:4}: {run['phases']} phases in {run['train_seconds']:.0f} s "
                f"({run['phase_seconds']:.1f} s/phase), reward {run['reward_first']:.2f} -> "
                f"{run['reward_last5']:.2f}, KL {run['kl_last']:.3f}, train peak "
                f"{run['train_peak_rss_mb']:.0f} MB, load {run['load_avg_start'][0]:.1f}"
                f"->{run['load_avg_end'][0]:.1f}",
                flush=True,
            )
        if opts.out:
            opts.out.parent.mkdir(parents=True, exist_ok=True)
            opts.out.write_text(json.dumps(runs, indent=1) + "\n")


if __name__ == "__main__":
    main()
