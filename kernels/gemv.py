"""Dense GEMV for decode: y[M, N] = x[M, K] @ W[N, K]^T (+ add), M <= 4, one launch, no split-K.

At decode batch sizes the dense projections are matrix-vector products bound by reading W once.
cuBLAS runs the tall-K ones (hidden 7168) as split-K GEMMs plus a reduce launch (~2 µs each,
bench/RESULTS.md session 15/16 profiles). Here every program owns BLOCK_N output columns over
the whole K: it streams its [BLOCK_N, K] slab of W in [BLOCK_N, BLOCK_K] tiles and keeps one
fp32 partial per (row, column), so there is nothing to reduce across programs. The grid is
cdiv(N, BLOCK_N) programs; BLOCK_N is picked so that there are about two programs per SM.
Config "STRIDED": program p owns rows p, p + G, p + 2G, ... (G programs) instead of a block of
BLOCK_N adjacent rows. Config "UNROLL": the K loop unrolled for this K (a compile per K), so a
program's loads for every K step are in flight at once instead of one step's per loop trip.
Measured on the H200 (bench/dense_gemv.py, RESULTS sessions 16 and 18): at the default tiles it
beats cuBLAS only where cuBLAS tiles badly (q_b 1536x1536) and loses on the tall-K q_a+kv_a
(15.2-15.8 vs 12.4 µs at M=1); STRIDED + UNROLL at 4 rows x 4096 K on 8 warps turn that into
9.65 vs 12.39 µs (the unrolled form issues 20 16-byte loads per thread at once, the loop 10 per
trip). The models run it at 1-2 rows for q_b, q_a+kv_a, o_proj, the router + shared gate/up and
the shared down, each with its measured tiles (layers/linear.gemv_ok's callers).

Contract: x [M, K] (last dim contiguous), w [N, K] contiguous, same dtype (bf16 / fp16 / fp32);
1 <= M <= MAX_M. out_dtype: the output's dtype (default x's; fp32 gives unrounded sums, e.g. the
router logits). add [M, N] (optional, last dim contiguous): y = add + x @ W^T with the sum in fp32
and one rounding, like cuBLAS addmm with beta 1; `out` may be `add` itself (in place). Products
and sums in fp32. No host syncs: CUDA/HIP-graph capturable. `gemv_ref` is the torch reference.
`norm=` (one row): the decoder's add + RMSNorm before the GEMV folded into it (`gemv`;
reference `gemv_norm_ref`), one launch and one DRAM round trip fewer per norm at B=1.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

MAX_M = 4


@triton.jit
def _gemv_step(X, RES, NW, w_ptr, k, offs_k, nmask, M, K, stride_xm, acc0, acc1, acc2, acc3, ss,
               BLOCK_M: tl.constexpr, NORM: tl.constexpr, HAS_RES: tl.constexpr):
    """One [BLOCK_N, BLOCK_K] weight tile at column k into the rows' fp32 partials. NORM (one
    row): x's chunk becomes r = x + residual (rounded to x's dtype, as add_rmsnorm stores it)
    times the norm weight, and ss collects r^2 for the row's RMS (applied to the sums at the
    end: _gemv_kernel)."""
    kmask = (k + offs_k) < K
    w = tl.load(w_ptr + k, mask=nmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
    x0 = tl.load(X + k + offs_k, mask=kmask, other=0.0)
    if NORM:
        if HAS_RES:
            x0 = (x0.to(tl.float32) + tl.load(RES + k + offs_k, mask=kmask, other=0.0)
                  .to(tl.float32)).to(X.dtype.element_ty)
        xf = x0.to(tl.float32)
        ss += xf * xf
        xf = xf * tl.load(NW + k + offs_k, mask=kmask, other=0.0).to(tl.float32)
    else:
        xf = x0.to(tl.float32)
    acc0 += tl.sum(w * xf[None, :], 1)
    if BLOCK_M > 1:
        # rows past M read row M - 1 again (valid memory; never stored)
        x1 = tl.load(X + tl.minimum(1, M - 1) * stride_xm + k + offs_k, mask=kmask, other=0.0)
        acc1 += tl.sum(w * x1.to(tl.float32)[None, :], 1)
    if BLOCK_M > 2:
        x2 = tl.load(X + tl.minimum(2, M - 1) * stride_xm + k + offs_k, mask=kmask, other=0.0)
        acc2 += tl.sum(w * x2.to(tl.float32)[None, :], 1)
        x3 = tl.load(X + tl.minimum(3, M - 1) * stride_xm + k + offs_k, mask=kmask, other=0.0)
        acc3 += tl.sum(w * x3.to(tl.float32)[None, :], 1)
    return acc0, acc1, acc2, acc3, ss


@triton.jit
def _norm_outputs(pid, G, X, RES, NW, RES_OUT, H_OUT, rstd, K, HAS_RES: tl.constexpr,
                  HAS_H: tl.constexpr, WB: tl.constexpr):
    """NORM: program pid's WB-wide slices (pid, pid + G, ...) of the new residual r = x +
    residual and of the normed row h = (r * rstd rounded) * weight (rounded): add_rmsnorm's
    outputs, bit for bit given the same rstd."""
    for s in range(pid, tl.cdiv(K, WB), G):
        offs = s * WB + tl.arange(0, WB)
        mask = offs < K
        r = tl.load(X + offs, mask=mask, other=0.0)
        if HAS_RES:
            r = (r.to(tl.float32) + tl.load(RES + offs, mask=mask, other=0.0).to(tl.float32)
                 ).to(X.dtype.element_ty)
            tl.store(RES_OUT + offs, r, mask=mask)
        if HAS_H:
            y = (r.to(tl.float32) * rstd).to(X.dtype.element_ty).to(tl.float32)
            nw = tl.load(NW + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(H_OUT + offs, (y * nw).to(H_OUT.dtype.element_ty), mask=mask)


@triton.jit
def _gemv_kernel(X, W, Y, ADD, RES, NW, RES_OUT, H_OUT, eps, M, N, K, stride_xm, stride_wn,
                 stride_ym, stride_am,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 HAS_ADD: tl.constexpr, STRIDED: tl.constexpr, K_UNROLL: tl.constexpr,
                 NORM: tl.constexpr = False, HAS_RES: tl.constexpr = False,
                 HAS_H: tl.constexpr = False, WB: tl.constexpr = 256):
    _gemv_program(tl.program_id(0), tl.num_programs(0), X, W, Y, ADD, RES, NW, RES_OUT, H_OUT,
                  eps, M, N, K, stride_xm, stride_wn, stride_ym, stride_am, BLOCK_M, BLOCK_N,
                  BLOCK_K, HAS_ADD, STRIDED, K_UNROLL, NORM, HAS_RES, HAS_H, WB)


@triton.jit
def _gemv_program(pid, G, X, W, Y, ADD, RES, NW, RES_OUT, H_OUT, eps, M, N, K, stride_xm,
                  stride_wn, stride_ym, stride_am, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, HAS_ADD: tl.constexpr, STRIDED: tl.constexpr,
                  K_UNROLL: tl.constexpr, NORM: tl.constexpr, HAS_RES: tl.constexpr,
                  HAS_H: tl.constexpr, WB: tl.constexpr):
    """Program pid of G GEMV programs (kernels that add other programs to the grid call this
    with their own G, e.g. kernels/mla_prologue's q_b + prologue launch)."""
    if STRIDED:  # rows pid, pid + G, pid + 2G, ... (G programs)
        offs_n = pid + tl.arange(0, BLOCK_N) * G
    else:
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    w_ptr = W + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    acc0 = tl.zeros((BLOCK_N,), tl.float32)
    acc1 = tl.zeros((BLOCK_N,), tl.float32)
    acc2 = tl.zeros((BLOCK_N,), tl.float32)
    acc3 = tl.zeros((BLOCK_N,), tl.float32)
    ss = tl.zeros((BLOCK_K,), tl.float32)
    if K_UNROLL > 0:  # K == K_UNROLL: the steps unrolled, so every step's loads issue at once
        for k in tl.static_range(0, K_UNROLL, BLOCK_K):
            acc0, acc1, acc2, acc3, ss = _gemv_step(X, RES, NW, w_ptr, k, offs_k, nmask, M, K,
                                                    stride_xm, acc0, acc1, acc2, acc3, ss,
                                                    BLOCK_M, NORM, HAS_RES)
    else:
        for k in range(0, K, BLOCK_K):
            acc0, acc1, acc2, acc3, ss = _gemv_step(X, RES, NW, w_ptr, k, offs_k, nmask, M, K,
                                                    stride_xm, acc0, acc1, acc2, acc3, ss,
                                                    BLOCK_M, NORM, HAS_RES)
    if NORM:  # the row's RMS scales the finished sums: sum(w * r * g) * rstd
        rstd = 1.0 / tl.sqrt(tl.sum(ss, 0) / K + eps)
        acc0 = acc0 * rstd
        if HAS_RES or HAS_H:
            _norm_outputs(pid, G, X, RES, NW, RES_OUT, H_OUT, rstd, K, HAS_RES, HAS_H, WB)
    _store_row(Y, ADD, 0, acc0, offs_n, nmask, M, stride_ym, stride_am, HAS_ADD)
    if BLOCK_M > 1:
        _store_row(Y, ADD, 1, acc1, offs_n, nmask, M, stride_ym, stride_am, HAS_ADD)
    if BLOCK_M > 2:
        _store_row(Y, ADD, 2, acc2, offs_n, nmask, M, stride_ym, stride_am, HAS_ADD)
        _store_row(Y, ADD, 3, acc3, offs_n, nmask, M, stride_ym, stride_am, HAS_ADD)


@triton.jit
def _store_row(Y, ADD, m, acc, offs_n, nmask, M, stride_ym, stride_am, HAS_ADD: tl.constexpr):
    ok = nmask & ((offs_n * 0 + m) < M)
    if HAS_ADD:
        acc += tl.load(ADD + m * stride_am + offs_n, mask=ok, other=0.0).to(tl.float32)
    tl.store(Y + m * stride_ym + offs_n, acc.to(Y.dtype.element_ty), mask=ok)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_config(M: int, N: int, K: int, device: torch.device) -> dict:
    """BLOCK_N (about two programs per SM, 1..16), BLOCK_K (512 or K) and warps for a shape."""
    sms = _sm_count(device.index or 0) if device.type == "cuda" else 4
    block_n = 1
    while block_n < 16 and triton.cdiv(N, 2 * block_n) >= 2 * sms:
        block_n *= 2
    # 512 (or K): the fastest of 256 / 512 / 1024 / 2048 at M=1 for q_b 1536x1536, o_proj
    # 7168x1024 and the lm_head shard on the H200 (bench/dense_gemv.py, RESULTS session 16)
    block_k = min(512, triton.next_power_of_2(K))
    return {"BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": 4, "STRIDED": False}


def gemv(x: torch.Tensor, w: torch.Tensor, *, out_dtype: torch.dtype | None = None,
         add: torch.Tensor | None = None, out: torch.Tensor | None = None,
         config: dict | None = None, norm: tuple | None = None) -> torch.Tensor:
    """y = x @ w^T (+ add) for 1 <= M <= MAX_M rows (see the module docstring).

    norm = (residual [1, K] | None, weight [K], eps, res_out [1, K] | None, h_out [1, K] | None),
    one row only: y = h @ w^T with h = RMSNorm(x + residual) * weight, the add + RMSNorm that
    would run before the GEMV folded into it (kernels/norm_rope.fused_add_rmsnorm's math; the
    GEMV reads r * weight unrounded and scales its sums by 1 / rms, so y differs from the
    unfused pair by h's bf16 rounding only). res_out (needed with a residual, not with None)
    receives r = x + residual and h_out (optional) h, both as add_rmsnorm writes them; neither
    may alias x or residual (every program reads them whole)."""
    M, K = x.shape
    N = w.shape[0]
    if (not 1 <= M <= MAX_M or w.shape[1] != K or w.stride(1) != 1 or w.stride(0) != K
            or x.stride(1) != 1 or x.dtype != w.dtype):
        raise ValueError(f"gemv: x {tuple(x.shape)} {x.dtype}, w {tuple(w.shape)} {w.dtype}: "
                         f"want 1 <= M <= {MAX_M}, contiguous w, same dtype")
    if add is not None and (add.shape != (M, N) or add.stride(1) != 1):
        raise ValueError(f"gemv: add {tuple(add.shape)}, want ({M}, {N}) with a contiguous row")
    res = nw = res_out = h_out = None
    eps = 0.0
    if norm is not None:
        res, nw, eps, res_out, h_out = norm
        rows = [t for t in (res, res_out, h_out) if t is not None]
        if (M != 1 or nw.shape != (K,) or not nw.is_contiguous()
                or any(t.shape != (1, K) or not t.is_contiguous() or t.dtype != x.dtype
                       for t in rows) or (res is None) != (res_out is None)):
            raise ValueError(f"gemv norm: one row of {K}, contiguous residual / res_out / h_out "
                             f"in x's dtype, res_out exactly with a residual (x "
                             f"{tuple(x.shape)})")
    if out is None:
        out = torch.empty(M, N, dtype=out_dtype or x.dtype, device=x.device)
    assert out.shape == (M, N) and out.stride(1) == 1
    cfg = dict(default_config(M, N, K, x.device), **(config or {}))
    bn = cfg["BLOCK_N"]
    _gemv_kernel[(triton.cdiv(N, bn),)](
        x, w, out, add if add is not None else out, x if res is None else res,
        x if nw is None else nw, x if res_out is None else res_out,
        x if h_out is None else h_out, float(eps), M, N, K, x.stride(0), w.stride(0),
        out.stride(0), add.stride(0) if add is not None else 0,
        BLOCK_M=1 if M == 1 else (2 if M == 2 else 4), BLOCK_N=bn, BLOCK_K=cfg["BLOCK_K"],
        HAS_ADD=add is not None, STRIDED=bool(cfg.get("STRIDED")),
        K_UNROLL=K if cfg.get("UNROLL") else 0, NORM=norm is not None, HAS_RES=res is not None,
        HAS_H=h_out is not None, num_warps=cfg["num_warps"])
    return out


def gemv_ref(x: torch.Tensor, w: torch.Tensor, *, out_dtype: torch.dtype | None = None,
             add: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 product (+ add in fp32), one rounding to out_dtype (default x's dtype)."""
    y = x.float() @ w.float().t()
    if add is not None:
        y = y + add.float()
    return y.to(out_dtype or x.dtype)


def gemv_norm_ref(x: torch.Tensor, w: torch.Tensor, residual: torch.Tensor | None,
                  weight: torch.Tensor, eps: float, *, out_dtype: torch.dtype | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The unfused pair gemv(norm=...) replaces: (y, r, h) with h, r = the add + RMSNorm
    reference (kernels/norm_rope.fused_add_rmsnorm_ref) and y = gemv_ref(h, w)."""
    from .norm_rope import fused_add_rmsnorm_ref
    h, r = fused_add_rmsnorm_ref(x, residual, weight, eps)
    return gemv_ref(h, w, out_dtype=out_dtype), r, h
