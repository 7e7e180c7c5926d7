"""Skinny GEMM for decode: y[M, N] = x[M, K] @ w[N, K]^T with small M (<= 16), bf16/fp16.

At decode batch sizes the dense projections (q_a, kv_a, q_b, o_proj, shared experts, lm_head)
are matrix-vector products bound by reading W once. cuBLAS runs them as split-K GEMMs of 2-4
launches at ~1.5 TB/s on an H200 (bench/RESULTS.md, profile of a replayed decode step); this
kernel streams W in [BLOCK_N, BLOCK_K] tiles with the whole (padded) M = 16 in one tl.dot tile.

Grid (cdiv(N, BLOCK_N), SPLIT_K): program (n, s) owns output columns [n*BLOCK_N, +BLOCK_N) and
the K range of split s. SPLIT_K == 1 writes y directly; otherwise fp32 partials go to a
workspace [SPLIT_K, M, N] that a second kernel sums (fixed order: deterministic, no atomics).
The split count is chosen so that about WAVES x SMs programs run, each with >= MIN_K_ITERS
K tiles. No host syncs: CUDA/HIP-graph capturable.

Contract: x [M, K] (last dim contiguous), w [N, K] contiguous, same dtype (bf16/fp16/fp32),
K % 16 == 0; returns y [M, N] in x's dtype, fp32 accumulation. `skinny_linear_ref` is the
torch reference (fp32 matmul of the same operands, cast back).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

MAX_M = 16
WAVES = 4
MIN_K_ITERS = 4


@triton.jit
def _skinny_kernel(X, W, Y, P, M, N, K, k_per_split, stride_xm, stride_wn, stride_ym,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   SPLIT: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    k0 = pid_k * k_per_split
    k1 = tl.minimum(k0 + k_per_split, K)
    w_ptr = W + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    x_ptr = X + offs_m[:, None] * stride_xm + offs_k[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k0, k1, BLOCK_K):
        k_ok = (k + offs_k) < k1
        w = tl.load(w_ptr + k, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        x = tl.load(x_ptr + k, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
    mask = m_ok[:, None] & n_ok[None, :]
    if SPLIT == 1:
        tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :],
                 acc.to(Y.dtype.element_ty), mask=mask)
    else:
        tl.store(P + (pid_k * M + offs_m[:, None]) * N + offs_n[None, :], acc, mask=mask)


@triton.jit
def _split_reduce_kernel(P, Y, M, N, stride_ym, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ok = offs < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SPLIT):
        acc += tl.load(P + s * M * N + offs, mask=ok, other=0.0)
    m = offs // N
    n = offs % N
    tl.store(Y + m * stride_ym + n, acc.to(Y.dtype.element_ty), mask=ok)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_config(M: int, N: int, K: int, device: torch.device) -> dict:
    """BLOCK_N/BLOCK_K/warps/stages and the split count for one shape (bench/skinny_gemm.py)."""
    sms = _sm_count(device.index or 0) if device.type == "cuda" else 8
    block_n, block_k = 32, 256 if K >= 1024 else 64
    blocks_n = triton.cdiv(N, block_n)
    k_tiles = triton.cdiv(K, block_k)
    split = max(1, min(WAVES * sms // blocks_n, k_tiles // MIN_K_ITERS, 32))
    return {"BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT": split, "num_warps": 4,
            "num_stages": 3}


def skinny_linear(x: torch.Tensor, w: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """y = x @ w^T for M = x.shape[0] <= 16 (see the module docstring)."""
    M, K = x.shape
    N = w.shape[0]
    if M > MAX_M or w.shape[1] != K or K % 16 or w.stride(1) != 1:
        raise ValueError(f"skinny_linear: M {M} (<= {MAX_M}), K {K} (% 16), w {tuple(w.shape)}")
    if x.stride(1) != 1:
        x = x.contiguous()
    cfg = dict(default_config(M, N, K, x.device), **(config or {}))
    split, bn, bk = cfg["SPLIT"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    k_per_split = triton.cdiv(triton.cdiv(K, split), bk) * bk
    split = triton.cdiv(K, k_per_split)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    p = torch.empty(split, M, N, dtype=torch.float32, device=x.device) if split > 1 else y
    _skinny_kernel[(triton.cdiv(N, bn), split)](
        x, w, y, p, M, N, K, k_per_split, x.stride(0), w.stride(0), y.stride(0),
        BLOCK_M=MAX_M, BLOCK_N=bn, BLOCK_K=bk, SPLIT=split,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if split > 1:
        block = 1024
        _split_reduce_kernel[(triton.cdiv(M * N, block),)](p, y, M, N, y.stride(0), SPLIT=split,
                                                            BLOCK=block)
    return y


def skinny_linear_ref(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (x.float() @ w.float().t()).to(x.dtype)
