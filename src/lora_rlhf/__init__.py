"""lora_rlhf: LoRA inside PPO-RLHF, as exercises on TransformerLens models.

Section 1 (PPO-RLHF with a value head) and Section 2 (LoRA) are importable from here. Names load
lazily, so ``import lora_rlhf`` (and the CLI's argument checks) stay fast.
"""

from __future__ import annotations

import importlib

from lora_rlhf import aliases

__version__ = "0.1.0"

# Old module paths (lora_rlhf.lora, lora_rlhf.trainer, ...) import the moved modules.
aliases.install()

_EXPORTS = {
    # models and devices
    "load_model": "lora_rlhf.models",
    "DEFAULT_MODEL": "lora_rlhf.models",
    "OFFLINE_MODELS": "lora_rlhf.models",
    "ModelUnavailableError": "lora_rlhf.models",
    "default_device": "lora_rlhf.models.devices",
    # Section 1
    "HookedTransformerWithValueHead": "lora_rlhf.rlhf.value_head",
    "RLHFArgs": "lora_rlhf.rlhf.args",
    "ArgsError": "lora_rlhf.rlhf.args",
    "reward_fn_char_count": "lora_rlhf.rlhf.rewards",
    "normalize_reward": "lora_rlhf.rlhf.rewards",
    "reward_fn_length": "lora_rlhf.rlhf.rewards",
    "reward_fn_no_char": "lora_rlhf.rlhf.rewards",
    "REWARDS": "lora_rlhf.rlhf.rewards",
    "get_reward_fn": "lora_rlhf.rlhf.rewards",
    "get_samples": "lora_rlhf.rlhf.ppo",
    "compute_advantages": "lora_rlhf.rlhf.ppo",
    "ReplayMinibatch": "lora_rlhf.rlhf.ppo",
    "ReplayMemory": "lora_rlhf.rlhf.ppo",
    "get_logprobs": "lora_rlhf.rlhf.ppo",
    "calc_kl_penalty": "lora_rlhf.rlhf.ppo",
    "calc_entropy_bonus": "lora_rlhf.rlhf.ppo",
    "calc_value_function_loss": "lora_rlhf.rlhf.ppo",
    "calc_clipped_surrogate_objective": "lora_rlhf.rlhf.ppo",
    "get_optimizer": "lora_rlhf.rlhf.ppo",
    "get_optimizer_and_scheduler": "lora_rlhf.rlhf.ppo",
    "RLHFTrainer": "lora_rlhf.rlhf.trainer",
    # Section 2
    "Lora": "lora_rlhf.lessons.section2_lora",
    "LoraHooks": "lora_rlhf.lessons.section2_lora",
    "TransformerWithValueHeadLora": "lora_rlhf.lessons.section2_lora",
    "RLHFArgsLora": "lora_rlhf.lessons.section2_lora",
    "RLHFTrainerLora": "lora_rlhf.lessons.section2_lora",
    # beyond the course
    "merge_lora": "lora_rlhf.adapters.merge",
    "disable_lora": "lora_rlhf.adapters.files",
    "save_adapter": "lora_rlhf.adapters.files",
    "load_adapter": "lora_rlhf.adapters.files",
    "load_lora_model": "lora_rlhf.adapters.files",
    "export_peft": "lora_rlhf.adapters.peft_export",
    "MlpLoraHooks": "lora_rlhf.lessons.bonus_mlp_lora",
    "TransformerWithValueHeadMlpLora": "lora_rlhf.lessons.bonus_mlp_lora",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lora_rlhf' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
