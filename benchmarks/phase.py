"""RLHF phases of one trainer in this (fresh) process; prints one JSON line. Run by run.py.

    python benchmarks/phase.py --trainer lora --phases 2 --threads 2

Peak memory is this process's maximum resident set size: it includes Python, torch and the imports
(``rss_after_imports_mb``), which is why each trainer gets its own process. It is read as
``VmHWM`` from /proc/self/status, the high-water mark of this program's own memory: Linux carries
``ru_maxrss`` over ``execve``, so in a process started by a large parent (run.py, holding several
models) it reports the parent's size at the fork. ``ru_maxrss`` is recorded too, and used where
there is no /proc (macOS).
The settings are those of ``lora-rlhf train`` (its ``DEFAULTS``) unless overridden.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

# The train CLI's defaults (kept here too, so this runs before the CLI exists or if it moves).
FALLBACK_DEFAULTS = {
    "model": "smollm2-135m",
    "batch_size": 16,
    "minibatches": 2,
    "batches_per_phase": 2,
    "gen_len": 8,
    "rank": 4,
    "alpha": 32.0,
    "base_lr": 2e-3,
    "head_lr": 1e-3,
    "kl_coef": 0.05,
    "ent_coef": 0.001,
    "warmup": 2,
    "phases": 30,
    "prefix": "This is",
    "seed": 1,
}


def train_defaults() -> dict:
    try:
        from lora_rlhf.train_cli import DEFAULTS
    except ImportError:
        return dict(FALLBACK_DEFAULTS)
    return {**FALLBACK_DEFAULTS, **{k: v for k, v in DEFAULTS.items() if k in FALLBACK_DEFAULTS}}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _ru_maxrss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, else KiB


def _peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass
    return _ru_maxrss_mb()


def main(argv: list[str] | None = None) -> dict:
    d = train_defaults()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trainer", choices=("lora", "full"), required=True)
    p.add_argument("--model", default=d["model"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--phases", type=int, default=2, help="phases to run (the last one is timed)")
    p.add_argument("--batch-size", type=int, default=d["batch_size"])
    p.add_argument("--gen-len", type=int, default=d["gen_len"])
    opts = p.parse_args(argv)
    rss_after_python = _rss_mb()

    import torch

    from lora_rlhf.args import RLHFArgs
    from lora_rlhf.lora import RLHFArgsLora, RLHFTrainerLora
    from lora_rlhf.trainer import RLHFTrainer

    if opts.threads:
        torch.set_num_threads(opts.threads)
    common = dict(
        base_model=opts.model,
        device=opts.device,
        batch_size=opts.batch_size,
        gen_len=opts.gen_len,
        num_minibatches=d["minibatches"],
        batches_per_learning_phase=d["batches_per_phase"],
        base_lr=d["base_lr"],
        head_lr=d["head_lr"],
        kl_coef=d["kl_coef"],
        ent_coef=d["ent_coef"],
        warmup_steps=d["warmup"],
        total_phases=max(d["phases"], opts.phases, d["warmup"] + 1),
        prefix=d["prefix"],
        seed=d["seed"],
    )
    if opts.trainer == "lora":
        args = RLHFArgsLora(**common, lora_rank=d["rank"], lora_alpha=d["alpha"])
        trainer_cls = RLHFTrainerLora
    else:
        args = RLHFArgs(**common)
        trainer_cls = RLHFTrainer
    cuda = opts.device.startswith("cuda")
    result: dict = {"rss_after_python_mb": rss_after_python, "rss_after_imports_mb": _rss_mb()}

    start = time.perf_counter()
    trainer = trainer_cls(args, show_progress=False)
    result["build_seconds"] = time.perf_counter() - start
    result["rss_after_build_mb"] = _rss_mb()
    result["peak_after_build_mb"] = _peak_rss_mb()  # the peak of loading the model(s)
    phases = [trainer.run_phase() for _ in range(opts.phases)]
    if cuda:
        torch.cuda.synchronize()
        result["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    result["peak_rss_mb"] = _peak_rss_mb()
    result["ru_maxrss_mb"] = _ru_maxrss_mb()
    result["phase_seconds"] = [m["phase_seconds"] for m in phases]
    result["rollout_seconds"] = [m["rollout_seconds"] for m in phases]

    trainable = {id(p): p for g in trainer.optimizer.param_groups for p in g["params"]}
    in_memory = {id(p): p for m in (trainer.model, trainer.ref_model) for p in m.parameters()}
    value_head = trainer.model.get_value_head_params()
    result["trainable_params"] = sum(p.numel() for p in trainable.values())
    result["value_head_params"] = sum(p.numel() for p in value_head)
    result["params_in_memory"] = sum(p.numel() for p in in_memory.values())
    result["base_params"] = sum(
        p.numel()
        for n, p in trainer.model.named_parameters()
        if not n.startswith(("lora.", "value_head."))
    )
    result["torch_threads"] = torch.get_num_threads()
    result["settings"] = {k: v for k, v in common.items() if k != "device"} | {
        "trainer": trainer_cls.__name__
    }
    if opts.trainer == "lora":
        result["settings"] |= {"lora_rank": d["rank"], "lora_alpha": d["alpha"]}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
