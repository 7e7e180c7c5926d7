"""Decode-step graph capture and replay per batch bucket (CUDA graphs; HIP graphs on ROCm).

One graph per bucket size B (default 1, 2, 4, 8, 16, 24, 32, 48, ..., 256, bounded by
max_num_seqs) captures the whole decode forward: embedding -> 61 layers (KV store, absorbed MLA
decode, MoE) -> final norm -> lm_head -> greedy argmax. All graphs share one memory pool and one
set of static input buffers (sized for the largest bucket); a smaller bucket uses their prefix.

Padding: a batch of b < B real sequences is padded to B with rows whose slot is the scratch
slot (the pool's reserved last block) and whose context length is 1, so padded rows compute
harmless garbage that nothing reads.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass

import torch

from atom_stream.layers.attention import AttentionMetadata

logger = logging.getLogger(__name__)


def default_capture_sizes(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4, 8, 16, 24, 32] + list(range(48, 257, 16))
    return [s for s in sizes if s <= max_num_seqs] or [1]


@dataclass
class GraphBuffers:
    """Static inputs shared by every bucket (views [:B] are used for bucket B)."""

    input_ids: torch.Tensor  # [Bmax] int64
    positions: torch.Tensor  # [Bmax] int64
    slot_mapping: torch.Tensor  # [Bmax] int64
    seq_lens: torch.Tensor  # [Bmax] int32
    block_tables: torch.Tensor  # [Bmax, max_blocks] int32


class DecodeGraphRunner:
    """Captures `model` decode steps for each bucket and replays the one that fits a batch."""

    def __init__(self, model, kv_caches: list[torch.Tensor], sizes: list[int], max_blocks: int,
                 block_size: int, scratch_slot: int, scratch_block: int, device: torch.device):
        self.model = model
        self.kv_caches = kv_caches
        self.sizes = sorted(set(sizes))
        self.block_size = block_size
        self.scratch_slot = scratch_slot
        self.scratch_block = scratch_block
        self.device = device
        bmax = self.sizes[-1]
        self.buf = GraphBuffers(
            input_ids=torch.zeros(bmax, dtype=torch.int64, device=device),
            positions=torch.zeros(bmax, dtype=torch.int64, device=device),
            slot_mapping=torch.full((bmax,), scratch_slot, dtype=torch.int64, device=device),
            seq_lens=torch.ones(bmax, dtype=torch.int32, device=device),
            block_tables=torch.full((bmax, max_blocks), scratch_block, dtype=torch.int32,
                                    device=device),
        )
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.argmax: dict[int, torch.Tensor] = {}
        self.pool = None

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def bucket(self, b: int) -> int | None:
        for s in self.sizes:
            if s >= b:
                return s
        return None

    def _metadata(self, B: int) -> AttentionMetadata:
        b = self.buf
        return AttentionMetadata(
            query_start_loc=list(range(B + 1)), seq_lens=[1] * B,
            block_tables=b.block_tables[:B], slot_mapping=b.slot_mapping[:B], num_decodes=B,
            block_size=self.block_size, decode_seq_lens=b.seq_lens[:B])

    def _forward(self, B: int) -> torch.Tensor:
        b = self.buf
        hidden = self.model(b.input_ids[:B], b.positions[:B], self.kv_caches, self._metadata(B))
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first (so the pool is sized by the largest).
        The cyclic garbage collector is off meanwhile, after one collection (vLLM collects and
        freezes it around its capture too): a collection on ANY thread can run the destructor
        of an earlier engine's graphs or memory, a device-synchronizing call that invalidates
        the capture (an AsyncEngine captures on its step thread while the caller's thread
        keeps running)."""
        gc.collect()
        enabled = gc.isenabled()
        gc.disable()
        try:
            self._capture()
        finally:
            if enabled:
                gc.enable()

    def _capture(self) -> None:
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for B in reversed(self.sizes):
                for _ in range(2):  # warm up: Triton compilation and autotuning stay outside
                    self._forward(B)
                torch.cuda.synchronize(self.device)
                graph = torch.cuda.CUDAGraph()
                # thread_local: other threads' unsafe calls do not invalidate this capture
                with torch.cuda.graph(graph, pool=self.pool, stream=stream,
                                      capture_error_mode="thread_local"):
                    logits = self._forward(B)
                    top = logits.argmax(dim=-1)
                if self.pool is None:
                    self.pool = graph.pool()
                self.graphs[B], self.logits[B], self.argmax[B] = graph, logits, top
        torch.cuda.current_stream(self.device).wait_stream(stream)
        logger.info("captured decode graphs for batch sizes %s", self.sizes)

    def load_inputs(self, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                    seq_lens: torch.Tensor, block_tables: torch.Tensor) -> int:
        """Copy a decode batch (b rows, device tensors) into the static buffers; returns bucket B.
        Rows b..B-1 are reset to padding."""
        b = input_ids.shape[0]
        B = self.bucket(b)
        assert B is not None, f"batch {b} exceeds the largest captured size {self.max_batch}"
        buf = self.buf
        buf.input_ids[:b].copy_(input_ids, non_blocking=True)
        buf.positions[:b].copy_(positions, non_blocking=True)
        buf.slot_mapping[:b].copy_(slots, non_blocking=True)
        buf.seq_lens[:b].copy_(seq_lens, non_blocking=True)
        nb = block_tables.shape[1]
        buf.block_tables[:b, :nb].copy_(block_tables, non_blocking=True)
        if b < B:
            buf.slot_mapping[b:B].fill_(self.scratch_slot)
            buf.seq_lens[b:B].fill_(1)
            buf.block_tables[b:B].fill_(self.scratch_block)
            buf.input_ids[b:B].zero_()
            buf.positions[b:B].zero_()
        return B

    def replay(self, B: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Replay bucket B; returns (logits [B, V], greedy ids [B]) views of static outputs."""
        self.graphs[B].replay()
        return self.logits[B], self.argmax[B]
