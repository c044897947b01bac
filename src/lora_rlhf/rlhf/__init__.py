"""Section 1, as the course gives it: the arguments, the value head, the PPO pieces, the
training loop, the rewards and the KL coefficient's controller. Plain code a student reads; the
engine's faster versions live in :mod:`lora_rlhf.fast`.

Imports :mod:`lora_rlhf.models` only: never the engine, never a lesson. The engine opts a trainer
into its memory-lean kernels and heap handling (:mod:`lora_rlhf.fast.lean_trainer`).
"""
