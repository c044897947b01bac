"""Export the adaptors to the PEFT format of the matching Hugging Face model (Llama family).

A LoRA trained here carries on in the Hugging Face stack (PEFT, TRL, accelerate)::

    export_peft(model, "out/peft")                       # adapter_model.safetensors + adapter_config.json
    peft_model = peft.PeftModel.from_pretrained(hf_model, "out/peft")

Two facts make the conversion exact:

* **Per-head adaptors are one block-structured adaptor.** ``q_proj`` maps d_model to the
  concatenation of the heads' queries, so n_heads rank-r adaptors ``A_q[h], B_q[h]`` are one
  adaptor of rank n_heads·r: ``lora_A`` stacks every head's A, ``lora_B`` is block diagonal (head
  h's B maps head h's r columns to head h's d_head outputs). K/V: n_key_value_heads blocks.
  ``o_proj`` reads the concatenation of the heads' z, so there ``lora_A`` is block diagonal and
  ``lora_B`` stacks every head's B. PEFT's scale is alpha/r per module, so the config sets
  ``rank_pattern`` (n·r) and ``alpha_pattern`` (n·α) to keep α/r equal to ours.
* **TransformerLens folds the RMSNorm weights w into the next weights** (W_Q, W_K, W_V, W_in,
  W_gate: ``W_tl = diag(w) W_hf``). Its hooks, and so the adaptors, read the normalized input
  *without* w, while Hugging Face's projections read ``x·w``. So ``lora_A_hf = diag(1/w) A``:
  ``(x·w) diag(1/w) A = x A``. The norm weights come from the transformers model, or, for the
  embedded SmolLM2, straight from its GGUF file.

MLP adaptors map one to one: ``mlp_in`` → ``up_proj``, ``mlp_gate`` → ``gate_proj``,
``mlp_out`` → ``down_proj`` (rank r, α as ours). The value head has no PEFT counterpart and is
not exported (save it with :func:`lora_rlhf.adapters.files.save_adapter`).
"""

from __future__ import annotations

import json
from pathlib import Path

import einops
import torch
from torch import Tensor, nn
from transformer_lens import HookedTransformer

from lora_rlhf.adapters.contract import adaptor_values, lora_targets, rank_and_alpha
from lora_rlhf.adapters.gguf_norms import (  # noqa: F401  (read_gguf_f32: also read from here)
    LlamaNormWeights,
    norm_weights_for,
    read_gguf_f32,
)

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
HUB_NAMES = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}

# target -> (module path inside a Llama decoder layer, which norm's weight TransformerLens folded in)
HF_MODULES = {
    "q": ("self_attn.q_proj", "attn"),
    "k": ("self_attn.k_proj", "attn"),
    "v": ("self_attn.v_proj", "attn"),
    "o": ("self_attn.o_proj", None),
    "mlp_in": ("mlp.up_proj", "mlp"),
    "mlp_gate": ("mlp.gate_proj", "mlp"),
    "mlp_out": ("mlp.down_proj", None),
}


def _check_llama(model: HookedTransformer) -> None:
    arch = model.cfg.original_architecture
    if arch not in SUPPORTED_ARCHITECTURES:
        raise NotImplementedError(
            f"PEFT export supports {', '.join(SUPPORTED_ARCHITECTURES)} models; this one is {arch} "
            "(GPT-NeoX/Pythia fuse q/k/v into one projection and fold LayerNorm biases, which a "
            "LoRA cannot carry over exactly)"
        )


def _unfold(A: Tensor, w: Tensor | None) -> Tensor:
    """diag(1/w) A for A: [n, d_model, r] (the adaptor of a weight TransformerLens folded w into)."""
    if w is None:
        return A
    if bool((w == 0).any()):
        raise ValueError("a norm weight is exactly 0: the adaptor on that input cannot be exported")
    return A / w.to(A)[None, :, None]


def peft_state_dict(
    model: nn.Module, norm_weights: LlamaNormWeights, prefix: str = "base_model.model."
) -> dict[str, Tensor]:
    """The ``lora_A``/``lora_B`` weights of every adapted module, keyed as PEFT saves them."""
    out = {}
    dtype = model.cfg.dtype
    for i, layer in enumerate(adaptor_values(model)):
        for target, (A, B, _) in layer.items():
            module, norm = HF_MODULES[target]
            w = None if norm is None else getattr(norm_weights, norm)[i]
            A, B = _unfold(A.detach().double().cpu(), w), B.detach().double().cpu()
            if target == "o":  # input = concat of heads' z: A block diagonal, B stacked
                lora_A = torch.block_diag(*[a.T for a in A])  # [(n r), (n d_head)]
                lora_B = einops.rearrange(B, "n r d_model -> d_model (n r)")
            else:  # output = concat of heads (1 "head" for an MLP weight): A stacked, B block diagonal
                lora_A = einops.rearrange(A, "n d_in r -> (n r) d_in")
                lora_B = torch.block_diag(*[b.T for b in B])  # [(n d_out), (n r)]
            key = f"{prefix}model.layers.{i}.{module}"
            out[f"{key}.lora_A.weight"] = lora_A.to(dtype).contiguous()
            out[f"{key}.lora_B.weight"] = lora_B.to(dtype).contiguous()
    return out


def peft_config(model: nn.Module, base_model_name_or_path: str | None = None) -> dict:
    """The ``adapter_config.json`` of the export: PEFT's alpha/r equals our α/r on every module."""
    rank, alpha = rank_and_alpha(model)
    alpha = int(alpha) if float(alpha).is_integer() else alpha
    cfg = model.cfg
    n_kv = cfg.n_key_value_heads or cfg.n_heads
    blocks = {"q": cfg.n_heads, "k": n_kv, "v": n_kv, "o": cfg.n_heads}
    targets = lora_targets(model)
    modules = [HF_MODULES[t][0].split(".")[-1] for t in targets]
    rank_pattern = {
        HF_MODULES[t][0].split(".")[-1]: n * rank for t, n in blocks.items() if t in targets
    }
    alpha_pattern = {
        HF_MODULES[t][0].split(".")[-1]: n * alpha for t, n in blocks.items() if t in targets
    }
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": alpha,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "target_modules": modules,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }


def export_peft(
    model: nn.Module,
    out_dir: str | Path,
    hf_model: nn.Module | None = None,
    norm_weights: LlamaNormWeights | None = None,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write `model`'s adaptors as a PEFT LoRA adapter for the matching transformers model.

    Args:
        model: a LoRA model on a Llama-architecture base (``smollm2-135m``, ``tiny-llama``, …).
        out_dir: the folder for ``adapter_model.safetensors`` and ``adapter_config.json`` (use
            another folder than :func:`~lora_rlhf.adapters.files.save_adapter`'s: both write an
            ``adapter_config.json``).
        hf_model: the transformers model holding the same weights; needed only for a base model
            other than the embedded and tiny ones (to read its norm weights).
        norm_weights: the folded RMSNorm weights, when known otherwise.
        base_model_name_or_path: written into the config (default: the hub name of the embedded
            model, or ``hf_model.name_or_path``).

    Returns:
        The folder; ``peft.PeftModel.from_pretrained(hf_model, out_dir)`` loads it.
    """
    from safetensors.torch import save_file

    _check_llama(model)
    norms = norm_weights or norm_weights_for(model, hf_model)
    if base_model_name_or_path is None:
        base_model_name_or_path = (
            HUB_NAMES.get(model.cfg.model_name)
            or getattr(hf_model, "name_or_path", None)
            or model.cfg.model_name
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(peft_state_dict(model, norms), str(out_dir / PEFT_WEIGHTS), metadata={"format": "pt"})
    config = peft_config(model, base_model_name_or_path)
    (out_dir / PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


@torch.no_grad()
def hf_llama_from_hooked(model: HookedTransformer, norm_weights: LlamaNormWeights | None = None):
    """A transformers ``LlamaForCausalLM`` with the same weights as a Llama-family HookedTransformer
    (the base weights; adaptors are not included — merge them first with ``merge_lora`` to export
    a merged model). The norm weights are unfolded back out of W_Q/W_K/W_V/W_in/W_gate/W_U."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _check_llama(model)
    cfg = model.cfg
    if cfg.rotary_dim not in (None, cfg.d_head):
        raise NotImplementedError("Llama applies rotary embeddings to the whole head")
    nonzero = [
        n
        for n, p in model.named_parameters()
        if n.split(".")[-1].lstrip("_").startswith("b_") and bool(p.any())
    ]
    if nonzero:
        raise NotImplementedError(f"Llama has no biases, this model has non-zero {nonzero[:3]}")
    norms = norm_weights or norm_weights_for(model)
    n_kv = cfg.n_key_value_heads or cfg.n_heads
    hf_cfg = LlamaConfig(
        vocab_size=cfg.d_vocab,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_mlp,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=n_kv,
        head_dim=cfg.d_head,
        hidden_act=cfg.act_fn,
        max_position_embeddings=cfg.n_ctx,
        rms_norm_eps=cfg.eps,
        rope_theta=float(cfg.rotary_base),
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
    )
    hf = LlamaForCausalLM(hf_cfg).to(cfg.dtype).eval()

    def unfold(W, w):  # W_tl = diag(w) W: undo it on the input axis (d_model, second to last)
        return W.detach().double().cpu() / w.double()[:, None]

    def attn_in(W, w, n):  # [n, d_model, d_head] -> [(n d_head), d_model]
        return einops.rearrange(unfold(W, w), "n m h -> (n h) m", n=n)

    state = {"model.embed_tokens.weight": model.W_E}
    if isinstance(getattr(model.ln_final, "w", None), torch.Tensor):
        # The final norm kept its weight (a tied unembedding, see lora_rlhf.models.sharing):
        # W_U holds none of it.
        state["model.norm.weight"] = model.ln_final.w.detach()
        state["lm_head.weight"] = model.W_U.T
    else:
        state["model.norm.weight"] = norms.final
        state["lm_head.weight"] = unfold(model.W_U, norms.final).T
    for i, block in enumerate(model.blocks):
        attn, mlp, p = block.attn, block.mlp, f"model.layers.{i}."
        grouped = getattr(attn, "_W_K", None) is not None
        state.update(
            {
                p + "input_layernorm.weight": norms.attn[i],
                p + "post_attention_layernorm.weight": norms.mlp[i],
                p + "self_attn.q_proj.weight": attn_in(attn.W_Q, norms.attn[i], cfg.n_heads),
                p + "self_attn.k_proj.weight": attn_in(
                    attn._W_K if grouped else attn.W_K, norms.attn[i], n_kv
                ),
                p + "self_attn.v_proj.weight": attn_in(
                    attn._W_V if grouped else attn.W_V, norms.attn[i], n_kv
                ),
                p + "self_attn.o_proj.weight": einops.rearrange(attn.W_O, "n h m -> m (n h)"),
                p + "mlp.up_proj.weight": unfold(mlp.W_in, norms.mlp[i]).T,
                p + "mlp.gate_proj.weight": unfold(mlp.W_gate, norms.mlp[i]).T,
                p + "mlp.down_proj.weight": mlp.W_out.T,
            }
        )
    hf.load_state_dict({k: v.to(cfg.dtype) for k, v in state.items()}, strict=True)
    return hf
