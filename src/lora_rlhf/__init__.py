"""lora_rlhf: LoRA inside PPO-RLHF, as exercises on TransformerLens models.

Section 1 (PPO-RLHF with a value head) and Section 2 (LoRA) are importable from here. Names load
lazily, so ``import lora_rlhf`` (and the CLI's argument checks) stay fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    # models and devices
    "load_model": "lora_rlhf.models",
    "DEFAULT_MODEL": "lora_rlhf.models",
    "OFFLINE_MODELS": "lora_rlhf.models",
    "ModelUnavailableError": "lora_rlhf.models",
    "default_device": "lora_rlhf.devices",
    # Section 1
    "HookedTransformerWithValueHead": "lora_rlhf.value_head",
    "RLHFArgs": "lora_rlhf.args",
    "ArgsError": "lora_rlhf.args",
    "reward_fn_char_count": "lora_rlhf.rewards",
    "normalize_reward": "lora_rlhf.rewards",
    "reward_fn_length": "lora_rlhf.rewards",
    "reward_fn_no_char": "lora_rlhf.rewards",
    "REWARDS": "lora_rlhf.rewards",
    "get_reward_fn": "lora_rlhf.rewards",
    "get_samples": "lora_rlhf.ppo",
    "compute_advantages": "lora_rlhf.ppo",
    "ReplayMinibatch": "lora_rlhf.ppo",
    "ReplayMemory": "lora_rlhf.ppo",
    "get_logprobs": "lora_rlhf.ppo",
    "calc_kl_penalty": "lora_rlhf.ppo",
    "calc_entropy_bonus": "lora_rlhf.ppo",
    "calc_value_function_loss": "lora_rlhf.ppo",
    "calc_clipped_surrogate_objective": "lora_rlhf.ppo",
    "get_optimizer": "lora_rlhf.ppo",
    "get_optimizer_and_scheduler": "lora_rlhf.ppo",
    "RLHFTrainer": "lora_rlhf.trainer",
    # Section 2
    "Lora": "lora_rlhf.lora",
    "LoraHooks": "lora_rlhf.lora",
    "TransformerWithValueHeadLora": "lora_rlhf.lora",
    "RLHFArgsLora": "lora_rlhf.lora",
    "RLHFTrainerLora": "lora_rlhf.lora",
    # beyond the course
    "merge_lora": "lora_rlhf.merge",
    "disable_lora": "lora_rlhf.adapters",
    "save_adapter": "lora_rlhf.adapters",
    "load_adapter": "lora_rlhf.adapters",
    "load_lora_model": "lora_rlhf.adapters",
    "export_peft": "lora_rlhf.peft_export",
    "MlpLoraHooks": "lora_rlhf.mlp_lora",
    "TransformerWithValueHeadMlpLora": "lora_rlhf.mlp_lora",
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
