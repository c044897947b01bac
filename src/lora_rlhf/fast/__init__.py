"""The engine: the fast path of the LoRA model (:mod:`~lora_rlhf.fast.lora`), the
memory-lean PPO kernels, the lean hook registration, the heap tuner, and the opt-in that trains a
Section 1 or lesson trainer with the last two (:mod:`~lora_rlhf.fast.lean_trainer`). Each is
tested equal to the lesson code it stands in for.

``from lora_rlhf.fast import fast_lora`` (the fast path's names, as before the move) is forwarded
to :mod:`lora_rlhf.fast.lora` on first use, so importing a leaf module (``fast.memory``) does not
load the lessons.
"""

import importlib as _importlib

_TARGET = "lora_rlhf.fast.lora"


def __getattr__(name: str):
    """The names of the module this package replaced, loaded on first use."""
    if name.startswith("__"):
        raise AttributeError(name)
    return getattr(_importlib.import_module(_TARGET), name)


def __dir__():
    return sorted(set(globals()) | set(dir(_importlib.import_module(_TARGET))))
