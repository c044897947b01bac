"""Adaptors as files and as a contract: which modules of a model are adaptors
(:mod:`~lora_rlhf.adapters.files`), save/load, merging into the weights, PEFT export and the
adaptor map. Reads the declared adaptor contract, never a lesson's internals.

``from lora_rlhf.adapters import save_adapter`` (as before the move) is forwarded to
:mod:`lora_rlhf.adapters.files`.
"""

import importlib as _importlib

_TARGET = "lora_rlhf.adapters.files"


def __getattr__(name: str):
    """The names of the module this package replaced, loaded on first use."""
    if name.startswith("__"):
        raise AttributeError(name)
    return getattr(_importlib.import_module(_TARGET), name)


def __dir__():
    return sorted(set(globals()) | set(dir(_importlib.import_module(_TARGET))))
