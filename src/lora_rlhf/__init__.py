"""lora_rlhf: LoRA inside PPO-RLHF, as exercises on TransformerLens models."""

__version__ = "0.1.0"
