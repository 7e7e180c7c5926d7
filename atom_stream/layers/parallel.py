"""Tensor-parallel state for model construction and the collectives the layers call.

The runner builds the model inside `tp_context(TPInfo(rank, size, group))`; layers read `tp()`
once at construction to size their shards and keep the TPInfo for their forward. Outside a
context the model is unsharded (rank 0 of 1). Nesting contexts is an error.

Collectives go through torch.distributed (NCCL on CUDA, RCCL on ROCm, gloo on the CPU); they
are no-ops at size 1, so the single-GPU and CPU paths never touch torch.distributed.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class TPInfo:
    rank: int = 0
    size: int = 1
    group: Any = None  # torch.distributed ProcessGroup (None: the default group)

    def shard(self, full: int, what: str) -> int:
        """The local size of a dimension of `full` split over the ranks (must divide evenly)."""
        if full % self.size:
            raise ValueError(f"tensor_parallel_size: {what} ({full}) is not divisible by "
                             f"{self.size}")
        return full // self.size


_current = TPInfo()
_active = False


@contextmanager
def tp_context(info: TPInfo):
    global _current, _active
    assert not _active, "tp_context does not nest"
    _current, _active = info, True
    try:
        yield info
    finally:
        _current, _active = TPInfo(), False


def tp() -> TPInfo:
    return _current


def all_reduce(x: torch.Tensor, info: TPInfo) -> torch.Tensor:
    """Sum x over the TP ranks in place (no-op at size 1)."""
    if info.size > 1:
        torch.distributed.all_reduce(x, group=info.group)
    return x


def all_gather_last(x: torch.Tensor, info: TPInfo) -> torch.Tensor:
    """Concatenate each rank's x along the last dim in rank order (no-op at size 1)."""
    if info.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(info.size)]
    torch.distributed.all_gather(parts, x.contiguous(), group=info.group)
    return torch.cat(parts, dim=-1)
