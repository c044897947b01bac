"""The course's own tooling: rendering the lessons into exercises/ and solutions/
(:mod:`~lora_rlhf.authoring.sync`) and loading whose classes to use — the library's, the
solutions', the exercises' or a submission's (:mod:`~lora_rlhf.authoring.implementations`).

``from lora_rlhf.authoring import sources`` (as before the move) is forwarded to
:mod:`lora_rlhf.authoring.sync`.
"""

import importlib as _importlib

_TARGET = "lora_rlhf.authoring.sync"


def __getattr__(name: str):
    """The names of the module this package replaced, loaded on first use."""
    if name.startswith("__"):
        raise AttributeError(name)
    return getattr(_importlib.import_module(_TARGET), name)


def __dir__():
    return sorted(set(globals()) | set(dir(_importlib.import_module(_TARGET))))
