"""The engine's versions of three Section 1 functions: the same values as
:func:`lora_rlhf.rlhf.ppo.get_logprobs`, :func:`~lora_rlhf.rlhf.ppo.calc_kl_penalty` and
:func:`~lora_rlhf.rlhf.ppo.calc_entropy_bonus`, for a fraction of their memory. The trainers use these.

Each is an autograd function that keeps only its inputs for the backward pass (views of logits
that are in memory anyway) and recomputes the softmax there, one sequence at a time. The plain
formulas keep two or three tensors the size of the logits' generated positions
(``[minibatch, gen_len, d_vocab]``) until backward and build several more while computing; here a
temporary is one sequence's ``[gen_len, d_vocab]``. That peak is most of what a LoRA phase holds
beyond the model (docs/training.md, "Memory"). tests/test_ppo_kernels.py checks values and
gradients against the plain formulas of :mod:`lora_rlhf.rlhf.ppo`.
"""

from __future__ import annotations

import itertools

import torch
from jaxtyping import Float, Int
from torch import Tensor
from torch.autograd.function import once_differentiable

from lora_rlhf.rlhf.ppo import gen_positions


def get_logprobs(
    logits: Float[Tensor, "batch seq d_vocab"],
    tokens: Int[Tensor, "batch seq"],
    prefix_len: int | None = None,
) -> Float[Tensor, "batch out_len"]:
    """:func:`lora_rlhf.rlhf.ppo.get_logprobs`, computed one sequence at a time."""
    start = 0 if prefix_len is None else prefix_len - 1
    return _LogProb.apply(logits[:, start:-1], tokens[:, start + 1 :])


def calc_kl_penalty(
    logits: Float[Tensor, "batch seq d_vocab"],
    ref_logits: Float[Tensor, "batch seq d_vocab"],
    kl_coef: float,
    gen_len: int,
) -> Float[Tensor, ""]:
    """:func:`lora_rlhf.rlhf.ppo.calc_kl_penalty`, computed one sequence at a time."""
    kl = _KLDivergence.apply(gen_positions(logits, gen_len), gen_positions(ref_logits, gen_len))
    return kl_coef * kl.mean()


def calc_entropy_bonus(
    logits: Float[Tensor, "batch seq d_vocab"], ent_coef: float, gen_len: int
) -> Float[Tensor, ""]:
    """:func:`lora_rlhf.rlhf.ppo.calc_entropy_bonus`, computed one sequence at a time."""
    entropy = _Entropy.apply(gen_positions(logits, gen_len))
    return ent_coef * entropy.mean()


def _row_blocks(t: Tensor) -> list[tuple]:
    """Indices of `t`'s ``[seq, d_vocab]`` blocks (one per sequence; the whole of a 2-D `t`)."""
    if t.dim() <= 2:
        return [(...,)]
    return list(itertools.product(*(range(n) for n in t.shape[:-2])))


def _empty_like_contiguous(t: Tensor) -> Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


class _LogProb(torch.autograd.Function):
    """``log softmax(x)[t]`` over the last axis, for one index `t` per row: ``x_t − logsumexp(x)``."""

    @staticmethod
    def forward(ctx, logits: Tensor, index: Tensor) -> Tensor:
        index = index.unsqueeze(-1)
        lse = _empty_like_contiguous(logits[..., 0])
        for i in _row_blocks(logits):
            torch.logsumexp(logits[i], dim=-1, out=lse[i])
        ctx.save_for_backward(logits, index, lse)
        return logits.gather(dim=-1, index=index).squeeze(-1) - lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        logits, index, lse = ctx.saved_tensors
        grad_logits = _empty_like_contiguous(logits)
        for i in _row_blocks(logits):
            # ∂/∂x_j = [j = t] − p_j
            probs = logits[i].sub(lse[i].unsqueeze(-1)).exp_()
            torch.mul(probs, grad[i].neg().unsqueeze(-1), out=grad_logits[i])
        grad_logits.scatter_add_(-1, index, grad.unsqueeze(-1))
        return grad_logits, None


class _Entropy(torch.autograd.Function):
    """H(softmax(x)) over the last axis: ``-Σ p log p``."""

    @staticmethod
    def forward(ctx, logits: Tensor) -> Tensor:
        entropy = _empty_like_contiguous(logits[..., 0])
        for i in _row_blocks(logits):
            logprobs = logits[i].log_softmax(dim=-1)
            torch.sum(logprobs.exp() * logprobs, dim=-1, out=entropy[i])
        entropy.neg_()
        ctx.save_for_backward(logits, entropy)
        return entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> Tensor:
        logits, entropy = ctx.saved_tensors
        grad_logits = _empty_like_contiguous(logits)
        for i in _row_blocks(logits):
            logprobs = logits[i].log_softmax(dim=-1)
            # ∂H/∂x_j = -p_j (log p_j + H)
            scale = logprobs.add(entropy[i].unsqueeze(-1)).mul_(grad[i].neg().unsqueeze(-1))
            torch.mul(logprobs.exp_(), scale, out=grad_logits[i])
        return grad_logits


class _KLDivergence(torch.autograd.Function):
    """KL(softmax(x) ‖ softmax(y)) over the last axis: ``Σ p (log p − log q)``."""

    @staticmethod
    def forward(ctx, logits: Tensor, ref_logits: Tensor) -> Tensor:
        kl = _empty_like_contiguous(logits[..., 0])
        for i in _row_blocks(logits):
            logprobs = logits[i].log_softmax(dim=-1)
            log_ratio = ref_logits[i].log_softmax(dim=-1).neg_().add_(logprobs)
            torch.sum(logprobs.exp_().mul_(log_ratio), dim=-1, out=kl[i])
        ctx.save_for_backward(logits, ref_logits, kl)
        return kl

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        logits, ref_logits, kl = ctx.saved_tensors
        want_logits, want_ref = ctx.needs_input_grad[:2]
        grad_logits = _empty_like_contiguous(logits) if want_logits else None
        grad_ref = _empty_like_contiguous(ref_logits) if want_ref else None
        for i in _row_blocks(logits):
            g = grad[i].unsqueeze(-1)
            logprobs = logits[i].log_softmax(dim=-1)
            ref_logprobs = ref_logits[i].log_softmax(dim=-1)
            if want_ref:  # ∂KL/∂y_j = q_j − p_j
                torch.mul(ref_logprobs.exp() - logprobs.exp(), g, out=grad_ref[i])
            if want_logits:  # ∂KL/∂x_j = p_j (log p_j − log q_j − KL)
                scale = ref_logprobs.neg_().add_(logprobs).sub_(kl[i].unsqueeze(-1)).mul_(g)
                torch.mul(logprobs.exp_(), scale, out=grad_logits[i])
        return grad_logits, grad_ref
