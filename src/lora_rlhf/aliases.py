"""Old module paths, kept importable: ``import lora_rlhf.lora`` (or ``lora_rlhf.trainer``,
``lora_rlhf.ppo`` ...) gives the module that now lives in a folder (``lora_rlhf.lessons.section2_lora``),
the very same module object, so notebooks, submissions and saved runs written before the move
keep working. Installed by ``lora_rlhf/__init__.py``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys

# old path -> where the module lives now
ALIASES: dict[str, str] = {
    "lora_rlhf.adaptor_map": "lora_rlhf.adapters.adaptor_map",
    "lora_rlhf.args": "lora_rlhf.rlhf.args",
    "lora_rlhf.checkpoint": "lora_rlhf.cli.checkpoint",
    "lora_rlhf.devices": "lora_rlhf.models.devices",
    "lora_rlhf.fast_lora_bonus": "lora_rlhf.lessons.bonus_fast_lora",
    "lora_rlhf.grpo": "lora_rlhf.lessons.section3_grpo",
    "lora_rlhf.grpo_trainer": "lora_rlhf.cli.grpo_trainer",
    "lora_rlhf.hacking": "lora_rlhf.rlhf.hacking",
    "lora_rlhf.impl": "lora_rlhf.authoring.implementations",
    "lora_rlhf.kl_control": "lora_rlhf.rlhf.kl_control",
    "lora_rlhf.lean_hooks": "lora_rlhf.fast.hooks",
    "lora_rlhf.lora": "lora_rlhf.lessons.section2_lora",
    "lora_rlhf.memory": "lora_rlhf.fast.memory",
    "lora_rlhf.merge": "lora_rlhf.adapters.merge",
    "lora_rlhf.mlp_lora": "lora_rlhf.lessons.bonus_mlp_lora",
    "lora_rlhf.peft_export": "lora_rlhf.adapters.peft_export",
    "lora_rlhf.ppo": "lora_rlhf.rlhf.ppo",
    "lora_rlhf.ppo_kernels": "lora_rlhf.fast.ppo_kernels",
    "lora_rlhf.rewards": "lora_rlhf.rlhf.rewards",
    "lora_rlhf.run_files": "lora_rlhf.cli.run_files",
    "lora_rlhf.stop_signals": "lora_rlhf.cli.stop_signals",
    "lora_rlhf.train_cli": "lora_rlhf.cli.train",
    "lora_rlhf.train_outputs": "lora_rlhf.cli.outputs",
    "lora_rlhf.train_settings": "lora_rlhf.cli.settings",
    "lora_rlhf.trainer": "lora_rlhf.rlhf.trainer",
    "lora_rlhf.value_head": "lora_rlhf.rlhf.value_head",
}


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec):
        return importlib.import_module(self.target)

    def exec_module(self, module) -> None:
        """Nothing to run: the module was imported under its own name."""


class AliasFinder(importlib.abc.MetaPathFinder):
    """Finds each old path of :data:`ALIASES` as the module it names."""

    def find_spec(self, fullname, path=None, target=None):
        new = ALIASES.get(fullname)
        if new is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(new))


def install() -> None:
    if not any(isinstance(f, AliasFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, AliasFinder())


def forward_names(target: str):
    """``__getattr__`` and ``__dir__`` for a package that took an old module's name
    (``lora_rlhf.fast`` was ``fast.py``): its names come from ``target``, imported on first use,
    so importing one of the package's leaf modules loads nothing else."""

    def __getattr__(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(importlib.import_module(target), name)

    def __dir__():
        return sorted(
            set(sys.modules[target.rpartition(".")[0]].__dict__)
            | set(dir(importlib.import_module(target)))
        )

    return __getattr__, __dir__
