"""Benchmarks of the LoRA implementation, as ratios measured side by side on one machine.

    python benchmarks/run.py                 # everything but the test suite (~5 min on 2 quiet cores)
    python benchmarks/run.py --suite         # also time the test suite and the grader
    python benchmarks/run.py --quick         # fewer rounds and processes: a smoke run
    python benchmarks/run.py --device cuda   # on a GPU

Keeps the raw results of the latest run on each kind of device in docs/benchmarks/cpu.json and
docs/benchmarks/cuda.json, and writes the tables into docs/benchmarks.md (between its markers; the
prose around it is kept): the headline figures with one column per kind of device, so a run on a
GPU adds a GPU column beside the CPU's, then each run's full tables. What is measured, and why
that way, is in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # `benchmarks` as a package, also when run as a script

from benchmarks import report  # noqa: E402
from benchmarks.timing import time_interleaved  # noqa: E402


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformer_lens", "transformers", "peft"):
        try:
            out[name] = version(name.replace("_", "-"))
        except PackageNotFoundError:
            out[name] = "absent"
    return out


# ------------------------------------------------------------------------------- sections


def run_forward(opts, meta: dict) -> dict:
    import torch

    from benchmarks import models

    _log(
        f"loading {opts.model} (LoRA model and copies{', transformers + PEFT' if opts.peft else ''})"
    )
    setup = models.build(
        opts.model, opts.device, opts.batch, opts.seq, opts.rank, opts.alpha, with_peft=opts.peft
    )
    cases = models.cases(setup)
    sync = torch.cuda.synchronize if opts.device.startswith("cuda") else (lambda: None)
    _log(f"timing {len(cases)} cases × {opts.repeats} interleaved rounds")
    start = time.perf_counter()
    times = time_interleaved(
        cases,
        repeats=opts.repeats,
        warmup=1,
        synchronize=sync,
        clock=time.process_time if opts.clock == "cpu" else time.perf_counter,
        on_round=lambda r: _log(
            f"  round {r + 1}/{opts.repeats} ({time.perf_counter() - start:.0f} s)"
        ),
    )
    hooks = None  # a GPU runs the hooks' kernels asynchronously: a clock in a hook sees launches
    if not opts.device.startswith("cuda"):
        _log("time inside each kind of hook")
        hooks = models.hook_times(setup, rounds=opts.repeats)
    meta["load_samples"].append(_load())
    return {
        "times": times,
        "hook_seconds": hooks,
        "notes": setup.notes,
        "params": models.param_counts(setup.model),
    }


def _phase_child(trainer: str, opts) -> dict:
    cmd = [
        sys.executable,
        str(HERE / "phase.py"),
        "--trainer",
        trainer,
        "--model",
        opts.model,
        "--device",
        opts.device,
        "--threads",
        str(opts.threads),
        "--phases",
        str(opts.phases),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=opts.phase_timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_phase(opts, meta: dict) -> dict:
    out: dict[str, list] = {"lora": [], "fast": [], "full": []}
    for i in range(opts.phase_processes):  # alternating: all see the same background load
        for trainer in ("full", "lora", "fast"):
            _log(f"RLHF phase, {trainer} trainer, process {i + 1}/{opts.phase_processes}")
            result = _phase_child(trainer, opts)
            out[trainer].append(result)
            meta["load_samples"].append(_load())
            _log(
                f"  peak {result['peak_rss_mb']:.0f} MB, "
                f"last phase {result['phase_seconds'][-1]:.2f} s"
            )
    return out


def _timed(cmd: list[str], cwd: Path, timeout: float) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    return time.perf_counter() - start, proc


def run_suite(opts, meta: dict) -> dict:
    out = {}
    cmd = [sys.executable, "-m", "pytest", "-q", "-n", "2"]
    _log("test suite: " + " ".join(cmd[1:]))
    seconds, proc = _timed(cmd, ROOT, timeout=3600)
    summary = (proc.stdout.strip().splitlines() or [""])[-1]
    out["pytest"] = {
        "ran": True,
        "seconds": seconds,
        "command": "python -m pytest -q -n 2",
        "returncode": proc.returncode,
        "detail": summary.strip("= "),
    }
    meta["load_samples"].append(_load())

    grade = [sys.executable, "-m", "lora_rlhf.cli.command", "grade"]
    shown = "lora-rlhf grade solutions"
    probe = subprocess.run([*grade, "--help"], capture_output=True, text=True, cwd=ROOT)
    if probe.returncode != 0:
        out["grade"] = {"ran": False, "command": shown, "detail": "no `grade` command yet"}
        return out
    _log(shown)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            *grade,
            str(ROOT / "solutions"),
            "--results",
            str(Path(tmp) / "results.json"),
            "--junit",
            str(Path(tmp) / "junit.xml"),
            "--quiet",
        ]
        seconds, proc = _timed(cmd, Path(tmp), timeout=1800)
    total = (proc.stdout.strip().splitlines() or [""])[-1]
    out["grade"] = {
        "ran": True,
        "seconds": seconds,
        "command": shown,
        "returncode": proc.returncode,
        "detail": total,
    }
    meta["load_samples"].append(_load())
    return out


# ---------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="3 rounds, 1 process per trainer, 1 phase")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    p.add_argument("--json", type=Path, help="also write the raw results here")
    p.add_argument(
        "--results-dir",
        type=Path,
        help="where each kind of device's latest raw results are kept (default: --out without "
        "its .md, i.e. docs/benchmarks/)",
    )
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument(
        "--threads",
        type=int,
        default=min(2, _cpus()),
        help="torch.set_num_threads for every measurement (default: 2, or the CPUs if fewer)",
    )
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="what the in-process timings and the fast-vs-teaching phase row read: the wall clock "
        "(default) or this process's CPU time (steadier on a shared machine; with --threads 1)",
    )
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=24)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--repeats", type=int, help="interleaved rounds (default 9; --quick: 3)")
    p.add_argument(
        "--phase-processes", type=int, help="fresh processes per trainer (default 2; --quick: 1)"
    )
    p.add_argument("--phases", type=int, help="phases per process, last one timed (default 2)")
    p.add_argument("--phase-timeout", type=float, default=1800.0)
    p.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=("forward", "peft", "phase"),
        help="leave out a part (repeatable): the in-process timings, the PEFT models in them, "
        "or the RLHF phases",
    )
    p.add_argument("--suite", action="store_true", help="also time the test suite and grading")
    opts = p.parse_args(argv)
    opts.repeats = opts.repeats or (3 if opts.quick else 9)
    opts.phase_processes = opts.phase_processes or (1 if opts.quick else 2)
    opts.phases = opts.phases or (1 if opts.quick else 2)
    opts.results_dir = opts.results_dir or opts.out.with_suffix("")
    opts.forward, opts.peft, opts.phase = (
        part not in opts.skip for part in ("forward", "peft", "phase")
    )
    return opts


def collect_meta(opts, argv: list[str] | None = None) -> dict:
    """The settings and the machine, for the report's first paragraph."""
    import torch

    device = opts.device
    if device.startswith("cuda"):
        device += f" ({torch.cuda.get_device_name()})"
    args = argv if argv is not None else sys.argv[1:]
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": _cpu_name(),
        "cpus": _cpus(),
        "device": device,
        "threads": opts.threads,
        "versions": _versions(),
        "model": opts.model,
        "batch": opts.batch,
        "seq": opts.seq,
        "rank": opts.rank,
        "alpha": opts.alpha,
        "repeats": opts.repeats,
        "clock": opts.clock,
        "command": " ".join(["python benchmarks/run.py", shlex.join(args)]).strip(),
        "load_samples": [_load()],
    }


def main(argv: list[str] | None = None) -> dict:
    opts = parse_args(argv)
    import torch

    if opts.device.startswith("cuda") and opts.clock == "cpu":
        raise SystemExit("benchmarks/run.py: --clock cpu times the CPU, not a GPU's work")
    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(
            f"benchmarks/run.py: --device {opts.device}: no CUDA device here (torch "
            f"{torch.__version__}); run it on a machine with a GPU, or leave out --device"
        )
    torch.set_num_threads(opts.threads)
    meta = collect_meta(opts, argv)
    results: dict = {"meta": meta}
    if opts.forward:
        results["forward"] = run_forward(opts, meta)
    if opts.phase:
        results["phase"] = run_phase(opts, meta)
    if opts.suite:
        results["suite"] = run_suite(opts, meta)
    samples = meta["load_samples"]
    meta["load_average"] = {"start": samples[0], "end": samples[-1], "max": max(samples)}
    kind = report.device_kind(opts.device)
    opts.results_dir.mkdir(parents=True, exist_ok=True)
    (opts.results_dir / f"{kind}.json").write_text(json.dumps(results, indent=1) + "\n")
    if opts.json:
        opts.json.write_text(json.dumps(results, indent=1))
    block = report.render_devices(load_results(opts.results_dir))
    report.write(opts.out, block)
    print(block)
    _log(f"wrote {opts.out} and {opts.results_dir / f'{kind}.json'}")
    return results


def load_results(directory: Path) -> dict[str, dict]:
    """The latest raw results of each kind of device kept in `directory`, by kind."""
    out = {}
    for kind in report.DEVICE_KINDS:
        path = directory / f"{kind}.json"
        if path.exists():
            try:
                out[kind] = json.loads(path.read_text())
            except json.JSONDecodeError as err:
                raise SystemExit(
                    f"benchmarks/run.py: {path} is not valid JSON ({err}); delete it "
                    "or re-run the benchmark on that device"
                ) from None
    return out


if __name__ == "__main__":
    main()
