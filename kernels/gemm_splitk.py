"""Split-K tensor-core GEMM for decode batches: y[M, N] = x[M, K] @ W[N, K]^T (+ add), 1 <= M <= 64.

At 4..64 decode rows the dense projections of one Kimi-K2.5 TP8 rank (q_a+kv_a 2112x7168, the
router + shared gate/up 896x7168, o_proj 7168x1024, the folded q_b 4608x1536) are still bound by
reading W once, but there are too few [BLOCK_N]-row tiles to keep every SM's memory pipe full:
cuBLAS splits K and adds a reduce launch (~1.8 µs at 16 rows, bench/RESULTS.md session 20's B=16
profile). Here the grid is (cdiv(N, BLOCK_N), SPLIT): program (j, s) multiplies its rows of W
over the K range [s * K_PER, (s + 1) * K_PER) on the tensor cores (x padded to BLOCK_M rows) and
writes an fp32 partial; the last of the SPLIT programs of tile j to arrive (an acq_rel counter
that it resets to 0, so the workspace is all-zero again when the launch ends) sums the partials
in split order, adds `add`, rounds once and stores y. One launch, nothing else to zero.
Config "W_AS_M": the weight tile is the MMA's M side ([BLOCK_N, BLOCK_K] @ x^T: Hopper's wgmma
wants M >= 64), else x is ([BLOCK_M, BLOCK_K] @ W^T, mma.sync).

Contract: x [M, K] (last dim contiguous), w [N, K] contiguous, same dtype (bf16 / fp16 / fp32);
1 <= M <= MAX_M. out_dtype: y's dtype (default x's). add [M, N] (optional, last dim
contiguous): y = add + x @ W^T, summed in fp32 and rounded once; `out` may be `add` (in place).
The sum order is fixed (split 0 first), so results do not depend on timing; they do depend on
SPLIT (config) and on M's BLOCK_M bucket only through padding rows (zeros). No host syncs:
CUDA/HIP-graph capturable once warmed up (the workspace and counters are cached per device, N
and tiling; launches on one stream are ordered, so one workspace serves every call: do not run
two launches of one N and tiling, whatever their M or K, concurrently on two streams).
`gemm_splitk_ref` is the torch reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gemv import gemv_ref

MAX_M = 64


@triton.jit
def _splitk_kernel(X, W, Y, ADD, P, CNT, M, N, K, K_PER, stride_xm, stride_wn, stride_ym,
                   stride_am, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, W_AS_M: tl.constexpr, HAS_ADD: tl.constexpr):
    j = tl.program_id(0)
    s = tl.program_id(1)
    n_split = tl.num_programs(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = j * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mmask = offs_m < M
    nmask = offs_n < N
    k0 = s * K_PER
    xp = X + offs_m[:, None] * stride_xm + k0 + offs_k[None, :]
    wp = W + offs_n[:, None].to(tl.int64) * stride_wn + k0 + offs_k[None, :]
    if W_AS_M:
        acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k in range(0, K_PER, BLOCK_K):
        kmask = (k0 + k + offs_k) < K
        xt = tl.load(xp + k, mask=mmask[:, None] & kmask[None, :], other=0.0)
        wt = tl.load(wp + k, mask=nmask[:, None] & kmask[None, :], other=0.0)
        if W_AS_M:
            acc = tl.dot(wt, tl.trans(xt), acc)
        else:
            acc = tl.dot(xt, tl.trans(wt), acc)
    # partial [M, N] of split s at P[s]; the orientation only changes the pointer grid
    if W_AS_M:
        pp = P + offs_m[None, :] * N + offs_n[:, None]
        pmask = mmask[None, :] & nmask[:, None]
    else:
        pp = P + offs_m[:, None] * N + offs_n[None, :]
        pmask = mmask[:, None] & nmask[None, :]
    tl.store(pp + s * M * N, acc, mask=pmask)
    tl.debug_barrier()  # every warp's partial stores precede the (one-thread, release) atomic
    if tl.atomic_add(CNT + j, 1, sem="acq_rel", scope="gpu") == n_split - 1:
        tl.atomic_xchg(CNT + j, 0, sem="relaxed", scope="gpu")
        tot = tl.load(pp, mask=pmask, other=0.0, cache_modifier=".cg")
        for t in range(1, n_split):
            tot += tl.load(pp + t * M * N, mask=pmask, other=0.0, cache_modifier=".cg")
        if W_AS_M:
            yo = offs_m[None, :] * stride_ym + offs_n[:, None]
            ao = offs_m[None, :] * stride_am + offs_n[:, None]
        else:
            yo = offs_m[:, None] * stride_ym + offs_n[None, :]
            ao = offs_m[:, None] * stride_am + offs_n[None, :]
        if HAS_ADD:
            tot += tl.load(ADD + ao, mask=pmask, other=0.0).to(tl.float32)
        tl.store(Y + yo, tot.to(Y.dtype.element_ty), mask=pmask)


DEFAULT_CONFIG = {"BLOCK_N": 64, "BLOCK_K": 128, "SPLIT": 8, "W_AS_M": True, "num_warps": 4,
                  "num_stages": 4}

_workspace: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _buffers(device: torch.device, split: int, n: int, tiles: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 partials for split x MAX_M x n, int32 counters [tiles], zero) for one (N, tiling),
    allocated on the first call (the runner's warm-up, before graph capture) and shared by every
    M: each launch's counters are back at zero when it ends."""
    key = (device, split, n, tiles)
    buf = _workspace.get(key)
    if buf is None:
        buf = _workspace[key] = (torch.empty(split * MAX_M * n, dtype=torch.float32,
                                             device=device),
                                 torch.zeros(tiles, dtype=torch.int32, device=device))
    return buf


def block_m(m: int) -> int:
    """The launch's padded row count for m rows (16, 32 or 64; Triton also compiles M == 1 and
    M % 16 == 0 apart: engine/kernel_warmup.splitk_warmup_rows)."""
    return max(16, triton.next_power_of_2(m))


def gemm_splitk(x: torch.Tensor, w: torch.Tensor, *, out_dtype: torch.dtype | None = None,
                add: torch.Tensor | None = None, out: torch.Tensor | None = None,
                config: dict | None = None) -> torch.Tensor:
    """y [M, N] = x [M, K] @ w [N, K]^T (+ add); see the module docstring for the contract."""
    M, K = x.shape
    N = w.shape[0]
    if not 1 <= M <= MAX_M or w.shape[1] != K or x.dtype != w.dtype or x.stride(1) != 1:
        raise ValueError(f"gemm_splitk: x {tuple(x.shape)} {x.dtype}, w {tuple(w.shape)} "
                         f"{w.dtype}: need 1 <= M <= {MAX_M}, same K and dtype, x rows contiguous")
    if not w.is_contiguous():
        raise ValueError("gemm_splitk: w must be contiguous")
    cfg = {**DEFAULT_CONFIG, **(config or {})}
    bn, bk = cfg["BLOCK_N"], cfg["BLOCK_K"]
    k_per = triton.cdiv(triton.cdiv(K, cfg["SPLIT"]), bk) * bk
    split = triton.cdiv(K, k_per)
    tiles = triton.cdiv(N, bn)
    if out is None:
        out = torch.empty(M, N, dtype=out_dtype or x.dtype, device=x.device)
    if add is not None and add.shape != (M, N):
        raise ValueError(f"gemm_splitk: add {tuple(add.shape)} != {(M, N)}")
    part, cnt = _buffers(x.device, split, N, tiles)
    _splitk_kernel[(tiles, split)](
        x, w, out, add if add is not None else out, part, cnt, M, N, K, k_per, x.stride(0),
        w.stride(0), out.stride(0), add.stride(0) if add is not None else 0,
        BLOCK_M=block_m(M), BLOCK_N=bn, BLOCK_K=bk,
        W_AS_M=bool(cfg["W_AS_M"]), HAS_ADD=add is not None, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    return out


# the torch reference: fp32 products (+ add in fp32), one rounding to out_dtype, as the GEMV's
gemm_splitk_ref = gemv_ref
