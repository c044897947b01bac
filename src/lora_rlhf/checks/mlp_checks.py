"""Checks of the bonus exercises (``bonus_mlp_lora.py``): `MlpLoraHooks` and
`TransformerWithValueHeadMlpLora`.

They are registered in their own registry, :data:`lora_rlhf.checks.core.MLP` (read it with
``MLP.for_exercise``), not in :data:`lora_rlhf.checks.core.CHECKS`: ``checks_for()`` stays the
graded 100-point rubric of Section 2, whose submissions do not define the bonus classes. Each check
carries 0 points.
"""

from __future__ import annotations

# importing the two halves registers their checks into MLP (plain `import`: no edge to the package)
import lora_rlhf.checks.mlp_hooks_checks  # noqa: F401
import lora_rlhf.checks.mlp_model_checks  # noqa: F401
from lora_rlhf.authoring.implementations import SECTIONS
from lora_rlhf.checks.core import MLP
from lora_rlhf.checks.notebook import run_exercise

BONUS_FILE = SECTIONS["mlp"][0]
BONUS_CHECKS = MLP.checks
bonus_checks_for = MLP.for_exercise


# --------------------------------------------------------------------------------------------
# Notebook-style entry points (called at the end of each bonus exercise)


def testing_mlp_lora_hooks(MlpLoraHooks) -> None:
    """Shapes (gated and plain MLP), hook names, dispatch, the out-hook, hooked == merged."""
    run_exercise(MLP.for_exercise("MlpLoraHooks"), "MlpLoraHooks", MlpLoraHooks=MlpLoraHooks)


def testing_mlp_lora_model(TransformerWithValueHeadMlpLora) -> None:
    """Parameters and the hooked forward of a TransformerWithValueHeadMlpLora on tiny-llama."""
    run_exercise(
        MLP.for_exercise("TransformerWithValueHeadMlpLora"),
        "TransformerWithValueHeadMlpLora",
        TransformerWithValueHeadMlpLora=TransformerWithValueHeadMlpLora,
    )
