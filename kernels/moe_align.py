"""Sort/align (token, k) pairs by expert into blocks of BLOCK_M rows, on the device, in one program.

Pairs: p = m * KP + k for token m and selection column k (KP = top_k + n_shared; column
k >= top_k is the shared expert n_routed + k - top_k, weight 1.0).

moe_align(topk_ids [M, top_k] int32/int64, num_experts, block_m, *, n_shared=0)
    -> (sorted_pairs [max_blocks * block_m] int32, block_expert [max_blocks] int32)
- num_experts counts every expert (routed + shared), i.e. w13.shape[0].
- Expert e's pairs fill blocks block_start[e] .. (in pair order: deterministic), blocks in
  expert order; unused rows hold the sentinel M * KP, unused blocks expert -1.
- max_blocks = min(P, E) + P // block_m (`max_blocks()`) with P = M * KP: the upper bound of
  sum_e ceil(count_e / block_m) for any ids, so the grid of the GEMMs that read these tables is a
  function of shapes only (CUDA/HIP-graph capturable: no host syncs, no data-dependent shapes).
One program (the chunked histogram/rank keeps it deterministic): ~26 µs per MoE layer at B=64,
~100 µs at M=256 x 9 pairs on an H200 (bench/RESULTS.md, sessions 5 and 7).

The parallel form (the default: `parallel=None` and ATOM_STREAM_MOE_ALIGN_PAR unset or 1, or
`parallel=True`; any P) is one
launch of cdiv(P, 128) programs with the same output: each program histograms all P ids itself
(block starts, and its chunk's offset inside each expert from the chunks before it), so the
programs never wait on each other; see `_align_par_kernel`. Measured in the whole MoE (session 7):
M=64 344 -> 324 µs, M=256 533 -> 438 µs (align + gate_up alone 352 -> 252 µs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import envs


@triton.jit
def pair_expert(IDS, stride_im, p, valid, TOPK: tl.constexpr, KP: tl.constexpr,
                N_ROUTED: tl.constexpr):
    """Expert of pair p (int32 tensor); shared columns k >= TOPK map to N_ROUTED + k - TOPK."""
    m = p // KP
    k = p % KP
    routed = valid & (k < TOPK)
    e = tl.load(IDS + m.to(tl.int64) * stride_im + k, mask=routed, other=0).to(tl.int32)
    return tl.where(k < TOPK, e, N_ROUTED + k - TOPK)


# pair and block counts vary with the batch: no per-divisibility variants (fused_moe_tc)
@triton.jit(do_not_specialize=["num_pairs", "max_blocks"])
def _align_kernel(
    IDS, SORTED, BLKEXP, CURSOR, stride_im, num_pairs, max_blocks,
    TOPK: tl.constexpr, KP: tl.constexpr, N_ROUTED: tl.constexpr, E: tl.constexpr,
    NBINS: tl.constexpr, BM: tl.constexpr, CHUNK: tl.constexpr, FILL: tl.constexpr,
):
    sentinel = num_pairs
    for s in range(0, max_blocks * BM, FILL):
        o = s + tl.arange(0, FILL)
        tl.store(SORTED + o, tl.zeros((FILL,), tl.int32) + sentinel, mask=o < max_blocks * BM)
    for s in range(0, max_blocks, FILL):
        o = s + tl.arange(0, FILL)
        tl.store(BLKEXP + o, tl.full((FILL,), -1, tl.int32), mask=o < max_blocks)
    # histogram (invalid lanes go to bin E, ignored)
    counts = tl.zeros((NBINS,), tl.int32)
    for s in range(0, num_pairs, CHUNK):
        p = s + tl.arange(0, CHUNK)
        ok = p < num_pairs
        e = tl.where(ok, pair_expert(IDS, stride_im, p, ok, TOPK, KP, N_ROUTED), E)
        counts += tl.histogram(e, NBINS)
    bins = tl.arange(0, NBINS)
    counts = tl.where(bins < E, counts, 0)
    nb = (counts + BM - 1) // BM
    bstart = tl.cumsum(nb, 0) - nb
    for i in range(tl.max(nb, 0)):
        tl.store(BLKEXP + bstart + i, bins, mask=nb > i)
    cursor = bstart * BM
    tl.store(CURSOR + bins, cursor)
    tl.debug_barrier()
    r = tl.arange(0, CHUNK)
    for s in range(0, num_pairs, CHUNK):
        p = s + r
        ok = p < num_pairs
        e = tl.where(ok, pair_expert(IDS, stride_im, p, ok, TOPK, KP, N_ROUTED), E)
        before = (e[:, None] == e[None, :]) & (r[None, :] < r[:, None])
        rank = tl.sum(before.to(tl.int32), axis=1)
        pos = tl.load(CURSOR + e, mask=ok, other=0) + rank
        tl.store(SORTED + pos, p, mask=ok)
        cursor += tl.histogram(e, NBINS)
        tl.debug_barrier()
        tl.store(CURSOR + bins, cursor)
        tl.debug_barrier()


@triton.jit(do_not_specialize=["num_pairs", "max_blocks"])
def _align_par_kernel(
    IDS, SORTED, BLKEXP, stride_im, num_pairs, max_blocks,
    TOPK: tl.constexpr, KP: tl.constexpr, N_ROUTED: tl.constexpr, E: tl.constexpr,
    NBINS: tl.constexpr, BM: tl.constexpr, CHUNK: tl.constexpr, SCAN: tl.constexpr,
    FILL: tl.constexpr,
):
    """Program c of cdiv(P, CHUNK): every program reads all P expert ids (SCAN at a time) and
    derives the block layout itself (no communication between programs); it then writes the
    pairs of its own chunk, the padding rows and block entries of the experts e with
    e % nprog == c, and its share of the unused tail. All writes are disjoint: no ordering."""
    c = tl.program_id(0)
    nprog = tl.num_programs(0)
    bins = tl.arange(0, NBINS)
    start = c * CHUNK
    counts = tl.zeros((NBINS,), tl.int32)
    before = tl.zeros((NBINS,), tl.int32)  # pairs of expert e in the chunks before this one
    for s in range(0, num_pairs, SCAN):
        q = s + tl.arange(0, SCAN)
        okq = q < num_pairs
        eq = tl.where(okq, pair_expert(IDS, stride_im, q, okq, TOPK, KP, N_ROUTED), E)
        counts += tl.histogram(eq, NBINS)
        before += tl.histogram(tl.where(q < start, eq, E), NBINS)
    counts = tl.where(bins < E, counts, 0)
    nb = (counts + BM - 1) // BM
    bstart = tl.cumsum(nb, 0) - nb
    base = bstart * BM + before  # this chunk's offset inside each expert's rows
    r = tl.arange(0, CHUNK)
    p = start + r
    ok = p < num_pairs
    e = tl.where(ok, pair_expert(IDS, stride_im, p, ok, TOPK, KP, N_ROUTED), E)
    rank = tl.sum(((e[:, None] == e[None, :]) & (r[None, :] < r[:, None])).to(tl.int32), axis=1)
    pos = tl.gather(base, e, 0) + rank
    tl.store(SORTED + pos, p, mask=ok)
    # this program's experts: their block entries and padding rows
    mine = (bins < E) & (bins % nprog == c)
    for i in range(tl.max(tl.where(mine, nb, 0), 0)):
        tl.store(BLKEXP + bstart + i, bins, mask=mine & (nb > i))
    j = tl.arange(0, BM)
    row = bstart[:, None] * BM + counts[:, None] + j[None, :]
    pad = mine[:, None] & (j[None, :] < (nb * BM - counts)[:, None])
    tl.store(SORTED + row, tl.zeros((NBINS, BM), tl.int32) + num_pairs, mask=pad)
    # the unused blocks after the last expert's: sentinel rows, expert -1
    used = tl.sum(nb, 0)
    for s in range(used * BM + c * FILL, max_blocks * BM, nprog * FILL):
        o = s + tl.arange(0, FILL)
        tl.store(SORTED + o, tl.zeros((FILL,), tl.int32) + num_pairs, mask=o < max_blocks * BM)
    for s in range(used + c * FILL, max_blocks, nprog * FILL):
        o = s + tl.arange(0, FILL)
        tl.store(BLKEXP + o, tl.full((FILL,), -1, tl.int32), mask=o < max_blocks)


# The one-launch parallel form: every program reads all P ids, PAR_SCAN at a time (one pass
# for decode batches; long prefills loop). Its output is identical (tests/test_kernels_moe.py).
# On by default since the session-7 H200 A/B (bench/RESULTS.md): int4 MoE at M=256 533 ->
# 438 µs (align + gate_up 352 -> 252 µs), M=64 344 -> 324 µs; ATOM_STREAM_MOE_ALIGN_PAR=0
# keeps the one-program kernel (which walks the P pairs in 128-pair steps, one after another).
PAR_SCAN = 4096
SMALL_SCAN = 1024


def par_scan(num_pairs: int) -> int:
    """The parallel align's scan width: two classes only (each a compiled variant), both met
    at GPU start-up (decode graphs / the warm-up prefills: model_runner.WARMUP_PREFILL_LENS),
    so an eager step of a new size compiles nothing (session 9's serving run paid ~1 s for a
    per-power-of-two width)."""
    return SMALL_SCAN if num_pairs <= SMALL_SCAN else PAR_SCAN
ALIGN_PAR = envs.flag("ATOM_STREAM_MOE_ALIGN_PAR")
PAR_CHUNK = 128


def par_warps(num_pairs: int) -> int:
    """The parallel align's warps per program, tied to its scan class (no extra compiled
    variant): 16 for the wide scan (each warp then holds a quarter of the ids the histograms
    walk), 4 for the small one. H200, session 11 (bench/RESULTS.md): align alone M=256 17.8 ->
    15.6 us, M=1024 39.4 -> 33.4 us; the whole int4 MoE at M=256 449 -> 420 us; at M=64 (small
    scan) 16 warps were slower (8.3 -> 12.7 us)."""
    return 16 if par_scan(num_pairs) == PAR_SCAN else 4


def max_blocks(num_pairs: int, num_experts: int, block_m: int) -> int:
    return min(num_pairs, num_experts) + num_pairs // block_m


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int, *, n_shared: int = 0,
              out: tuple[torch.Tensor, torch.Tensor] | None = None, parallel: bool | None = None,
              warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """See the module docstring. `out`: preallocated (sorted_pairs, block_expert) int32.
    `parallel`: the one-launch multi-program form (None: ATOM_STREAM_MOE_ALIGN_PAR); same
    output either way. `warps`: the parallel form's warps per program (None: `par_warps`)."""
    M, top_k = topk_ids.shape
    kp = top_k + n_shared
    P = M * kp
    nblk = max_blocks(P, num_experts, block_m)
    dev = topk_ids.device
    if out is None:
        sorted_pairs = torch.empty(nblk * block_m, dtype=torch.int32, device=dev)
        block_expert = torch.empty(nblk, dtype=torch.int32, device=dev)
    else:
        sorted_pairs, block_expert = out
        if sorted_pairs.numel() < nblk * block_m or block_expert.numel() < nblk:
            raise ValueError(f"moe_align: buffers smaller than {nblk} blocks of {block_m}")
    nbins = triton.next_power_of_2(num_experts + 1)
    if topk_ids.stride(-1) != 1:
        topk_ids = topk_ids.contiguous()
    if ALIGN_PAR if parallel is None else parallel:
        _align_par_kernel[(triton.cdiv(P, PAR_CHUNK),)](
            topk_ids, sorted_pairs, block_expert, topk_ids.stride(0), P, nblk,
            TOPK=top_k, KP=kp, N_ROUTED=num_experts - n_shared, E=num_experts, NBINS=nbins,
            BM=block_m, CHUNK=PAR_CHUNK, SCAN=par_scan(P),
            FILL=256,
            num_warps=warps or par_warps(P),
        )
        return sorted_pairs, block_expert
    cursor = torch.empty(nbins, dtype=torch.int32, device=dev)
    _align_kernel[(1,)](
        topk_ids, sorted_pairs, block_expert, cursor, topk_ids.stride(0), P, nblk,
        TOPK=top_k, KP=kp, N_ROUTED=num_experts - n_shared, E=num_experts, NBINS=nbins,
        BM=block_m, CHUNK=128, FILL=1024, num_warps=8,
    )
    return sorted_pairs, block_expert
