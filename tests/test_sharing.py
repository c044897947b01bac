"""One tensor where a model needs the same values twice: the tied unembedding, the rotary tables."""

from __future__ import annotations

import copy

import pytest
import torch
from transformer_lens.components import RMSNorm

from lora_rlhf.adapters.merge import merge_lora
from lora_rlhf.adapters.peft_export import hf_llama_from_hooked
from lora_rlhf.models import load_model
from lora_rlhf.models.sharing import (
    distinct_tensors,
    share_frozen_copies,
    share_rotary_tables,
    tie_unembed,
    unembed_is_tied,
    untie_unembed,
)
from lora_rlhf.rlhf.args import RLHFArgs
from lora_rlhf.rlhf.trainer import RLHFTrainer


def folded_tiny_llama(seed: int = 0):
    """tiny-llama made to look like a tied model loaded with fold_ln: W_U = diag(w) W_E.T for a
    random final norm weight w. Returns the model and w."""
    torch.manual_seed(seed)
    model = load_model("tiny-llama", device="cpu", dtype=torch.float64)
    w = 0.5 + torch.rand(model.cfg.d_model, dtype=torch.float64)
    with torch.no_grad():
        model.unembed.W_U.copy_(w[:, None] * model.embed.W_E.T)
    return model, w


def test_tie_unembed_keeps_the_logits_and_the_value_heads_input():
    """Independent reference: the folded model's own logits (W_U = diag(w) W_E.T) before tying."""
    model, w = folded_tiny_llama()
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 7))
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter="ln_final.hook_normalized")
    tie_unembed(model, w)
    assert unembed_is_tied(model) and isinstance(model.ln_final, RMSNorm)
    assert model.W_U.data_ptr() == model.W_E.data_ptr()
    with torch.no_grad():
        tied, tied_cache = model.run_with_cache(tokens, names_filter="ln_final.hook_normalized")
    torch.testing.assert_close(tied, logits, rtol=0, atol=1e-12)
    # the hook the value head reads is still the unweighted x / rms(x)
    torch.testing.assert_close(
        tied_cache["ln_final.hook_normalized"], cache["ln_final.hook_normalized"], rtol=0, atol=0
    )


def test_tie_unembed_refuses_a_model_whose_final_norm_already_has_a_weight():
    model, w = folded_tiny_llama()
    tie_unembed(model, w)
    with pytest.raises(TypeError, match="RMSNormPre"):
        tie_unembed(model, w)


def test_untie_gives_w_u_its_own_memory_and_training_moves_it_alone():
    model, w = folded_tiny_llama()
    tie_unembed(model, w)
    W_E_before = model.W_E.detach().clone()
    untie_unembed(model)
    assert not unembed_is_tied(model)
    torch.testing.assert_close(model.W_U, model.W_E.T, rtol=0, atol=0)
    assert model.W_U.stride() == model.W_E.T.stride()  # the layout F.linear reads
    with torch.no_grad():
        model.unembed.W_U.add_(1.0)
    torch.testing.assert_close(model.W_E, W_E_before, rtol=0, atol=0)
    untie_unembed(model)  # a no-op on an untied model
    assert not unembed_is_tied(model)


def test_share_frozen_copies_ties_a_deep_copy_again_and_refuses_trainable_models():
    model, w = folded_tiny_llama()
    tie_unembed(model, w)
    model.requires_grad_(False)
    copied = copy.deepcopy(model)
    assert not unembed_is_tied(copied)  # deepcopy clones each parameter
    share_frozen_copies(copied)
    assert unembed_is_tied(copied)
    attns = [block.attn for block in copied.blocks]
    assert all(a.rotary_sin is attns[0].rotary_sin for a in attns)
    trainable, _ = folded_tiny_llama()
    with pytest.raises(ValueError, match="frozen"):
        share_frozen_copies(trainable)
    # an untied frozen model whose W_U differs from W_E.T stays untied
    trainable.requires_grad_(False)
    share_frozen_copies(trainable)
    assert not unembed_is_tied(trainable)


def test_shared_rotary_tables_keep_the_logits():
    model = load_model("tiny-llama", device="cpu")
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 9))
    with torch.no_grad():
        before = model(tokens)
        share_rotary_tables(model)
        after = model(tokens)
    assert all(b.attn.rotary_cos is model.blocks[0].attn.rotary_cos for b in model.blocks)
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_transformers_export_of_a_tied_model_keeps_its_logits():
    model, w = folded_tiny_llama()
    model = model.to(torch.float32)
    tie_unembed(model, w.float())
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 7))
    hf = hf_llama_from_hooked(model)
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, model(tokens), rtol=0, atol=1e-4)


def test_the_embedded_model_is_loaded_tied_like_the_original(smollm2, smollm2_reference):
    """SmolLM2's lm_head is its embedding: W_U is W_E.T (one tensor), the final norm weight is the
    transformers model's, every layer reads one rotary table."""
    hf_model, _ = smollm2_reference
    assert hf_model.config.tie_word_embeddings
    assert unembed_is_tied(smollm2)
    assert torch.equal(smollm2.W_E, hf_model.model.embed_tokens.weight)
    assert torch.equal(smollm2.ln_final.w, hf_model.model.norm.weight)
    rotary = {b.attn.rotary_sin.data_ptr() for b in smollm2.blocks}
    assert len(rotary) == 1


def test_merging_a_tied_model_keeps_it_tied():
    model, w = folded_tiny_llama()
    tie_unembed(model, w)
    from lora_rlhf.lessons.section2_lora import TransformerWithValueHeadLora

    lora_model = TransformerWithValueHeadLora.from_pretrained(
        "tiny-llama", device="cpu", dtype=torch.float64
    )
    lora_model.load_state_dict(model.state_dict(), strict=False)
    tie_unembed(lora_model, w)
    with torch.no_grad():
        for name, p in lora_model.lora.named_parameters():
            if name.endswith(".B"):
                p.normal_(std=0.1)
    merged = merge_lora(lora_model)
    assert unembed_is_tied(merged) and isinstance(merged.ln_final, RMSNorm)
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 7))
    with torch.no_grad():
        hooked, _ = lora_model.forward_with_value_head(tokens)
        torch.testing.assert_close(merged(tokens), hooked, rtol=0, atol=1e-10)


def test_full_fine_tuning_unties_the_policy_and_ties_its_frozen_reference(monkeypatch):
    """Section 1's trainer trains W_E and W_U as two parameters; its frozen reference copy holds
    one. (tiny-llama loaded tied, through the registry's loader.)"""
    import lora_rlhf.models.registry as registry

    loaders = dict(registry._LOADERS)
    real = loaders["tiny-llama"]

    def tied_tiny_llama(name, device, dtype, model_class):
        model = real(name, device, dtype, model_class=model_class)
        w = 0.5 + torch.rand(model.cfg.d_model, dtype=model.cfg.dtype)
        with torch.no_grad():
            model.unembed.W_U.copy_(w[:, None] * model.embed.W_E.T)
        return tie_unembed(model, w)

    monkeypatch.setitem(registry._LOADERS, "tiny-llama", tied_tiny_llama)
    args = RLHFArgs(
        base_model="tiny-llama", use_wandb=False, total_phases=2, warmup_steps=0, batch_size=4,
        num_minibatches=2, gen_len=3,
    )  # fmt: skip
    trainer = RLHFTrainer(args, show_progress=False)
    policy, ref = trainer.model, trainer.ref_model
    assert not unembed_is_tied(policy) and unembed_is_tied(ref)
    assert policy.unembed.W_U.requires_grad and not ref.unembed.W_U.requires_grad
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert id(policy.unembed.W_U) in in_optimizer and id(policy.embed.W_E) in in_optimizer
    W_E_ref = ref.W_E.detach().clone()
    trainer.run_phase()
    torch.testing.assert_close(ref.W_E, W_E_ref, rtol=0, atol=0)  # the reference never moves
    assert not torch.equal(policy.W_U, policy.W_E.T)  # trained as two parameters


def test_distinct_tensors_counts_a_tied_unembedding_once():
    model, w = folded_tiny_llama()
    before = sum(p.numel() for p in distinct_tensors(model.parameters()))
    assert before == sum(p.numel() for p in model.parameters())  # untied: every tensor its own
    tie_unembed(model, w)
    params = list(model.parameters())
    distinct = distinct_tensors([*params, None, params[0]])
    assert len(distinct) == len(params) - 1
    assert sum(p.numel() for p in distinct) == before - model.W_U.numel() + model.cfg.d_model
