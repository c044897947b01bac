"""What a `lora-rlhf train` run writes into its folder.

:class:`RunRecorder` writes ``metrics.jsonl`` as each phase ends (with a checkpoint when one is
due) and, at the end (or on a stop), the reward curve, the samples before/after, the adapter and
the trainer state. Reading a saved run back is :mod:`lora_rlhf.cli.outputs`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from lora_rlhf.cli.outputs import (
    hacks_label,
    kl_controller_state,
    rng_state,
    set_rng_state,
    summarize,
    trained_params,
)
from lora_rlhf.cli.run_files import (
    CURVE_FILE,
    METRICS_FILE,
    SAMPLES_JSON,
    SAMPLES_MD,
    SUMMARY_EVENT,
    TRAINER_STATE,
)
from lora_rlhf.cli.settings import Plan, reward_label
from lora_rlhf.rlhf.hacking import count_hacks


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
            "params": [p.detach().clone() for p in trained_params(trainer)],
            "optimizer": copy.deepcopy(trainer.optimizer.state_dict()),
            "scheduler": copy.deepcopy(trainer.scheduler.state_dict()),
            "rng": rng_state(),
            "kl_controller": kl_controller_state(trainer),
        }

    def rewind(self) -> None:
        """Undo a phase cut short: back to the state of :meth:`snapshot`."""
        import torch

        trainer, snap = self.trainer, self._snapshot
        if snap is None:  # stopped before the first snapshot: nothing has changed yet
            return
        with torch.no_grad():
            for param, saved in zip(trained_params(trainer), snap["params"]):
                param.copy_(saved)
        trainer.optimizer.load_state_dict(snap["optimizer"])
        trainer.scheduler.load_state_dict(snap["scheduler"])
        set_rng_state(snap["rng"])
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
                "rng": rng_state(),
                "phase": trainer.phase,
                "kl_controller": kl_controller_state(trainer),
            },
            folder / TRAINER_STATE,
        )

    def save_plot(self) -> Path | None:
        from lora_rlhf.plots import plot_reward_curve

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
                + ("" if hacks is None else f" {hacks_label(hacks, len(rewards)).capitalize()}."),
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
