"""Keeping the process's resident memory close to what its tensors need (glibc's malloc).

glibc's ``malloc`` serves most of PyTorch's CPU tensors from its heap and keeps the pages of
freed tensors for reuse. Within an RLHF phase the sizes and lifetimes change from step to step
(sampling with a growing KV cache, full-vocabulary logits, activations kept for backward), and
the heap fragments: freed pages stay resident on top of the activations a phase needs, as much
again as LoRA's activations on the embedded model. Two remedies, both measured in
docs/training.md ("Memory"):

* :func:`release_freed_memory` (``malloc_trim(0)``) returns every whole free page of the heap to
  the kernel; the trainers call it between the steps of a phase.
* :func:`lean_heap` serves every allocation of at least 128 KiB from its own mapping while the
  block runs, so a freed activation goes straight back to the kernel instead of leaving a hole
  in the heap. The trainers run their learning phase (forward passes whose activations are kept
  for backward) under it. It costs page faults (their share of a phase: docs/training.md).

Both do nothing where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from collections.abc import Iterator
from contextlib import contextmanager

M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)
LEAN_MMAP_THRESHOLD = 128 * 1024  # glibc's own starting value, before it adapts upwards
# Outside lean_heap: once set, glibc no longer adapts its threshold; 32 MiB is where its adaptive
# threshold ends up after the first large tensors are freed (its maximum on 64-bit Linux).
DEFAULT_MMAP_THRESHOLD = 32 * 1024 * 1024


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)  # the C library this process already uses
    except OSError:
        return None
    if not (hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt")):  # musl has neither
        return None
    libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return libc


def release_freed_memory() -> bool:
    """Return the heap's free pages to the operating system; False where that is not supported."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


@contextmanager
def lean_heap(threshold: int = LEAN_MMAP_THRESHOLD) -> Iterator[bool]:
    """Within the block, allocations of `threshold` bytes or more get their own mappings, which
    are returned to the kernel as soon as they are freed. Yields whether that is in effect."""
    libc = _glibc()
    active = libc is not None and libc.mallopt(M_MMAP_THRESHOLD, threshold) == 1
    try:
        yield active
    finally:
        if active:
            libc.mallopt(M_MMAP_THRESHOLD, DEFAULT_MMAP_THRESHOLD)
