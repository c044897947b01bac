"""lora_rlhf.fast.memory: giving freed heap back to the kernel (glibc), and the trainers' use of it."""

import json
import platform
import subprocess
import sys
from contextlib import contextmanager

import pytest
from helpers import tiny_args

import lora_rlhf.fast.memory as memory
from lora_rlhf.fast.lean_trainer import with_lean_memory
from lora_rlhf.rlhf.trainer import RLHFTrainer

glibc = memory._glibc()
needs_glibc = pytest.mark.skipif(glibc is None, reason="not glibc: the functions do nothing")


@needs_glibc
def test_release_freed_memory_reports_that_it_ran():
    assert memory.release_freed_memory() is True


# glibc maps an allocation on its own only when no free chunk of the heap can hold it, so the
# effect of lean_heap is checked in a fresh interpreter, with tensors larger than anything freed
# there so far (8 MiB: above lean_heap's 128 KiB, below the 32 MiB threshold outside it).
_PROBE = """
import ctypes, json, torch
import lora_rlhf.fast.memory as memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = memory._glibc()
libc.mallinfo2.restype = MallInfo2
mapped = lambda: libc.mallinfo2().hblkhd
size = 8 * 2**20
result = {}
with memory.lean_heap() as active:
    result["active"] = active
    before = mapped()
    t = torch.empty(size // 4)
    result["inside"] = mapped() - before
    del t
    result["inside_after_free"] = mapped() - before
try:
    with memory.lean_heap():
        raise RuntimeError("boom")
except RuntimeError:
    pass
before = mapped()
t = torch.empty(size // 4)
result["outside"] = mapped() - before
print(json.dumps(result))
"""


@needs_glibc
def test_lean_heap_maps_large_allocations_on_their_own_only_inside_the_block():
    if not hasattr(glibc, "mallinfo2"):
        pytest.skip("glibc older than 2.33: no mallinfo2")
    done = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    size = 8 * 2**20
    assert result["active"] is True
    assert result["inside"] >= size, f"not mapped on its own inside lean_heap: {result}"
    assert result["inside_after_free"] <= 0, f"the mapping outlived the tensor: {result}"
    # after the block (also one that raised), the heap serves it again
    assert result["outside"] < size, f"still mapped on its own after lean_heap: {result}"


def test_without_glibc_both_do_nothing(monkeypatch):
    monkeypatch.setattr(memory, "_glibc", lambda: None)
    assert memory.release_freed_memory() is False
    with memory.lean_heap() as active:
        assert active is False


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_the_lean_trainer_runs_learning_under_lean_heap_and_releases_memory_around_steps(
    monkeypatch,
):
    events = []

    @contextmanager
    def recording_lean_heap():
        events.append("enter")
        yield True
        events.append("exit")

    trainer = with_lean_memory(RLHFTrainer)(tiny_args(total_phases=1), show_progress=False)
    monkeypatch.setattr("lora_rlhf.fast.lean_trainer.lean_heap", recording_lean_heap)
    monkeypatch.setattr(
        "lora_rlhf.fast.lean_trainer.release_freed_memory", lambda: events.append("release")
    )
    original_step = trainer.optimizer.step
    monkeypatch.setattr(
        trainer.optimizer, "step", lambda *a, **k: (events.append("step"), original_step(*a, **k))
    )
    trainer.train()
    # after sampling; then, inside lean_heap, before each forward and before each backward; and
    # once the phase's steps are done
    step = ["release", "release", "step"]
    assert events == ["release", "enter", *step * 2, "exit", "release"], events


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="not a glibc system")
def test_glibc_is_found_where_the_system_has_it():
    """On glibc systems (the CI machines) the functions must be active, not silently off."""
    assert glibc is not None
