"""Probe helpers of the model checks: how many hooks a model still holds, and how often each
LoraHooks hook method runs."""

from __future__ import annotations

HOOK_METHODS = ("store_hook_attn_normalized", "lora_hook_qkv", "store_hook_z", "lora_hook_out")


def registered_hooks(model) -> int:
    return sum(len(hp._forward_hooks) + len(hp._backward_hooks) for hp in model.hook_dict.values())


class HookCounter:
    """Counts calls of the LoraHooks hook methods. The methods are patched on the class *before*
    the model is built (hook lists hold bound methods) and restored on exit."""

    def __init__(self, LoraHooks):
        self.cls = LoraHooks
        self.counts = dict.fromkeys(HOOK_METHODS, 0)
        self.fail_on: str | None = None
        self.originals = {m: getattr(LoraHooks, m) for m in HOOK_METHODS}

    def reset(self, fail_on: str | None = None) -> dict:
        self.counts = dict.fromkeys(HOOK_METHODS, 0)
        self.fail_on = fail_on
        return self.counts

    def _wrap(self, method_name, fn):
        def counted(hooks_self, *args, **kwargs):
            self.counts[method_name] += 1
            if method_name == self.fail_on:
                raise RuntimeError("deliberate failure inside a hook")
            return fn(hooks_self, *args, **kwargs)

        return counted

    def __enter__(self):
        for m, fn in self.originals.items():
            setattr(self.cls, m, self._wrap(m, fn))
        return self

    def __exit__(self, *exc):
        for m, fn in self.originals.items():
            setattr(self.cls, m, fn)
