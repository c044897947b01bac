"""The engine's hook registration: what TransformerLens' ``with model.hooks(fwd_hooks=...)`` does
for forward hooks, for a fraction of its cost.

That context manager stores the ``repr`` of every hook function (for a bound method, the repr of
its whole module) and resets every hook point of the model on exit, which costs more than the
LoRA model's forward hooks themselves on small inputs (docs/benchmarks.md). :func:`attached_hooks`
registers and removes only the hooks it is given; :func:`use_attached_hooks` makes a model's
``hooks`` context use it, so the course's code (``forward_with_value_head``, the LoRA model's
``generate``) runs unchanged and the engine opts in: the fast path does, for the model it trains.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

from torch import nn
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

FwdHook = tuple[str, Callable]


def _call(fn: Callable, hook_point: HookPoint, module: nn.Module, inputs, output):
    return fn(output, hook=hook_point)


@contextmanager
def attached_hooks(model: HookedTransformer, fwd_hooks: list[FwdHook]) -> Iterator[None]:
    """Run the block with the forward hooks ``(hook_name, fn)`` on `model`; each is removed on the
    way out, also when the block raises.

    The same calls as TransformerLens' ``with model.hooks(fwd_hooks=...)`` (``fn(activation,
    hook=hook_point)``; a returned tensor replaces the activation; hooks run in list order), but
    only these hooks are touched on exit. Hook points with a TransformerLens tensor conversion
    (its compatibility mode) are left to TransformerLens' own context manager."""
    points = []
    for name, fn in fwd_hooks:
        if name not in model.mod_dict:
            raise KeyError(f"{name!r} is not a hook point of this model")
        points.append((model.mod_dict[name], fn))
    if any(getattr(point, "hook_conversion", None) is not None for point, _ in points):
        with type(model).hooks(model, fwd_hooks=fwd_hooks):
            yield
        return
    handles = []
    try:
        for point, fn in points:
            handles.append(point.register_forward_hook(partial(_call, fn, point)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def use_attached_hooks(model: HookedTransformer) -> Callable[[], None]:
    """From now on, ``with model.hooks(fwd_hooks=...)`` on `model` runs through
    :func:`attached_hooks` (any other use of ``hooks`` — backward hooks, no reset on exit,
    cleared contexts — still goes to TransformerLens); returns the function undoing it."""
    own = type(model).hooks

    def hooks(fwd_hooks=(), bwd_hooks=(), reset_hooks_end=True, clear_contexts=False):
        if bwd_hooks or not reset_hooks_end or clear_contexts:
            return own(model, list(fwd_hooks), list(bwd_hooks), reset_hooks_end, clear_contexts)
        return attached_hooks(model, list(fwd_hooks))

    hooks.__doc__ = own.__doc__
    model.hooks = hooks
    return lambda: model.__dict__.pop("hooks", None)
