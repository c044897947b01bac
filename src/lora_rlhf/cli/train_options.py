"""The options of `lora-rlhf train` (:func:`add_options`, in groups: what to train,
hyperparameters, run) and the algorithms ``--algo`` names (:data:`ALGOS`). The command itself is
:mod:`lora_rlhf.cli.train`."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from lora_rlhf.cli.settings import DEFAULTS, DTYPES, parse_kl_target

LIST_REWARDS = "list"  # --reward list: describe the rewards and exit


def _ppo_trainer() -> type:
    from lora_rlhf.lessons.section2_lora import RLHFTrainerLora

    return RLHFTrainerLora


def _grpo_trainer() -> type:
    from lora_rlhf.cli.grpo_trainer import GRPOTrainer

    return GRPOTrainer


# --algo name -> (one-line description, a function returning the trainer class). Another algorithm
# registers itself here; its trainer's ``__init__`` takes RLHFArgsLora alone and builds the model
# from ``model_class``, so that --impl can swap in a submission's TransformerWithValueHeadLora.
ALGOS: dict[str, tuple[str, Callable[[], type]]] = {
    "ppo": ("PPO with a value head (Section 1)", _ppo_trainer),
    "grpo": ("GRPO, groups of samples and no value head (bonus section)", _grpo_trainer),
}


def add_options(p: argparse.ArgumentParser) -> None:
    """Add ``train``'s options to its parser; each defaults to None, so that an option given on
    the command line can be told from one left out (--resume keeps the resumed run's value)."""
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
        help="the prompt every sample continues (sentiment: 'This movie was so'; others: 'This is')",
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
        help="continue a saved run: its folder (its newest intact checkpoint or save), one of its "
        "checkpoint folders, or its adapter file",
    )
    opt(
        run,
        "--save-every",
        type=int,
        help="write a checkpoint every N phases, for --resume after a kill (0: none, only the "
        "save at the end or on a stop)",
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
