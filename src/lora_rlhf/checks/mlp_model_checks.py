"""MLP bonus checks of `TransformerWithValueHeadMlpLora`: its parameters and its hooked forward
against the attention and MLP adaptors merged into a freshly loaded model."""

from __future__ import annotations

import torch

from lora_rlhf.checks.core import CheckFailed, expect
from lora_rlhf.checks.mlp_hooks_checks import (
    assign_mlp_layer,
    bonus_check,
    mlp_adaptor_values,
    mlp_merged_model,
)
from lora_rlhf.checks.reference import (
    ALPHA,
    RANK,
    adaptor_values,
    assign_layer,
    base_model,
    close,
    max_diff,
    merged_model,
    seeded_tokens,
)

# --------------------------------------------------------------------------------------------
MODEL, SEED = "tiny-llama", 9
MODEL_NEEDS = ("TransformerWithValueHeadMlpLora",)


def _model(impl):
    torch.manual_seed(0)
    model = impl.TransformerWithValueHeadMlpLora.from_pretrained(
        MODEL, lora_alpha=ALPHA, rank=RANK, device="cpu"
    )
    mlp_lora = getattr(model, "mlp_lora", None)
    if mlp_lora is None or len(mlp_lora) != model.cfg.n_layers:
        raise CheckFailed(
            f"model.mlp_lora should hold one MlpLoraHooks per layer "
            f"({model.cfg.n_layers}); got {None if mlp_lora is None else len(mlp_lora)}"
        )
    for i, values in enumerate(adaptor_values(model.cfg, SEED)):
        assign_layer(model.lora[i], values, i)
    for i, values in enumerate(mlp_adaptor_values(model.cfg, SEED)):
        assign_mlp_layer(model.mlp_lora[i], values, i)
    return model


@bonus_check("TransformerWithValueHeadMlpLora", needs=MODEL_NEEDS)
def probe_mlp_model_params(impl):
    """lora_params() holds the attention and MLP adaptors; base weights frozen and not among them."""
    model = _model(impl)
    lora_ids = {id(p) for p in model.lora_params()}
    mlp_ids = {id(p) for p in model.mlp_lora.parameters()}
    attn_ids = {id(p) for p in model.lora.parameters()}
    base = model.base_model_params()
    return {
        "mlp_in_lora_params": len(mlp_ids & lora_ids),
        "n_mlp": len(mlp_ids),
        "attn_in_lora_params": len(attn_ids & lora_ids),
        "n_attn": len(attn_ids),
        "mlp_in_base": len(mlp_ids & {id(p) for p in base}),
        "base_trainable": sum(p.requires_grad for p in base),
        "mlp_trainable": sum(p.requires_grad for p in model.mlp_lora.parameters()),
    }


@probe_mlp_model_params.judge
def judge_mlp_model_params(out):
    expect(out["n_mlp"] > 0, "model.mlp_lora has no parameters")
    expect(
        out["mlp_in_lora_params"] == out["n_mlp"],
        f"lora_params() holds {out['mlp_in_lora_params']} of the {out['n_mlp']} MLP adaptor "
        "parameters: return the attention and the MLP adaptors",
    )
    expect(
        out["attn_in_lora_params"] == out["n_attn"],
        "lora_params() lost the attention adaptors: return both kinds",
    )
    expect(out["mlp_in_base"] == 0, "base_model_params() includes MLP adaptor parameters")
    expect(out["base_trainable"] == 0, f"{out['base_trainable']} base parameters are trainable")
    expect(out["mlp_trainable"] == out["n_mlp"], "the MLP adaptors must be trainable")


@bonus_check("TransformerWithValueHeadMlpLora", needs=MODEL_NEEDS)
def probe_mlp_model_forward(impl):
    """forward_with_value_head uses the attention and MLP adaptors; plain forward is the base model."""
    model = _model(impl)
    tokens = seeded_tokens(2, 8, model.cfg.d_vocab, seed=8)
    with torch.no_grad():
        logits, values = model.forward_with_value_head(tokens)
        plain = model(tokens)
    return {"logits": logits.float(), "values_shape": list(values.shape), "plain": plain.float()}


@probe_mlp_model_forward.judge
def judge_mlp_model_forward(out):
    tokens = seeded_tokens(2, 8, 512, seed=8)
    with torch.no_grad():
        expected = mlp_merged_model(MODEL, SEED, with_attention=True)(tokens)
        base = base_model(MODEL)(tokens)
    expect(
        out["values_shape"] == [2, 8], f"values should have shape [2, 8], got {out['values_shape']}"
    )
    expect(close(out["plain"], base), "plain forward must be the base model (no adaptors)")
    got = out["logits"]
    if close(got, expected):
        return
    hint = ""
    if close(got, base):
        hint = ": no adaptor ran"
    else:
        with torch.no_grad():
            attention_only = merged_model(MODEL, SEED)(tokens)
        if close(got, attention_only):
            hint = ": only the attention adaptors ran — append the MLP hooks to self.lora_fwd_hooks"
    raise CheckFailed(
        f"forward_with_value_head should equal the model with attention and MLP "
        f"adaptors merged (max logit diff {max_diff(got, expected):.3g}){hint}"
    )
