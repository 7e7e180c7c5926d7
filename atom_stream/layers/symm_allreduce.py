"""One-shot all-reduce over peer GPU memory (torch symmetric memory) for decode-sized tensors.

A 2-way NCCL all-reduce of one decode token's hidden state (14 KB) takes ~18 µs inside a
graph on two NVLinked H200s (bench/RESULTS.md "Session 6"), and the decode step issues two per
layer: at B=1 the collectives cost more than the rank's whole memory floor. The one-shot form
copies the input into a buffer every rank can address, meets the peers at a barrier in device
memory, and each rank sums all peers' copies itself: one kernel, no ring, no proxy thread.

`SymmAllReduce(group, device, max_bytes)` allocates `max_bytes` of symmetric memory and
rendezvouses over `group` (a collective: every rank constructs it, in the same order as its other
collectives). `sum_(x)` reduces x in place (x's bytes <= max_bytes, contiguous, bf16 / fp16 /
fp32); `eligible(x)` says whether it can. Graph-capturable. Multicast (NVLS) is never used: only
the one-shot kernel, which reads the peers' buffers over P2P.

Availability: CUDA (and ROCm builds of torch that carry symmetric memory); `try_create` returns
None, with a log line, where the platform lacks it, so callers keep NCCL/RCCL.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 8 << 20
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class SymmAllReduce:
    def __init__(self, group, device: torch.device, max_bytes: int = DEFAULT_MAX_BYTES):
        import torch.distributed._symmetric_memory as symm_mem

        self.group = group if group is not None else torch.distributed.group.WORLD
        self.group_name = self.group.group_name
        self.max_bytes = max_bytes
        self.buffer = symm_mem.empty(max_bytes, dtype=torch.uint8, device=device)
        symm_mem.rendezvous(self.buffer, self.group_name)

    def eligible(self, x: torch.Tensor) -> bool:
        return (x.is_cuda and x.dtype in _DTYPES and x.is_contiguous()
                and x.numel() * x.element_size() <= self.max_bytes)

    def sum_(self, x: torch.Tensor) -> torch.Tensor:
        """x <- sum over the ranks of x, in place."""
        flat = x.view(-1)
        staged = self.buffer[: flat.numel() * flat.element_size()].view(x.dtype)
        staged.copy_(flat)
        torch.ops.symm_mem.one_shot_all_reduce_out(staged, "sum", self.group_name, flat)
        return x


# Names of the process groups this process has rendezvoused symmetric memory over. A TP engine
# torn down and started again in the same process (tests, notebooks) gets a new default group
# under the old name ("0"), and a second engine's one-shot all-reduces over it hung the leader
# on four H200s (bench/RESULTS.md "Session 8"): such an engine keeps NCCL/RCCL instead.
_RENDEZVOUSED: set[str] = set()


def _all_agree(ok: bool, group, device: torch.device) -> bool:
    """MIN over the group of every rank's `ok` (a collective)."""
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN, group=group)
    return int(flag.item()) == 1


def try_create(group, device: torch.device, max_bytes: int = DEFAULT_MAX_BYTES
               ) -> SymmAllReduce | None:
    """A SymmAllReduce, or None (logged) where symmetric memory is unavailable or this process
    already used it over a group of the same name. Every rank must call it, and every rank gets
    the same answer: the ranks first agree that none of them used the name before (only then
    does anyone rendezvous), and afterwards that every rank's construction succeeded (a rank
    that failed after others succeeded would leave the group mismatched); both by a MIN
    all-reduce over the group."""
    name = (group if group is not None else torch.distributed.group.WORLD).group_name
    if not _all_agree(name not in _RENDEZVOUSED, group, device):
        logger.warning("a TP group named %r used symmetric memory earlier in one of these "
                       "processes: this engine keeps the process group's all-reduce", name)
        return None
    ok, sym = True, None
    try:
        sym = SymmAllReduce(group, device, max_bytes)
        _RENDEZVOUSED.add(name)
    except Exception as e:  # noqa: BLE001 - platform without symmetric memory: keep NCCL/RCCL
        logger.warning("symmetric-memory all-reduce unavailable (%s): using the process "
                       "group's all-reduce", e)
        ok = False
    if not _all_agree(ok, group, device):
        return None
    logger.info("one-shot symmetric-memory all-reduce for tensors up to %d bytes", max_bytes)
    return sym
