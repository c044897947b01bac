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

This module is the command (its options, the plan, the run); the defaults and the checks are in
:mod:`lora_rlhf.train_settings`, what a run writes and reads back in :mod:`lora_rlhf.train_outputs`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from lora_rlhf.train_outputs import (
    RunRecorder,
    print_summary,
    read_metrics,
    restore,
)
from lora_rlhf.train_settings import (
    DEFAULTS,
    DTYPES,
    REWARD_DEFAULTS,
    Plan,
    UsageError,
    build_args,
    check_device,
    check_model,
    check_numbers,
    check_out,
    check_reward,
    default_out,
    kl_label,
    merge_settings,
    parse_kl_target,
    read_resume_point,
    reward_label,
)

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
_build_args = build_args  # the name benchmarks/phase.py and scripts/measure_memory.py use
LIST_REWARDS = "list"  # --reward list: describe the rewards and exit


def _ppo_trainer() -> type:
    from lora_rlhf.lora import RLHFTrainerLora

    return RLHFTrainerLora


def _grpo_trainer() -> type:
    from lora_rlhf.grpo_trainer import GRPOTrainer

    return GRPOTrainer


# --algo name -> (one-line description, a function returning the trainer class). Another algorithm
# registers itself here; its trainer takes RLHFArgsLora and builds the model from ``model_class``,
# so that --impl can swap in a submission's TransformerWithValueHeadLora.
ALGOS: dict[str, tuple[str, Callable[[], type]]] = {
    "ppo": ("PPO with a value head (Section 1)", _ppo_trainer),
    "grpo": ("GRPO, groups of samples and no value head (bonus section)", _grpo_trainer),
}


# ------------------------------------------------------------------------------------ parser


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``train`` on the ``lora-rlhf`` subcommand parser."""
    p = subparsers.add_parser(
        "train",
        help="RLHF with LoRA on the embedded model: metrics, reward curve, samples, adapter",
        description=__doc__.split("\n\n", 1)[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Defaults are the settings of the documented default run (docs/training.md); "
        + "; ".join(
            f"--reward {reward}: "
            + ", ".join(f"--{k.replace('_', '-')} {v!r}" for k, v in own.items())
            for reward, own in REWARD_DEFAULTS.items()
        )
        + ". With --resume, an option left out keeps the resumed run's value.",
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
    opt(
        what,
        "--algo",
        choices=sorted(ALGOS),
        help="the RL algorithm: " + "; ".join(f"{k}: {v[0]}" for k, v in sorted(ALGOS.items())),
    )
    opt(
        what,
        "--group-size",
        type=int,
        help="--algo grpo: samples per group, each other's baseline (divides --batch-size)",
    )
    opt(
        what,
        "--advantage",
        choices=("grpo", "rloo"),
        help="--algo grpo: (reward − group mean) / group std, or reward − mean of the others",
    )
    opt(
        what,
        "--reward",
        help="reward function: char_count, length, no_char, sentiment, … "
        "('--reward list' describes each)",
    )
    opt(what, "--char", help="the character char_count counts (and no_char penalises)")
    opt(
        what,
        "--prefix",
        help="the prompt every sample continues (sentiment: 'This movie was'; others: 'This is')",
    )

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
    opt(
        hp,
        "--kl-coef",
        type=float,
        help="weight of the KL penalty against the base model (with --kl-target: its start)",
    )
    opt(
        hp,
        "--kl-target",
        type=parse_kl_target,
        help="KL(π‖π_ref) per generated token that an adaptive coefficient steers towards "
        "(Ziegler et al. 2019), or off: --kl-coef stays fixed, as in Section 1",
    )
    opt(
        hp,
        "--kl-horizon",
        type=float,
        help="samples over which the adaptive coefficient corrects a KL error (larger: slower)",
    )
    opt(hp, "--max-grad-norm", type=float, help="clip the gradient norm to this (inf: no clipping)")
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


def _trainer_class(impl_spec: str, algo: str = "ppo") -> type:
    """The ``--algo`` trainer (RLHFTrainerLora for ppo), training the ``--impl`` submission's
    ``TransformerWithValueHeadLora``."""
    from lora_rlhf.impl import ImplementationError, load_impl
    from lora_rlhf.value_head import HookedTransformerWithValueHead

    if algo not in ALGOS:
        raise UsageError(f"--algo {algo}: unknown algorithm; known: {', '.join(sorted(ALGOS))}")
    trainer_class = ALGOS[algo][1]()
    if impl_spec == "library":  # the library's own classes, run through its fast path
        from lora_rlhf.fast import with_fast_lora

        return with_fast_lora(trainer_class)
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
    return type(trainer_class.__name__, (trainer_class,), {"model_class": model_class})


def prepare(args: argparse.Namespace) -> Plan:
    """Check every option; raise :class:`UsageError` on the first bad one. Loads no model."""
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads {args.threads}: must be >= 1")
    resume = read_resume_point(args.resume) if args.resume else None
    settings = merge_settings(args, resume)
    check_numbers(settings)
    check_reward(settings, char_given=args.char is not None)
    check_model(settings["model"])
    if resume is not None and resume.phases_done >= settings["phases"]:
        raise UsageError(
            f"--resume {args.resume}: the run already did {resume.phases_done} phases; "
            f"pass --phases N with N > {resume.phases_done} to train further"
        )
    check_device(args.device)
    trainer_class = _trainer_class(settings["impl"], settings["algo"])
    if settings["impl"] not in ("library", "solutions", "exercises"):
        settings["impl"] = str(Path(settings["impl"]).resolve())  # saved for --resume
    rlhf_args = build_args(settings, args.device, bool(args.wandb), args.wandb_project)
    if hasattr(trainer_class, "command_args"):  # an algorithm's own arguments (GRPO's groups)
        try:
            rlhf_args = trainer_class.command_args(rlhf_args, settings)
        except ValueError as err:
            raise UsageError(f"--algo {settings['algo']}: {err}") from None
    elif args.group_size is not None or args.advantage is not None:
        raise UsageError("--group-size and --advantage apply to --algo grpo only")
    if args.out:
        out = Path(args.out)
    elif resume is not None:
        out = resume.folder
    else:
        out = default_out()
    check_out(out, resume)
    return Plan(
        settings=settings,
        rlhf_args=rlhf_args,
        trainer_class=trainer_class,
        out=out,
        resume=resume,
        threads=args.threads,
        show_progress=not args.no_progress,
    )


# ------------------------------------------------------------------------------------ run


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
        f"reward: {reward_label(s)}; {kl_label(s)}; output {plan.out}/",
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
    this_run = trainer.phase - start_phase
    print_summary(plan, trainer, seconds, cpu_seconds, this_run, interrupted, recorder.summary())
    return EXIT_INTERRUPTED if interrupted else 0


def list_rewards() -> int:
    """``--reward list``: every reward with a one-line description, and whether it can run here."""
    from lora_rlhf.rewards import REWARD_DESCRIPTIONS, REWARDS, check_reward_available

    width = max(map(len, REWARDS))
    for name in sorted(REWARDS):
        line = f"{name:<{width}}  {REWARD_DESCRIPTIONS.get(name, '')}"
        try:
            check_reward_available(name)
        except ImportError as err:
            line += f" — not installed here: {str(err).rsplit(': ', 1)[-1]}"
        print(line)
    return 0


def run_command(args: argparse.Namespace) -> int:
    """``lora-rlhf train``: check the options (exit 2 on a bad one), then train."""
    if args.reward == LIST_REWARDS:
        return list_rewards()
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
