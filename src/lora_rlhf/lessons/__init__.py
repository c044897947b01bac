"""The single sources of the course's files, each named after the file it generates
(``lora-rlhf sync`` writes exercises/ and solutions/ from them): ``section2_lora``,
``section3_grpo``, ``bonus_mlp_lora``, ``bonus_fast_lora``.

Import :mod:`lora_rlhf.models` and :mod:`lora_rlhf.rlhf`; their check runners only inside the
check cells, so importing a lesson never loads the check framework.
"""
