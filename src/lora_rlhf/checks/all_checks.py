"""Importing this module registers every check, in the order students meet them."""

from lora_rlhf.checks import lora_checks  # noqa: F401, I001  (order matters: exercises 1–4)
from lora_rlhf.checks import hooks_checks  # noqa: F401
from lora_rlhf.checks import model_checks  # noqa: F401
from lora_rlhf.checks import trainer_checks  # noqa: F401
from lora_rlhf.checks import backward_checks  # noqa: F401  (gradient checks of exercises 2–3)

# The rubric's order, whichever of these modules happened to be imported first.
MODULES = (lora_checks, hooks_checks, model_checks, trainer_checks, backward_checks)
