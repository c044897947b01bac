from lora_rlhf.models.registry import (
    DEFAULT_MODEL,
    OFFLINE_MODELS,
    ModelUnavailableError,
    check_model_name,
    load_model,
)

__all__ = [
    "DEFAULT_MODEL",
    "OFFLINE_MODELS",
    "ModelUnavailableError",
    "check_model_name",
    "load_model",
]
