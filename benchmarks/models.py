"""The in-process cases: forward and forward+backward of the LoRA, base, merged and PEFT models.

Every case is a zero-argument callable timed by :func:`timing.time_interleaved`. All models hold
the same base weights (the merged, transformers and PEFT models hold copies) and see the same
tokens. (The embedded model's loader stores the MLP weights and W_U transposed, so that
TransformerLens' per-call ``W.T.contiguous()`` copies nothing: the base and LoRA cases run on that
layout; see ``lora_rlhf.models.smollm2``.)

Backward cases need something to differentiate. The LoRA models train their adaptors (and the
value head); a base model with frozen weights gets its gradient at the embedding output instead
(a hook makes it a leaf that requires grad), so that backward runs through every layer exactly as
it does above the adaptors. "Full fine-tuning" trains every weight, as Section 1's trainer does.
"""

from __future__ import annotations

import copy
import re
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lora_rlhf.adapters.merge import merge_lora
from lora_rlhf.fast.hooks import attached_hooks
from lora_rlhf.fast.lora import install_fast_lora
from lora_rlhf.lessons.section2_lora import TransformerWithValueHeadLora
from lora_rlhf.models.sharing import distinct_tensors

PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


@dataclass
class Setup:
    """What the cases run on; built once by :func:`build`."""

    model: TransformerWithValueHeadLora  # plain forward = the base model
    fast: TransformerWithValueHeadLora  # a copy of it, its adaptors run by lora_rlhf.fast.lora
    merged: torch.nn.Module
    tokens: Tensor
    hf: torch.nn.Module | None = None  # transformers model, same base weights
    peft_same_rank: torch.nn.Module | None = None  # PEFT LoraConfig(r=rank) on q,k,v,o
    peft_exported: torch.nn.Module | None = None  # our adaptors exported to PEFT (same function)
    notes: dict[str, object] = field(default_factory=dict)


def build(
    model_name: str,
    device: str,
    batch: int,
    seq: int,
    rank: int = 4,
    alpha: float = 32,
    with_peft: bool = True,
    seed: int = 0,
) -> Setup:
    """The LoRA model (adaptors with non-zero B), its variants, and checks that they agree."""
    torch.manual_seed(seed)
    model = TransformerWithValueHeadLora.from_pretrained(
        model_name, lora_alpha=alpha, rank=rank, device=device
    )
    nonzero_B(model)
    model.eval()  # no dropout anywhere; eval only matters for PEFT's lora_dropout (0 anyway)
    tokens = torch.randint(0, model.cfg.d_vocab, (batch, seq), device=device)
    fast = copy.deepcopy(model)
    install_fast_lora(fast)
    setup = Setup(model=model, fast=fast, merged=merge_lora(model), tokens=tokens)
    setup.notes["n_hooks"] = len(model.fwd_hooks)
    setup.notes["n_layers"] = model.cfg.n_layers
    # Every variant must compute the same function as the LoRA model.
    with torch.no_grad():
        lora_logits, _ = model.forward_with_value_head(tokens)
        merged_logits = setup.merged(tokens)
        setup.notes["merged_max_abs_diff"] = (merged_logits - lora_logits).abs().max().item()
        fast_logits, _ = fast.forward_with_value_head(tokens)
        setup.notes["fast_max_abs_diff"] = (fast_logits - lora_logits).abs().max().item()
    if with_peft and model.cfg.original_architecture == "LlamaForCausalLM":
        _add_peft(setup, rank, alpha)
    return setup


def _add_peft(setup: Setup, rank: int, alpha: float) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model

    from lora_rlhf.adapters.peft_export import export_peft, hf_llama_from_hooked

    model, tokens = setup.model, setup.tokens
    device = tokens.device
    hf = hf_llama_from_hooked(model).to(device).eval()
    hf.requires_grad_(False)
    setup.hf = hf
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=PEFT_TARGETS, lora_dropout=0.0)
    same_rank = get_peft_model(copy.deepcopy(hf), config).eval()
    with torch.no_grad():
        for name, param in same_rank.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02)
    setup.peft_same_rank = same_rank
    with tempfile.TemporaryDirectory() as tmp:
        export_peft(model, tmp)
        exported = PeftModel.from_pretrained(copy.deepcopy(hf), tmp, is_trainable=True)
    setup.peft_exported = exported.eval()
    setup.notes["hf_attn_implementation"] = hf.config._attn_implementation
    with torch.no_grad(), attached_hooks(model, model.lora_fwd_hooks):
        ours = model(tokens)
    with torch.no_grad():
        theirs = exported(input_ids=tokens, use_cache=False).logits
    setup.notes["peft_exported_max_abs_diff"] = (ours - theirs).abs().max().item()


# ------------------------------------------------------------------------------------ helpers


@torch.no_grad()
def nonzero_B(model: TransformerWithValueHeadLora) -> None:
    """Every adaptor's B drawn from N(0, 0.02²). B starts at zero; a trained adaptor has B ≠ 0
    (same FLOPs, but then the merged and the PEFT logits can only match if the adaptors really
    are applied)."""
    for name, param in model.lora.named_parameters():
        if name.endswith(".B"):
            param.normal_(std=0.02)


def _embed_output_requires_grad(x: Tensor, hook) -> Tensor:
    """TransformerLens hook: the embedding output becomes a leaf that requires grad."""
    return x.detach().requires_grad_(True)


@contextmanager
def _hf_embed_requires_grad(hf: torch.nn.Module):
    base = hf.get_base_model() if hasattr(hf, "get_base_model") else hf
    handle = base.model.embed_tokens.register_forward_hook(
        lambda module, inputs, output: output.detach().requires_grad_(True)
    )
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def _trainable(params: list[torch.nn.Parameter]):
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None


# -------------------------------------------------------------------------------------- cases


def cases(setup: Setup) -> dict[str, Callable[[], object]]:
    """Every timed case, by name (see ``CASE_TITLES`` in report.py for what each measures)."""
    model, fast, merged, tokens = setup.model, setup.fast, setup.merged, setup.tokens
    base_params = model.base_model_params()

    def base_fwd():
        with torch.no_grad():
            model(tokens)

    def lora_fwd():
        with torch.no_grad():
            model.forward_with_value_head(tokens)

    def lora_only_fwd():  # the LoRA model: base + adaptors, no value head (what PEFT computes)
        with torch.no_grad(), attached_hooks(model, model.lora_fwd_hooks):
            model(tokens)

    def base_vh_fwd():  # the base model and the value head: what forward_with_value_head adds to
        with torch.no_grad(), attached_hooks(model, [model.value_head_hook]):
            model(tokens)

    def fast_fwd():  # the same adaptors through the library's fast path (lora_rlhf.fast.lora)
        with torch.no_grad():
            fast.forward_with_value_head(tokens)

    def fast_fwdbwd():
        fast.zero_grad(set_to_none=True)
        logits, values = fast.forward_with_value_head(tokens)
        (logits.mean() + values.mean()).backward()

    def lora_only_fwdbwd():
        model.zero_grad(set_to_none=True)
        with attached_hooks(model, model.lora_fwd_hooks):
            logits = model(tokens)
        logits.mean().backward()

    def merged_fwd():
        with torch.no_grad():
            merged(tokens)

    def hook_registration():  # adding and removing forward_with_value_head's hooks, no forward
        with attached_hooks(model, model.fwd_hooks):
            pass

    def base_fwdbwd():
        with attached_hooks(model, [("hook_embed", _embed_output_requires_grad)]):
            logits = model(tokens)
        logits.mean().backward()

    def lora_fwdbwd():
        model.zero_grad(set_to_none=True)
        logits, values = model.forward_with_value_head(tokens)
        (logits.mean() + values.mean()).backward()

    def full_ft_fwdbwd():  # what the LoRA trainer replaces: every weight trained
        model.zero_grad(set_to_none=True)
        with _trainable(base_params):
            with attached_hooks(model, [model.value_head_hook]):
                logits = model(tokens)
            (logits.mean() + model.value_head_output.mean()).backward()

    out = {
        "base_fwd": base_fwd,
        "lora_fwd": lora_fwd,
        "lora_only_fwd": lora_only_fwd,
        "base_vh_fwd": base_vh_fwd,
        "fast_fwd": fast_fwd,
        "fast_fwdbwd": fast_fwdbwd,
        "lora_only_fwdbwd": lora_only_fwdbwd,
        "merged_fwd": merged_fwd,
        "hook_registration": hook_registration,
        "base_fwdbwd": base_fwdbwd,
        "lora_fwdbwd": lora_fwdbwd,
        "full_ft_fwdbwd": full_ft_fwdbwd,
    }
    if setup.hf is not None:
        out.update(_peft_cases(setup))
    return out


def _peft_cases(setup: Setup) -> dict[str, Callable[[], object]]:
    tokens, hf = setup.tokens, setup.hf
    peft_same_rank, peft_exported = setup.peft_same_rank, setup.peft_exported

    def hf_fwd(m):
        def run():
            with torch.no_grad():
                m(input_ids=tokens, use_cache=False)

        return run

    def hf_base_fwdbwd():
        with _hf_embed_requires_grad(hf):
            logits = hf(input_ids=tokens, use_cache=False).logits
        logits.mean().backward()

    def peft_fwdbwd(m):
        def run():
            m.zero_grad(set_to_none=True)
            m(input_ids=tokens, use_cache=False).logits.mean().backward()

        return run

    return {
        "hf_base_fwd": hf_fwd(hf),
        "hf_base_fwdbwd": hf_base_fwdbwd,
        "peft_fwd": hf_fwd(peft_same_rank),
        "peft_fwdbwd": peft_fwdbwd(peft_same_rank),
        "peft_exported_fwd": hf_fwd(peft_exported),
        "peft_exported_fwdbwd": peft_fwdbwd(peft_exported),
    }


def hook_times(setup: Setup, rounds: int) -> dict[str, float]:
    """Seconds spent inside each kind of hook during one ``forward_with_value_head`` (all layers
    together; the least over ``rounds`` forwards), measured by wrapping every hook in a timer.

    Kinds are hook names without the layer: ``attn.hook_q``, ``hook_attn_out``,
    ``ln1.hook_normalized``, ``ln_final.hook_normalized`` (the value head), … Summing inside
    one forward makes this far steadier than the difference of two forwards' times.
    """
    model, tokens = setup.model, setup.tokens
    spent: dict[str, float] = {}

    def timed(kind: str, fn):
        def hook(activation, hook):
            start = time.perf_counter()
            out = fn(activation, hook=hook)
            spent[kind] = spent.get(kind, 0.0) + time.perf_counter() - start
            return out

        return hook

    hooks = [(name, timed(re.sub(r"^blocks\.\d+\.", "", name), fn)) for name, fn in model.fwd_hooks]
    measured = []
    with torch.no_grad():
        for i in range(rounds + 1):  # the first one warms up
            spent.clear()
            with model.hooks(fwd_hooks=hooks):
                model(tokens)
            if i:
                measured.append(dict(spent))
    return {kind: min(m[kind] for m in measured) for kind in measured[0]}


def param_counts(model: TransformerWithValueHeadLora) -> dict[str, int]:
    # each tensor once: a tied W_U (the view W_E.T) holds W_E's numbers
    n = lambda params: sum(p.numel() for p in distinct_tensors(params))  # noqa: E731
    return {
        "base": n(model.base_model_params()),
        "lora": n(model.lora_params()),
        "value_head": n(model.get_value_head_params()),
    }
