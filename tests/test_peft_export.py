"""export_peft: the adaptors as a PEFT LoRA adapter, checked against PEFT itself.

The tiny-llama tests build the equivalent transformers LlamaForCausalLM from the tiny model's
weights; the slow test uses the transformers model de-quantized from the embedded GGUF file.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import ALPHA, RANK, SMOLLM2_ATOL, make_lora_model, tokens
from safetensors.torch import load_file

from lora_rlhf.adapters.peft_export import (
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    LlamaNormWeights,
    export_peft,
    hf_llama_from_hooked,
    read_gguf_f32,
)

peft = pytest.importorskip("peft")


def peft_logits(hf_model, adapter_dir, toks) -> torch.Tensor:
    peft_model = peft.PeftModel.from_pretrained(hf_model, str(adapter_dir))
    with torch.no_grad():
        return peft_model(toks).logits


def test_the_equivalent_transformers_llama_has_the_same_logits():
    model = make_lora_model("tiny-llama")
    toks = tokens(model)
    with torch.no_grad():
        assert (hf_llama_from_hooked(model)(toks).logits - model(toks)).abs().max() <= 1e-4


@pytest.mark.parametrize("mlp", [False, True], ids=["attn", "attn+mlp"])
def test_peft_model_logits_equal_the_lora_models(mlp, tmp_path):
    model = make_lora_model("tiny-llama", mlp=mlp)
    toks = tokens(model)
    hf_model = hf_llama_from_hooked(model)
    export_peft(model, tmp_path)
    with torch.no_grad():
        want, _ = model.forward_with_value_head(toks)
    assert (want - model(toks)).abs().max() > 0.1
    assert (peft_logits(hf_model, tmp_path, toks) - want).abs().max() <= 1e-4


def test_export_keeps_our_scale_alpha_over_r_on_every_module(tmp_path):
    model = make_lora_model("tiny-llama", mlp=True)
    export_peft(model, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(hf_llama_from_hooked(model), str(tmp_path))
    layer = peft_model.base_model.model.model.layers[0]
    for module in (
        layer.self_attn.q_proj,
        layer.self_attn.k_proj,
        layer.self_attn.o_proj,
        layer.mlp.gate_proj,
    ):
        assert module.scaling["default"] == ALPHA / RANK


def test_per_head_adaptors_become_one_block_structured_adaptor(tmp_path):
    model = make_lora_model("tiny-llama")  # 4 query heads, 2 key/value heads, d_head 16, r 4
    export_peft(model, tmp_path)
    weights = load_file(tmp_path / PEFT_WEIGHTS)
    config = json.loads((tmp_path / PEFT_CONFIG).read_text())
    key = "base_model.model.model.layers.0.self_attn.{}.lora_{}.weight"
    assert weights[key.format("q_proj", "A")].shape == (16, 64)  # rank 4 heads · 4
    assert weights[key.format("k_proj", "B")].shape == (32, 8)  # 2 kv heads · d_head 16, 2 · 4
    q_B = weights[key.format("q_proj", "B")]
    # head 0's outputs read only head 0's rank; head 0's rank reads only head 0's z
    assert torch.equal(q_B[:16, 4:], torch.zeros(16, 12))
    o_A = weights[key.format("o_proj", "A")]
    assert torch.equal(o_A[:4, 16:], torch.zeros(4, 48))
    assert config["rank_pattern"] == {"q_proj": 16, "k_proj": 8, "v_proj": 8, "o_proj": 16}


def test_pythia_export_is_refused_with_the_reason(tmp_path):
    with pytest.raises(NotImplementedError, match="GPTNeoXForCausalLM"):
        export_peft(make_lora_model("tiny-pythia"), tmp_path)


@pytest.fixture
def smollm2_pair(smollm2_mlp_lora):
    """The embedded model with random attention and MLP adaptors (shared, see conftest.py), and
    a transformers model de-quantized from the same GGUF file of this test's own: PEFT wraps it,
    changing it in place (loaded from the cache in ~1 s)."""
    from lora_rlhf.models.smollm2 import hf_model_and_tokenizer

    hf_model, _ = hf_model_and_tokenizer()
    return smollm2_mlp_lora, hf_model


@pytest.mark.slow
def test_smollm2_export_loaded_by_peft_matches_the_lora_model(smollm2_pair, tmp_path):
    model, hf_model = smollm2_pair
    toks = tokens(model, seq=6)
    export_peft(model, tmp_path / "from_gguf")  # norm weights read from the GGUF file
    export_peft(model, tmp_path / "from_hf", hf_model=hf_model)
    from_gguf, from_hf = (load_file(tmp_path / d / PEFT_WEIGHTS) for d in ("from_gguf", "from_hf"))
    assert all(torch.equal(from_gguf[k], from_hf[k]) for k in from_hf)
    with torch.no_grad():
        want, _ = model.forward_with_value_head(toks)
    assert (want - model(toks)).abs().max() > 0.1
    # transformers and TransformerLens differ by ~5e-5 on the base model already (fp32 noise)
    assert (peft_logits(hf_model, tmp_path / "from_hf", toks) - want).abs().max() <= SMOLLM2_ATOL


def test_read_gguf_f32_reads_the_norm_weights():
    from lora_rlhf.models.smollm2 import gguf_path

    norms = LlamaNormWeights.from_gguf(gguf_path(), n_layers=30)
    assert norms.attn.shape == (30, 576) and norms.final.shape == (576,)
    first = read_gguf_f32(gguf_path(), ["blk.0.attn_norm.weight"])["blk.0.attn_norm.weight"]
    assert torch.equal(first, norms.attn[0]) and first.abs().min() > 0
