"""Time limits per check, from the reference implementation's own measured time.

A check may take ``FACTOR`` times what the library's reference classes take for it (measured on
one thread), and never less than ``FLOOR`` seconds: the floor absorbs a fresh worker's first-call
costs and a loaded machine, the factor a slower one. So a submission that hangs loses seconds per
check, not minutes, while a correct one never comes near its limits.

``python -m lora_rlhf.grading.timing`` measures the reference again and prints the table;
``--write`` stores it in ``reference_seconds.json`` beside this module (a test checks that every
registered check has a time).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

FACTOR = 20.0
FLOOR = 2.0  # seconds
IMPORT_LIMIT = 20.0  # seconds to import the submission (in a worker that has torch already)
UNKNOWN = 30.0  # seconds for a check that has no measured time (a new one, before --write)
TOTAL_LIMIT = 180.0  # seconds for all the probes together

# Seconds the reference classes take per check, one torch thread: a data file beside this module,
# written by ``--write``.
SECONDS_FILE = Path(__file__).with_name("reference_seconds.json")
REFERENCE_SECONDS: dict[str, float] = json.loads(SECONDS_FILE.read_text())["seconds"]


def check_limit(name: str) -> float:
    """Seconds check `name` may take by default."""
    measured = REFERENCE_SECONDS.get(name)
    if measured is None:
        return UNKNOWN
    return max(FLOOR, FACTOR * measured)


def measure(repeats: int = 3) -> dict[str, float]:
    """The fastest of `repeats` runs of every check's probe on the library's reference classes."""
    import torch

    from lora_rlhf.authoring.implementations import load_impl
    from lora_rlhf.checks import checks_for
    from lora_rlhf.checks.core import run_probe

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


def write(times: dict[str, float], path: Path = SECONDS_FILE) -> None:
    """Store `times` in the data file `path`, with the command that measures them."""
    data = {
        "command": "python -m lora_rlhf.grading.timing --write",
        "about": "seconds the library's reference classes take per check, fastest of 3, one "
        "torch thread",
        "seconds": times,
    }
    path.write_text(json.dumps(data, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--write", action="store_true", help=f"store the times in {SECONDS_FILE.name}"
    )
    args = parser.parse_args(argv)
    times = measure()
    for name, seconds in times.items():
        print(f"{name:<34}{seconds:8.4f} s   limit {max(FLOOR, FACTOR * seconds):5.1f} s")
    if args.write:
        write(times)


if __name__ == "__main__":
    main()
