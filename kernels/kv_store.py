"""KV store: write T new tokens' latent entries [c | k_pe] into their cache slots.

- kv_cache [num_blocks, block_size, D] (contiguous), D = R + DR; slot = block * block_size + offset.
- c [T, R] and k_pe [T, DR] (any row strides, last dim contiguous; k_pe may also be [T, 1, DR]),
  or one entry [T, D] passed as `c` with k_pe=None.
- slot_mapping [T] int64; a slot < 0 is padding and is skipped (nothing written).
- fp8 cache (e4m3fn / e4m3fnuz): stored = saturate(x / k_scale) rounded to nearest-even, the
  same as torch's `.to(float8)` after clamping to the format's finite range (model_spec §4e).
  Otherwise the values are cast to the cache dtype.
One program per token; graph-capturable (no host syncs).

fp8_round() rounds fp32 to the e4m3 grid (nearest-even) before the final cast, so the cast is
exact: the result is the same on every backend, and the Triton CPU interpreter (whose own fp8
cast mis-rounds: 31.0 -> 16.0, ties away from even) agrees with torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_FP8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e4m3fnuz") if hasattr(torch, n))


@triton.jit
def fp8_round(x, FP8_MAX: tl.constexpr, MIN_EXP: tl.constexpr):
    """Saturate fp32 x to +-FP8_MAX and round to the nearest e4m3 value (ties to even), in fp32.
    MIN_EXP is the smallest normal exponent (-6 for e4m3fn, -7 for e4m3fnuz); below it the
    spacing is fixed (subnormals). Uses (x + C) - C with C = 1.5 * 2^23 * spacing."""
    x = tl.clamp(x, -FP8_MAX, FP8_MAX)
    bits = x.to(tl.int32, bitcast=True)
    e = tl.maximum(((bits >> 23) & 0xFF) - 127, MIN_EXP)
    big = ((e - 3 + 23 + 127) << 23) | (1 << 22)  # bits of 1.5 * 2^(e - 3 + 23)
    cst = big.to(tl.float32, bitcast=True)
    r = (tl.abs(x) + cst) - cst
    return (r.to(tl.int32, bitcast=True) | (bits & -2147483648)).to(tl.float32, bitcast=True)


@triton.jit
def _kv_store_kernel(C, KP, KV, SLOT, k_scale, stride_c, stride_kp,
                     R: tl.constexpr, DR: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_P: tl.constexpr, QUANT: tl.constexpr, FP8_MAX: tl.constexpr,
                     MIN_EXP: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(SLOT + t)
    if slot >= 0:
        D: tl.constexpr = R + DR
        offs_r = tl.arange(0, BLOCK_R)
        offs_p = tl.arange(0, BLOCK_P)
        c = tl.load(C + t.to(tl.int64) * stride_c + offs_r, mask=offs_r < R)
        kp = tl.load(KP + t.to(tl.int64) * stride_kp + offs_p, mask=offs_p < DR)
        if QUANT:
            c = fp8_round(tl.math.div_rn(c.to(tl.float32), k_scale), FP8_MAX, MIN_EXP)
            kp = fp8_round(tl.math.div_rn(kp.to(tl.float32), k_scale), FP8_MAX, MIN_EXP)
        dst = KV + slot * D
        tl.store(dst + offs_r, c.to(KV.dtype.element_ty), mask=offs_r < R)
        tl.store(dst + R + offs_p, kp.to(KV.dtype.element_ty), mask=offs_p < DR)


def fp8_min_exp(dtype: torch.dtype) -> int:
    """Smallest normal exponent of an fp8 e4m3 dtype (fnuz has exponent bias 8, fn 7)."""
    return -7 if "fnuz" in str(dtype) else -6


def kv_store(kv_cache: torch.Tensor, slot_mapping: torch.Tensor, c: torch.Tensor,
             k_pe: torch.Tensor | None = None, k_scale: float = 1.0,
             rope_dim: int = 64) -> None:
    """Write [c | k_pe] of T tokens into kv_cache at slot_mapping (in place)."""
    D = kv_cache.shape[-1]
    if k_pe is None:
        c, k_pe = c[..., : D - rope_dim], c[..., D - rope_dim:]
    k_pe = k_pe.reshape(k_pe.shape[0], k_pe.shape[-1]) if k_pe.dim() == 3 else k_pe
    T, R = c.shape
    DR = k_pe.shape[-1]
    assert R + DR == D and kv_cache.is_contiguous()
    assert c.stride(-1) == 1 and k_pe.stride(-1) == 1 and slot_mapping.shape[0] == T
    if T == 0:
        return
    quant = kv_cache.dtype in _FP8
    fp8_max = float(torch.finfo(kv_cache.dtype).max) if quant else 0.0
    _kv_store_kernel[(T,)](
        c, k_pe, kv_cache, slot_mapping, float(k_scale), c.stride(0), k_pe.stride(0),
        R=R, DR=DR, BLOCK_R=triton.next_power_of_2(R), BLOCK_P=triton.next_power_of_2(DR),
        QUANT=quant, FP8_MAX=fp8_max, MIN_EXP=fp8_min_exp(kv_cache.dtype), num_warps=2,
    )


def kv_store_ref(kv_cache: torch.Tensor, slot_mapping: torch.Tensor, c: torch.Tensor,
                 k_pe: torch.Tensor, k_scale: float = 1.0) -> None:
    """Plain torch reference of kv_store (in place)."""
    flat = kv_cache.view(-1, kv_cache.shape[-1])
    entry = torch.cat([c, k_pe.reshape(k_pe.shape[0], -1)], dim=-1)
    keep = slot_mapping >= 0
    slots, entry = slot_mapping[keep], entry[keep]
    if kv_cache.dtype in _FP8:
        fmax = torch.finfo(kv_cache.dtype).max
        flat[slots] = (entry.float() / k_scale).clamp(-fmax, fmax).to(kv_cache.dtype)
    else:
        flat[slots] = entry.to(kv_cache.dtype)
