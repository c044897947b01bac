"""Time limits per check, from the reference implementation's own measured time.

A check may take ``FACTOR`` times what the library's reference classes take for it (measured on
one thread), and never less than ``FLOOR`` seconds: the floor absorbs a fresh worker's first-call
costs and a loaded machine, the factor a slower one. So a submission that hangs loses seconds per
check, not minutes, while a correct one never comes near its limits.

``python -m lora_rlhf.grading.timing`` measures the reference again and prints the table;
``--write`` stores it below (a test checks that every registered check has a time).
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

FACTOR = 20.0
FLOOR = 2.0  # seconds
IMPORT_LIMIT = 20.0  # seconds to import the submission (in a worker that has torch already)
UNKNOWN = 30.0  # seconds for a check that has no measured time (a new one, before --write)
TOTAL_LIMIT = 180.0  # seconds for all the probes together

# Seconds the reference classes take per check, one torch thread (written by --write).
# fmt: off
REFERENCE_SECONDS: dict[str, float] = {
    # measured:start
    "lora_param_shapes": 0.0003,
    "lora_init": 0.0006,
    "lora_forward_formula": 0.0008,
    "lora_alpha_scaling": 0.0019,
    "lora_broadcast": 0.0008,
    "lora_dtype": 0.0007,
    "lora_xa_then_b": 0.0025,
    "lora_gradients": 0.001,
    "hooks_adaptor_shapes": 0.0011,
    "hooks_names": 0.001,
    "hooks_qkv_dispatch": 0.0052,
    "hooks_out_summed": 0.0041,
    "hooks_merged_tiny_llama": 0.0278,
    "hooks_merged_tiny_pythia": 0.0261,
    "model_fwd_hooks": 0.012,
    "model_frozen_params": 0.0126,
    "model_forward_with_value_head": 0.024,
    "model_plain_forward_is_base": 0.0939,
    "model_generate": 0.0905,
    "model_hook_calls": 0.0933,
    "model_no_hook_leak": 0.0343,
    "model_training_step": 0.0387,
    "trainer_smoke_run": 0.356,
    "hooks_gradients_tiny_llama": 0.0312,
    "hooks_gradients_tiny_pythia": 0.0348,
    "model_gradients": 0.0321,
    # measured:end
}
# fmt: on


def check_limit(name: str) -> float:
    """Seconds check `name` may take by default."""
    measured = REFERENCE_SECONDS.get(name)
    if measured is None:
        return UNKNOWN
    return max(FLOOR, FACTOR * measured)


def measure(repeats: int = 3) -> dict[str, float]:
    """The fastest of `repeats` runs of every check's probe on the library's reference classes."""
    import torch

    from lora_rlhf.checks import checks_for
    from lora_rlhf.checks.core import run_probe
    from lora_rlhf.impl import load_impl

    torch.set_num_threads(1)  # as in a worker
    impl = load_impl("library")
    times = {}
    for c in checks_for():
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            outputs = run_probe(c, impl)
            best = min(best, time.perf_counter() - start)
        if "__error__" in outputs or "__failed__" in outputs:
            raise RuntimeError(f"the reference fails {c.name}: {outputs}")
        times[c.name] = round(best, 4)
    return times


def write(times: dict[str, float], path: Path = Path(__file__)) -> None:
    text = path.read_text()
    body = "".join(f'    "{k}": {v},\n' for k, v in times.items())
    text = re.sub(
        r"(    # measured:start\n).*?(    # measured:end\n)",
        lambda m: m.group(1) + body + m.group(2),
        text,
        flags=re.S,
    )
    path.write_text(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="store the times in this module")
    args = parser.parse_args(argv)
    times = measure()
    for name, seconds in times.items():
        print(f"{name:<34}{seconds:8.4f} s   limit {max(FLOOR, FACTOR * seconds):5.1f} s")
    if args.write:
        write(times)


if __name__ == "__main__":
    main()
