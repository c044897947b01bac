"""The RMSNorm weights a Llama model's export needs back: TransformerLens folds them into the next
weights (``W_tl = diag(w) W_hf``), so :mod:`lora_rlhf.adapters.peft_export` reads them from the
transformers model, from the embedded SmolLM2's GGUF file, or from the model itself when unfolded.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import einops
import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens import HookedTransformer


@dataclass
class LlamaNormWeights:
    """The RMSNorm weights TransformerLens folded away: ``attn`` (input_layernorm) and ``mlp``
    (post_attention_layernorm), each [n_layers, d_model], and ``final`` (the last norm), [d_model]."""

    attn: Float[Tensor, "n_layers d_model"]
    mlp: Float[Tensor, "n_layers d_model"]
    final: Float[Tensor, " d_model"]

    @classmethod
    def ones(cls, cfg) -> LlamaNormWeights:
        """A model built without norm weights (the tiny random models): w = 1 everywhere."""
        return cls(
            torch.ones(cfg.n_layers, cfg.d_model),
            torch.ones(cfg.n_layers, cfg.d_model),
            torch.ones(cfg.d_model),
        )

    @classmethod
    def from_hf(cls, hf_model: nn.Module) -> LlamaNormWeights:
        """Read them from a transformers Llama model (``LlamaForCausalLM`` or a PEFT wrapper)."""
        base = hf_model.get_base_model() if hasattr(hf_model, "get_base_model") else hf_model
        layers = base.model.layers
        return cls(
            torch.stack([layer.input_layernorm.weight.detach().float().cpu() for layer in layers]),
            torch.stack(
                [layer.post_attention_layernorm.weight.detach().float().cpu() for layer in layers]
            ),
            base.model.norm.weight.detach().float().cpu(),
        )

    @classmethod
    def from_gguf(cls, path: str | Path, n_layers: int) -> LlamaNormWeights:
        """Read them from a GGUF file (llama.cpp names ``blk.{i}.attn_norm`` …, stored as F32)."""
        names = [f"blk.{i}.{kind}_norm.weight" for kind in ("attn", "ffn") for i in range(n_layers)]
        tensors = read_gguf_f32(path, [*names, "output_norm.weight"])

        def stack(kind: str) -> Tensor:
            return torch.stack([tensors[f"blk.{i}.{kind}_norm.weight"] for i in range(n_layers)])

        return cls(stack("attn"), stack("ffn"), tensors["output_norm.weight"])


_GGUF_SCALARS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_GGUF_STRING, _GGUF_ARRAY, _GGUF_F32 = 8, 9, 0


def read_gguf_f32(path: str | Path, names: list[str]) -> dict[str, Tensor]:
    """Read a few F32 tensors from a GGUF file without parsing the rest (``gguf.GGUFReader`` builds
    every metadata field, slow for SmolLM2's vocabulary; this reads only the headers it skips)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        pos = 0

        def take(fmt: str):
            nonlocal pos
            (value,) = struct.unpack_from("<" + fmt, data, pos)
            pos += struct.calcsize("<" + fmt)
            return value

        def skip(vtype: int) -> None:
            nonlocal pos
            if vtype == _GGUF_STRING:
                n = take("Q")  # not `pos += take(...)`: that would read pos before take moves it
                pos += n
            elif vtype == _GGUF_ARRAY:
                item_type, n = take("I"), take("Q")
                if item_type in _GGUF_SCALARS:
                    pos += n * struct.calcsize(_GGUF_SCALARS[item_type])
                else:
                    for _ in range(n):
                        skip(item_type)
            else:
                pos += struct.calcsize(_GGUF_SCALARS[vtype])

        def string() -> str:
            nonlocal pos
            n = take("Q")
            pos += n
            return bytes(data[pos - n : pos]).decode("utf-8", "replace")

        if data[:4] != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        pos = 4
        take("I")  # version
        n_tensors, n_kv = take("Q"), take("Q")
        alignment = 32
        for _ in range(n_kv):
            key, vtype = string(), take("I")
            if key == "general.alignment":
                alignment = take("I")
            else:
                skip(vtype)
        infos = {}
        for _ in range(n_tensors):
            name = string()
            dims = [take("Q") for _ in range(take("I"))]
            infos[name] = (dims, take("I"), take("Q"))
        start = -(-pos // alignment) * alignment
        out = {}
        for name in names:
            if name not in infos:
                raise KeyError(f"{path} has no tensor {name!r}")
            dims, ttype, offset = infos[name]
            if ttype != _GGUF_F32:
                raise ValueError(f"{path}: {name} is stored as GGUF type {ttype}, not F32")
            begin = start + offset
            # Slicing gives bytes (a copy): no view of the map outlives it.
            raw = data[begin : begin + 4 * int(np.prod(dims))]
            out[name] = torch.from_numpy(np.frombuffer(raw, dtype="<f4").reshape(dims[::-1]).copy())
    return out


def norm_weights_for(
    model: HookedTransformer, hf_model: nn.Module | None = None
) -> LlamaNormWeights:
    """The norm weights folded into `model`: from `hf_model` when given, else from the embedded
    model's GGUF file, the model itself (unfolded ``RMS``), or ones (the tiny random models)."""
    cfg = model.cfg
    if hf_model is not None:
        norms = LlamaNormWeights.from_hf(hf_model)
        _check_same_weights(model, hf_model, norms)
        return norms
    if cfg.model_name == "smollm2-135m":
        from lora_rlhf.models.smollm2 import gguf_path

        return LlamaNormWeights.from_gguf(gguf_path(), cfg.n_layers)
    if cfg.normalization_type == "RMS":  # not folded: the weights are still in the model
        return LlamaNormWeights(
            torch.stack([b.ln1.w.detach().float().cpu() for b in model.blocks]),
            torch.stack([b.ln2.w.detach().float().cpu() for b in model.blocks]),
            model.ln_final.w.detach().float().cpu(),
        )
    if cfg.model_name == "tiny-llama":
        return LlamaNormWeights.ones(cfg)
    raise ValueError(
        f"{cfg.model_name}: TransformerLens folded its RMSNorm weights into the next weights; "
        "pass hf_model= (the transformers model it was converted from) so that the export can "
        "unfold them"
    )


def _check_same_weights(
    model: HookedTransformer, hf_model: nn.Module, norms: LlamaNormWeights
) -> None:
    base = hf_model.get_base_model() if hasattr(hf_model, "get_base_model") else hf_model
    q_hf = base.model.layers[0].self_attn.q_proj
    q_hf = getattr(q_hf, "base_layer", q_hf).weight.detach().double().cpu()  # PEFT-wrapped or not
    folded = (
        einops.rearrange(q_hf, "(n h) m -> n m h", n=model.cfg.n_heads)
        * norms.attn[0].double()[:, None]
    )
    W_Q = model.blocks[0].attn.W_Q.detach().double().cpu()
    if folded.shape != W_Q.shape or not torch.allclose(folded, W_Q, atol=1e-4, rtol=1e-3):
        raise ValueError(
            "hf_model does not hold the same weights as this model "
            "(layer 0 q_proj · input_layernorm differs from W_Q)"
        )
