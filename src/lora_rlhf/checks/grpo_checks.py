"""Checks of the GRPO bonus (``section3_grpo.py``): group advantages, the k3 estimator, the GRPO
objective and `GRPOTrainerLora`.

They live in their own registry, :data:`lora_rlhf.checks.core.GRPO`, not in Section 2's
:data:`~lora_rlhf.checks.core.CHECKS`: ``checks_for()`` stays the 100-point rubric, and these points
are optional, on top of it. The checks are written in :mod:`.grpo_advantages` (the formulas) and
:mod:`.grpo_trainer` (the trainer); every judge compares with float64 references from the formulas
(or the base and merged tiny models of :mod:`.reference`) and none imports the code it judges.
"""

from __future__ import annotations

# importing the two halves registers their checks into GRPO (plain `import`: no edge to the package)
import lora_rlhf.checks.grpo_advantages  # noqa: F401
import lora_rlhf.checks.grpo_trainer  # noqa: F401
from lora_rlhf.authoring.implementations import SECTIONS
from lora_rlhf.checks.core import GRPO

GRPO_FILE = SECTIONS["grpo"][0]
GRPO_EXERCISES = ("group_advantages", "calc_kl_k3", "calc_grpo_objective", "GRPOTrainerLora")
GRPO_CHECKS = GRPO.checks  # the names the grader reads
grpo_checks_for = GRPO.for_exercise
