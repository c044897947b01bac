"""Smoke test of the benchmark code (`python benchmarks/run.py`) on the tiny model, in-process.

Only the code paths: the numbers of a tiny model on a test machine mean nothing. The PEFT models
and the RLHF phases (fresh processes, seconds each) are left out to keep this well under 3 s.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import report, run  # noqa: E402
from benchmarks.timing import ratio, time_interleaved  # noqa: E402

DOCS = ROOT / "docs" / "benchmarks.md"
KEPT = ROOT / "docs" / "benchmarks"  # the latest raw results of each kind of device
# A fixed run's raw results (29 Nov 12:28, the library's hooks of that day), for tests that check
# rendered numbers: the committed docs/benchmarks/cpu.json changes with every run.
SAMPLE = ROOT / "tests" / "data" / "benchmark_cpu_12-28.json"
QUICK = ["--model", "tiny-llama", "--skip", "peft", "--skip", "phase", "--repeats", "1"]


def _as_gpu_run(results: dict) -> dict:
    """A CPU run's results relabelled as a GPU run's (what run.py stores after `--device cuda`):
    the hooks not timed, peak CUDA memory measured, every ratio halved or doubled so that no
    number of the GPU column can be the CPU's."""
    gpu = copy.deepcopy(results)
    gpu["meta"]["device"] = "cuda (NVIDIA H200)"
    gpu["meta"]["date"] = "2026-12-01 09:00"
    fwd = gpu["forward"]
    fwd["hook_seconds"] = None
    fwd["times"]["lora_only_fwd"] = [2 * x for x in fwd["times"]["lora_only_fwd"]]
    for process in gpu["phase"]["lora"]:
        process["cuda_peak_mb"] = 100.0
    for process in gpu["phase"]["full"]:
        process["cuda_peak_mb"] = 400.0
    return gpu


def test_a_quick_run_writes_the_table_and_keeps_the_prose_around_it(tmp_path):
    out = tmp_path / "benchmarks.md"
    out.write_text(
        f"# Benchmarks\n\nprose before\n\n{report.BEGIN}\nstale\n{report.END}\n\nprose after\n"
    )
    argv = [
        "--model",
        "tiny-llama",
        "--skip",
        "peft",
        "--skip",
        "phase",
        "--repeats",
        "1",
        "--threads",
        "1",
    ]
    results = run.main([*argv, "--out", str(out)])

    text = out.read_text()
    assert "prose before" in text and "prose after" in text and "stale" not in text
    assert json.loads((tmp_path / "benchmarks" / "cpu.json").read_text()) == results
    assert "| CPU: " in text and "| GPU: not measured yet |" in text
    assert "--device cuda` on a machine with one" in text
    teaching = "Forward: LoRA model by the teaching hooks (Exercise 2, `lora_fwd_hooks`)"
    assert f"| 1 | {teaching} vs base `forward` | " in text
    assert "| 1 | Forward as the library trains: `forward_with_value_head` through the fast" in text
    assert "| 3 | Forward: merged model" in text
    notes = results["forward"]["notes"]
    assert notes["merged_max_abs_diff"] < 1e-4  # the merged model computes the LoRA model
    assert notes["fast_max_abs_diff"] < 1e-4  # and so does the fast path


def test_rounds_interleave_every_case_and_ratios_pair_rounds():
    calls = []
    times = time_interleaved(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1
    )
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then rotating rounds
    assert len(times["a"]) == len(times["b"]) == 3

    r = ratio({"a": [2.0, 3.0, 9.0], "b": [1.0, 1.0, 10.0]}, "a", "b")
    assert r.best == 2.0  # min(a) / min(b)
    assert r.paired == 2.0  # median of 2, 3, 0.9


def test_forward_target_counts_as_met_only_when_every_estimate_meets_it():
    """Row 1's verdict: a lucky min/min must not read as "met" while the paired median or the
    time inside the adaptors' hooks says otherwise (29 Nov: 1.035× min/min, hooks +10%)."""
    from benchmarks.timing import Ratio

    calm = Ratio(best=1.03, paired=1.04, paired_lo=1.02, paired_hi=1.06)
    assert report.forward_verdict(calm, hooks_share=0.04).endswith("— met")
    assert report.forward_verdict(calm).endswith("— met")  # no hook timings: two estimates
    lucky = Ratio(best=1.035, paired=1.053, paired_lo=1.015, paired_hi=1.135)
    verdict = report.forward_verdict(lucky, hooks_share=0.103)
    assert "**missed**" in verdict and "paired 1.053×" in verdict and "hooks 1.103×" in verdict
    assert "min/min" not in verdict  # only the estimates over the target are named
    slow = Ratio(best=1.10, paired=1.04, paired_lo=1.0, paired_hi=1.1)
    assert "min/min 1.100×" in report.forward_verdict(slow, hooks_share=0.02)


def test_the_hooks_share_leaves_out_the_value_head():
    times = {"base_fwd": [0.5, 0.4]}
    seconds = {"attn.hook_q": 0.01, "hook_attn_out": 0.01, report.VALUE_HEAD_HOOK: 0.2}
    assert report._lora_hooks_share(times, seconds) == pytest.approx(0.02 / 0.4)
    assert report._lora_hooks_share(times, None) is None


def test_the_committed_tables_are_rendered_from_the_committed_raw_results():
    """docs/benchmarks.md's generated block is exactly what its raw results give: no figure in
    it was typed by hand or left from another run."""
    text = DOCS.read_text()
    block = report.BEGIN + text.split(report.BEGIN, 1)[1].split(report.END, 1)[0] + report.END
    assert block == report.render_devices(run.load_results(KEPT))
    assert "cpu" in run.load_results(KEPT)


def test_a_gpu_run_adds_a_column_beside_the_cpus(tmp_path):
    cpu = json.loads(SAMPLE.read_text())
    gpu = _as_gpu_run(cpu)
    block = report.render_devices({"cpu": cpu, "cuda": gpu})
    header = next(line for line in block.splitlines() if line.startswith("| # |"))
    assert header.endswith(
        "| CPU: AMD EPYC, 2 threads, 2026-11-29 12:28 | GPU: cuda (NVIDIA H200), 2026-12-01 09:00 |"
    )
    rows = {
        line.split(" | ")[1]: line.split(" | ")
        for line in block.splitlines()
        if line.startswith("| ") and not line.startswith(("| # ", "|---"))
    }
    target, cpu_cell, gpu_cell = rows[
        "forward, LoRA model by the teaching hooks (Exercise 2) vs base"
    ][2:5]
    assert target == "—" and cpu_cell == "1.071× (1.054×)"  # the lesson's row has no target
    assert gpu_cell.startswith("2.142×")
    memory = rows["one RLHF phase, peak memory, LoRA vs full fine-tuning"]
    assert memory[3].startswith("0.344× (resident) — met")
    assert memory[4].startswith("0.250× (CUDA allocated) — met")
    assert "### CPU" in block and "### GPU" in block and report.NO_HOOK_TIMES in block
    assert block.index("### CPU") < block.index("### GPU")


def test_a_cpu_run_keeps_the_stored_gpu_column(tmp_path):
    out = tmp_path / "benchmarks.md"
    (tmp_path / "benchmarks").mkdir()
    gpu = _as_gpu_run(json.loads(SAMPLE.read_text()))
    (tmp_path / "benchmarks" / "cuda.json").write_text(json.dumps(gpu))
    run.main([*QUICK, "--threads", "1", "--out", str(out)])
    text = out.read_text()
    assert "| GPU: cuda (NVIDIA H200), 2026-12-01 09:00 |" in text
    assert "### GPU" in text and "tiny-llama" in text.split("### GPU")[0]
    assert json.loads((tmp_path / "benchmarks" / "cuda.json").read_text()) == gpu


def test_bad_device_and_bad_kept_results_stop_with_a_clear_message(tmp_path):
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="--device cuda: no CUDA device here"):
            run.main([*QUICK, "--device", "cuda", "--out", str(tmp_path / "b.md")])
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "cpu.json").write_text('{"meta": ')
    with pytest.raises(SystemExit, match=r"cpu.json is not valid JSON .*re-run"):
        run.load_results(tmp_path / "kept")
    with pytest.raises(ValueError, match="no benchmark results"):
        report.render_devices({})


def test_the_fast_paths_phase_time_is_set_against_the_teaching_classes_of_the_same_run():
    results = json.loads(SAMPLE.read_text())
    phase = results["phase"]
    phase["fast"] = copy.deepcopy(phase["lora"])
    for process in phase["fast"]:
        process["phase_seconds"] = [0.8 * x for x in process["phase_seconds"]]
    block = report.render_devices({"cpu": results})
    row = next(line for line in block.splitlines() if "default run's phase time" in line)
    assert "| ≤ 0.85× | 0.800× — met |" in row
    phase["fast"][0]["phase_seconds"][-1] = 10 * phase["lora"][0]["phase_seconds"][-1]
    phase["fast"][1]["phase_seconds"][-1] = 10 * phase["lora"][1]["phase_seconds"][-1]
    assert "**missed**" in report.summary_table({"cpu": results}).split("phase time, fast")[1]
    # With --clock cpu the row reads this process's CPU time, and shows the wall clock beside it.
    results["meta"]["clock"] = "cpu"
    for name, cpu in (("lora", 10.0), ("fast", 8.0)):
        for process in phase[name]:
            process["phase_cpu_seconds"] = [cpu + 1, cpu]
    block = report.render_devices({"cpu": results})
    row = next(line for line in block.splitlines() if "default run's phase time" in line)
    assert "| ≤ 0.85× | 0.800× — met |" in row
    row = next(line for line in block.splitlines() if "(`--impl library`)" in line)
    assert "**0.800×** (CPU time)" in row and "CPU 8.00 s vs 10.00 s" in row and "wall " in row
    assert "timed by this process's **CPU time** (`--clock cpu`)" in block


def test_the_clock_can_be_this_processs_cpu_time():
    ticks = iter(range(0, 100, 3))
    times = time_interleaved({"a": lambda: None}, repeats=2, warmup=0, clock=lambda: next(ticks))
    assert times == {"a": [3, 3]}


def test_the_base_rate_scores_the_requested_samples_with_the_commands_reward(capsys):
    from benchmarks import base_rate

    result = base_rate.main(["--samples", "32", "--batch", "16", "--model", "tiny-llama"])
    assert result["samples"] == 32 and "'.' after 'This is'" in result["task"]
    assert (
        0 <= result["16_sample_means"]["min"] <= result["mean"] <= result["16_sample_means"]["max"]
    )
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
