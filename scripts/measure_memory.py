"""Peak memory of LoRA-RLHF against full fine-tuning (Section 1's trainer), same settings.

    python scripts/measure_memory.py                  # the default `lora-rlhf train` settings
    python scripts/measure_memory.py --phases 2 --batch-size 32 --json docs/training/memory.json

Each trainer runs in a fresh subprocess (so one cannot inherit the other's allocations): it is
built, trains ``--phases`` phases, and reports

* ``peak_rss`` — the process's peak resident memory, ``ru_maxrss``;
* ``rss_after_import`` — torch + transformer_lens + lora_rlhf imported, no model yet;
* ``load_peak`` / ``rss_after_build`` — while / after the model (and optimizer) are built;
* ``train_peak`` — the peak during the phases alone (the peak counter is reset after building,
  through ``/proc/self/clear_refs``; absent where the kernel does not allow it);
* the bytes the trainer holds in tensors: weights, the reference copy, gradients, Adam state.

All figures are MiB. The ratio printed is LoRA's peak RSS over full fine-tuning's.

TransformerLens 3.9 multiplies by a fresh copy of each weight in every forward pass (its
rearranges and ``W.T.contiguous()``), which autograd then keeps for the backward pass; the
embedded model's cache stores each weight in the layout those calls consume, so they are views
(see ``lora_rlhf.models.smollm2``) and neither run pays for copies.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

MiB = 2**20


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _rss() -> float:
    kib = _status_kib("VmRSS")
    return kib / 1024 if kib is not None else float("nan")


def _hwm() -> float:
    kib = _status_kib("VmHWM")
    return kib / 1024 if kib is not None else float("nan")


def _maxrss() -> float:
    # Linux reports KiB (macOS bytes; this script is about the Linux CPU machine).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS (VmHWM)
        return True
    except OSError:
        return False


def _tensor_mib(tensors) -> float:
    """Bytes held by `tensors`, each once (a tied W_U, the view W_E.T, is W_E's bytes)."""
    from lora_rlhf.models.sharing import distinct_tensors

    return sum(t.numel() * t.element_size() for t in distinct_tensors(tensors)) / MiB


def child(mode: str, options: argparse.Namespace) -> dict:
    import torch

    import lora_rlhf.cli.train as train_cli
    import lora_rlhf.lessons.section2_lora  # noqa: F401  (import everything a run imports before measuring)
    from lora_rlhf.cli.settings import build_args
    from lora_rlhf.fast.lean_trainer import with_lean_memory
    from lora_rlhf.rlhf.args import RLHFArgs
    from lora_rlhf.rlhf.trainer import RLHFTrainer, build_trainer

    torch.set_num_threads(options.threads)
    result: dict = {"mode": mode, "rss_after_import": _rss()}
    settings = dict(train_cli.DEFAULTS, phases=options.phases, warmup=0, model=options.model)
    if options.batch_size:
        settings["batch_size"] = options.batch_size
    if options.gen_len:
        settings["gen_len"] = options.gen_len
    lora_args = build_args(settings, "cpu", False, "memory")
    if mode == "lora":
        from lora_rlhf.lessons.section2_lora import RLHFTrainerLora as trainer_class

        args = lora_args
    else:
        import dataclasses

        fields = {f.name: getattr(lora_args, f.name) for f in dataclasses.fields(RLHFArgs)}
        args, trainer_class = RLHFArgs(**fields), RLHFTrainer

    start = time.perf_counter()
    # as `lora-rlhf train` trains it: with the engine's memory-lean kernels and heap handling
    trainer = build_trainer(with_lean_memory(trainer_class), args, show_progress=False)
    result["build_seconds"] = time.perf_counter() - start
    result["load_peak"] = _maxrss()
    result["rss_after_build"] = _rss()
    result["peak_reset"] = _reset_peak()

    start = time.perf_counter()
    trainer.train()
    result["train_seconds"] = time.perf_counter() - start
    result["train_peak"] = _hwm() if result["peak_reset"] else float("nan")
    result["peak_rss"] = max(result["load_peak"], _maxrss(), _hwm())
    result["rss_after_train"] = _rss()

    model, ref = trainer.model, trainer.ref_model
    result["weights"] = _tensor_mib(model.parameters())
    result["reference_copy"] = 0.0 if ref is model else _tensor_mib(ref.parameters())
    result["gradients"] = _tensor_mib(p.grad for p in model.parameters())
    result["adam_state"] = _tensor_mib(
        v
        for state in trainer.optimizer.state.values()
        for v in state.values()
        if torch.is_tensor(v)
    )
    result["trainable_params"] = sum(
        p.numel() for g in trainer.optimizer.param_groups for p in g["params"]
    )
    result["settings"] = {
        k: settings[k] for k in ("model", "batch_size", "gen_len", "minibatches", "rank")
    }
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--phases", type=int, default=1)
    parser.add_argument("--batch-size", type=int, help="default: lora-rlhf train's")
    parser.add_argument("--gen-len", type=int, help="default: lora-rlhf train's")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (memory barely depends on it)"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", choices=("lora", "full"), help=argparse.SUPPRESS)
    options = parser.parse_args()

    if options.child:
        print(json.dumps(child(options.child, options)))
        return 0

    results = {}
    for mode in ("lora", "full"):
        argv = [sys.executable, __file__, "--child", mode, "--model", options.model,
                "--phases", str(options.phases), "--threads", str(options.threads)]  # fmt: skip
        if options.batch_size:
            argv += ["--batch-size", str(options.batch_size)]
        if options.gen_len:
            argv += ["--gen-len", str(options.gen_len)]
        print(f"measuring {mode} …", file=sys.stderr, flush=True)
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(done.stderr, file=sys.stderr)
            return 1
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])

    lora, full = results["lora"], results["full"]
    rows = [
        ("peak RSS (ru_maxrss)", "peak_rss"),
        ("  RSS after imports", "rss_after_import"),
        ("  peak while loading", "load_peak"),
        ("  RSS after building", "rss_after_build"),
        ("  peak while training", "train_peak"),
        ("tensors: weights", "weights"),
        ("tensors: reference copy", "reference_copy"),
        ("tensors: gradients", "gradients"),
        ("tensors: Adam state", "adam_state"),
    ]
    print(f"settings: {lora['settings']}, phases={options.phases}")
    print(f"{'MiB':28s} {'LoRA':>9s} {'full FT':>9s} {'ratio':>7s}")
    for label, key in rows:
        a, b = lora[key], full[key]
        ratio = f"{a / b:7.3f}" if b else "      -"
        print(f"{label:28s} {a:9.0f} {b:9.0f} {ratio}")
    baseline = lora["rss_after_import"]
    results["ratio_peak_rss"] = lora["peak_rss"] / full["peak_rss"]
    results["ratio_above_imports"] = (lora["peak_rss"] - baseline) / (
        full["peak_rss"] - full["rss_after_import"]
    )
    print(
        f"trainable parameters: LoRA {lora['trainable_params']:,}, full FT {full['trainable_params']:,}"
    )
    print(f"LoRA / full FT peak RSS: {results['ratio_peak_rss']:.3f} "
          f"(above the imports' RSS: {results['ratio_above_imports']:.3f})")  # fmt: skip
    if options.json:
        options.json.parent.mkdir(parents=True, exist_ok=True)
        options.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
