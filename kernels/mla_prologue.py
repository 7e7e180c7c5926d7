"""MLA prologue: the latent RMSNorms, k_pe's RoPE and the KV store in one launch per step.

After the fused q_a / kv_a GEMM (models/mla.py, kernel path) each token t has
    q_c [T, QL]     (the q_a output; QL = q_lora_rank, 1536 in the real models)
    kv  [T, R + DR] (the kv_a output: latent c [R] then k_pe [DR]; 512 + 64)
usually as two strided views of one [T, QL + R + DR] tensor. mla_prologue computes, per token:

    q_out[t]       = RMSNorm(q_c[t]; q_weight, eps_q)             (new contiguous [T, QL])
    kv[t, :R]      = c  = RMSNorm(kv[t, :R]; kv_weight, eps_kv)   (in place)
    kv[t, R:]      = kp = RoPE(kv[t, R:], positions[t])           (in place)
    kv_cache[slot] = [c | kp]     slot = slot_mapping[t]; slot < 0 is padding: nothing written

which is exactly what the unfused kernel path does with four launches:
kernels/norm_rope.fused_add_rmsnorm (twice, residual=None), rope_interleaved_ (the k_pe half;
q_pe is rotated after q_b, by its own launch) and kernels/kv_store.kv_store:
- RMSNorm as HF computes it: normalize in fp32, cast to x's dtype, multiply by the weight
  (fp32 product, cast back).
- RoPE: interleaved (GPT-J / DeepSeek) pairs (x[2j], x[2j+1]) rotated by cos/sin[positions[t], j]
  (cos/sin [P, DR/2] fp32, layers/rotary.RotaryEmbedding), fp32 math, cast back to kv's dtype.
- Store: the values above already rounded to kv's dtype are written; an fp8 cache (e4m3fn or
  e4m3fnuz, taken from kv_cache.dtype) gets saturate(x / k_scale) rounded to nearest-even with
  IEEE division (tl.math.div_rn + kv_store.fp8_round), bit-identical to kv_store's codes.
  kv_cache [num_blocks, block_size, R + DR] contiguous; slot = block * block_size + offset.

Constraints: DR/2 a power of two (tl.arange over the pairs); QL and R any width (masked blocks);
last dims contiguous; slot_mapping int32/int64. One program per token (grid (T,)); no host syncs
and the only allocation (q_out, unless passed) has a data-independent shape, so the launch is
CUDA/HIP-graph capturable. Triton only (NVIDIA and AMD).
`mla_prologue_ref` is the torch reference (the same ops composed from norm_rope / kv_store refs,
with exact fp8 division: moe_ref.exact_div).

qb_prologue: for one token, the prologue and the q_b GEMV in one launch (the q_a norm folded
into kernels/gemv.py's programs, one more program for the kv part); reference qb_prologue_ref.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gemv import _gemv_program, gemv_ref
from .gemv import default_config as gemv_default_config
from .kv_store import _FP8, fp8_min_exp, fp8_round
from .moe_ref import exact_div
from .norm_rope import fused_add_rmsnorm_ref, rope_interleaved_ref


@triton.jit
def _rmsnorm_row(x, w, n, eps, OUT_DTYPE: tl.constexpr):
    """fp32 row x (masked lanes 0), weight w (fp32) -> RMSNorm in OUT_DTYPE (HF order)."""
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / n + eps)
    y = (x * rstd).to(OUT_DTYPE).to(tl.float32)
    return (y * w).to(OUT_DTYPE)


@triton.jit
def _mla_prologue_kernel(QC, KVI, QOUT, QW, KVW, COS, SIN, POS, SLOT, KVC, eps_q, eps_kv, k_scale,
                         stride_qc, stride_kv, stride_qo, stride_cos,
                         QL: tl.constexpr, R: tl.constexpr, HALF: tl.constexpr,
                         BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr, QUANT: tl.constexpr,
                         FP8_MAX: tl.constexpr, MIN_EXP: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    # every load first (independent, so they overlap: the launch is latency-bound at small T)
    oq = tl.arange(0, BLOCK_Q)
    mq = oq < QL
    q = tl.load(QC + t * stride_qc + oq, mask=mq, other=0.0).to(tl.float32)
    wq = tl.load(QW + oq, mask=mq, other=0.0).to(tl.float32)
    kv = _kv_load(t, KVI, KVW, COS, SIN, POS, SLOT, stride_kv, stride_cos, R, HALF, BLOCK_R)
    # q_a norm -> the q_b GEMM's input
    tl.store(QOUT + t * stride_qo + oq, _rmsnorm_row(q, wq, QL, eps_q, QOUT.dtype.element_ty),
             mask=mq)
    _kv_finish(kv, KVI, KVC, eps_kv, k_scale, R, HALF, BLOCK_R, QUANT, FP8_MAX, MIN_EXP)


@triton.jit
def _kv_load(t, KVI, KVW, COS, SIN, POS, SLOT, stride_kv, stride_cos, R: tl.constexpr,
             HALF: tl.constexpr, BLOCK_R: tl.constexpr):
    """Token t's kv_a output row, its norm weight, the k_pe pair halves, cos / sin at its
    position and its slot: every load of the kv part, issued together."""
    orr = tl.arange(0, BLOCK_R)
    mr = orr < R
    kv_row = KVI + t * stride_kv
    c = tl.load(kv_row + orr, mask=mr, other=0.0).to(tl.float32)
    wc = tl.load(KVW + orr, mask=mr, other=0.0).to(tl.float32)
    j = tl.arange(0, HALF)
    x0 = tl.load(kv_row + R + 2 * j).to(tl.float32)
    x1 = tl.load(kv_row + R + 2 * j + 1).to(tl.float32)
    pos = tl.load(POS + t).to(tl.int64)
    cs = tl.load(COS + pos * stride_cos + j).to(tl.float32)
    sn = tl.load(SIN + pos * stride_cos + j).to(tl.float32)
    slot = tl.load(SLOT + t).to(tl.int64)
    return kv_row, c, wc, x0, x1, cs, sn, slot


@triton.jit
def _kv_finish(kv, KVI, KVC, eps_kv, k_scale, R: tl.constexpr, HALF: tl.constexpr,
               BLOCK_R: tl.constexpr, QUANT: tl.constexpr, FP8_MAX: tl.constexpr,
               MIN_EXP: tl.constexpr):
    """The kv part from `_kv_load`'s values: latent norm and k_pe rotation written back in
    place (the prefill path reads them), then the cache entry [c | k_pe]."""
    kv_row, c, wc, x0, x1, cs, sn, slot = kv
    dt = KVI.dtype.element_ty
    orr = tl.arange(0, BLOCK_R)
    mr = orr < R
    j = tl.arange(0, HALF)
    kp_ptr = kv_row + R + 2 * j
    c_n = _rmsnorm_row(c, wc, R, eps_kv, dt)
    y0 = (x0 * cs - x1 * sn).to(dt)
    y1 = (x0 * sn + x1 * cs).to(dt)
    tl.store(kv_row + orr, c_n, mask=mr)
    tl.store(kp_ptr, y0)
    tl.store(kp_ptr + 1, y1)
    if slot >= 0:  # the cache entry [c | k_pe] from the values rounded to dt, as kv_store does
        cf = c_n.to(tl.float32)
        y0f = y0.to(tl.float32)
        y1f = y1.to(tl.float32)
        if QUANT:
            cf = fp8_round(tl.math.div_rn(cf, k_scale), FP8_MAX, MIN_EXP)
            y0f = fp8_round(tl.math.div_rn(y0f, k_scale), FP8_MAX, MIN_EXP)
            y1f = fp8_round(tl.math.div_rn(y1f, k_scale), FP8_MAX, MIN_EXP)
        dst = KVC + slot * (R + 2 * HALF)
        odt = KVC.dtype.element_ty
        tl.store(dst + orr, cf.to(odt), mask=mr)
        tl.store(dst + R + 2 * j, y0f.to(odt))
        tl.store(dst + R + 2 * j + 1, y1f.to(odt))


@triton.jit
def _qb_prologue_kernel(QC, W, Y, QW, KVI, KVW, COS, SIN, POS, SLOT, KVC, eps_q, eps_kv,
                        k_scale, N, stride_wn, stride_kv, stride_cos, G, QL: tl.constexpr,
                        R: tl.constexpr, HALF: tl.constexpr, BLOCK_R: tl.constexpr,
                        QUANT: tl.constexpr, FP8_MAX: tl.constexpr, MIN_EXP: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STRIDED: tl.constexpr,
                        K_UNROLL: tl.constexpr):
    """qb_prologue: programs 0..G-1 the q_b GEMV over RMSNorm(q_c) (the norm folded, as
    kernels/gemv.py's norm=), program G the kv part."""
    pid = tl.program_id(0)
    if pid == G:
        kv = _kv_load(0, KVI, KVW, COS, SIN, POS, SLOT, stride_kv, stride_cos, R, HALF,
                      BLOCK_R)
        _kv_finish(kv, KVI, KVC, eps_kv, k_scale, R, HALF, BLOCK_R, QUANT, FP8_MAX, MIN_EXP)
    else:
        _gemv_program(pid, G, QC, W, Y, Y, QC, QW, QC, QC, eps_q, 1, N, QL, QL, stride_wn,
                      N, 0, 1, BLOCK_N, BLOCK_K, False, STRIDED, K_UNROLL, True, False, False,
                      256)


def _kv_args(q_c, kv, q_weight, kv_weight, cos, sin, positions, kv_cache, slot_mapping
             ) -> dict:
    """The kv part's checks (both wrappers) and its constexprs: R, HALF, BLOCK_R and the
    cache's QUANT / FP8_MAX / MIN_EXP."""
    T, QL = q_c.shape
    R = kv_weight.shape[0]
    DR = kv.shape[-1] - R
    half = DR // 2
    assert kv.dim() == 2 and kv.shape[0] == T and q_weight.shape == (QL,)
    assert q_c.stride(-1) == 1 and kv.stride(-1) == 1 and kv.dtype == q_c.dtype
    assert DR > 0 and DR % 2 == 0 and half & (half - 1) == 0, "DR/2 must be a power of two"
    assert cos.shape[-1] == half and cos.stride(-1) == 1 and sin.stride() == cos.stride()
    assert kv_cache.is_contiguous() and kv_cache.shape[-1] == R + DR
    assert slot_mapping.shape[0] == T and positions.shape[0] == T
    quant = kv_cache.dtype in _FP8
    return {"R": R, "HALF": half, "BLOCK_R": triton.next_power_of_2(R), "QUANT": quant,
            "FP8_MAX": float(torch.finfo(kv_cache.dtype).max) if quant else 0.0,
            "MIN_EXP": fp8_min_exp(kv_cache.dtype)}


def mla_prologue(q_c: torch.Tensor, kv: torch.Tensor, q_weight: torch.Tensor,
                 kv_weight: torch.Tensor, eps_q: float, eps_kv: float, cos: torch.Tensor,
                 sin: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                 slot_mapping: torch.Tensor, k_scale: float = 1.0,
                 q_out: torch.Tensor | None = None) -> torch.Tensor:
    """One launch: returns q_out [T, QL] (RMSNorm(q_c), contiguous, q_c's dtype); normalizes /
    rotates kv [T, R + DR] in place and stores it at slot_mapping (module docstring)."""
    T, QL = q_c.shape
    kva = _kv_args(q_c, kv, q_weight, kv_weight, cos, sin, positions, kv_cache, slot_mapping)
    if q_out is None:
        q_out = torch.empty(T, QL, dtype=q_c.dtype, device=q_c.device)
    assert q_out.shape == (T, QL) and q_out.stride(-1) == 1
    if T == 0:
        return q_out
    block_q = triton.next_power_of_2(QL)
    _mla_prologue_kernel[(T,)](
        q_c, kv, q_out, q_weight, kv_weight, cos, sin, positions, slot_mapping, kv_cache,
        float(eps_q), float(eps_kv), float(k_scale), q_c.stride(0), kv.stride(0),
        q_out.stride(0), cos.stride(0), QL=QL, BLOCK_Q=block_q, **kva,
        num_warps=max(1, min(8, block_q // 512)))
    return q_out


def qb_prologue(q_c: torch.Tensor, kv: torch.Tensor, w_qb: torch.Tensor, q_weight: torch.Tensor,
                kv_weight: torch.Tensor, eps_q: float, eps_kv: float, cos: torch.Tensor,
                sin: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                slot_mapping: torch.Tensor, k_scale: float = 1.0,
                config: dict | None = None) -> torch.Tensor:
    """One token (decode B=1, or a one-token prefill chunk): q = RMSNorm(q_c) @ w_qb^T [1, N]
    and the kv part of mla_prologue (kv normed / rotated in place, the cache entry stored) in
    ONE launch: the q_b GEMV (kernels/gemv.py's programs, `config` its tiles, the q_a norm
    folded into it: y differs from mla_prologue + gemv by the normed row's rounding only)
    plus one program for the kv part. q_c [1, QL] contiguous, w_qb [N, QL] contiguous in q_c's
    dtype; the rest as mla_prologue. Reference: qb_prologue_ref."""
    T, QL = q_c.shape
    N = w_qb.shape[0]
    if (T != 1 or w_qb.shape[1] != QL or not w_qb.is_contiguous() or not q_c.is_contiguous()
            or w_qb.dtype != q_c.dtype or q_weight.shape != (QL,)):
        raise ValueError(f"qb_prologue: one contiguous q_c row and w_qb [N, {QL}] of its dtype "
                         f"(q_c {tuple(q_c.shape)}, w_qb {tuple(w_qb.shape)})")
    kva = _kv_args(q_c, kv, q_weight, kv_weight, cos, sin, positions, kv_cache, slot_mapping)
    cfg = dict(gemv_default_config(1, N, QL, q_c.device), **(config or {}))
    G = triton.cdiv(N, cfg["BLOCK_N"])
    y = torch.empty(1, N, dtype=q_c.dtype, device=q_c.device)
    _qb_prologue_kernel[(G + 1,)](
        q_c, w_qb, y, q_weight, kv, kv_weight, cos, sin, positions, slot_mapping, kv_cache,
        float(eps_q), float(eps_kv), float(k_scale), N, w_qb.stride(0), kv.stride(0),
        cos.stride(0), G, QL=QL, **kva, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        STRIDED=bool(cfg.get("STRIDED")), K_UNROLL=QL if cfg.get("UNROLL") else 0,
        num_warps=cfg["num_warps"])
    return y


def qb_prologue_ref(q_c, kv, w_qb, q_weight, kv_weight, eps_q, eps_kv, cos, sin, positions,
                    kv_cache, slot_mapping, k_scale=1.0):
    """mla_prologue_ref (kv and kv_cache in place) then the q_b product in fp32 of its normed
    row, rounded once to q_c's dtype."""
    q_n = mla_prologue_ref(q_c, kv, q_weight, kv_weight, eps_q, eps_kv, cos, sin, positions,
                           kv_cache, slot_mapping, k_scale)
    return gemv_ref(q_n, w_qb)


def mla_prologue_ref(q_c: torch.Tensor, kv: torch.Tensor, q_weight: torch.Tensor,
                     kv_weight: torch.Tensor, eps_q: float, eps_kv: float, cos: torch.Tensor,
                     sin: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                     slot_mapping: torch.Tensor, k_scale: float = 1.0) -> torch.Tensor:
    """Torch reference of mla_prologue (same in-place effects on kv and kv_cache): the norm and
    RoPE references of norm_rope and kv_store_ref's store, dividing exactly for fp8."""
    R = kv_weight.shape[0]
    q_out = fused_add_rmsnorm_ref(q_c, None, q_weight, eps_q)[0]
    c = fused_add_rmsnorm_ref(kv[:, :R], None, kv_weight, eps_kv)[0]
    k_pe = rope_interleaved_ref(kv[:, R:], cos, sin, positions)
    kv[:, :R], kv[:, R:] = c, k_pe
    keep = slot_mapping >= 0
    flat = kv_cache.view(-1, kv_cache.shape[-1])
    entry = kv[keep]
    if kv_cache.dtype in _FP8:
        fmax = torch.finfo(kv_cache.dtype).max
        flat[slot_mapping[keep]] = exact_div(entry.float(), k_scale).clamp(-fmax, fmax).to(
            kv_cache.dtype)
    else:
        flat[slot_mapping[keep]] = entry.to(kv_cache.dtype)
    return q_out.contiguous()
