"""Absorbed MLA decode, query side: q_nope through W_UK and q_pe's RoPE in one launch.

After q_b, each decode token t has q [T, H, nope + rope] (q_nope, then q_pe). The absorbed
decode needs (model_spec §3.6; models/mla.py)

    q_lat[t, h] = q_nope[t, h] @ W_UK[h]               W_UK [H, nope, R] -> q_lat [T, H, R]
    q_pe[t, h]  = RoPE(q_pe[t, h], positions[t])        in place in q (interleaved pairs)

which the kernel path otherwise runs as two launches (a batched GEMM and kernels/norm_rope's
rope_interleaved_). mla_q_absorb does both: grid (cdiv(T, BLOCK_T), H, cdiv(R, BLOCK_R));
program (tb, h, rb) computes q_lat for its BLOCK_T tokens x BLOCK_R latent columns with one
tl.dot over nope (fp32 accumulation; IEEE fp32 products for fp32 inputs, no TF32), rounded to
q_lat's dtype; the rb == 0 programs also rotate their tokens' q_pe (fp32 math, cast back, as
rope_interleaved_). Decode batches are small, so W_UK (1 MB for a Kimi TP8 rank) is read once
per token tile, mostly from L2.

Contract: q [T, H, nope + rope] with a contiguous last dim (any row / head strides, e.g. the q_b
output viewed per head); w_uk [H, nope, R] with a contiguous last dim; nope and rope / 2 powers
of two, nope >= 16; cos / sin [P, rope / 2] fp32 (layers/rotary.RotaryEmbedding); positions [T].
Returns q_lat [T, H, R] (new, q's dtype, unless `out` is given). No host syncs: CUDA/HIP-graph
capturable. `mla_q_absorb_ref` is the torch reference (bmm in fp32 + rope_interleaved_ref).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .norm_rope import rope_interleaved_ref


@triton.jit
def _q_absorb_kernel(Q, WUK, QLAT, COS, SIN, POS, T, R,
                     stride_qt, stride_qh, stride_wh, stride_wn, stride_lt, stride_lh, stride_cos,
                     NOPE: tl.constexpr, HALF: tl.constexpr, BLOCK_T: tl.constexpr,
                     BLOCK_R: tl.constexpr, IEEE: tl.constexpr):
    tb = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    rb = tl.program_id(2)
    offs_t = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = offs_t < T
    offs_n = tl.arange(0, NOPE)
    offs_r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = offs_r < R
    q_rows = Q + offs_t[:, None].to(tl.int64) * stride_qt + h * stride_qh
    q = tl.load(q_rows + offs_n[None, :], mask=tmask[:, None], other=0.0)
    w = tl.load(WUK + h * stride_wh + offs_n[:, None] * stride_wn + offs_r[None, :],
                mask=rmask[None, :], other=0.0)
    # q_pe's RoPE (programs rb == 0): its loads issued with q's and W_UK's, not after the dot
    # (masked off elsewhere: no memory traffic)
    pmask = tmask & ((offs_t * 0 + rb) == 0)  # a tensor: the interpreter rejects & scalar
    j = tl.arange(0, HALF)
    pe = q_rows + NOPE + 2 * j[None, :]
    x0 = tl.load(pe, mask=pmask[:, None], other=0.0).to(tl.float32)
    x1 = tl.load(pe + 1, mask=pmask[:, None], other=0.0).to(tl.float32)
    pos = tl.load(POS + offs_t, mask=pmask, other=0).to(tl.int64)
    cs = tl.load(COS + pos[:, None] * stride_cos + j[None, :], mask=pmask[:, None], other=0.0)
    sn = tl.load(SIN + pos[:, None] * stride_cos + j[None, :], mask=pmask[:, None], other=0.0)
    if IEEE:
        acc = tl.dot(q, w, input_precision="ieee")
    else:
        acc = tl.dot(q, w)
    tl.store(QLAT + offs_t[:, None].to(tl.int64) * stride_lt + h * stride_lh + offs_r[None, :],
             acc.to(QLAT.dtype.element_ty), mask=tmask[:, None] & rmask[None, :])
    if rb == 0:
        dt = Q.dtype.element_ty
        tl.store(pe, (x0 * cs - x1 * sn).to(dt), mask=tmask[:, None])
        tl.store(pe + 1, (x0 * sn + x1 * cs).to(dt), mask=tmask[:, None])

def mla_q_absorb(q: torch.Tensor, w_uk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 positions: torch.Tensor, out: torch.Tensor | None = None,
                 block_r: int = 64) -> torch.Tensor:
    """q_lat [T, H, R] = q_nope @ W_UK per head, and q_pe rotated in place (module docstring)."""
    T, H, D = q.shape
    Hw, nope, R = w_uk.shape
    rope = D - nope
    half = rope // 2
    if (Hw != H or rope <= 0 or rope % 2 or half & (half - 1) or nope < 16 or nope & (nope - 1)
            or q.stride(-1) != 1 or w_uk.stride(-1) != 1 or cos.shape[-1] != half
            or cos.stride(-1) != 1 or sin.stride() != cos.stride() or positions.shape[0] != T
            or w_uk.dtype != q.dtype):
        raise ValueError(f"mla_q_absorb: q {tuple(q.shape)} {q.dtype}, w_uk {tuple(w_uk.shape)} "
                         f"{w_uk.dtype}, cos {tuple(cos.shape)}: see the module docstring")
    if out is None:
        out = torch.empty(T, H, R, dtype=q.dtype, device=q.device)
    assert out.shape == (T, H, R) and out.stride(-1) == 1
    if T == 0:
        return out
    block_t = 16  # tl.dot's smallest M tile; decode batches below it are masked rows
    block_r = min(block_r, triton.next_power_of_2(R))
    _q_absorb_kernel[(triton.cdiv(T, block_t), H, triton.cdiv(R, block_r))](
        q, w_uk, out, cos, sin, positions, T, R, q.stride(0), q.stride(1), w_uk.stride(0),
        w_uk.stride(1), out.stride(0), out.stride(1), cos.stride(0),
        NOPE=nope, HALF=half, BLOCK_T=block_t, BLOCK_R=block_r,
        IEEE=q.dtype == torch.float32, num_warps=4)
    return out


def mla_q_absorb_ref(q: torch.Tensor, w_uk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     positions: torch.Tensor) -> torch.Tensor:
    """Torch reference with the same in-place effect on q's rope half."""
    nope = w_uk.shape[1]
    q_lat = torch.einsum("thn,hnr->thr", q[..., :nope].float(), w_uk.float()).to(q.dtype)
    q[..., nope:] = rope_interleaved_ref(q[..., nope:], cos, sin, positions)
    return q_lat
