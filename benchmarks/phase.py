"""RLHF phases of one trainer in this (fresh) process; prints one JSON line. Run by run.py.

    python benchmarks/phase.py --trainer lora --phases 2 --threads 2

Trainers: ``lora`` (Section 2's teaching classes, as ``--impl solutions`` trains them), ``fast``
(the same classes through ``lora_rlhf.fast.lora``, as ``lora-rlhf train`` trains by default), ``full``
(Section 1's full fine-tuning, same settings).

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
    import lora_rlhf.cli.train as train_cli  # the command's defaults and options (it imports no torch)

    d = train_cli.DEFAULTS
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trainer", choices=("lora", "fast", "full"), required=True)
    p.add_argument("--model", default=d["model"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--phases", type=int, default=2, help="phases to run (the last one is timed)")
    p.add_argument("--batch-size", type=int, default=d["batch_size"])
    p.add_argument("--gen-len", type=int, default=d["gen_len"])
    opts = p.parse_args(argv)
    rss_after_python = _rss_mb()

    import dataclasses

    import torch

    from lora_rlhf.cli.settings import build_args
    from lora_rlhf.fast.lean_trainer import with_lean_memory
    from lora_rlhf.fast.lora import with_fast_lora
    from lora_rlhf.lessons.section2_lora import RLHFTrainerLora
    from lora_rlhf.models.sharing import distinct_tensors
    from lora_rlhf.rlhf.args import RLHFArgs
    from lora_rlhf.rlhf.trainer import RLHFTrainer, build_trainer

    if opts.threads:
        torch.set_num_threads(opts.threads)
    # `lora-rlhf train`'s own arguments, as its options build them (the schedule spans at least
    # the default run, so the timed phase is not in warm-up).
    settings = dict(
        d,
        model=opts.model,
        batch_size=opts.batch_size,
        gen_len=opts.gen_len,
        phases=max(d["phases"], opts.phases, d["warmup"] + 1),
    )
    lora_args = build_args(settings, opts.device, False, "benchmark")
    # every trainer as `lora-rlhf train` trains it: with the engine's memory-lean kernels and heap
    # handling (with_fast_lora includes them)
    if opts.trainer == "lora":
        args, trainer_cls = lora_args, with_lean_memory(RLHFTrainerLora)
    elif opts.trainer == "fast":
        args, trainer_cls = lora_args, with_fast_lora(RLHFTrainerLora)
    else:  # Section 1's trainer on the same settings, without the LoRA fields
        shared = {f.name: getattr(lora_args, f.name) for f in dataclasses.fields(RLHFArgs)}
        args, trainer_cls = RLHFArgs(**shared), with_lean_memory(RLHFTrainer)
    cuda = opts.device.startswith("cuda")
    result: dict = {"rss_after_python_mb": rss_after_python, "rss_after_imports_mb": _rss_mb()}

    start = time.perf_counter()
    trainer = build_trainer(trainer_cls, args, show_progress=False)
    result["build_seconds"] = time.perf_counter() - start
    result["rss_after_build_mb"] = _rss_mb()
    result["peak_after_build_mb"] = _peak_rss_mb()  # the peak of loading the model(s)
    phases, cpu_seconds = [], []
    for _ in range(opts.phases):
        start = time.process_time()
        phases.append(trainer.run_phase())
        cpu_seconds.append(time.process_time() - start)
    if cuda:
        torch.cuda.synchronize()
        result["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    result["peak_rss_mb"] = _peak_rss_mb()
    result["ru_maxrss_mb"] = _ru_maxrss_mb()
    result["phase_seconds"] = [m["phase_seconds"] for m in phases]
    result["phase_cpu_seconds"] = cpu_seconds  # this process's CPU time: steadier when shared
    result["rollout_seconds"] = [m["rollout_seconds"] for m in phases]

    def _numel(params) -> int:  # each tensor once (a tied W_U holds W_E's numbers)
        return sum(p.numel() for p in distinct_tensors(params))

    trainable = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    in_memory = [p for m in (trainer.model, trainer.ref_model) for p in m.parameters()]
    value_head = trainer.model.get_value_head_params()
    result["trainable_params"] = _numel(trainable)
    result["value_head_params"] = _numel(value_head)
    result["params_in_memory"] = _numel(in_memory)
    result["base_params"] = _numel(
        p for n, p in trainer.model.named_parameters() if not n.startswith(("lora.", "value_head."))
    )
    result["torch_threads"] = torch.get_num_threads()
    result["settings"] = {
        key: getattr(args, key)
        for key in (
            "base_model", "batch_size", "gen_len", "num_minibatches",
            "batches_per_learning_phase", "base_lr", "head_lr", "kl_coef", "ent_coef",
            "warmup_steps", "total_phases", "prefix", "seed", "lora_rank", "lora_alpha",
        )
        if hasattr(args, key)
    } | {"trainer": trainer_cls.__name__}  # fmt: skip
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
