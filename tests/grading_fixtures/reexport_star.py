"""A "submission" that re-exports the library's reference classes instead of writing its own.

The grader must give it no points for any exercise (the AST scan sees that the classes are not
defined here), even though every check would pass on the reference classes.
"""

from lora_rlhf.lora import *  # noqa: F403
