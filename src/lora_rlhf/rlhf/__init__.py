"""Section 1, as the course gives it: the arguments, the value head, the PPO pieces, the
training loop, the rewards and the KL coefficient's controller. Plain code a student reads; the
engine's faster versions live in :mod:`lora_rlhf.fast`.

Imports :mod:`lora_rlhf.models` (and the engine's leaf modules :mod:`lora_rlhf.fast.memory`,
:mod:`lora_rlhf.fast.ppo_kernels`, which import nothing of the package); never a lesson.
"""
