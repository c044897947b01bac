"""The library's fast path (`lora_rlhf.fast.lora`) computes what the teaching classes compute.

Every comparison runs one model twice, through its own six hooks per layer (the lesson) and
through `fast_lora`, with non-zero B everywhere: logits, values and the gradient of every adaptor
parameter (and the value head's). In float64 they agree to rounding; in float32 the fast path may
differ from the lesson by no more than the lesson differs from its own float64 run.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from lora_rlhf.adapters.files import AdaptorContractError, disable_lora
from lora_rlhf.authoring.implementations import load_impl
from lora_rlhf.fast.lora import fast_lora, install_fast_lora
from lora_rlhf.lessons.bonus_mlp_lora import TransformerWithValueHeadMlpLora
from lora_rlhf.lessons.section2_lora import TransformerWithValueHeadLora

ALPHA, RANK = 8.0, 4  # α/r = 2
COURSE_SUBMISSION = Path(__file__).parent / "grading_fixtures" / "course_submission.py"
GEN = dict(max_new_tokens=6, do_sample=False, verbose=False, stop_at_eos=False)


def lora_model(name="tiny-llama", model_class=TransformerWithValueHeadLora, dtype=None, seed=0):
    """A LoRA model whose adaptors all have random non-zero A and B."""
    torch.manual_seed(seed)
    model = model_class.from_pretrained(
        name, lora_alpha=ALPHA, rank=RANK, device="cpu", dtype=dtype
    )
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.lora_params():
            param.copy_(0.1 * torch.randn(param.shape, generator=gen, dtype=torch.float64))
    return model


def tokens(model, batch=2, seq=9, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, model.cfg.d_vocab, (batch, seq), generator=gen)


def forward_backward(model, toks) -> dict[str, torch.Tensor]:
    """Logits, values and the gradient of every trainable parameter, by name."""
    model.zero_grad(set_to_none=True)
    logits, values = model.forward_with_value_head(toks)
    (logits.log_softmax(-1)[..., :7].sum() + values.sum()).backward()
    out = {"logits": logits.detach(), "values": values.detach()}
    out |= {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out


def lesson_and_fast(model, toks) -> tuple[dict, dict]:
    lesson = forward_backward(model, toks)
    with fast_lora(model):
        fast = forward_backward(model, toks)
    return lesson, fast


def assert_same(got: dict, want: dict, atol_of) -> None:
    assert set(got) == set(want)
    grads = [n for n in want if n.startswith("lora.")]
    assert grads and all(bool(want[n].abs().max() > 0) for n in grads)
    for name in want:
        diff = (got[name] - want[name]).abs().max().item()
        assert diff <= atol_of(name), f"{name}: max diff {diff:.3g} > {atol_of(name):.3g}"


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-pythia"])
def test_float64_logits_values_and_gradients_equal_the_lessons(name):
    model = lora_model(name, dtype=torch.float64)
    lesson, fast = lesson_and_fast(model, tokens(model))
    assert_same(fast, lesson, lambda n: 1e-12 * (1 + lesson[n].abs().max().item()))


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-pythia"])
def test_float32_agrees_with_the_lesson_to_the_lessons_own_rounding(name):
    model = lora_model(name)
    toks = tokens(model)
    exact = forward_backward(copy.deepcopy(model).to(torch.float64), toks)
    lesson, fast = lesson_and_fast(model, toks)
    noise = {n: (lesson[n].double() - exact[n]).abs().max().item() for n in lesson}
    assert_same(fast, lesson, lambda n: 2 * noise[n] + 1e-6 * lesson[n].abs().max().item())


def test_a_model_written_the_way_the_course_writes_it_runs_fast_too():
    """Only the contract is read (lora[i].lora_q/k/v/o with A, B, rank, lora_alpha;
    lora_fwd_hooks, fwd_hooks): a submission in the course's own style runs the same function."""
    impl = load_impl(str(COURSE_SUBMISSION))
    model = lora_model(model_class=impl.TransformerWithValueHeadLora, dtype=torch.float64)
    assert type(model.lora[0].lora_q).__module__ != "lora_rlhf.lessons.section2_lora"
    lesson, fast = lesson_and_fast(model, tokens(model))
    assert_same(fast, lesson, lambda n: 1e-12 * (1 + lesson[n].abs().max().item()))


def test_other_lora_hooks_of_the_model_stay_on():
    """The MLP bonus's adaptors still run through their own hooks, beside the fast attention."""
    model = lora_model(model_class=TransformerWithValueHeadMlpLora, dtype=torch.float64)
    lesson, fast = lesson_and_fast(model, tokens(model))
    assert any(n.startswith("mlp_lora.") for n in lesson)
    assert_same(fast, lesson, lambda n: 1e-12 * (1 + lesson[n].abs().max().item()))


@pytest.mark.parametrize("use_past_kv_cache", [True, False])
def test_generate_gives_the_lessons_tokens_and_plain_forward_stays_the_base(use_past_kv_cache):
    model = lora_model()
    toks = tokens(model)
    with torch.no_grad():
        base = model(toks)
    want = model.generate(toks[:, :4], use_past_kv_cache=use_past_kv_cache, **GEN)
    with fast_lora(model), torch.no_grad():
        got = model.generate(toks[:, :4], use_past_kv_cache=use_past_kv_cache, **GEN)
        plain = model(toks)
        with disable_lora(model):
            switched_off, _ = model.forward_with_value_head(toks)
    assert torch.equal(got, want)
    torch.testing.assert_close(plain, base, rtol=0, atol=0)
    torch.testing.assert_close(switched_off, base, rtol=0, atol=0)


def test_matrices_kept_outside_autograd_follow_changed_and_replaced_parameters():
    model = lora_model(dtype=torch.float64)
    toks = tokens(model)
    with fast_lora(model):
        for step in range(3):
            with torch.no_grad():
                fast, _ = model.forward_with_value_head(toks)
            lesson = _lesson_logits(model, toks)
            torch.testing.assert_close(fast, lesson, rtol=0, atol=1e-12)
            with torch.no_grad():
                if step == 0:  # an optimizer-like step: in place
                    for param in model.lora_params():
                        param.add_(0.05)
                else:  # a new parameter object
                    lora_k = model.lora[1].lora_k
                    lora_k.B = torch.nn.Parameter(lora_k.B + 0.1)


def _lesson_logits(model, toks):
    """The teaching hooks' logits, with the fast path of `model` set aside for one call."""
    saved = {m: model.__dict__.pop(m) for m in ("forward_with_value_head", "generate")}
    qkv = {}
    for block in model.blocks:
        qkv[block] = block.attn.__dict__.pop("calculate_qkv_matrices")
    try:
        with torch.no_grad():
            return model.forward_with_value_head(toks)[0]
    finally:
        model.__dict__.update(saved)
        for block, fn in qkv.items():
            block.attn.calculate_qkv_matrices = fn


def test_the_block_undoes_everything_also_when_it_raises():
    model = lora_model()
    toks = tokens(model)
    with torch.no_grad():
        before, _ = model.forward_with_value_head(toks)
    with pytest.raises(KeyError), fast_lora(model):
        raise KeyError("inside")
    assert "generate" not in model.__dict__ and "forward_with_value_head" not in model.__dict__
    assert all("calculate_qkv_matrices" not in b.attn.__dict__ for b in model.blocks)
    with torch.no_grad():
        after, _ = model.forward_with_value_head(toks)
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_install_returns_the_undo_and_refuses_a_second_install():
    model = lora_model()
    undo = install_fast_lora(model)
    with pytest.raises(RuntimeError, match="installed on this model already"):
        install_fast_lora(model)
    undo()
    install_fast_lora(model)()


def test_misuse_stops_with_a_message_that_names_it():
    model = lora_model()
    del model.lora[1].lora_k.lora_alpha  # an adaptor outside the adaptor contract
    with pytest.raises(AdaptorContractError, match="Lora has no lora_alpha: .*A, B, rank and"):
        install_fast_lora(model)
    model.lora[1].lora_k.lora_alpha = 2 * ALPHA  # α/r differing within one layer
    with pytest.raises(ValueError, match="differ in rank or α/r"):
        install_fast_lora(model)
    model.lora[1].lora_k.lora_alpha = ALPHA
    with pytest.raises(TypeError, match="Section 2 LoRA model"):
        install_fast_lora(torch.nn.Linear(2, 2))
    with fast_lora(model), torch.no_grad():  # the teaching hooks attached by hand as well
        with pytest.raises(RuntimeError, match="would be added twice"):
            with model.hooks(fwd_hooks=model.lora[0].list_fwd_hooks()):
                model.forward_with_value_head(tokens(model))


def test_a_model_whose_fwd_hooks_ignore_lora_fwd_hooks_is_refused():
    class OwnHookList(TransformerWithValueHeadLora):
        @property
        def fwd_hooks(self):
            return [h for layer in self.lora for h in layer.list_fwd_hooks()] + [
                self.value_head_hook
            ]

    model = lora_model(model_class=OwnHookList)
    with pytest.raises(TypeError, match="lora_fwd_hooks read at call time"):
        install_fast_lora(model)


@pytest.mark.slow  # loads the embedded model
def test_the_embedded_model_float64_equals_the_lesson():
    model = lora_model("smollm2-135m")
    model = copy.deepcopy(model).to(torch.float64)
    toks = tokens(model, batch=1, seq=6)
    lesson, fast = lesson_and_fast(model, toks)
    assert_same(fast, lesson, lambda n: 1e-10 * (1 + lesson[n].abs().max().item()))
