"""`lora-rlhf train`'s settings: the defaults, and every check of the options that runs before a
model is loaded (a bad option raises :class:`UsageError`, one line naming the option and the fix).

:func:`merge_settings` layers the defaults, a resumed run's saved settings and the options given;
the ``check_*`` functions judge the result; :func:`build_args` turns it into ``RLHFArgsLora``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

# The default run: SmolLM2-135M learns to write more full stops after "This is" while the KL
# penalty keeps it close to the base model. Chosen to finish within 10 minutes on 2 CPU cores and
# to hold on every seed tried; the measurements behind it (adaptive KL candidates included) are in
# docs/training.md.
DEFAULTS: dict[str, Any] = {
    "model": "smollm2-135m",
    "algo": "ppo",
    "group_size": 4,  # --algo grpo
    "advantage": "grpo",  # --algo grpo
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
    "kl_coef": 0.2,
    "kl_target": "off",  # fixed kl_coef; a number: the adaptive controller's target (nats/token)
    "kl_horizon": 48.0,  # samples (with --kl-target): at most ±1/15 a phase of 16 samples
    "max_grad_norm": 1.0,
    "ent_coef": 0.001,
    "warmup": 2,
    "final_scale": 0.1,
    "temperature": 1.0,
    "top_k": 10,
    "seed": 1,
    "dtype": "float32",
    "impl": "library",
    "save_every": 1,  # phases between checkpoints (0: none); see lora_rlhf.cli.checkpoint
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
    "kl_target": "kl_target",
    "kl_horizon": "kl_horizon",
    "max_grad_norm": "max_grad_norm",
    "ent_coef": "ent_coef",
    "warmup": "warmup_steps",
    "final_scale": "final_scale",
    "temperature": "temperature",
    "top_k": "top_k",
    "seed": "seed",
}
FIELD_FLAGS = {field: "--" + dest.replace("_", "-") for dest, field in ARGS_FIELDS.items()}
# Options a resumed run must keep: the saved adaptors only fit the same model, rank and alpha.
FIXED_ON_RESUME = ("model", "rank", "alpha", "algo")
DTYPES = ("float32", "bfloat16", "float16")
KL_FIXED = "off"  # --kl-target off: the course's fixed coefficient
# A reward's and an algorithm's own defaults, where they differ from DEFAULTS: they apply to the
# options not given (a resumed run keeps its saved settings). Chosen by measurement over seeds:
# docs/training.md (sentiment), docs/grpo.md (GRPO learns only from groups whose samples differ).
REWARD_DEFAULTS: dict[str, dict[str, Any]] = {
    "sentiment": {"prefix": "This movie was so", "temperature": 0.7, "phases": 30,
                  "batch_size": 32, "minibatches": 8},
}  # fmt: skip
ALGO_DEFAULTS: dict[str, dict[str, Any]] = {"grpo": {"batch_size": 32}}


class UsageError(Exception):
    """A bad option, found before any model is loaded; the message is one line."""


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


# ------------------------------------------------------------------------------------ checks


@dataclasses.dataclass
class ResumePoint:
    """A saved run to continue: its state is read from ``folder`` (the run's folder, or one of
    its checkpoints), and the run goes on in ``run_folder`` unless ``--out`` says otherwise."""

    folder: Path
    config: dict[str, Any]
    phases_done: int
    run_folder: Path | None = None  # None: the same as folder
    notices: list[str] = dataclasses.field(default_factory=list)  # printed when the run starts

    def __post_init__(self) -> None:
        if self.run_folder is None:
            self.run_folder = self.folder

    def notices_for(self, out: Path) -> list[str]:
        """What to tell when the run starts in ``out``: the damaged states passed over, and the
        lines of ``out``'s metrics.jsonl past the state resumed from (they are dropped)."""
        from lora_rlhf.cli.run_files import metrics_past

        past, done = metrics_past(out, self.phases_done), self.phases_done
        if not past:
            return list(self.notices)
        phases = sorted(p for p in past if p is not None)
        which = (
            "unreadable"
            if not phases
            else f"phase {phases[0]}"
            if len(phases) == 1
            else f"phases {phases[0]}–{phases[-1]}"
        )
        return [
            *self.notices,
            f"{out / 'metrics.jsonl'}: {len(past)} line(s) past the {done} phases saved in "
            f"{self.folder} dropped ({which}); those phases run again",
        ]


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


def read_resume_point(spec: str) -> ResumePoint:
    from lora_rlhf.adapters.files import (
        ADAPTER_WEIGHTS,
        AdapterMismatchError,
        read_adapter_config,
    )
    from lora_rlhf.cli.run_files import NoSavedRun, choose_resume_source

    path = Path(spec)
    if not path.exists():
        raise UsageError(f"--resume {spec}: no such file or folder")
    try:
        # every file --resume reads is checked, before anything is loaded
        folder, run_folder, notices = choose_resume_source(path)
        config = read_adapter_config(folder)
    except NoSavedRun as err:
        raise UsageError(f"--resume {spec}: no saved run there ({err})") from None
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
    return ResumePoint(folder, config, done, run_folder=run_folder, notices=notices)


def merge_settings(args: argparse.Namespace, resume: ResumePoint | None) -> dict[str, Any]:
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
        saved.setdefault("algo", "ppo")  # saved before --algo existed
        for key in FIXED_ON_RESUME:
            if key in given and given[key] != saved[key]:
                raise UsageError(
                    f"{_flag(key)} {given[key]}: the resumed run has {_flag(key)} {saved[key]} "
                    "(its adaptors only fit that)"
                )
        saved.setdefault("kl_target", KL_FIXED)  # saved before the adaptive KL existed
        settings.update({k: v for k, v in saved.items() if k in DEFAULTS})
    settings.update(given)
    if resume is None:
        own = {
            **ALGO_DEFAULTS.get(settings["algo"], {}),
            **REWARD_DEFAULTS.get(settings["reward"], {}),
        }
        settings.update({k: v for k, v in own.items() if k not in given})
    return settings


def check_numbers(s: dict[str, Any]) -> None:
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
    require(
        s["kl_target"] == KL_FIXED or (math.isfinite(s["kl_target"]) and s["kl_target"] > 0),
        "kl_target",
        f"must be > 0 nats per generated token, or {KL_FIXED} (a fixed --kl-coef)",
    )
    require(math.isfinite(s["kl_horizon"]) and s["kl_horizon"] > 0, "kl_horizon", "must be > 0")
    require(s["max_grad_norm"] > 0, "max_grad_norm", "must be > 0 (inf: no clipping)")
    require(s["temperature"] > 0, "temperature", "must be > 0")
    require(s["top_k"] >= 0, "top_k", "must be >= 0 (0: no top-k filtering)")
    require(s["dtype"] in DTYPES, "dtype", f"must be one of {', '.join(DTYPES)}")
    require(len(str(s["char"])) > 0, "char", "must not be empty")
    require(s["save_every"] >= 0, "save_every", "must be >= 0 (0: no checkpoints during the run)")


def check_reward(s: dict[str, Any], char_given: bool) -> None:
    from lora_rlhf.rlhf.rewards import REWARDS, RewardUnavailableError, check_reward_available

    if s["reward"] not in REWARDS:
        raise UsageError(
            f"--reward {s['reward']}: unknown reward; known: {', '.join(sorted(REWARDS))} "
            "(--reward list describes them)"
        )
    if char_given and s["reward"] not in ("char_count", "no_char"):
        raise UsageError(f"--char applies to the char_count and no_char rewards, not {s['reward']}")
    try:
        check_reward_available(s["reward"])
    except RewardUnavailableError as err:
        raise UsageError(f"--reward {s['reward']}: {err}") from None


def parse_kl_target(text: str) -> float | str:
    """``--kl-target``: a number of nats per generated token, or ``off``."""
    if text.strip().lower() in (KL_FIXED, "none", "fixed"):
        return KL_FIXED
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: a KL per generated token (e.g. 0.5), or {KL_FIXED} for a fixed --kl-coef"
        ) from None


def check_model(name: str) -> None:
    from lora_rlhf.models import ModelUnavailableError, check_model_name

    try:
        check_model_name(name)
    except ModelUnavailableError as err:
        raise UsageError(f"--model {name}: {err}") from None


def check_device(spec: str | None) -> None:
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


def make_reward_fn(name: str, char: str):
    """The registered reward ``name``; char_count and no_char count ``char``."""
    from lora_rlhf.rlhf.rewards import REWARDS

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
        "sentiment": "VADER compound sentiment score",
    }.get(settings["reward"], settings["reward"])


def kl_label(settings: dict[str, Any]) -> str:
    """How the KL penalty is weighted, for the console and the saved config."""
    if settings["kl_target"] == KL_FIXED:
        return f"KL coefficient {settings['kl_coef']:g} (fixed)"
    return (
        f"adaptive KL coefficient from {settings['kl_coef']:g} (target {settings['kl_target']:g} "
        f"nats/token, horizon {settings['kl_horizon']:g} samples)"
    )


def build_args(settings: dict[str, Any], device: str | None, wandb: bool, wandb_project: str):
    import torch

    from lora_rlhf.lessons.section2_lora import RLHFArgsLora
    from lora_rlhf.rlhf.args import ArgsError

    fields = {field: settings[dest] for dest, field in ARGS_FIELDS.items()}
    fields["top_k"] = fields["top_k"] or None
    fields["kl_target"] = None if fields["kl_target"] == KL_FIXED else fields["kl_target"]
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


def default_out() -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path("runs") / stamp
    n = 1
    while out.exists():
        n += 1
        out = Path("runs") / f"{stamp}-{n}"
    return out


def check_out(out: Path, resume: ResumePoint | None) -> None:
    """The output folder exists (created now) and takes files; it never overwrites another run."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")
    same_as_resumed = (
        resume is not None and out.exists() and out.resolve() == resume.run_folder.resolve()
    )
    if out.is_dir() and not same_as_resumed:
        from lora_rlhf.cli.run_files import RUN_FILES

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
