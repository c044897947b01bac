"""The engine: the fast path of the LoRA model (:mod:`~lora_rlhf.fast.lora`), the
memory-lean PPO kernels, the lean hook registration, the heap tuner, and the opt-in that trains a
Section 1 or lesson trainer with the last two (:mod:`~lora_rlhf.fast.lean_trainer`). Each is
tested equal to the lesson code it stands in for.

``from lora_rlhf.fast import fast_lora`` (the fast path's names, as before the move) is forwarded
to :mod:`lora_rlhf.fast.lora` on first use, so importing a leaf module (``fast.memory``) does not
load the lessons.
"""

from lora_rlhf.aliases import forward_names as _forward_names

__getattr__, __dir__ = _forward_names("lora_rlhf.fast.lora")
