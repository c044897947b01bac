"""The package-wide default device: cuda when present, else cpu (override with LORA_RLHF_DEVICE)."""

from __future__ import annotations

import os

import torch


def default_device() -> torch.device:
    forced = os.environ.get("LORA_RLHF_DEVICE")
    if forced:
        return torch.device(forced)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
