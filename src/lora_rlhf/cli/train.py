"""`lora-rlhf train`: PPO-RLHF with LoRA adaptors on the embedded model, from the command line.

The run (see ``docs/training.md``):

1. checks every option — and the output folder, the ``--impl`` submission, the ``--resume``
   checkpoint — *before* a model is loaded; a bad one exits with status 2 and one line on stderr;
2. trains :class:`~lora_rlhf.lessons.section2_lora.RLHFTrainerLora` (with the ``--impl`` classes) under a progress
   bar that shows the reward;
3. writes into ``--out``: ``metrics.jsonl`` (one line per phase, as it goes), ``reward_curve.png``,
   ``samples.md`` (before/after training), ``adapter.safetensors`` + ``adapter_config.json`` (the
   LoRA and value-head weights, in the format of :mod:`lora_rlhf.adapters.files`) and
   ``trainer_state.pt`` (optimizer and random-number state, so ``--resume`` continues exactly);
4. prints a summary.

Every ``--save-every`` phases it also writes a checkpoint (:mod:`lora_rlhf.cli.checkpoint`), which
``--resume`` continues from after a kill. Ctrl-C, SIGTERM and SIGHUP stop the run after saving
what was learned so far (:mod:`lora_rlhf.cli.stop_signals`; exit status 128 + the signal's number:
130, 143, 129).

This module is the command (the plan, the run). Its options are in
:mod:`lora_rlhf.cli.train_options`, the defaults and the checks in :mod:`lora_rlhf.cli.settings`,
what a run writes in :mod:`lora_rlhf.cli.recorder` and reads back in :mod:`lora_rlhf.cli.outputs`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from lora_rlhf.cli.outputs import print_summary, read_metrics, restore
from lora_rlhf.cli.recorder import RunRecorder
from lora_rlhf.cli.settings import (
    ALGO_DEFAULTS,
    DEFAULTS,
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
    read_resume_point,
    reward_label,
)
from lora_rlhf.cli.stop_signals import StopSignals, exit_status, signal_name
from lora_rlhf.cli.train_options import ALGOS, LIST_REWARDS, add_options

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


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
            f"--{kind} {name}: "
            + ", ".join(f"--{k.replace('_', '-')} {v!r}" for k, v in own.items())
            for kind, table in (("algo", ALGO_DEFAULTS), ("reward", REWARD_DEFAULTS))
            for name, own in table.items()
        )
        + ". With --resume, an option left out keeps the resumed run's value.",
    )
    add_options(p)
    p.set_defaults(func=run_command)
    return p


def _trainer_class(impl_spec: str, algo: str = "ppo") -> type:
    """The ``--algo`` trainer (RLHFTrainerLora for ppo), training the ``--impl`` submission's
    ``TransformerWithValueHeadLora``: for ppo, the submission's own ``RLHFTrainerLora`` when it
    defines one, else the library's, building the submission's model."""
    from lora_rlhf.authoring.implementations import ImplementationError, load_impl
    from lora_rlhf.rlhf.trainer import RLHFTrainer
    from lora_rlhf.rlhf.value_head import HookedTransformerWithValueHead

    if algo not in ALGOS:
        raise UsageError(f"--algo {algo}: unknown algorithm; known: {', '.join(sorted(ALGOS))}")
    trainer_class = ALGOS[algo][1]()
    if impl_spec == "library":  # the library's own classes, run through its fast path
        from lora_rlhf.fast.lora import with_fast_lora

        return with_fast_lora(trainer_class)
    # Any other --impl trains its own classes as written, in the engine's memory-lean way.
    from lora_rlhf.fast.lean_trainer import with_lean_memory

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
            "lora_rlhf.rlhf.value_head.HookedTransformerWithValueHead"
        )
    own = getattr(module, "RLHFTrainerLora", None)
    if algo == "ppo" and isinstance(own, type) and issubclass(own, RLHFTrainer):
        return with_lean_memory(own)  # the submission's own trainer, building its own model
    own_model = type(trainer_class.__name__, (trainer_class,), {"model_class": model_class})
    return with_lean_memory(own_model)


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
        out = resume.run_folder
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
    """Run a checked plan; return the exit status (0, or 128 + the signal's number when a signal
    stopped it: 130 for Ctrl-C)."""
    with StopSignals() as stops:
        return _train(plan, stops)


def _say(text: str) -> None:
    """A line on stderr that cannot stop a save (after SIGHUP the terminal may be gone)."""
    try:
        print(text, file=sys.stderr, flush=True)
    except OSError:
        pass


def _train(plan: Plan, stops: StopSignals) -> int:
    import torch

    from lora_rlhf.adapters.files import AdapterMismatchError, AdaptorContractError, rank_and_alpha
    from lora_rlhf.models import ModelUnavailableError
    from lora_rlhf.rlhf.trainer import build_trainer

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
    for notice in plan.resume.notices_for(plan.out) if plan.resume else []:
        _say(f"lora-rlhf train: {notice}")
    recorder = RunRecorder(plan)
    recorder.critical = stops.deferred
    loading, stopped = time.perf_counter(), None
    try:
        trainer = build_trainer(
            plan.trainer_class, args, recorder.on_phase_end, show_progress=plan.show_progress
        )
        rank_and_alpha(trainer.model)  # the adaptor contract, read when the adapter is saved
        if plan.resume is not None:
            restore(trainer, plan.resume)
        print(
            f"Loaded {s['model']} on {trainer.device} in {time.perf_counter() - loading:.1f}s.",
            flush=True,
        )
        started, cpu_started = time.perf_counter(), time.process_time()
        recorder.start(trainer)
        trainer.train()
    except (ModelUnavailableError, AdapterMismatchError) as err:
        print(f"lora-rlhf train: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except AdaptorContractError as err:
        print(f"lora-rlhf train: error: --impl {s['impl']}: {err}", file=sys.stderr)
        return EXIT_USAGE
    except NotImplementedError as err:
        return _unfinished(s["impl"], err)
    except KeyboardInterrupt as stop:
        if recorder.trainer is None:
            _say(
                f"\nInterrupted ({signal_name(stop)}) while loading: nothing trained, nothing saved."
            )
            return exit_status(stop)
        stopped = stop
    stops.ignoring = True  # from here on a signal cannot cut the save short
    if stopped is not None:
        recorder.rewind()
        _say(
            f"\nInterrupted ({signal_name(stopped)}): saving the {trainer.phase} finished phases "
            "(the one under way is dropped)…"
        )
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    interrupted = stopped is not None
    recorder.save_all(interrupted)
    this_run = trainer.phase - start_phase
    try:
        print_summary(
            plan, trainer, seconds, cpu_seconds, this_run, interrupted, recorder.summary()
        )
    except OSError:  # no terminal left to print to (SIGHUP): everything is saved
        pass
    return exit_status(stopped) if interrupted else 0


def list_rewards() -> int:
    """``--reward list``: every reward with a one-line description, and whether it can run here."""
    from lora_rlhf.rlhf.rewards import REWARD_DESCRIPTIONS, REWARDS, check_reward_available

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

if __name__ == "__main__":  # python -m lora_rlhf.cli.train …
    from lora_rlhf.cli.command import main

    sys.exit(main(["train", *sys.argv[1:]]))
