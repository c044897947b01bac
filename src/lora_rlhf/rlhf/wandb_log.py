"""Logging a training run to Weights & Biases (``RLHFArgs.use_wandb``): each phase's metrics and
a table of its samples. Without an API key (and no explicit ``WANDB_MODE``) the run stays local
(offline), so no login is ever needed."""

from __future__ import annotations

import netrc
import os
from typing import Any


def wandb_api_key_available() -> bool:
    """Whether wandb would find an API key (the environment, or ~/.netrc for its host)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://", 1)[-1]
    try:
        return netrc.netrc().authenticators(host.split("/", 1)[0]) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def init_wandb(trainer):
    """Start the trainer's wandb run (named ``trainer.run_name``, configured with its args)."""
    import wandb

    settings: dict[str, Any] = {}
    if not os.environ.get("WANDB_MODE") and not wandb_api_key_available():
        settings["mode"] = "offline"
    return wandb.init(
        project=trainer.args.wandb_project_name,
        entity=trainer.args.wandb_entity,
        name=trainer.run_name,
        config=trainer.args.to_config(),
        **settings,
    )


def log_wandb(trainer, metrics: dict[str, Any]) -> None:
    """Log a phase's metrics, with its samples and rewards as a table."""
    import wandb

    rewards = trainer.rewards.tolist() if trainer.rewards is not None else []
    table = wandb.Table(
        columns=["phase", "sample", "reward"],
        data=[[metrics["phase"], s, r] for s, r in zip(trainer.samples, rewards)],
    )
    wandb.log({**metrics, "samples": table}, step=metrics["phase"])
