"""Adaptors as files and as a contract: which modules of a model are adaptors
(:mod:`~lora_rlhf.adapters.files`), save/load, merging into the weights, PEFT export and the
adaptor map. Reads the declared adaptor contract, never a lesson's internals.

``from lora_rlhf.adapters import save_adapter`` (as before the move) is forwarded to
:mod:`lora_rlhf.adapters.files`.
"""

from lora_rlhf.aliases import forward_names as _forward_names

__getattr__, __dir__ = _forward_names("lora_rlhf.adapters.files")
