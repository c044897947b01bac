"""How a saved `lora-rlhf train` run is read back, and what it reached.

:func:`read_metrics` and :func:`read_summary` read ``metrics.jsonl``; :func:`restore` loads a
saved run into a freshly built trainer for ``--resume``; :func:`summarize` and
:func:`print_summary` say what a run reached. The writing side is :mod:`lora_rlhf.cli.recorder`.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

from lora_rlhf.cli.run_files import (
    CURVE_FILE,
    METRICS_FILE,
    SAMPLES_MD,
    SUMMARY_EVENT,
    TRAINER_STATE,
)
from lora_rlhf.cli.settings import Plan, ResumePoint, reward_label

# ------------------------------------------------------------------------------------ state


def _metrics_lines(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The per-phase metrics of a run folder (or of its ``metrics.jsonl``)."""
    return [m for m in _metrics_lines(path) if "phase" in m]


def read_summary(path: str | Path) -> dict[str, Any] | None:
    """The summary line a finished (or interrupted) run appends to ``metrics.jsonl``: rewards,
    their ratio, and the final KL (see :func:`summarize`); None before the run ends."""
    summaries = [m for m in _metrics_lines(path) if m.get("event") == SUMMARY_EVENT]
    return summaries[-1] if summaries else None


def rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, [int(k) for k in keys], int(pos), int(has_gauss), float(gauss)],
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def trained_params(trainer) -> list:
    return [p for group in trainer.optimizer.param_groups for p in group["params"]]


def _continue_schedule(trainer, phases_done: int) -> None:
    """Set the learning rates to where the schedule is after ``phases_done`` phases."""
    scheduler = trainer.scheduler
    lambdas = getattr(scheduler, "lr_lambdas", None)
    groups = trainer.optimizer.param_groups
    if lambdas is None:  # not a LambdaLR: replay the steps
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()"
            for _ in range(phases_done):
                scheduler.step()
        return
    bases = list(scheduler.base_lrs)
    for group, base, lr_lambda in zip(groups, bases, lambdas):
        group["initial_lr"] = base
        group["lr"] = base * lr_lambda(phases_done)
    scheduler.last_epoch = phases_done
    scheduler._last_lr = [group["lr"] for group in groups]


def restore(trainer, resume: ResumePoint) -> None:
    """Load a saved run into a freshly built trainer: adaptors, value head, phase count, history,
    optimizer and random-number state (when saved), and the learning-rate schedule."""
    import torch

    from lora_rlhf.adapters.files import load_adapter

    load_adapter(trainer.model, resume.folder)
    done = resume.phases_done
    trainer.phase = done
    trainer.history = [m for m in read_metrics(resume.folder) if m["phase"] < done]
    state_path = resume.folder / TRAINER_STATE
    bases = list(getattr(trainer.scheduler, "base_lrs", []))
    if state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        trainer.optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        if "kl_controller" in state and hasattr(trainer, "kl_controller"):
            trainer.kl_controller.load_state_dict(state["kl_controller"])
    if bases:  # this run's learning rates, not the saved ones (--base-lr may differ)
        trainer.scheduler.base_lrs = bases
    _continue_schedule(trainer, done)


# ------------------------------------------------------------------------------------ run


def summarize(history: list[dict[str, Any]], kl_final: float | None = None) -> dict[str, float]:
    """What a run reached (NaN when undefined).

    ``reward_first``: the first phase's mean reward; ``reward_last5``: the mean over the last five
    phases; ``reward_ratio``: last5 / first; ``kl_last5``: the rollouts' KL(π ‖ π_ref) per
    generated token, mean over the last five phases; ``kl_final``: the trained policy's, on the
    fresh samples after training (when given); ``kl_coef_final``: the last phase's KL coefficient.
    """
    nan = math.nan
    if not history:
        return dict.fromkeys(
            (
                "reward_first",
                "reward_last5",
                "reward_ratio",
                "kl_last5",
                "kl_final",
                "kl_coef_final",
            ),
            nan,
        )

    def last5_mean(key: str) -> float:
        values = [m.get(key, nan) for m in history[-5:]]
        return sum(values) / len(values)

    first, last5 = history[0]["reward_mean"], last5_mean("reward_mean")
    return {
        "reward_first": first,
        "reward_last5": last5,
        "reward_ratio": last5 / first if first > 0 else nan,
        "kl_last5": last5_mean("kl"),
        "kl_final": nan if kl_final is None else kl_final,
        "kl_coef_final": history[-1].get("kl_coef", nan),
    }


def kl_controller_state(trainer) -> dict[str, Any] | None:
    controller = getattr(trainer, "kl_controller", None)
    return None if controller is None else controller.state_dict()


def hacks_label(hacks: int, total: int) -> str:
    return f"reward hacks {hacks} of {total} (lora_rlhf.rlhf.hacking)"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{seconds:.1f}s"


def print_summary(
    plan: Plan,
    trainer,
    seconds: float,
    cpu_seconds: float,
    this_run: int,
    interrupted: bool,
    summary: dict[str, Any] | None = None,
) -> None:
    from lora_rlhf.adapters.adaptor_map import MAP_FILE

    s, out = summary or summarize(trainer.history), plan.out
    total = plan.rlhf_args.total_phases
    state = (
        f"Interrupted after {trainer.phase} of {total} phases"
        if interrupted
        else f"Done: {trainer.phase} phases"
    )
    per_phase = f" ({seconds / this_run:.1f} s/phase)" if this_run else ""
    print(
        f"\n{state}; {this_run} this run in {_duration(seconds)}{per_phase}, "
        f"CPU time {_duration(cpu_seconds)}."
    )
    if trainer.history:
        ratio = f"×{s['reward_ratio']:.2f}" if math.isfinite(s["reward_ratio"]) else "ratio n/a"
        print(
            f"Reward ({reward_label(plan.settings)}): first phase {s['reward_first']:.3f}, "
            f"last 5 phases {s['reward_last5']:.3f} ({ratio})."
        )
        final = f", trained policy {s['kl_final']:.3f}" if math.isfinite(s["kl_final"]) else ""
        print(
            f"KL(π‖π_ref) per generated token: last 5 phases {s['kl_last5']:.3f} nats{final}; "
            f"KL coefficient at the end {s['kl_coef_final']:.4g}."
        )
    if s.get("samples_after"):
        hacks = s.get("hacks_after")
        print(
            f"Fresh samples after training: mean reward {s['reward_after']:.3f} over "
            f"{s['samples_after']}"
            + ("" if hacks is None else f"; {hacks_label(hacks, s['samples_after'])}")
            + "."
        )
    print(f"Output in {out}/:")
    for name, what in (
        (METRICS_FILE, "per-phase metrics"),
        (CURVE_FILE, "reward curve"),
        (MAP_FILE, "adaptor map: where the adaptors changed the weights"),
        (SAMPLES_MD, "samples before/after training"),
        (
            "adapter.safetensors",
            ("LoRA weights" if plan.settings.get("algo") == "grpo" else "LoRA + value-head weights")
            + " (config: adapter_config.json)",
        ),
    ):
        if (out / name).exists():
            print(f"  {out / name}  — {what}")
    more = total if interrupted else total * 2
    print(f"Continue with: lora-rlhf train --resume {out} --phases {more}")
