"""What a `lora-rlhf train` run writes, and how a saved run is read back.

:class:`RunRecorder` writes ``metrics.jsonl`` as each phase ends and, at the end (or on Ctrl-C),
the reward curve, the samples before/after, the adapter and the trainer state; :func:`restore`
loads a saved run into a freshly built trainer for ``--resume``; :func:`print_summary` is the
console summary.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from lora_rlhf.cli.settings import Plan, ResumePoint, reward_label
from lora_rlhf.rlhf.hacking import count_hacks

METRICS_FILE = "metrics.jsonl"
CURVE_FILE = "reward_curve.png"
SAMPLES_MD = "samples.md"
SAMPLES_JSON = "samples.json"
TRAINER_STATE = "trainer_state.pt"
# a folder holding one of these holds a run
RUN_FILES = ("adapter_config.json", METRICS_FILE, "checkpoints")
SUMMARY_EVENT = "summary"  # metrics.jsonl's last line: {"event": "summary", ...}


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


def _rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, [int(k) for k in keys], int(pos), int(has_gauss), float(gauss)],
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def _trained_params(trainer) -> list:
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
        _set_rng_state(state["rng"])
        if "kl_controller" in state and hasattr(trainer, "kl_controller"):
            trainer.kl_controller.load_state_dict(state["kl_controller"])
    if bases:  # this run's learning rates, not the saved ones (--base-lr may differ)
        trainer.scheduler.base_lrs = bases
    _continue_schedule(trainer, done)


# ------------------------------------------------------------------------------------ outputs


def _display(sample: str, bos: str | None) -> str:
    if bos and sample.startswith(bos):
        sample = sample[len(bos) :]
    return sample.replace("\n", "⏎").replace("```", "'''")


class RunRecorder:
    """Writes a run's outputs into its folder: a checkpoint and the metrics as phases end, the
    rest on save.

    ``critical`` makes a block that a stop signal does not cut short (the run's
    :meth:`lora_rlhf.cli.stop_signals.StopSignals.deferred`): the end of each phase runs in one.
    """

    def __init__(self, plan: Plan):
        self.plan = plan
        self.out = plan.out
        self.metrics_path = self.out / METRICS_FILE
        self.save_every = plan.settings.get("save_every", 1)
        self.critical = contextlib.nullcontext
        self.trainer = None
        self._snapshot: dict[str, Any] | None = None
        self.samples: dict[str, Any] = {}
        self._unwritten: list[dict[str, Any]] = []  # metrics of phases no checkpoint holds yet
        if plan.resume is not None:
            saved = plan.resume.folder / SAMPLES_JSON
            if saved.is_file():
                self.samples = {"before": json.loads(saved.read_text()).get("before")}

    def start(self, trainer) -> None:
        """(Re)write metrics.jsonl with the phases done so far (none, unless resuming); in one
        step, since a resumed run's file may be the only copy of its metrics."""
        self.trainer = trainer
        self.snapshot()
        with self.critical():
            _write_metrics(self.metrics_path, trainer.history)

    def on_phase_end(self, metrics: dict[str, Any]) -> None:
        """A phase ended: keep its state (and write a checkpoint when one is due), then its
        metrics line."""
        with self.critical():
            if not self.samples.get("before"):
                phase = metrics["phase"]
                what = "untrained adaptors" if phase == 0 else "first rollout of the resumed run"
                self.samples["before"] = self._rollout_record(
                    phase, f"rollout of phase {phase}, {what}"
                )
            self._unwritten.append(metrics)
            due = not self.save_every or self.trainer.phase % self.save_every == 0
            if self.save_every and due:
                try:
                    self.write_checkpoint()
                except OSError as err:  # a full disk, say: the run goes on, as do the old ones
                    due = False  # its metrics wait for the next checkpoint
                    phase = self.trainer.phase
                    _warn(f"checkpoint {phase} not written ({err}); the one before it stands")
            if due:
                self._append_metrics()
            self.snapshot()

    def _append_metrics(self) -> None:
        done = self.trainer.phase
        with open(self.metrics_path, "a") as f:
            for metrics in self._unwritten:
                if metrics["phase"] < done:  # not a phase a stop dropped
                    f.write(json.dumps(metrics) + "\n")
        self._unwritten = []

    def write_checkpoint(self) -> Path:
        """``checkpoints/phase-NNNNNN/``: the run's state now, in one step (see
        :mod:`lora_rlhf.cli.checkpoint`)."""
        from lora_rlhf.cli.checkpoint import write_checkpoint

        def fill(folder: Path) -> None:
            self._write_state(folder, interrupted=False, checkpoint=True)
            _write_metrics(folder / METRICS_FILE, self.trainer.history)
            before = {"before": self.samples.get("before")}
            (folder / SAMPLES_JSON).write_text(json.dumps(before, indent=1) + "\n")

        return write_checkpoint(self.out, self.trainer.phase, fill)

    def snapshot(self) -> None:
        """Keep the trained tensors, optimizer and random state as they are after a finished phase
        (a few MB with LoRA), so that Ctrl-C in the middle of a phase saves exactly the finished
        phases and ``--resume`` carries on as if never interrupted."""
        import copy

        trainer = self.trainer
        self._snapshot = {
            "phase": trainer.phase,
            "params": [p.detach().clone() for p in _trained_params(trainer)],
            "optimizer": copy.deepcopy(trainer.optimizer.state_dict()),
            "scheduler": copy.deepcopy(trainer.scheduler.state_dict()),
            "rng": _rng_state(),
            "kl_controller": _kl_controller_state(trainer),
        }

    def rewind(self) -> None:
        """Undo a phase cut short: back to the state of :meth:`snapshot`."""
        import torch

        trainer, snap = self.trainer, self._snapshot
        if snap is None:  # stopped before the first snapshot: nothing has changed yet
            return
        with torch.no_grad():
            for param, saved in zip(_trained_params(trainer), snap["params"]):
                param.copy_(saved)
        trainer.optimizer.load_state_dict(snap["optimizer"])
        trainer.scheduler.load_state_dict(snap["scheduler"])
        _set_rng_state(snap["rng"])
        if snap["kl_controller"] is not None:
            trainer.kl_controller.load_state_dict(snap["kl_controller"])
        trainer.phase = snap["phase"]
        trainer.history = [m for m in trainer.history if m["phase"] < snap["phase"]]

    def _rollout_record(self, phase: int, what: str) -> dict[str, Any]:
        trainer = self.trainer
        rewards = trainer.rewards.tolist() if trainer.rewards is not None else []
        return {"phase": phase, "what": what, "samples": list(trainer.samples), "rewards": rewards}

    def sample_after(self) -> None:
        """Sample a fresh batch from the trained policy (leaving the random state untouched)."""
        import torch

        trainer = self.trainer
        devices = [trainer.device] if trainer.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            sample_ids, samples = trainer.sample()
        rewards = trainer.compute_rewards(samples).tolist()
        self.samples["after"] = {
            "phase": trainer.phase,
            "what": f"fresh samples after {trainer.phase} phases of training",
            "samples": samples,
            "rewards": rewards,
            "kl": trainer.kl_to_reference(sample_ids),
        }

    def save_adapter(self, interrupted: bool) -> None:
        """adapter.safetensors + adapter_config.json + trainer_state.pt (each replaced
        atomically, the config last: its phase count is what ``--resume`` trusts)."""
        from lora_rlhf.adapters.files import ADAPTER_CONFIG, ADAPTER_WEIGHTS

        with tempfile.TemporaryDirectory(dir=self.out, prefix=".saving-") as tmp:
            tmp = Path(tmp)
            self._write_state(tmp, interrupted)
            # The trainer state first and the config last: a save cut short by a kill leaves them
            # disagreeing on the phase, which --resume detects; the config marks a saved run.
            for name in (TRAINER_STATE, ADAPTER_WEIGHTS, ADAPTER_CONFIG):
                with open(tmp / name, "rb+") as f:
                    os.fsync(f.fileno())
                os.replace(tmp / name, self.out / name)

    def _write_state(self, folder: Path, interrupted: bool, checkpoint: bool = False) -> None:
        """The adapter, its config (with the run's settings) and the trainer state into
        ``folder``; nothing here draws a random number or changes the trainer."""
        import torch

        import lora_rlhf
        from lora_rlhf.adapters.files import ADAPTER_CONFIG, save_adapter

        trainer, args = self.trainer, self.plan.rlhf_args
        save_adapter(trainer.model, folder, base_model=args.base_model)
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
        config.update(
            library="lora_rlhf",
            library_version=lora_rlhf.__version__,
            phases_done=trainer.phase,
            total_phases=args.total_phases,
            seed=args.seed,
            interrupted=interrupted,
            checkpoint=checkpoint,
            reward=reward_label(self.plan.settings),
            impl=self.plan.settings["impl"],
            training=self.plan.settings,
            torch_version=torch.__version__,
            saved_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )
        (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        torch.save(
            {
                "optimizer": trainer.optimizer.state_dict(),
                "scheduler": trainer.scheduler.state_dict(),
                "rng": _rng_state(),
                "phase": trainer.phase,
                "kl_controller": _kl_controller_state(trainer),
            },
            folder / TRAINER_STATE,
        )

    def save_plot(self) -> Path | None:
        from lora_rlhf.cli.plots import plot_reward_curve

        history = self.trainer.history
        if not history:
            return None
        title = f"{self.plan.rlhf_args.base_model} + LoRA r={self.plan.rlhf_args.lora_rank}: RLHF"
        return plot_reward_curve(
            history,
            self.out / CURVE_FILE,
            title=title,
            reward_label=reward_label(self.plan.settings),
        )

    def save_adaptor_map(self) -> None:
        """adaptor_map.png: where the adaptors changed the weights (lora_rlhf.adapters.adaptor_map)."""
        from lora_rlhf.adapters.adaptor_map import MAP_FILE, save_adaptor_map

        args = self.plan.rlhf_args
        title = (
            f"{args.base_model} + LoRA r={args.lora_rank}, α={args.lora_alpha:g}: {self.out.name}"
        )
        save_adaptor_map(self.trainer.model, self.out / MAP_FILE, title=title)

    def save_samples(self) -> None:
        (self.out / SAMPLES_JSON).write_text(json.dumps(self.samples, indent=1) + "\n")
        tokenizer = getattr(self.trainer.model, "tokenizer", None)
        bos = getattr(tokenizer, "bos_token", None)
        s = self.plan.settings
        lines = [
            f"# Samples of `{self.out.name}`",
            "",
            f"Model `{s['model']}`, prompt {s['prefix']!r}, {s['gen_len']} generated tokens, "
            f"temperature {s['temperature']}, top-k {s['top_k'] or 'off'}. "
            f"Reward: {reward_label(s)} (prompt included).",
        ]
        for key, heading in (("before", "Before training"), ("after", "After training")):
            record = self.samples.get(key)
            if not record:
                continue
            rewards = record["rewards"]
            mean = sum(rewards) / len(rewards) if rewards else float("nan")
            hacks = count_hacks(record["samples"], s["reward"], s["char"])
            lines += [
                "",
                f"## {heading} — {record['what']}",
                "",
                f"Mean reward {mean:.3f} over {len(rewards)} samples."
                + (
                    f" KL(π‖π_ref) {record['kl']:.3f} nats per generated token."
                    if "kl" in record
                    else ""
                )
                + ("" if hacks is None else f" {_hacks_label(hacks, len(rewards)).capitalize()}."),
                "",
                "```text",
                *(f"[{r:g}] {_display(t, bos)}" for t, r in zip(record["samples"], rewards)),
                "```",
            ]
        (self.out / SAMPLES_MD).write_text("\n".join(lines) + "\n")

    def save_all(self, interrupted: bool) -> None:
        """Everything: after an interruption, the last rollout stands in for fresh samples."""
        self.save_adapter(interrupted)
        self._append_metrics()  # the phases since the last checkpoint (with --save-every N)
        self.save_plot()
        if interrupted and self.trainer.sample_history:
            start = self.plan.resume.phases_done if self.plan.resume else 0
            phase = start + len(self.trainer.sample_history) - 1
            what = f"rollout of phase {phase}, the last before the interruption"
            self.samples["after"] = self._rollout_record(phase, what)
        elif not interrupted:
            self.sample_after()
        self.save_samples()
        self.save_summary()
        self.save_adaptor_map()  # last: everything else is saved even if a student's class trips it

    def summary(self) -> dict[str, Any]:
        """:func:`summarize` of the history, with the KL of the fresh samples after training, their
        number, mean reward and reward hacks (``lora_rlhf.rlhf.hacking``; None for a reward without a
        rule)."""
        after = self.samples.get("after") or {}
        rewards, s = after.get("rewards") or [], self.plan.settings
        return {
            **summarize(self.trainer.history, kl_final=after.get("kl")),
            "samples_after": len(rewards),
            "reward_after": sum(rewards) / len(rewards) if rewards else math.nan,
            "hacks_after": count_hacks(after.get("samples") or [], s["reward"], s["char"]),
        }

    def save_summary(self) -> None:
        """Append the summary line to ``metrics.jsonl`` (``start`` rewrites the file without it)."""
        line = {"event": SUMMARY_EVENT, "phases_done": self.trainer.phase, **self.summary()}
        line = {k: None if isinstance(v, float) and not math.isfinite(v) else v
                for k, v in line.items()}  # fmt: skip
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(line) + "\n")


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


def _warn(text: str) -> None:
    import sys

    print(f"lora-rlhf train: warning: {text}", file=sys.stderr, flush=True)


def _write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    """metrics.jsonl with these phases, replacing the file in one step."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.writelines(json.dumps(metrics) + "\n" for metrics in history)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _kl_controller_state(trainer) -> dict[str, Any] | None:
    controller = getattr(trainer, "kl_controller", None)
    return None if controller is None else controller.state_dict()


def _hacks_label(hacks: int, total: int) -> str:
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
            + ("" if hacks is None else f"; {_hacks_label(hacks, s['samples_after'])}")
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
