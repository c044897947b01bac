"""HookedTransformerWithValueHead on the tiny models: logits, values, parameters, hook hygiene."""

import pytest
import torch
from torch import nn

from lora_rlhf.models import load_model
from lora_rlhf.rlhf.value_head import VALUE_HEAD_HOOK_NAME, HookedTransformerWithValueHead

TINY_MODELS = ["tiny-llama", "tiny-pythia"]


@pytest.fixture(scope="module", params=TINY_MODELS)
def model(request):
    return HookedTransformerWithValueHead.from_pretrained(request.param, device="cpu")


@pytest.fixture
def tokens(model):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, model.cfg.d_vocab, (2, 6), generator=g)


def registered_hooks(model) -> int:
    """Hooks left on any hook point (TransformerLens' handles and raw torch hooks)."""
    return sum(len(hp.fwd_hooks) + len(hp._forward_hooks) for hp in model.hook_dict.values())


def test_value_head_architecture(model):
    d_model = model.cfg.d_model
    head = model.value_head
    assert [type(m) for m in head] == [nn.Linear, nn.ReLU, nn.Linear]
    assert (head[0].in_features, head[0].out_features) == (d_model, 4 * d_model)
    assert (head[2].in_features, head[2].out_features) == (4 * d_model, 1)
    name, fn = model.value_head_hook
    assert name == VALUE_HEAD_HOOK_NAME == "ln_final.hook_normalized"
    assert callable(fn)


def test_logits_equal_the_plain_model(model, tokens):
    logits, values = model.forward_with_value_head(tokens)
    assert logits.shape == (*tokens.shape, model.cfg.d_vocab)
    assert values.shape == tokens.shape
    torch.testing.assert_close(logits, model(tokens))
    plain = load_model(model.cfg.model_name, device="cpu")  # same seeded random init
    torch.testing.assert_close(logits, plain(tokens))


def test_values_are_the_head_applied_to_final_normalized_residual(model, tokens):
    _, values = model.forward_with_value_head(tokens)
    _, cache = model.run_with_cache(tokens, names_filter=VALUE_HEAD_HOOK_NAME)
    resid = cache[VALUE_HEAD_HOOK_NAME]
    w1, b1 = model.value_head[0].weight, model.value_head[0].bias
    w2, b2 = model.value_head[2].weight, model.value_head[2].bias
    expected = (torch.relu(resid @ w1.T + b1) @ w2.T + b2).squeeze(-1)
    torch.testing.assert_close(values, expected)
    assert model.value_head_output is values


def test_forward_with_value_head_leaves_no_hooks(model, tokens):
    model.forward_with_value_head(tokens)
    assert registered_hooks(model) == 0


def test_hooks_are_removed_when_the_hooked_call_raises(tokens):
    model = HookedTransformerWithValueHead.from_pretrained("tiny-llama", device="cpu")

    class Boom(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    head = model.value_head
    model.value_head = Boom()
    with pytest.raises(RuntimeError, match="boom"):
        model.forward_with_value_head(tokens)
    assert registered_hooks(model) == 0
    model.value_head = head
    _, values = model.forward_with_value_head(tokens)  # works again afterwards
    assert values.shape == tokens.shape


def test_parameter_groups_partition_the_model(model):
    base = {id(p) for p in model.get_base_model_trainable_params()}
    head = {id(p) for p in model.get_value_head_params()}
    assert head == {id(p) for p in model.value_head.parameters()}
    assert not base & head
    assert base | head == {id(p) for p in model.parameters()}


def test_without_value_head_there_are_no_hooks_to_run():
    model = HookedTransformerWithValueHead.from_pretrained(
        "tiny-pythia", use_value_head=False, device="cpu"
    )
    assert model.value_head is None and model.get_value_head_params() == []
    with pytest.raises(RuntimeError, match="use_value_head=False"):
        _ = model.fwd_hooks


def test_attached_hooks_call_like_transformer_lens_hooks_and_leave_none(model, tokens):
    """attached_hooks (the engine's lean registration) against TransformerLens' own
    `model.hooks`: same activations replaced, in the same order, same hook point passed; nothing
    left registered, also after an exception; unknown names are named."""
    from lora_rlhf.fast.hooks import attached_hooks

    def run(context):
        calls = []

        def scale(x, hook):
            calls.append(("scale", hook.name))
            return x * 1.5

        def shift(x, hook):
            calls.append(("shift", hook.name))
            return x + 0.25

        def look(x, hook):
            calls.append(("look", hook.name))

        hooks = [
            ("blocks.0.attn.hook_q", scale),
            ("blocks.0.attn.hook_q", shift),  # two on one point: list order
            ("blocks.1.hook_mlp_out", look),
            ("blocks.1.hook_resid_post", shift),
        ]
        with torch.no_grad(), context(hooks):
            logits = model(tokens)
        return logits, calls

    ours, our_calls = run(lambda hooks: attached_hooks(model, hooks))
    theirs, their_calls = run(lambda hooks: model.hooks(fwd_hooks=hooks))
    assert our_calls == their_calls and len(our_calls) == 4
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    with torch.no_grad():
        assert (ours - model(tokens)).abs().max() > 1e-3  # the hooks did change the logits
    assert registered_hooks(model) == 0

    def boom(x, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), attached_hooks(model, [("hook_embed", boom)]):
        model(tokens)
    assert registered_hooks(model) == 0
    with pytest.raises(KeyError, match="blocks.0.nope"):
        with attached_hooks(model, [("hook_embed", boom), ("blocks.0.nope", boom)]):
            pass
    assert registered_hooks(model) == 0


def test_use_attached_hooks_changes_no_value_and_leaves_no_hook(model, tokens):
    """The engine's opt-in (use_attached_hooks, which the fast path installs): forward_with_value_head
    gives exactly the logits and values of TransformerLens' own hooks context, registers nothing
    that outlives the call, and the undo gives the model its own `hooks` back."""
    from lora_rlhf.fast.hooks import use_attached_hooks

    with torch.no_grad():
        want = model.forward_with_value_head(tokens)
        undo = use_attached_hooks(model)
        try:
            assert "hooks" in vars(model)
            got = model.forward_with_value_head(tokens)
            assert registered_hooks(model) == 0
            with model.hooks(fwd_hooks=[("hook_embed", lambda x, hook: x * 0)]):
                zeroed = model(tokens)
            assert registered_hooks(model) == 0
        finally:
            undo()
    assert "hooks" not in vars(model)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (zeroed - want[0]).abs().max() > 1e-3  # the routed context did run its hook
