"""The ``lora-rlhf`` command (:mod:`~lora_rlhf.cli.command`) and ``train``'s parts: its
options, settings, outputs, run files, plots and checkpoints. The top of the import graph:
nothing imports it.

``from lora_rlhf.cli import main`` (as before the move) is forwarded to
:mod:`lora_rlhf.cli.command`.
"""

from lora_rlhf.aliases import forward_names as _forward_names

__getattr__, __dir__ = _forward_names("lora_rlhf.cli.command")
