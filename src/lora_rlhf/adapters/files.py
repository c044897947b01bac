"""Adaptors as files: save them and load them back (which modules are adaptors, and the
attributes each must have, is :mod:`lora_rlhf.adapters.contract`).

A LoRA model (``TransformerWithValueHeadLora`` or its MLP subclass) keeps its adaptors in
``model.lora`` (one ``LoraHooks`` per layer: ``lora_q/k/v/o``) and, with MLP adaptors, in
``model.mlp_lora`` (one ``MlpLoraHooks`` per layer: ``lora_in``, ``lora_gate``, ``lora_out``).
Everything reads them through :func:`~lora_rlhf.adapters.contract.layer_adaptors`, by *target* name:

======== ================================ ==========================
target   adapts                           A, B shapes
======== ================================ ==========================
q        W_Q (one adaptor per query head) [n_heads, d_model, r], [n_heads, r, d_head]
k, v     _W_K, _W_V (per key/value head)  [n_kv, d_model, r], [n_kv, r, d_head]
o        W_O (one adaptor per query head) [n_heads, d_head, r], [n_heads, r, d_model]
mlp_in   W_in                             [1, d_model, r], [1, r, d_mlp]
mlp_gate W_gate (gated MLPs only)         [1, d_model, r], [1, r, d_mlp]
mlp_out  W_out                            [1, d_mlp, r], [1, r, d_model]
======== ================================ ==========================

The saved format (canonical for this library; ``lora-rlhf train`` writes it too) is a folder with

* ``adapter.safetensors`` — ``blocks.{i}.lora_{target}.A`` / ``.B`` for every layer and target,
  plus ``value_head.*`` when the value head is included;
* ``adapter_config.json`` — base model name, rank, α, targets, the model's shape, whether the
  value head is included, dtype and the library version.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import lora_rlhf

# The contract's names, also read from here (the module they were split from)
from lora_rlhf.adapters.contract import (  # noqa: F401
    ATTN_TARGETS,
    CONTRACT,
    MLP_ATTRS,
    MLP_TARGETS,
    AdaptorContractError,
    adaptor_values,
    disable_lora,
    layer_adaptors,
    lora_enabled,
    lora_targets,
    rank_and_alpha,
    scaling_of,
)

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FORMAT = "lora_rlhf-adapter"
FORMAT_VERSION = 1


class AdapterMismatchError(ValueError):
    """A saved adapter that does not fit the model it is loaded onto, saying what differs."""


class AdapterFileError(AdapterMismatchError):
    """A file of a saved adapter (or training run) folder that is missing or damaged. The message
    is one line: the file, what is wrong with it, and what to do."""


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 200 else text[:199] + "…"


def damaged(path: Path, err: BaseException | str, fix: str) -> AdapterFileError:
    why = err if isinstance(err, str) else one_line(err)
    return AdapterFileError(f"{path}: damaged ({why}); {fix}")


RESAVE = "restore it from a copy or save the adapter again (nothing was loaded or overwritten)"


# ---------------------------------------------------------------------------------------------
# Save and load


def _model_shape(cfg) -> dict[str, Any]:
    return {
        "n_layers": cfg.n_layers,
        "d_model": cfg.d_model,
        "n_heads": cfg.n_heads,
        "n_key_value_heads": cfg.n_key_value_heads or cfg.n_heads,
        "d_head": cfg.d_head,
        "d_mlp": cfg.d_mlp,
        "gated_mlp": bool(cfg.gated_mlp),
    }


def adapter_state_dict(model: nn.Module, value_head: bool = True) -> dict[str, Tensor]:
    """The tensors :func:`save_adapter` writes (detached, contiguous, on cpu)."""
    state = {}
    for i, layer in enumerate(layer_adaptors(model)):
        for target, lora in layer.items():
            state[f"blocks.{i}.lora_{target}.A"] = lora.A
            state[f"blocks.{i}.lora_{target}.B"] = lora.B
    head = getattr(model, "value_head", None)
    if value_head and head is not None:
        state.update({f"value_head.{k}": v for k, v in head.state_dict().items()})
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_adapter(
    model: nn.Module,
    path: str | Path,
    value_head: bool = True,
    base_model: str | None = None,
) -> Path:
    """Write the adaptors (and the value head) of `model` to the folder `path`.

    Args:
        model: a LoRA model (attention adaptors, and MLP adaptors when it has them).
        path: a folder (created when missing); ``adapter.safetensors`` and
            ``adapter_config.json`` are written inside it.
        value_head: include the value head's weights (when the model has one).
        base_model: the base model's registry name; defaults to ``model.cfg.model_name``.

    Returns:
        The folder.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rank, alpha = rank_and_alpha(model)
    state = adapter_state_dict(model, value_head=value_head)
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": lora_rlhf.__version__,
        "base_model": base_model or model.cfg.model_name,
        "rank": rank,
        "lora_alpha": int(alpha) if alpha.is_integer() else alpha,
        "targets": list(lora_targets(model)),
        "value_head": any(k.startswith("value_head.") for k in state),
        "dtype": str(next(iter(state.values())).dtype).removeprefix("torch."),
        "model": _model_shape(model.cfg),
    }
    save_file(state, str(path / ADAPTER_WEIGHTS), metadata={"format": "pt", "lora_rlhf": FORMAT})
    (path / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return path


def read_adapter_config(path: str | Path) -> dict[str, Any]:
    """The ``adapter_config.json`` of a saved adapter folder (validated)."""
    path = Path(path)
    config_path = path / ADAPTER_CONFIG if path.is_dir() else path
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: no adapter config (save one with save_adapter)")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise damaged(config_path, f"not readable JSON: {one_line(err)}", RESAVE) from None
    if not isinstance(config, dict):
        raise damaged(config_path, "not a JSON object", RESAVE)
    if "peft_type" in config:
        raise AdapterMismatchError(
            f"{config_path} is a PEFT adapter (for a Hugging Face model): load it with "
            "peft.PeftModel.from_pretrained, not load_adapter"
        )
    if config.get("format") != FORMAT:
        raise AdapterMismatchError(f"{config_path} is not a lora_rlhf adapter config")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise AdapterMismatchError(
            f"{config_path} has format version {config['format_version']}; this lora_rlhf "
            f"({lora_rlhf.__version__}) reads up to {FORMAT_VERSION}: upgrade lora_rlhf"
        )
    missing = [k for k in ("base_model", "rank", "lora_alpha", "targets") if k not in config]
    if missing:
        raise damaged(config_path, f"no {', '.join(missing)}", RESAVE)
    return config


def read_adapter_weights(path: str | Path, fix: str = RESAVE) -> dict[str, Tensor]:
    """The tensors of a saved adapter folder's ``adapter.safetensors`` (on the CPU).

    Raises :class:`AdapterFileError` (one line naming the file) when it is missing, truncated or
    not a safetensors file.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = Path(path) / ADAPTER_WEIGHTS if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise AdapterFileError(f"{file}: missing; {fix}")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise damaged(file, f"truncated or not a safetensors file: {one_line(err)}", fix) from None


def _describe(key: str) -> str:
    # "blocks.3.lora_k.A" -> "layer 3 lora_k.A"
    if key.startswith("blocks."):
        _, layer, rest = key.split(".", 2)
        return f"layer {layer} {rest}"
    return key


def load_adapter(
    model: nn.Module,
    path: str | Path,
    value_head: bool | None = None,
    check_base_model: bool = True,
) -> dict[str, Any]:
    """Load a folder written by :func:`save_adapter` into `model`'s adaptors (in place).

    Everything is checked before anything is copied, so a failed load leaves the model as it was.

    Args:
        model: a LoRA model with the same targets, rank and α as the saved one.
        path: the adapter folder.
        value_head: load the value head too: None (default) when the file has one and the model
            has a value head; True requires both; False never loads it.
        check_base_model: refuse an adapter saved from another base model (by name).

    Returns:
        The adapter's config.

    Raises:
        AdapterMismatchError: another base model, other targets, rank or α, or a tensor whose
            shape differs (the message names it, e.g. ``layer 3 lora_k.A: saved (3, 576, 4),
            model (9, 576, 4)``).
    """
    path = Path(path)
    config = read_adapter_config(path)
    where = f"adapter {path}"
    this = model.cfg.model_name
    if check_base_model and config["base_model"] != this:
        raise AdapterMismatchError(
            f"{where}: adapter was trained on {config['base_model']}, this model is {this}"
        )
    targets = lora_targets(model)
    if tuple(config["targets"]) != targets:
        extra = [t for t in config["targets"] if t not in targets]
        hint = ""
        if any(t in MLP_TARGETS for t in extra):
            hint = " (the adapter has MLP adaptors: build the model with TransformerWithValueHeadMlpLora)"
        raise AdapterMismatchError(
            f"{where}: adapter targets {tuple(config['targets'])}, this model {targets}{hint}"
        )
    rank, alpha = rank_and_alpha(model)
    if (config["rank"], float(config["lora_alpha"])) != (rank, alpha):
        raise AdapterMismatchError(
            f"{where}: adapter has rank={config['rank']}, lora_alpha={config['lora_alpha']}; "
            f"this model rank={rank}, lora_alpha={alpha}"
        )

    saved = read_adapter_weights(path)
    wanted: dict[str, Tensor] = {}
    for i, layer in enumerate(layer_adaptors(model)):
        for target, lora in layer.items():
            wanted[f"blocks.{i}.lora_{target}.A"] = lora.A
            wanted[f"blocks.{i}.lora_{target}.B"] = lora.B
    head = getattr(model, "value_head", None)
    file_has_head = any(k.startswith("value_head.") for k in saved)
    if value_head is True and not (file_has_head and head is not None):
        what = "the adapter file has no value head" if not file_has_head else "the model has none"
        raise AdapterMismatchError(f"{where}: value_head=True but {what}")
    if value_head is not False and file_has_head and head is not None:
        wanted.update({f"value_head.{k}": v for k, v in head.state_dict().items()})

    missing = [k for k in wanted if k not in saved]
    if missing:
        raise AdapterMismatchError(
            f"{where}: the file lacks {len(missing)} tensors, e.g. {', '.join(missing[:3])}"
        )
    unexpected = [k for k in saved if k not in wanted and not k.startswith("value_head.")]
    if unexpected:
        raise AdapterMismatchError(
            f"{where}: this model has no place for {len(unexpected)} saved tensors, e.g. "
            f"{', '.join(unexpected[:3])}"
        )
    wrong = [
        f"{_describe(k)}: saved {tuple(saved[k].shape)}, model {tuple(v.shape)}"
        for k, v in wanted.items()
        if tuple(saved[k].shape) != tuple(v.shape)
    ]
    if wrong:
        more = f" (and {len(wrong) - 5} more)" if len(wrong) > 5 else ""
        raise AdapterMismatchError(f"{where}: shapes differ: " + "; ".join(wrong[:5]) + more)

    with torch.no_grad():
        for key, target in wanted.items():
            target.copy_(saved[key].to(device=target.device, dtype=target.dtype))
    return config


def load_lora_model(
    path: str | Path,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Build the LoRA model a saved adapter describes (base model, rank, α, targets) and load it.

    MLP targets give a ``TransformerWithValueHeadMlpLora``, otherwise a
    ``TransformerWithValueHeadLora``.
    """
    config = read_adapter_config(path)
    read_adapter_weights(path)  # a damaged file stops here, before the base model is loaded
    if any(t in MLP_TARGETS for t in config["targets"]):
        from lora_rlhf.lessons.bonus_mlp_lora import TransformerWithValueHeadMlpLora as model_class
    else:
        from lora_rlhf.lessons.section2_lora import TransformerWithValueHeadLora as model_class
    model = model_class.from_pretrained(
        config["base_model"],
        lora_alpha=config["lora_alpha"],
        rank=config["rank"],
        use_value_head=bool(config.get("value_head", True)),
        device=device,
        dtype=dtype,
    )
    load_adapter(model, path)
    return model
