"""Tensor-parallel state for model construction and the collectives the layers call.

The runner builds the model inside `tp_context(TPInfo(rank, size, group))`; layers read `tp()`
once at construction to size their shards and keep the TPInfo for their forward. Outside a
context the model is unsharded (rank 0 of 1). Nesting contexts is an error. The context is
per thread (data-parallel replicas build their models concurrently).

Collectives go through torch.distributed (NCCL on CUDA, RCCL on ROCm, gloo on the CPU); they
are no-ops at size 1, so the single-GPU and CPU paths never touch torch.distributed.

Expert parallelism (`TPInfo.ep`, `--enable-expert-parallel`): the EP group IS the TP group. Rank r
holds routed experts [r*E/size, (r+1)*E/size) with the full moe_intermediate_size (`moe_tp` is then
a single rank: no intermediate split); attention, dense MLPs and shared experts stay TP-sharded.
Tokens are replicated on every rank after attention, so dispatch is local: each rank maps the
global top-k ids to its own experts and zeroes the weights of the picks it does not hold
(`local_topk`); combine is the MoE layer's one all-reduce of routed + shared partial sums.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from atom_stream.config import ConfigError  # a ValueError: one line per TP rank at start-up


@dataclass(frozen=True)
class TPInfo:
    rank: int = 0
    size: int = 1
    group: Any = None  # torch.distributed ProcessGroup (None: the default group)
    ep: bool = False  # expert parallel over these same ranks (see the module docstring)
    # layers/symm_allreduce.SymmAllReduce over `group`, or None: all_reduce uses it for the
    # tensors it takes (one-shot over peer memory), the process group for the rest
    fast_ar: Any = None

    @property
    def ep_size(self) -> int:
        return self.size if self.ep else 1

    @property
    def ep_rank(self) -> int:
        return self.rank if self.ep else 0

    @property
    def moe_tp(self) -> TPInfo:
        """The ranks the routed experts' intermediate dim is split over: all of them without EP,
        none (a single rank) with EP."""
        return TPInfo() if self.ep and self.size > 1 else self

    def expert_range(self, num_experts: int) -> tuple[int, int]:
        """(first global expert id, count) of the routed experts this rank holds."""
        if num_experts % self.ep_size:
            raise ConfigError(f"enable_expert_parallel: n_routed_experts ({num_experts}) is not "
                             f"divisible by tensor_parallel_size {self.ep_size}")
        n = num_experts // self.ep_size
        return self.ep_rank * n, n

    def shard(self, full: int, what: str) -> int:
        """The local size of a dimension of `full` split over the ranks (must divide evenly)."""
        if full % self.size:
            raise ConfigError(f"tensor_parallel_size: {what} ({full}) is not divisible by "
                             f"{self.size}")
        return full // self.size


# per thread: DPEngine builds its replicas concurrently, each on its own step thread
_state = threading.local()


@contextmanager
def tp_context(info: TPInfo):
    assert getattr(_state, "info", None) is None, "tp_context does not nest"
    _state.info = info
    try:
        yield info
    finally:
        _state.info = None


def tp() -> TPInfo:
    return getattr(_state, "info", None) or _DEFAULT


_DEFAULT = TPInfo()


def all_reduce(x: torch.Tensor, info: TPInfo) -> torch.Tensor:
    """Sum x over the TP ranks in place (no-op at size 1)."""
    if info.size > 1:
        if info.fast_ar is not None and info.fast_ar.eligible(x):
            info.fast_ar.sum_(x)
        else:
            torch.distributed.all_reduce(x, group=info.group)
    return x


def broadcast_from_first(x: torch.Tensor, info: TPInfo) -> torch.Tensor:
    """Overwrite x on every TP rank with TP rank 0's x, in place (no-op at size 1)."""
    if info.size > 1:
        torch.distributed.broadcast(x, group=info.group, group_src=0)
    return x


def all_gather_last(x: torch.Tensor, info: TPInfo) -> torch.Tensor:
    """Concatenate each rank's x along the last dim in rank order (no-op at size 1)."""
    if info.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(info.size)]
    torch.distributed.all_gather(parts, x.contiguous(), group=info.group)
    return torch.cat(parts, dim=-1)


def local_topk(topk_weights: torch.Tensor, topk_ids: torch.Tensor, start: int,
               num_local: int) -> tuple[torch.Tensor, torch.Tensor]:
    """EP dispatch: global expert ids [T, k] -> ids local to this rank's experts
    [start, start + num_local); picks held by other ranks get weight 0 and (any valid) local id 0,
    so every expert path (reference loop, dense reference, fused kernel) adds nothing for them.
    Pure tensor ops: no host sync, graph-capturable."""
    local = topk_ids - start
    mine = (local >= 0) & (local < num_local)
    return (torch.where(mine, topk_weights, torch.zeros_like(topk_weights)),
            torch.where(mine, local, torch.zeros_like(local)))


def private_group(init_method: str, rank: int, world: int, backend: str):
    """A process group that does not touch torch.distributed's default group, for a process that
    runs rank 0 of several TP groups (DPEngine: data_parallel_size > 1 with tensor_parallel_size
    > 1, one TPExecutor per replica). Every rank of the group calls it with the same
    `init_method` (tcp://host:port); collectives take it as `group=` (TPInfo.group).
    Same construction as vLLM's stateless process groups."""
    import datetime

    from torch.distributed import PrefixStore, ProcessGroup, rendezvous

    timeout = datetime.timedelta(minutes=30)
    store, rank, world = next(rendezvous(init_method, rank, world, timeout=timeout))
    store.set_timeout(timeout)
    store = PrefixStore(init_method, store)
    pg = ProcessGroup(store, rank, world)
    if backend == "gloo":
        impl = torch.distributed.ProcessGroupGloo(store, rank, world, timeout=timeout)
        kind, device = ProcessGroup.BackendType.GLOO, torch.device("cpu")
    else:
        opts = torch.distributed.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        impl = torch.distributed.ProcessGroupNCCL(store, rank, world, opts)
        kind, device = ProcessGroup.BackendType.NCCL, torch.device("cuda")
    impl._set_sequence_number_for_group()
    pg._set_default_backend(kind)
    pg._register_backend(device, kind, impl)
    return pg
