"""Smoke test of the benchmark code (`python benchmarks/run.py`) on the tiny model, in-process.

Only the code paths: the numbers of a tiny model on a test machine mean nothing. The PEFT models
and the RLHF phases (fresh processes, seconds each) are left out to keep this well under 3 s.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import report, run  # noqa: E402
from benchmarks.timing import ratio, time_interleaved  # noqa: E402


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
    assert (
        "| 1 | Forward: LoRA model (base + adaptors: `lora_fwd_hooks`) vs base `forward` |" in text
    )
    assert "| 3 | Forward: merged model" in text
    notes = results["forward"]["notes"]
    assert notes["merged_max_abs_diff"] < 1e-4  # the merged model computes the LoRA model


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
