"""`lora-rlhf train`: PPO-RLHF with LoRA adaptors on the embedded model, from the command line.

The run (see ``docs/training.md``):

1. checks every option — and the output folder, the ``--impl`` submission, the ``--resume``
   checkpoint — *before* a model is loaded; a bad one exits with status 2 and one line on stderr;
2. trains :class:`~lora_rlhf.lora.RLHFTrainerLora` (with the ``--impl`` classes) under a progress
   bar that shows the reward;
3. writes into ``--out``: ``metrics.jsonl`` (one line per phase, as it goes), ``reward_curve.png``,
   ``samples.md`` (before/after training), ``adapter.safetensors`` + ``adapter_config.json`` (the
   LoRA and value-head weights, in the format of :mod:`lora_rlhf.adapters`) and
   ``trainer_state.pt`` (optimizer and random-number state, so ``--resume`` continues exactly);
4. prints a summary. Ctrl-C stops after saving what was learned so far (exit status 130).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

METRICS_FILE = "metrics.jsonl"
CURVE_FILE = "reward_curve.png"
SAMPLES_MD = "samples.md"
SAMPLES_JSON = "samples.json"
TRAINER_STATE = "trainer_state.pt"
RUN_FILES = ("adapter_config.json", METRICS_FILE)  # a folder holding one of these holds a run

# The default run: SmolLM2-135M learns to write more full stops after "This is". Chosen to finish
# within 10 minutes on 2 CPU cores; the measurements behind it are in docs/training.md.
DEFAULTS: dict[str, Any] = {
    "model": "smollm2-135m",
    "reward": "char_count",
    "char": ".",
    "prefix": "This is",
    "phases": 30,
    "batch_size": 16,
    "minibatches": 2,
    "batches_per_phase": 2,
    "gen_len": 8,
    "rank": 4,
    "alpha": 32.0,
    "base_lr": 1e-3,
    "head_lr": 1e-3,
    "kl_coef": 0.05,
    "ent_coef": 0.001,
    "warmup": 2,
    "final_scale": 0.1,
    "temperature": 1.0,
    "top_k": 10,
    "seed": 1,
    "dtype": "float32",
    "impl": "library",
}

# option (its dest) -> RLHFArgsLora field
ARGS_FIELDS = {
    "model": "base_model",
    "prefix": "prefix",
    "phases": "total_phases",
    "batch_size": "batch_size",
    "minibatches": "num_minibatches",
    "batches_per_phase": "batches_per_learning_phase",
    "gen_len": "gen_len",
    "rank": "lora_rank",
    "alpha": "lora_alpha",
    "base_lr": "base_lr",
    "head_lr": "head_lr",
    "kl_coef": "kl_coef",
    "ent_coef": "ent_coef",
    "warmup": "warmup_steps",
    "final_scale": "final_scale",
    "temperature": "temperature",
    "top_k": "top_k",
    "seed": "seed",
}
FIELD_FLAGS = {field: "--" + dest.replace("_", "-") for dest, field in ARGS_FIELDS.items()}
# Options a resumed run must keep: the saved adaptors only fit the same model, rank and alpha.
FIXED_ON_RESUME = ("model", "rank", "alpha")
DTYPES = ("float32", "bfloat16", "float16")


class UsageError(Exception):
    """A bad option, found before any model is loaded; the message is one line."""


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


# ------------------------------------------------------------------------------------ parser


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``train`` on the ``lora-rlhf`` subcommand parser."""
    p = subparsers.add_parser(
        "train",
        help="RLHF with LoRA on the embedded model: metrics, reward curve, samples, adapter",
        description=__doc__.split("\n\n", 1)[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Defaults are the settings of the documented default run (docs/training.md). "
        "With --resume, an option left out keeps the resumed run's value.",
    )
    d = DEFAULTS

    def opt(group, *flags, help, **kw):
        dest = flags[0].lstrip("-").replace("-", "_")
        default = d.get(dest)
        suffix = f" (default: {default})" if default is not None else ""
        kw.setdefault("metavar", {int: "N", float: "X"}.get(kw.get("type"), dest.upper()))
        # default None: an option given on the command line can be told from one left out.
        group.add_argument(*flags, default=None, help=help + suffix, **kw)

    what = p.add_argument_group("what to train")
    opt(
        what,
        "--model",
        help="base model: smollm2-135m, tiny-llama, tiny-pythia or a TransformerLens name",
    )
    opt(
        what,
        "--impl",
        help="whose classes: library, solutions, exercises, or a submission's .py file/folder",
    )
    opt(what, "--reward", help="reward function: char_count, length or no_char")
    opt(what, "--char", help="the character char_count counts (and no_char penalises)")
    opt(what, "--prefix", help="the prompt every sample continues")

    hp = p.add_argument_group("hyperparameters")
    opt(hp, "--phases", type=int, help="total phases (rollout + learning phase)")
    opt(hp, "--batch-size", type=int, help="samples per rollout")
    opt(
        hp,
        "--minibatches",
        type=int,
        help="minibatches per pass over the rollout (divides --batch-size)",
    )
    opt(hp, "--batches-per-phase", type=int, help="passes over each rollout in its learning phase")
    opt(hp, "--gen-len", type=int, help="tokens generated per sample")
    opt(hp, "--rank", type=int, help="LoRA rank r")
    opt(hp, "--alpha", type=float, help="LoRA alpha (the update is scaled by alpha/r)")
    opt(hp, "--base-lr", type=float, help="learning rate of the adaptors")
    opt(hp, "--head-lr", type=float, help="learning rate of the value head")
    opt(hp, "--kl-coef", type=float, help="weight of the KL penalty against the base model")
    opt(hp, "--ent-coef", type=float, help="weight of the entropy bonus")
    opt(hp, "--warmup", type=int, help="phases of linear learning-rate warm-up")
    opt(hp, "--final-scale", type=float, help="learning-rate multiplier reached at the last phase")
    opt(hp, "--temperature", type=float, help="sampling temperature")
    opt(hp, "--top-k", type=int, help="sample from the k likeliest tokens (0: all)")
    opt(hp, "--seed", type=int, help="random seed (same seed and device: same metrics)")
    opt(hp, "--dtype", choices=DTYPES, help="dtype of the model and adaptors")

    run = p.add_argument_group("run")
    run.add_argument(
        "--out", help="output folder (default: runs/<timestamp>; with --resume, the resumed folder)"
    )
    run.add_argument(
        "--resume",
        metavar="DIR_OR_ADAPTER",
        help="continue a saved run: its folder or its adapter file",
    )
    run.add_argument("--device", help="cpu, cuda, cuda:1, … (default: cuda when present, else cpu)")
    run.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: torch's; 1 helps on a busy machine)",
    )
    run.add_argument(
        "--wandb", action="store_true", help="log to Weights & Biases (offline without an API key)"
    )
    run.add_argument(
        "--wandb-project", default="lora-rlhf", help="wandb project (default: lora-rlhf)"
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_command)
    return p


# ------------------------------------------------------------------------------------ checks


@dataclasses.dataclass
class ResumePoint:
    """A saved run to continue."""

    folder: Path
    config: dict[str, Any]
    phases_done: int


@dataclasses.dataclass
class Plan:
    """Everything a run needs, checked; no model loaded yet."""

    settings: dict[str, Any]
    rlhf_args: Any  # RLHFArgsLora
    trainer_class: type
    out: Path
    resume: ResumePoint | None
    threads: int | None
    show_progress: bool


def _read_resume_point(spec: str) -> ResumePoint:
    from lora_rlhf.adapters import (
        ADAPTER_CONFIG,
        ADAPTER_WEIGHTS,
        AdapterMismatchError,
        read_adapter_config,
    )

    path = Path(spec)
    if not path.exists():
        raise UsageError(f"--resume {spec}: no such file or folder")
    folder = path if path.is_dir() else path.parent
    if not (folder / ADAPTER_CONFIG).is_file():
        raise UsageError(f"--resume {spec}: no saved run there ({ADAPTER_CONFIG} is missing)")
    try:
        config = read_adapter_config(folder)
    except (AdapterMismatchError, json.JSONDecodeError, OSError) as err:
        raise UsageError(f"--resume {spec}: {err}") from None
    if not (folder / ADAPTER_WEIGHTS).is_file():
        raise UsageError(f"--resume {spec}: {folder / ADAPTER_WEIGHTS} is missing")
    done = config.get("phases_done")
    if not isinstance(done, int) or done < 0:
        raise UsageError(
            f"--resume {spec}: its adapter_config.json has no phases_done "
            "(only a folder written by `lora-rlhf train` can be resumed)"
        )
    return ResumePoint(folder=folder, config=config, phases_done=done)


def _merge_settings(args: argparse.Namespace, resume: ResumePoint | None) -> dict[str, Any]:
    """DEFAULTS, then the resumed run's settings, then the options given on the command line."""
    given = {k: getattr(args, k) for k in DEFAULTS if getattr(args, k, None) is not None}
    settings = dict(DEFAULTS)
    if resume is not None:
        saved = dict(resume.config.get("training") or {})
        saved.update(
            model=resume.config["base_model"],
            rank=resume.config["rank"],
            alpha=float(resume.config["lora_alpha"]),
        )
        for key in FIXED_ON_RESUME:
            if key in given and given[key] != saved[key]:
                raise UsageError(
                    f"{_flag(key)} {given[key]}: the resumed run has {_flag(key)} {saved[key]} "
                    "(its adaptors only fit that)"
                )
        settings.update({k: v for k, v in saved.items() if k in DEFAULTS})
    settings.update(given)
    return settings


def _check_numbers(s: dict[str, Any]) -> None:
    def require(ok: bool, dest: str, what: str) -> None:
        if not ok:
            raise UsageError(f"{_flag(dest)} {s[dest]}: {what}")

    for dest in ("phases", "batch_size", "minibatches", "batches_per_phase", "gen_len"):
        require(s[dest] > 0, dest, "must be a positive integer")
    require(s["rank"] > 0, "rank", "the LoRA rank must be a positive integer")
    require(math.isfinite(s["alpha"]) and s["alpha"] > 0, "alpha", "LoRA alpha must be > 0")
    require(
        s["batch_size"] % s["minibatches"] == 0,
        "batch_size",
        f"must be divisible by --minibatches {s['minibatches']}",
    )
    require(s["warmup"] >= 0, "warmup", "must be >= 0")
    require(
        s["warmup"] < s["phases"],
        "phases",
        f"must be greater than --warmup {s['warmup']} (the learning rate must finish warming up)",
    )
    for dest in ("base_lr", "head_lr", "kl_coef", "ent_coef", "final_scale"):
        require(math.isfinite(s[dest]) and s[dest] >= 0, dest, "must be a number >= 0")
    require(s["temperature"] > 0, "temperature", "must be > 0")
    require(s["top_k"] >= 0, "top_k", "must be >= 0 (0: no top-k filtering)")
    require(s["dtype"] in DTYPES, "dtype", f"must be one of {', '.join(DTYPES)}")
    require(len(str(s["char"])) > 0, "char", "must not be empty")


def _check_reward(s: dict[str, Any], char_given: bool) -> None:
    from lora_rlhf.rewards import REWARDS

    if s["reward"] not in REWARDS:
        raise UsageError(
            f"--reward {s['reward']}: unknown reward; known: {', '.join(sorted(REWARDS))}"
        )
    if char_given and s["reward"] not in ("char_count", "no_char"):
        raise UsageError(f"--char applies to the char_count and no_char rewards, not {s['reward']}")


def _check_model(name: str) -> None:
    from lora_rlhf.models import ModelUnavailableError, check_model_name

    try:
        check_model_name(name)
    except ModelUnavailableError as err:
        raise UsageError(f"--model {name}: {err}") from None


def _check_device(spec: str | None) -> None:
    if spec is None:
        return
    import torch

    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError) as err:
        raise UsageError(f"--device {spec}: {err}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec}: CUDA is not available here (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {spec}: MPS is not available here (use --device cpu)")


def _trainer_class(impl_spec: str) -> type:
    """RLHFTrainerLora, training the ``--impl`` submission's ``TransformerWithValueHeadLora``."""
    from lora_rlhf.impl import ImplementationError, load_impl
    from lora_rlhf.lora import RLHFTrainerLora
    from lora_rlhf.value_head import HookedTransformerWithValueHead

    if impl_spec == "library":
        return RLHFTrainerLora
    try:
        module = load_impl(impl_spec)
    except ImplementationError as err:
        raise UsageError(f"--impl {impl_spec}: {err}") from None
    except Exception as err:  # the submission's own code failed on import
        raise UsageError(
            f"--impl {impl_spec}: importing it raised {type(err).__name__}: {err}"
        ) from None
    model_class = module.TransformerWithValueHeadLora
    if not issubclass(model_class, HookedTransformerWithValueHead):
        raise UsageError(
            f"--impl {impl_spec}: its TransformerWithValueHeadLora must subclass "
            "lora_rlhf.value_head.HookedTransformerWithValueHead"
        )
    return type("RLHFTrainerLora", (RLHFTrainerLora,), {"model_class": model_class})


def make_reward_fn(name: str, char: str):
    """The registered reward ``name``; char_count and no_char count ``char``."""
    from lora_rlhf.rewards import REWARDS

    fn = REWARDS[name]
    if name not in ("char_count", "no_char"):
        return fn
    reward = functools.partial(fn, char=char)
    reward.__name__ = f"{name}({char!r})"
    return reward


def reward_label(settings: dict[str, Any]) -> str:
    char = settings["char"]
    return {
        "char_count": f"count of {char!r} per sample",
        "no_char": f"− count of {char!r} per sample",
        "length": "length of the sample (characters)",
    }.get(settings["reward"], settings["reward"])


def _build_args(settings: dict[str, Any], device: str | None, wandb: bool, wandb_project: str):
    import torch

    from lora_rlhf.args import ArgsError
    from lora_rlhf.lora import RLHFArgsLora

    fields = {field: settings[dest] for dest, field in ARGS_FIELDS.items()}
    fields["top_k"] = fields["top_k"] or None
    fields["dtype"] = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        settings["dtype"]
    ]
    try:
        return RLHFArgsLora(
            **fields,
            reward_fn=make_reward_fn(settings["reward"], settings["char"]),
            device=device,
            use_wandb=wandb,
            wandb_project_name=wandb_project,
        )
    except (ArgsError, ValueError) as err:
        message = str(err)
        field = message.split(":", 1)[0]
        if field in FIELD_FLAGS:  # "batch_size: must be …" -> "--batch-size: must be …"
            message = FIELD_FLAGS[field] + message[len(field) :]
        raise UsageError(message) from None


def _default_out() -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path("runs") / stamp
    n = 1
    while out.exists():
        n += 1
        out = Path("runs") / f"{stamp}-{n}"
    return out


def _check_out(out: Path, resume: ResumePoint | None) -> None:
    """The output folder exists (created now) and takes files; it never overwrites another run."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")
    same_as_resumed = (
        resume is not None and out.exists() and out.resolve() == resume.folder.resolve()
    )
    if out.is_dir() and not same_as_resumed:
        held = [name for name in RUN_FILES if (out / name).exists()]
        if held:
            raise UsageError(
                f"--out {out}: already holds a run ({held[0]}); continue it with --resume {out} "
                "or choose another folder"
            )
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as err:
        reason = err.strerror or str(err)
        raise UsageError(f"--out {out}: the output folder is not writable ({reason})") from None


def prepare(args: argparse.Namespace) -> Plan:
    """Check every option; raise :class:`UsageError` on the first bad one. Loads no model."""
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads {args.threads}: must be >= 1")
    resume = _read_resume_point(args.resume) if args.resume else None
    settings = _merge_settings(args, resume)
    _check_numbers(settings)
    _check_reward(settings, char_given=args.char is not None)
    _check_model(settings["model"])
    if resume is not None and resume.phases_done >= settings["phases"]:
        raise UsageError(
            f"--resume {args.resume}: the run already did {resume.phases_done} phases; "
            f"pass --phases N with N > {resume.phases_done} to train further"
        )
    _check_device(args.device)
    trainer_class = _trainer_class(settings["impl"])
    if settings["impl"] not in ("library", "solutions", "exercises"):
        settings["impl"] = str(Path(settings["impl"]).resolve())  # saved for --resume
    rlhf_args = _build_args(settings, args.device, bool(args.wandb), args.wandb_project)
    if args.out:
        out = Path(args.out)
    elif resume is not None:
        out = resume.folder
    else:
        out = _default_out()
    _check_out(out, resume)
    return Plan(
        settings=settings,
        rlhf_args=rlhf_args,
        trainer_class=trainer_class,
        out=out,
        resume=resume,
        threads=args.threads,
        show_progress=not args.no_progress,
    )


# ------------------------------------------------------------------------------------ state


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The per-phase metrics of a run folder (or of its ``metrics.jsonl``)."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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

    from lora_rlhf.adapters import load_adapter

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
    if bases:  # this run's learning rates, not the saved ones (--base-lr may differ)
        trainer.scheduler.base_lrs = bases
    _continue_schedule(trainer, done)


# ------------------------------------------------------------------------------------ outputs


def _display(sample: str, bos: str | None) -> str:
    if bos and sample.startswith(bos):
        sample = sample[len(bos) :]
    return sample.replace("\n", "⏎").replace("```", "'''")


class RunRecorder:
    """Writes a run's outputs into its folder: metrics as each phase ends, the rest on save."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.out = plan.out
        self.metrics_path = self.out / METRICS_FILE
        self.trainer = None
        self.samples: dict[str, Any] = {}
        if plan.resume is not None:
            saved = plan.resume.folder / SAMPLES_JSON
            if saved.is_file():
                self.samples = {"before": json.loads(saved.read_text()).get("before")}

    def start(self, trainer) -> None:
        """(Re)write metrics.jsonl with the phases done so far (none, unless resuming)."""
        self.trainer = trainer
        with open(self.metrics_path, "w") as f:
            for metrics in trainer.history:
                f.write(json.dumps(metrics) + "\n")
        self.snapshot()

    def on_phase_end(self, metrics: dict[str, Any]) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if not self.samples.get("before"):
            phase = metrics["phase"]
            what = "untrained adaptors" if phase == 0 else "first rollout of the resumed run"
            self.samples["before"] = self._rollout_record(
                phase, f"rollout of phase {phase}, {what}"
            )
        self.snapshot()

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
        }

    def rewind(self) -> None:
        """Undo a phase cut short: back to the state of :meth:`snapshot`."""
        import torch

        trainer, snap = self.trainer, self._snapshot
        with torch.no_grad():
            for param, saved in zip(_trained_params(trainer), snap["params"]):
                param.copy_(saved)
        trainer.optimizer.load_state_dict(snap["optimizer"])
        trainer.scheduler.load_state_dict(snap["scheduler"])
        _set_rng_state(snap["rng"])
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
            _, samples = trainer.sample()
        rewards = trainer.compute_rewards(samples).tolist()
        self.samples["after"] = {
            "phase": trainer.phase,
            "what": f"fresh samples after {trainer.phase} phases of training",
            "samples": samples,
            "rewards": rewards,
        }

    def save_adapter(self, interrupted: bool) -> None:
        """adapter.safetensors + adapter_config.json + trainer_state.pt (replaced atomically)."""
        import torch

        import lora_rlhf
        from lora_rlhf.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, save_adapter

        trainer, args = self.trainer, self.plan.rlhf_args
        with tempfile.TemporaryDirectory(dir=self.out, prefix=".saving-") as tmp:
            tmp = Path(tmp)
            save_adapter(trainer.model, tmp, base_model=args.base_model)
            config = json.loads((tmp / ADAPTER_CONFIG).read_text())
            config.update(
                library="lora_rlhf",
                library_version=lora_rlhf.__version__,
                phases_done=trainer.phase,
                total_phases=args.total_phases,
                seed=args.seed,
                interrupted=interrupted,
                reward=reward_label(self.plan.settings),
                impl=self.plan.settings["impl"],
                training=self.plan.settings,
                torch_version=torch.__version__,
                saved_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            )
            (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
            torch.save(
                {
                    "optimizer": trainer.optimizer.state_dict(),
                    "rng": _rng_state(),
                    "phase": trainer.phase,
                },
                tmp / TRAINER_STATE,
            )
            # The config goes last: its presence marks a saved run.
            for name in (ADAPTER_WEIGHTS, TRAINER_STATE, ADAPTER_CONFIG):
                os.replace(tmp / name, self.out / name)

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
            lines += [
                "",
                f"## {heading} — {record['what']}",
                "",
                f"Mean reward {mean:.3f} over {len(rewards)} samples.",
                "",
                "```text",
                *(f"[{r:g}] {_display(t, bos)}" for t, r in zip(record["samples"], rewards)),
                "```",
            ]
        (self.out / SAMPLES_MD).write_text("\n".join(lines) + "\n")

    def save_all(self, interrupted: bool) -> None:
        """Everything: after an interruption, the last rollout stands in for fresh samples."""
        self.save_adapter(interrupted)
        self.save_plot()
        if interrupted and self.trainer.sample_history:
            start = self.plan.resume.phases_done if self.plan.resume else 0
            phase = start + len(self.trainer.sample_history) - 1
            what = f"rollout of phase {phase}, the last before the interruption"
            self.samples["after"] = self._rollout_record(phase, what)
        elif not interrupted:
            self.sample_after()
        self.save_samples()


# ------------------------------------------------------------------------------------ run


def summarize(history: list[dict[str, Any]]) -> dict[str, float]:
    """First-phase reward, mean of the last five phases, and their ratio (NaN when undefined)."""
    if not history:
        return {"first": math.nan, "last5": math.nan, "ratio": math.nan}
    rewards = [m["reward_mean"] for m in history]
    first, last5 = rewards[0], sum(rewards[-5:]) / len(rewards[-5:])
    ratio = last5 / first if first > 0 else math.nan
    return {"first": first, "last5": last5, "ratio": ratio}


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{seconds:.1f}s"


def _print_summary(
    plan: Plan, trainer, seconds: float, cpu_seconds: float, this_run: int, interrupted: bool
) -> None:
    s, out = summarize(trainer.history), plan.out
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
        ratio = f"×{s['ratio']:.2f}" if math.isfinite(s["ratio"]) else "ratio n/a"
        print(
            f"Reward ({reward_label(plan.settings)}): first phase {s['first']:.3f}, "
            f"last 5 phases {s['last5']:.3f} ({ratio})."
        )
    print(f"Output in {out}/:")
    for name, what in (
        (METRICS_FILE, "per-phase metrics"),
        (CURVE_FILE, "reward curve"),
        (SAMPLES_MD, "samples before/after training"),
        ("adapter.safetensors", "LoRA + value-head weights (config: adapter_config.json)"),
    ):
        if (out / name).exists():
            print(f"  {out / name}  — {what}")
    more = total if interrupted else total * 2
    print(f"Continue with: lora-rlhf train --resume {out} --phases {more}")


def _unfinished(impl: str, err: NotImplementedError) -> int:
    print(
        f"lora-rlhf train: error: --impl {impl}: {err or 'not implemented'} — finish that "
        "exercise (its check tells you when it is right), then train again",
        file=sys.stderr,
    )
    return 1


def train(plan: Plan) -> int:
    """Run a checked plan; return the exit status (0, or 130 when interrupted)."""
    import torch

    from lora_rlhf.adapters import AdapterMismatchError
    from lora_rlhf.models import ModelUnavailableError

    if plan.threads:
        torch.set_num_threads(plan.threads)
    args, s = plan.rlhf_args, plan.settings
    if args.use_wandb:
        os.environ.setdefault("WANDB_DIR", str(plan.out))
    start_phase = plan.resume.phases_done if plan.resume else 0
    print(
        f"lora-rlhf train: {s['model']} + LoRA (r={s['rank']}, α={s['alpha']:g}, impl {s['impl']}), "
        f"phases {start_phase}→{s['phases']}, {s['batch_size']} samples × {s['gen_len']} tokens, "
        f"reward: {reward_label(s)}; output {plan.out}/",
        flush=True,
    )
    recorder = RunRecorder(plan)
    loading = time.perf_counter()
    try:
        trainer = plan.trainer_class(
            args, on_phase_end=recorder.on_phase_end, show_progress=plan.show_progress
        )
        if plan.resume is not None:
            restore(trainer, plan.resume)
    except (ModelUnavailableError, AdapterMismatchError) as err:
        print(f"lora-rlhf train: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except NotImplementedError as err:
        return _unfinished(s["impl"], err)
    except KeyboardInterrupt:
        print("\nInterrupted while loading: nothing trained, nothing saved.", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(
        f"Loaded {s['model']} on {trainer.device} in {time.perf_counter() - loading:.1f}s.",
        flush=True,
    )
    recorder.start(trainer)

    started, cpu_started, interrupted = time.perf_counter(), time.process_time(), False
    try:
        trainer.train()
    except NotImplementedError as err:
        return _unfinished(s["impl"], err)
    except KeyboardInterrupt:
        interrupted = True
        recorder.rewind()
        print(
            f"\nInterrupted: saving the {trainer.phase} finished phases (the one under way is "
            "dropped)…",
            file=sys.stderr,
            flush=True,
        )
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    recorder.save_all(interrupted)
    _print_summary(plan, trainer, seconds, cpu_seconds, trainer.phase - start_phase, interrupted)
    return EXIT_INTERRUPTED if interrupted else 0


def run_command(args: argparse.Namespace) -> int:
    """``lora-rlhf train``: check the options (exit 2 on a bad one), then train."""
    try:
        plan = prepare(args)
    except UsageError as err:
        print(f"lora-rlhf train: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    return train(plan)


run = run_command

__all__ = [
    "DEFAULTS",
    "Plan",
    "RunRecorder",
    "UsageError",
    "add_parser",
    "prepare",
    "read_metrics",
    "run",
    "train",
]

if __name__ == "__main__":  # python -m lora_rlhf.train_cli …
    from lora_rlhf.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
