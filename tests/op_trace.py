"""OpTrace: every aten operation a block runs, with the shapes and dtypes of what it returns. A CUDA graph
replays the operations of the one step it captured, so steps meant for capture must trace alike whatever
they drew (tests/evaluate/test_student_graph_step.py, tests/squeeze/test_pretrain_graph_step.py)."""
from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import torch


class OpTrace(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        shapes = tuple((tuple(t.shape), t.dtype) for t in tree_leaves(out) if isinstance(t, torch.Tensor))
        self.ops.append((str(func), shapes))
        return out
