"""The ``lora-rlhf`` command (:mod:`~lora_rlhf.cli.command`) and ``train``'s parts: its
options, settings, outputs, run files, plots and checkpoints. The top of the import graph:
nothing imports it.

``from lora_rlhf.cli import main`` (as before the move) is forwarded to
:mod:`lora_rlhf.cli.command`.
"""

import importlib as _importlib

_TARGET = "lora_rlhf.cli.command"


def __getattr__(name: str):
    """The names of the module this package replaced, loaded on first use."""
    if name.startswith("__"):
        raise AttributeError(name)
    return getattr(_importlib.import_module(_TARGET), name)


def __dir__():
    return sorted(set(globals()) | set(dir(_importlib.import_module(_TARGET))))
