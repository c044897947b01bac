"""Counting the matrix products a piece of code runs: how the fast-LoRA bonus checks that an
idea saves work, exactly and the same on every machine (a timing on a shared CPU is neither)."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten


class ProductCounter(TorchDispatchMode):
    """Counts the matrix products (GEMMs) run inside the block: ``with ProductCounter() as c:``,
    then ``c.products``. A batched product of n matrices counts n (on a CPU it runs as n)."""

    SINGLE = {aten.mm, aten.addmm, aten.mv, aten.addmv, aten.dot, aten.vdot}
    # the op → which argument holds the batch of left-hand matrices
    BATCHED = {aten.bmm: 0, aten.baddbmm: 1, aten.addbmm: 1}

    def __init__(self):
        super().__init__()
        self.products = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = func.overloadpacket
        if packet in self.SINGLE:
            self.products += 1
        elif packet in self.BATCHED:
            self.products += args[self.BATCHED[packet]].shape[0]
        return func(*args, **(kwargs or {}))
