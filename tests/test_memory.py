"""lora_rlhf.memory: giving freed heap back to the kernel (glibc), and the trainers' use of it."""

import ctypes
import platform
from contextlib import contextmanager

import pytest
import torch

from lora_rlhf import memory
from lora_rlhf.trainer import RLHFTrainer

glibc = memory._glibc()
needs_glibc = pytest.mark.skipif(glibc is None, reason="not glibc: the functions do nothing")


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
    ]


def _mapped_bytes() -> int:
    """Bytes glibc holds in allocations that have mappings of their own (mallinfo2's hblkhd)."""
    if not hasattr(glibc, "mallinfo2"):
        pytest.skip("glibc older than 2.33: no mallinfo2")
    glibc.mallinfo2.restype = _MallInfo2
    return glibc.mallinfo2().hblkhd


@needs_glibc
def test_release_freed_memory_reports_that_it_ran():
    assert memory.release_freed_memory() is True


@needs_glibc
def test_lean_heap_maps_activation_sized_tensors_on_their_own_and_only_inside():
    size = 4 * memory.LEAN_MMAP_THRESHOLD  # 512 KiB: a layer's activation on the embedded model
    with memory.lean_heap() as active:
        assert active
        before = _mapped_bytes()
        inside = torch.empty(size // 4, dtype=torch.float32)
        assert _mapped_bytes() - before >= size  # its own mapping, returned when freed
        del inside
        assert _mapped_bytes() <= before
    before = _mapped_bytes()
    outside = torch.empty(size // 4, dtype=torch.float32)
    assert _mapped_bytes() == before  # from the heap again, as glibc serves it by default
    del outside


@needs_glibc
def test_lean_heap_restores_the_threshold_when_the_block_raises():
    with pytest.raises(RuntimeError, match="boom"), memory.lean_heap():
        raise RuntimeError("boom")
    before = _mapped_bytes()
    t = torch.empty(memory.LEAN_MMAP_THRESHOLD, dtype=torch.float32)  # 512 KiB
    assert _mapped_bytes() == before
    del t


def test_without_glibc_both_do_nothing(monkeypatch):
    monkeypatch.setattr(memory, "_glibc", lambda: None)
    assert memory.release_freed_memory() is False
    with memory.lean_heap() as active:
        assert active is False


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_learning_phase_runs_under_lean_heap_and_releases_memory_between_steps(monkeypatch):
    from tests.test_trainer import tiny_args

    events = []

    @contextmanager
    def recording_lean_heap():
        events.append("enter")
        yield True
        events.append("exit")

    trainer = RLHFTrainer(tiny_args(total_phases=1), show_progress=False)
    monkeypatch.setattr("lora_rlhf.trainer.lean_heap", recording_lean_heap)
    monkeypatch.setattr("lora_rlhf.trainer.release_freed_memory", lambda: events.append("release"))
    original_step = trainer.optimizer.step
    monkeypatch.setattr(
        trainer.optimizer, "step", lambda *a, **k: (events.append("step"), original_step(*a, **k))
    )
    trainer.train()
    # after sampling; then, inside lean_heap, before each backward and after each step
    assert events == ["release", "enter", *["release", "step", "release"] * 2, "exit"], events


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="not a glibc system")
def test_glibc_is_found_where_the_system_has_it():
    """On glibc systems (the CI machines) the functions must be active, not silently off."""
    assert glibc is not None
