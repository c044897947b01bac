"""Peak memory and time of one RLHF phase, each measurement in a fresh process.

Usage::

    python scripts/measure_full_ft.py                  # full fine-tuning of the embedded model
    python scripts/measure_full_ft.py --model tiny-llama --threads 1 --json out.json

Reusable: ``measure(trainer_cls, args)`` works for any RLHFTrainer subclass (e.g. the LoRA one)
whose class is importable by name (defined at a module's top level). Peak memory is the child
process's maximum resident set size (``resource.getrusage(...).ru_maxrss``), so it includes the
Python interpreter and torch (see ``rss_after_imports_mb`` for that baseline).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import time
from typing import Any


def _current_rss_mb() -> float | None:
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * resource.getpagesize() / 2**20
    except (OSError, ValueError, IndexError):
        return None


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (
        peak / 2**20 if sys.platform == "darwin" else peak / 2**10
    )  # bytes on macOS, KiB on Linux


def _measure_here(trainer_cls, args, threads: int | None) -> dict[str, Any]:
    """Build a trainer and run one rollout + learning phase in this process."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    result: dict[str, Any] = {"rss_after_imports_mb": _current_rss_mb()}

    start = time.perf_counter()
    trainer = trainer_cls(args, show_progress=False)
    result["build_seconds"] = time.perf_counter() - start
    result["rss_after_build_mb"] = _current_rss_mb()

    cpu_start = time.process_time()
    metrics = trainer.run_phase()
    result["phase_cpu_seconds"] = time.process_time() - cpu_start
    result["phase_seconds"] = metrics["phase_seconds"]
    result["rollout_seconds"] = metrics["rollout_seconds"]
    result["learning_seconds"] = metrics["phase_seconds"] - metrics["rollout_seconds"]
    result["reward_mean"] = metrics["reward_mean"]

    result["peak_rss_mb"] = _peak_rss_mb()
    trainable = {id(p): p for g in trainer.optimizer.param_groups for p in g["params"]}
    result["trainable_params"] = sum(p.numel() for p in trainable.values())
    models = {id(trainer.model): trainer.model, id(trainer.ref_model): trainer.ref_model}
    result["params_in_memory"] = sum(p.numel() for m in models.values() for p in m.parameters())
    result["torch_threads"] = torch.get_num_threads()
    result["trainer"] = f"{trainer_cls.__module__}.{trainer_cls.__qualname__}"
    return result


def _child(queue, trainer_cls, args, threads) -> None:
    try:
        queue.put(("ok", _measure_here(trainer_cls, args, threads)))
    except BaseException as err:  # report any failure to the parent instead of hanging it
        queue.put(("error", f"{type(err).__name__}: {err}"))


def measure(trainer_cls, args, threads: int | None = None, timeout: float = 1800) -> dict[str, Any]:
    """Measure one phase of ``trainer_cls(args)`` in a fresh (spawned) process.

    Returns:
        peak_rss_mb, rss_after_imports_mb, rss_after_build_mb, build_seconds, rollout_seconds,
        learning_seconds, phase_seconds, phase_cpu_seconds, trainable_params, params_in_memory,
        torch_threads, trainer.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=_child, args=(queue, trainer_cls, args, threads))
    process.start()
    try:
        status, payload = queue.get(timeout=timeout)
    finally:
        process.join(timeout=30)
        if process.is_alive():
            process.kill()
    if status != "ok":
        raise RuntimeError(f"measurement failed in the child process: {payload}")
    return payload


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-minibatches", type=int, default=2)
    parser.add_argument("--gen-len", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch threads in the child")
    parser.add_argument("--json", default=None, help="also write the result to this file")
    opts = parser.parse_args(argv)

    from lora_rlhf.args import RLHFArgs
    from lora_rlhf.trainer import RLHFTrainer

    args = RLHFArgs(
        base_model=opts.model,
        batch_size=opts.batch_size,
        num_minibatches=opts.num_minibatches,
        gen_len=opts.gen_len,
        total_phases=2,
        warmup_steps=0,
    )
    result = measure(RLHFTrainer, args, threads=opts.threads)
    result["settings"] = {
        "model": opts.model,
        "batch_size": opts.batch_size,
        "num_minibatches": opts.num_minibatches,
        "gen_len": opts.gen_len,
    }
    print(
        f"Full fine-tuning, one phase ({opts.model}, batch {opts.batch_size}, "
        f"{opts.num_minibatches} minibatches, gen_len {opts.gen_len}):"
    )
    for key, value in result.items():
        print(f"  {key:>22}: {value:.1f}" if isinstance(value, float) else f"  {key:>22}: {value}")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
