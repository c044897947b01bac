"""The engine's memory-lean log-probs, KL penalty and entropy bonus (lora_rlhf.fast.ppo_kernels): the
values and gradients of the plain formulas, without their vocabulary-sized temporaries."""

import pytest
import torch

import lora_rlhf.fast.ppo_kernels as ppo_kernels
import lora_rlhf.rlhf.ppo as ppo
from lora_rlhf.fast.ppo_kernels import calc_entropy_bonus, calc_kl_penalty, get_logprobs

BATCH, PREFIX_LEN, GEN_LEN, D_VOCAB = 3, 3, 4, 7
SEQ = PREFIX_LEN + GEN_LEN


def _plain_kl(x, y):  # the textbook formula, through autograd
    logp, logq = x.log_softmax(-1), y.log_softmax(-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def _plain_entropy(x):
    logp = x.log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_kl_and_entropy_gradients_equal_autograd_of_the_plain_formulas(scale):
    """calc_kl_penalty and calc_entropy_bonus compute their own backward (to keep no softmax for
    it): their gradients must equal autograd's through the plain formulas, for the policy's logits
    and also for reference logits that require grad; float64, random weights on each term."""
    g = torch.Generator().manual_seed(1)
    x = (
        torch.randn(BATCH, SEQ, D_VOCAB, generator=g, dtype=torch.float64) * scale
    ).requires_grad_()
    y = (
        torch.randn(BATCH, SEQ, D_VOCAB, generator=g, dtype=torch.float64) * scale
    ).requires_grad_()
    cut = slice(-GEN_LEN - 1, -1)
    w = torch.rand(3, generator=g, dtype=torch.float64)
    ours = (
        w[0] * calc_kl_penalty(x, y, kl_coef=1.0, gen_len=GEN_LEN)
        + w[1] * calc_entropy_bonus(x, ent_coef=1.0, gen_len=GEN_LEN)
        + w[2] * calc_kl_penalty(y, x, kl_coef=1.0, gen_len=GEN_LEN)
    )
    plain = (
        w[0] * _plain_kl(x[:, cut], y[:, cut]).mean()
        + w[1] * _plain_entropy(x[:, cut]).mean()
        + w[2] * _plain_kl(y[:, cut], x[:, cut]).mean()
    )
    torch.testing.assert_close(ours, plain, rtol=1e-12, atol=1e-12)
    got = torch.autograd.grad(ours, (x, y))
    want = torch.autograd.grad(plain, (x, y))
    assert want[0].abs().max() > 1e-3 and want[1].abs().max() > 1e-3  # non-trivial gradients
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # and torch's own finite-difference check, on a smaller case
    small = (
        x[:1, -3:].detach().clone().requires_grad_(),
        y[:1, -3:].detach().clone().requires_grad_(),
    )
    assert torch.autograd.gradcheck(lambda a, b: calc_kl_penalty(a, b, 1.0, 2), small)
    assert torch.autograd.gradcheck(lambda a: calc_entropy_bonus(a, 1.0, 2), small[:1])


def test_log_probs_kl_and_entropy_keep_no_vocabulary_sized_tensor_for_backward():
    """What makes the LoRA phase's memory peak: every tensor kept for backward that is as big as
    the logits' generated positions. get_logprobs, the KL penalty and the entropy bonus may keep
    views of the logits they were given (in memory anyway), but no new tensor of that size."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(BATCH, SEQ, D_VOCAB, generator=g, requires_grad=True)
    ref_logits = torch.randn(BATCH, SEQ, D_VOCAB, generator=g)
    tokens = torch.randint(0, D_VOCAB, (BATCH, SEQ), generator=g)
    inputs = {logits.untyped_storage().data_ptr(), ref_logits.untyped_storage().data_ptr()}
    new_big = []

    def pack(t):
        if t.numel() >= BATCH * GEN_LEN * D_VOCAB and t.untyped_storage().data_ptr() not in inputs:
            new_big.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        total = (
            get_logprobs(logits, tokens, PREFIX_LEN).sum()
            + calc_kl_penalty(logits, ref_logits, 0.5, GEN_LEN)
            + calc_entropy_bonus(logits, 0.1, GEN_LEN)
        )
    assert new_big == [], f"tensors of the logits' size kept for backward: {new_big}"
    total.backward()
    assert torch.isfinite(logits.grad).all()


def test_get_logprobs_gradient_equals_autograd_of_log_softmax_gather():
    """get_logprobs computes its own backward (one sequence at a time): it must equal autograd's
    through log_softmax + gather in float64, for a token repeated in a row and extreme logits."""
    g = torch.Generator().manual_seed(3)
    for scale in (1.0, 30.0):
        x = (
            torch.randn(BATCH, SEQ, D_VOCAB, generator=g, dtype=torch.float64) * scale
        ).requires_grad_()
        tokens = torch.randint(0, D_VOCAB, (BATCH, SEQ), generator=g)
        tokens[0, -2:] = tokens[0, -3]  # the same token at neighbouring positions
        w = torch.rand(BATCH, SEQ - PREFIX_LEN, generator=g, dtype=torch.float64)
        ours = (w * get_logprobs(x, tokens, PREFIX_LEN)).sum()
        cut = x[:, PREFIX_LEN - 1 : -1].log_softmax(-1)
        plain = (w * cut.gather(-1, tokens[:, PREFIX_LEN:, None]).squeeze(-1)).sum()
        torch.testing.assert_close(ours, plain, rtol=1e-12, atol=1e-12)
        got, want = torch.autograd.grad(ours, x)[0], torch.autograd.grad(plain, x)[0]
        assert want.abs().max() > 1e-3
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    small = x[:1, -4:].detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a: get_logprobs(a, tokens[:1, -4:], 2), (small,))


def test_log_probs_kl_and_entropy_never_build_a_tensor_of_the_batchs_logits_size():
    """While computing (forward and backward), get_logprobs, the KL penalty and the entropy bonus
    work one sequence at a time: apart from the gradients they return, no operation may produce a
    tensor bigger than one sequence's [gen_len, d_vocab] block. (Plain formulas build several the
    size of the whole batch's logits, which is what made the peak of a LoRA phase.)"""
    from torch.utils._python_dispatch import TorchDispatchMode

    g = torch.Generator().manual_seed(4)
    logits = torch.randn(BATCH, SEQ, D_VOCAB, generator=g, requires_grad=True)
    ref_logits = torch.randn(BATCH, SEQ, D_VOCAB, generator=g)
    tokens = torch.randint(0, D_VOCAB, (BATCH, SEQ), generator=g)
    block = SEQ * D_VOCAB

    class NewBigTensors(TorchDispatchMode):
        """Records every operation that allocates a tensor bigger than one sequence's block
        (views and in-place/``out=`` results share an input's storage and are not counted)."""

        def __init__(self, allowed=()):
            super().__init__()
            self.allowed, self.big = allowed, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            inputs = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            shared = {a.untyped_storage().data_ptr() for a in inputs}
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if (
                    isinstance(t, torch.Tensor)
                    and t.numel() > block
                    and t.untyped_storage().data_ptr() not in shared
                    and func.overloadpacket not in self.allowed
                ):
                    self.big.append(f"{func}: {tuple(t.shape)}")
            return out

    with NewBigTensors() as forward_mode:
        terms = [
            get_logprobs(logits, tokens, PREFIX_LEN).sum(),
            calc_kl_penalty(logits, ref_logits, 0.5, GEN_LEN),
            calc_entropy_bonus(logits, 0.1, GEN_LEN),
        ]
    assert forward_mode.big == [], f"batch-sized temporaries in forward: {forward_mode.big}"
    # In backward each function allocates only the gradient it returns (empty); autograd itself
    # then pads it to the full sequence (slice_backward: the slice of generated positions).
    aten = torch.ops.aten
    for term in terms:
        with NewBigTensors(
            allowed=(aten.empty, aten.new_zeros, aten.zeros, aten.slice_backward)
        ) as backward_mode:
            (grad,) = torch.autograd.grad(term, logits)
        assert backward_mode.big == [], f"batch-sized temporaries in backward: {backward_mode.big}"
        assert torch.isfinite(grad).all()


def test_each_kernel_equals_the_section_1_function_it_stands_in_for():
    """The trainers call these instead of lora_rlhf.rlhf.ppo's plain functions: same arguments, the same
    values and gradients (float32, full-sequence and already-cut logits alike)."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(BATCH, SEQ, D_VOCAB, generator=g) * 4
    ref_logits = torch.randn(BATCH, SEQ, D_VOCAB, generator=g) * 4
    tokens = torch.randint(0, D_VOCAB, (BATCH, SEQ), generator=g)
    cut = slice(-GEN_LEN - 1, -1)
    calls = {
        "get_logprobs": lambda f, x, y: f(x, tokens, PREFIX_LEN).mul(torch.arange(GEN_LEN)).sum(),
        "get_logprobs, no prefix": lambda f, x, y: f(x, tokens).sum(),
        "calc_kl_penalty": lambda f, x, y: f(x, y, 0.7, GEN_LEN),
        "calc_kl_penalty, cut": lambda f, x, y: f(x[:, cut], y[:, cut], 0.7, GEN_LEN),
        "calc_entropy_bonus": lambda f, x, y: f(x, 0.3, GEN_LEN),
    }
    for label, call in calls.items():
        name = label.split(",")[0]
        results = []
        for module in (ppo, ppo_kernels):
            x, y = logits.clone().requires_grad_(), ref_logits.clone().requires_grad_()
            value = call(getattr(module, name), x, y)
            results.append((value, *torch.autograd.grad(value, (x, y), allow_unused=True)))
        (plain, *plain_grads), (kernel, *kernel_grads) = results
        torch.testing.assert_close(kernel, plain, rtol=1e-6, atol=1e-7, msg=label)
        for a, b in zip(kernel_grads, plain_grads):
            if b is None:  # get_logprobs and the entropy do not read the reference logits
                assert a is None or not a.any(), label
            else:
                assert b.abs().max() > 1e-4, label  # non-trivial gradients
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=label)
