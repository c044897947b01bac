"""The course's own tooling: rendering the lessons into exercises/ and solutions/
(:mod:`~lora_rlhf.authoring.sync`) and loading whose classes to use — the library's, the
solutions', the exercises' or a submission's (:mod:`~lora_rlhf.authoring.implementations`).

``from lora_rlhf.authoring import sources`` (as before the move) is forwarded to
:mod:`lora_rlhf.authoring.sync`.
"""

from lora_rlhf.aliases import forward_names as _forward_names

__getattr__, __dir__ = _forward_names("lora_rlhf.authoring.sync")
