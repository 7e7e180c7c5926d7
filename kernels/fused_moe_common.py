"""Shared Triton helpers of the fused MoE (kernels/fused_moe.py): format codes, dequantization
and quantization primitives, and the tensor-core K-loop step `_step` / `_mm` for every format.

Format codes (constexpr FMT): FLOAT (bf16/fp16/fp32 weights), FP8 (fp8 128x128 blocks), INT4
(repacked int4 g32), MXFP4 (repacked MXFP4), MXFP4_DS (raw Quark MXFP4 via tl.dot_scaled), FP8C
(fp8 e4m3 with a per-output-channel or per-tensor scale, fp8 activations with a per-token or
static per-tensor scale; the caller applies both scales after the K loop, see `_step`).
Activation quantization (constexpr ACT): A_NONE, A_FP8, A_MXFP4. MMA operand dtype (MDT): BF16,
F16, F32 (the interpreter runs bf16 dots as F32).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .. import envs

FLOAT, FP8, INT4, MXFP4, MXFP4_DS, FP8C = 0, 1, 2, 3, 4, 5  # weight formats (constexpr FMT)
A_NONE, A_FP8, A_MXFP4 = 0, 1, 2  # activation quantization (constexpr ACT)
BF16, F16, F32 = 0, 1, 2  # MMA operand dtype (constexpr MDT)
_SIGN = tl.constexpr(-2147450880)  # 0x80008000 as int32
_INTERP = envs.triton_interpreted()
FP8_MAX = 448.0


@triton.jit
def _wrow(rows, NCH: tl.constexpr, WT: tl.constexpr, C: tl.constexpr):
    """Element offset of chunk 0 of `rows` in one expert's 4-bit words (C = 16 int32 per 128-K
    chunk) or group scales (C = 4 per chunk): tiles of WT consecutive rows, chunk-major inside
    a tile ([N / WT, NCH, WT, C]); WT = 1 is the row-major [N, NCH, C] layout. A row's chunk c
    is then at + c * WT * C (fused_moe.tile_w13 writes the tiled copy)."""
    return ((rows // WT) * (NCH * WT) + rows % WT) * C


@triton.jit
def _split4(t):
    """[..., 4] (held in one thread: the 16-byte vector) -> its 4 slices [...] (no data moves)."""
    a, b = tl.split(tl.reshape(t, t.shape[:-1] + [2, 2]))
    t0, t2 = tl.split(a)
    t1, t3 = tl.split(b)
    return t0, t1, t2, t3


@triton.jit
def _sel4(a0, a1, a2, a3, j: tl.constexpr):
    """a_j (j constexpr)."""
    if j == 0:
        return a0
    elif j == 1:
        return a1
    elif j == 2:
        return a2
    else:
        return a3


@triton.jit
def _halves(v, R: tl.constexpr):
    """int32 [R, 16] -> int16 [R, 32]: each word's low then high half (element 2t + h)."""
    return tl.join(v.to(tl.int16), (v >> 16).to(tl.int16)).reshape(R, 32)


@triton.jit
def _dot(a, b, acc, MDT: tl.constexpr):
    """acc += a @ b on bf16 (MDT 0), fp16 (1; bf16 activations b saturate at +-65504: cfg F16)
    or fp32 (2) operands; casts of operands already in that dtype are free."""
    if MDT == 0:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
    elif MDT == 1 and b.dtype == tl.bfloat16:  # bf16 activations on fp16 MMAs (cfg F16)
        return tl.dot(a.to(tl.float16), _x_to_fp16(b), acc)
    elif MDT == 1:
        return tl.dot(a.to(tl.float16), b.to(tl.float16), acc)
    else:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")


@triton.jit
def _pow2(biased):
    """2^(biased - 127) as fp32 for an int32 biased exponent in [1, 254]."""
    return (biased << 23).to(tl.float32, bitcast=True)


@triton.jit
def _mx_quant(a):
    """a fp32 [G, 32, N] -> (e2m1 codes int32 [G, 32, N] (bit 3 = sign), e8m0 int32 [G, N])."""
    amax = tl.max(tl.abs(a), axis=1)
    biased = ((amax.to(tl.int32, bitcast=True) + 0x200000) & 0x7F800000) >> 23
    e = tl.minimum(tl.maximum(biased - 129, -127), 126)
    y = a * _pow2(127 - e)[:, None, :]  # exact: a power of two
    mag = tl.abs(y)
    code = ((mag > 0.25).to(tl.int32) + (mag >= 0.75).to(tl.int32) + (mag > 1.25).to(tl.int32)
            + (mag >= 1.75).to(tl.int32) + (mag > 2.5).to(tl.int32) + (mag >= 3.5).to(tl.int32)
            + (mag > 5.0).to(tl.int32))
    return code | tl.where(y < 0, 8, 0), e + 127


@triton.jit
def _e2m1_value(code):
    """int32 codes -> fp32 e2m1 values (fp16 bit pattern of value * 2^-14, then rescaled)."""
    bits = ((code & 7) << 9) | ((code & 8) << 12)
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32) * 16384.0


@triton.jit
def _round_e4m3(v):
    """fp32 -> fp32 on the e4m3 grid, round-half-even (|v| <= 448), so that the cast to fp8
    is exact (the Triton interpreter's fp32->e4m3 cast mishandles mantissa carries)."""
    bits = v.to(tl.int32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
    sub = ((v * 512.0 + 12582912.0) - 12582912.0) * 0.001953125
    return tl.where(tl.abs(v) < 0.015625, sub, normal)


@triton.jit
def _x_to_fp16(x):
    return tl.minimum(tl.maximum(x.to(tl.float32), -65504.0), 65504.0).to(tl.float16)


@triton.jit
def _fp8_qv(x, s):
    """fp32 x / s (IEEE division), clamped to +-448 and rounded to the e4m3 grid: the values
    torch's `(x / s).clamp(-448, 448).to(float8_e4m3fn)` gives, as fp32 (exact in fp8)."""
    v = tl.math.div_rn(x, s)
    return _round_e4m3(tl.minimum(tl.maximum(v, -448.0), 448.0))


@triton.jit
def _row_scale(Xp, x_row, x_ok, AS, K: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
               ASTATIC: tl.constexpr):
    """fp8 activation scales [BM] of rows x_row (element offsets) of a row-major [*, K] tensor:
    static: the scalar at AS; dynamic per token: max(amax(|row|) / 448, 1e-12) (w4a8.py's
    fp8_qdq_per_token). Rows with x_ok False get 1e-12 (their loads are masked anyway)."""
    if ASTATIC:
        return tl.zeros((BM,), tl.float32) + tl.load(AS).to(tl.float32)
    amax = tl.zeros((BM,), tl.float32)
    for k0 in range(0, K, BK):
        k = k0 + tl.arange(0, BK)
        x = tl.load(Xp + x_row[:, None] + k[None, :], mask=x_ok[:, None], other=0.0)
        amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), axis=1))
    return tl.maximum(tl.math.div_rn(amax, tl.zeros((BM,), tl.float32) + 448.0), 1e-12)


def _int4_ptx(shift: int) -> str:
    """PTX for `_int4_sub_asm`, scale group j = shift / 4: the nibbles n of each half to bits
    0..3 (the bf16 subnormal n * 2^-133), then ONE fma: n * 2^-133 * (s * 2^70) + (-s * 2^-60)."""
    src = "" if shift == 0 else f"shr.u32 t, t, {shift}; "
    return ("{ .reg .b32 t; mov.b32 t, $1; " + src + "and.b32 t, t, 0x000F000F; "
            "fma.rn.bf16x2 $0, t, $2, $3; }")


_INT4_SUB_ASM = tl.constexpr(tuple(_int4_ptx(4 * j) for j in range(4)))


def _mx_asm(j: int) -> str:
    """PTX for `_mx_bf16_asm`, scale group j: the magnitude bits 3j..3j+2 of each half move to
    6..8 (a), the sign bit 12 + j to 15 (b), then one fma by the scale pair."""
    a = ("shl.b32 a, $1, 6; ", "shl.b32 a, $1, 3; ", "mov.b32 a, $1; ", "shr.u32 a, $1, 3; ")[j]
    b = ("shl.b32 b, $1, 3; ", "shl.b32 b, $1, 2; ", "shl.b32 b, $1, 1; ", "mov.b32 b, $1; ")[j]
    return ("{ .reg .b32 a, b, nz; mov.b32 nz, 0x80008000; " + a + b
            + "and.b32 b, b, 0x80008000; lop3.b32 a, a, 0x01C001C0, b, 0xEA; "
            "fma.rn.bf16x2 $0, a, $2, nz; }")


_MX_ASM = tl.constexpr(tuple(_mx_asm(j) for j in range(4)))
MX_RESCALE = tl.constexpr(9.223372036854775808e18)  # 2^63: DQ 3's weights leave it to the sum
INT4_SUB_S = tl.constexpr(1.1805916207174113e21)  # 2^70: `_int4_sub_asm`'s scale pair, s * 2^70
INT4_SUB_C = tl.constexpr(-8.673617379884035e-19)  # -2^-60: its offset pair, -8 s * 2^-63


@triton.jit
def _int4_sub_asm(w, sp, cp, j: tl.constexpr):
    """NVIDIA sm_80+ (inline PTX): int32 words w [R, 16] (8 nibbles each), packed bf16 pairs
    sp = (s * 2^70, s * 2^70) and cp = (-s * 2^-60, -s * 2^-60) [R, 1] -> int32 [R, 16], each
    the bf16 pair (n - 8) * s * 2^-63 of scale group j's nibbles: one shift (none for j = 0),
    one AND, one fma (the nibble itself is the bf16 subnormal n * 2^-133; the fma computes
    (n - 8) * s * 2^-63 exactly and rounds once). `_mm` multiplies the fp32 sum by 2^63, so the
    sums equal DQ 1's ((n - 8) * s rounded to bf16 once) bit for bit while 2^-63 <= |s| < 2^57
    (scaled weights and -s * 2^-60 stay bf16 normals, s * 2^70 finite): 3 instructions per
    weight pair (2 at j = 0). (Session 13's DQ 3 OR-ed the nibble into bf16 128 + n and took two
    fmas, 4 per pair: 390 vs 335 SASS per K step of the gate_up, bench/RESULTS.md session 14.)"""
    return tl.inline_asm_elementwise(_INT4_SUB_ASM[j], "=r,r,r,r", [w, sp, cp], dtype=tl.int32,
                                     is_pure=True, pack=1)


@triton.jit
def _mx_bf16_asm(w, sp, j: tl.constexpr):
    """NVIDIA sm_80+ (inline PTX): repacked MXFP4 words w [R, 16] and packed bf16 scale pairs
    sp [R, 1] (2^(e - 64) each) -> int32 [R, 16], each the bf16 pair of scale group j's values
    times 2^-63: `_dq16`'s bit moves (e2m1 * 2^-126) and ONE exact multiply; the 2^63 that
    `_dq16`'s portable path multiplies into every weight is applied once to the fp32
    accumulator instead (`_mm`). Exact (bit-equal sums) while the scaled weights stay bf16
    normals: e8m0 exponents e >= 65, scales >= 2^-62."""
    return tl.inline_asm_elementwise(_MX_ASM[j], "=r,r,r", [w, sp], dtype=tl.int32,
                                     is_pure=True, pack=1)


@triton.jit
def _bf16_pair(s16):
    """int16 [R] -> int32 [R] holding it in both halves (one mov / PRMT; NVIDIA inline PTX)."""
    return tl.inline_asm_elementwise("mov.b32 $0, {$1, $1};", "=r,h", [s16], dtype=tl.int32,
                                     is_pure=True, pack=1)


@triton.jit
def _dq16(w, j: tl.constexpr, s, R: tl.constexpr, FMT: tl.constexpr, MDT: tl.constexpr,
          ASM: tl.constexpr = False):
    """Scale group j (elements 32j + 2t + h of a 128-K chunk) of kernel-layout words w int32
    [R, 16] -> the scaled weights [R, 32] as 16-bit floats for one MMA with K = 32: bf16 when
    MDT == 0, else fp16 (int4 only). s [R]: the group's scale (int4: the bf16 scale; MXFP4: the
    e8m0 byte as int32).
    int4: nibble n -> 16-bit float of magic + n (bf16 128 + n / fp16 1024 + n) by one OR into
    the mantissa; (magic + n) - (magic + 8) = n - 8 exactly; times the scale: one rounding to
    the 16-bit format (bf16: relative 2^-9, like the bf16 activations; fp16: scales below 2^-14
    lose bits as fp16 subnormals).
    MXFP4 (bf16 only): the 3 magnitude bits go to bits 6..8 (the bf16 bit pattern of
    e2m1 * 2^-126; the zero-exponent code lands on a subnormal, exactly), the sign to bit 15;
    times 2^63 and 2^(e - 64) (powers of two: exact for e8m0 e in [1, 191], the clamp). (Leaving
    the 2^63 to the fp32 accumulator compiled to MORE code on sm_90: 575 vs 516 SASS per chunk,
    the halves then get re-packed with PRMT; see bench/notes_fused_moe_tc.md. ASM (DQ 3) does
    that through inline PTX, `_mx_bf16_asm`: 446 vs 516 SASS per chunk; its weights are then
    the values * 2^-63 and `_mm` scales the sum.)
    ASM (cfg DQ 3, bf16 only): inline PTX instead, `_int4_sub_asm` / `_mx_bf16_asm`, both
    giving the weights times 2^-63 (`_mm` scales the sum back)."""
    if FMT == 2 and MDT == 0 and ASM:
        sf = s.to(tl.float32)
        sp = _bf16_pair((sf * INT4_SUB_S).to(tl.bfloat16).to(tl.int16, bitcast=True))
        cp = _bf16_pair((sf * INT4_SUB_C).to(tl.bfloat16).to(tl.int16, bitcast=True))
        v = _int4_sub_asm(w, sp[:, None], cp[:, None], j)  # powers of two: exact
        return _halves(v, R).to(tl.bfloat16, bitcast=True)
    elif FMT == 3 and ASM:  # the weights times 2^-63: `_mm` multiplies the sum back
        sp = _bf16_pair(((tl.minimum(tl.maximum(s, 1), 191) + 63) << 7).to(tl.int16))
        v = _mx_bf16_asm(w, sp[:, None], j)
        return _halves(v, R).to(tl.bfloat16, bitcast=True)
    elif FMT == 2:
        if MDT == 0:
            v = ((w >> (4 * j)) & 0x000F000F) | 0x43004300
            off = 136.0
            fdt = tl.bfloat16
        else:
            v = ((w >> (4 * j)) & 0x000F000F) | 0x64006400
            off = 1032.0
            fdt = tl.float16
        wj = _halves(v, R).to(fdt, bitcast=True)
        return (wj - off).to(fdt) * s.to(fdt)[:, None]
    else:
        if j == 3:
            v = ((w >> 3) & 0x01C001C0) | (w & _SIGN)
        else:
            v = ((w << (6 - 3 * j)) & 0x01C001C0) | ((w << (3 - j)) & _SIGN)
        wj = _halves(v, R)
        wj = wj.to(tl.bfloat16, bitcast=True) * 9.223372036854775808e18  # 2^63, exact
        sb = ((tl.minimum(tl.maximum(s, 1), 191) + 63) << 7).to(tl.int16)  # bf16 2^(e - 64)
        return wj * sb.to(tl.bfloat16, bitcast=True)[:, None]


@triton.jit
def _step4s(acc, k0, Wp, Sp, row_w, row_s, wm, Xp, x_row, x_ok, R: tl.constexpr,
            BM: tl.constexpr, BK: tl.constexpr, FMT: tl.constexpr, MDT: tl.constexpr,
            DQ: tl.constexpr, CS: tl.constexpr = 16, SCS: tl.constexpr = 4):
    """DQ >= 1 step for repacked int4 / MXFP4 weight-only: acc[R, BM] += W[rows, k0:k0+BK] @
    X[k0:k0+BK, tokens] with the group scales folded into the 16-bit weight operand (`_dq16`),
    so every MMA accumulates into acc directly: no per-group fp32 partial, no per-group wait on
    the MMA and rescale of the accumulator (what DQ=0 does). DQ=1: one MMA per scale group
    (K = 32); DQ=2: one per 128-K chunk (groups interleaved along K, x rows permuted to match).
    The 4 scales of a chunk are one [R, 4] load. CS: words between a row's consecutive 128-K
    chunks (16: the repacked [rows, K / 128, 16] layout; T * 16 for a row-tiled copy with T rows
    per tile, whose row_w then points at the row inside its tile); SCS likewise for the scales
    (4: row-major [rows, K / 32]; T * 4 tiled)."""
    t = tl.arange(0, 16)
    for cc in tl.static_range(BK // 128):
        c = k0 // 128 + cc
        w = tl.load(Wp + row_w[:, None] + c * CS + t[None, :], mask=wm[:, None], other=0)
        sg = c * SCS + tl.arange(0, 4)
        if FMT == 2:  # bf16 scales, used as they are
            s4 = tl.load(Sp + row_s[:, None] + sg[None, :], mask=wm[:, None], other=0.0)
        else:
            s4 = tl.load(Sp + row_s[:, None] + sg[None, :], mask=wm[:, None], other=127)
            s4 = s4.to(tl.int32)
        s0, s1, s2, s3 = _split4(s4)  # [R] each: the chunk's 4 scale groups
        if DQ == 2:  # one MMA with K = 128 per chunk: the 4 groups interleaved along K
            # (column 4m + 2s + s2 = element m of group s + 2 s2), x rows permuted to match
            wa = tl.join(_dq16(w, 0, s0, R, FMT, MDT), _dq16(w, 1, s1, R, FMT, MDT))
            wb = tl.join(_dq16(w, 2, s2, R, FMT, MDT), _dq16(w, 3, s3, R, FMT, MDT))
            wc = tl.reshape(tl.join(wa, wb), (R, 128))
            kx = c * 128 + tl.arange(0, 128)
            x = tl.load(Xp + x_row[None, :] + kx[:, None], mask=x_ok[None, :], other=0.0)
            x = tl.reshape(tl.permute(tl.reshape(x, (2, 2, 32, BM)), (2, 1, 0, 3)), (128, BM))
            acc = _dot(wc, x, acc, MDT)
        else:
            for j in tl.static_range(4):
                kx = c * 128 + 32 * j + tl.arange(0, 32)
                x = tl.load(Xp + x_row[None, :] + kx[:, None], mask=x_ok[None, :], other=0.0)
                acc = _dot(_dq16(w, j, _sel4(s0, s1, s2, s3, j), R, FMT, MDT, DQ == 3), x,
                           acc, MDT)
    return acc


@triton.jit
def _step(acc, k0, Wp, Sp, row_w, row_s, wm, Xp, x_row, x_ok, XSp, xs_row, XSC,
          R: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, FMT: tl.constexpr,
          ACT: tl.constexpr, MDT: tl.constexpr, OFFS: tl.constexpr, DQ: tl.constexpr = 0,
          CS: tl.constexpr = 16, SCS: tl.constexpr = 4):
    """acc[R, BM] += W[rows, k0:k0+BK] @ X[k0:k0+BK, tokens] for one weight format.
    DQ=1 (repacked int4 with bf16/fp16 MMAs, MXFP4 with bf16 MMAs; weight-only): `_step4s`
    instead (group scales applied to the 16-bit weight operand, one accumulator chain); other
    cases ignore DQ.
    FP8C: XSC [BM] are the tokens' fp8 activation scales; acc gets the unscaled fp8 x fp8 dot
    (the caller multiplies by the weight-row and activation scales once, after the K loop).
    CS / SCS (repacked int4 / MXFP4): a row's chunk stride in words / scales (`_wrow`)."""
    if FMT == 0:  # float weights
        k = k0 + tl.arange(0, BK)
        w = tl.load(Wp + row_w[:, None] + k[None, :], mask=wm[:, None], other=0.0)
        x = tl.load(Xp + x_row[None, :] + k[:, None], mask=x_ok[None, :], other=0.0)
        acc = _dot(w, x, acc, MDT)
    elif FMT == 1:  # fp8 block 128x128, BK == 128
        k = k0 + tl.arange(0, BK)
        w = tl.load(Wp + row_w[:, None] + k[None, :], mask=wm[:, None], other=0.0)
        s = tl.load(Sp + row_s + k0 // 128, mask=wm, other=0.0)
        x = tl.load(Xp + x_row[None, :] + k[:, None], mask=x_ok[None, :], other=0.0)
        if ACT == 1:
            xf = x.to(tl.float32)
            sa = tl.math.div_rn(tl.maximum(tl.max(tl.abs(xf), axis=0), 1e-4), 448.0)
            xq = _round_e4m3(xf / sa[None, :]).to(tl.float8e4nv)
            d = tl.dot(w, xq)
            acc += d * s[:, None] * sa[None, :]
        else:
            d = _dot(w, x, tl.zeros((R, BM), tl.float32), MDT)
            acc += d * s[:, None]
    elif FMT == 5:  # fp8 per-channel / per-tensor weights, fp8 per-token activations
        k = k0 + tl.arange(0, BK)
        w = tl.load(Wp + row_w[:, None] + k[None, :], mask=wm[:, None], other=0.0)
        x = tl.load(Xp + x_row[None, :] + k[:, None], mask=x_ok[None, :], other=0.0)
        xq = _fp8_qv(x.to(tl.float32), XSC[None, :]).to(tl.float8e4nv)
        acc = tl.dot(w, xq, acc)
    elif FMT == 4:  # raw MXFP4 via tl.dot_scaled (FP4 matrix units), BK == 128
        kb = k0 // 2 + tl.arange(0, BK // 2)
        kg = k0 // 32 + tl.arange(0, BK // 32)
        w = tl.load(Wp + row_w[:, None] + kb[None, :], mask=wm[:, None], other=0)
        ws = tl.load(Sp + row_s[:, None] + kg[None, :], mask=wm[:, None], other=127)
        if ACT == 2:
            xq = tl.load(Xp + x_row[None, :] + kb[:, None], mask=x_ok[None, :], other=0)
            xs = tl.load(XSp + xs_row[:, None] + kg[None, :], mask=x_ok[:, None], other=127)
            acc = tl.dot_scaled(w, ws, "e2m1", xq, xs, "e2m1", acc)
        else:
            k = k0 + tl.arange(0, BK)
            x = tl.load(Xp + x_row[None, :] + k[:, None], mask=x_ok[None, :], other=0.0)
            if MDT == 0:
                acc = tl.dot_scaled(w, ws, "e2m1", x.to(tl.bfloat16), None, "bf16", acc)
            else:
                acc = tl.dot_scaled(w, ws, "e2m1", _x_to_fp16(x), None, "fp16", acc)
    elif DQ >= 1 and ACT == 0 and (MDT == 0 or (MDT == 1 and FMT == 2)):
        acc = _step4s(acc, k0, Wp, Sp, row_w, row_s, wm, Xp, x_row, x_ok, R, BM, BK, FMT, MDT,
                       DQ, CS, SCS)
    else:  # repacked int4 / mxfp4: BK = 128 * chunks; 4 scale groups of 32 per chunk
        t = tl.arange(0, 16)
        for cc in tl.static_range(BK // 128):
            c = k0 // 128 + cc
            w = tl.load(Wp + row_w[:, None] + c * CS + t[None, :], mask=wm[:, None], other=0)
            for j in tl.static_range(4):
                kx = c * 128 + 32 * j + tl.arange(0, 32)
                x = tl.load(Xp + x_row[None, :] + kx[:, None], mask=x_ok[None, :], other=0.0)
                if FMT == 2:
                    s = tl.load(Sp + row_s + c * SCS + j, mask=wm, other=0.0).to(tl.float32)
                    if MDT == 2:
                        q = (w >> (4 * j)) & 0x000F000F
                        lo = ((q & 0xFFFF) - 8).to(tl.float32)
                        hi = ((q >> 16) - 8).to(tl.float32)
                        wj = tl.join(lo, hi).reshape(R, 32)
                        d = _dot(wj, x, tl.zeros((R, BM), tl.float32), MDT)
                        acc += d * s[:, None]
                    else:
                        # nibble n -> 16-bit float of (magic + n): bf16 128+n / fp16 1024+n; the
                        # offset (magic + 8) * sum(x) is removed after the dot
                        if MDT == 0:
                            v = ((w >> (4 * j)) & 0x000F000F) | 0x43004300
                            off = 136.0
                            fdt = tl.bfloat16
                        else:
                            v = ((w >> (4 * j)) & 0x000F000F) | 0x64006400
                            off = 1032.0
                            fdt = tl.float16
                        wj = _halves(v, R)
                        wj = wj.to(fdt, bitcast=True)
                        if OFFS == 1:  # exact: (magic + n) - (magic + 8) = n - 8
                            d = _dot((wj - off).to(fdt), x, tl.zeros((R, BM), tl.float32), MDT)
                            acc += d * s[:, None]
                        else:
                            d = _dot(wj, x, tl.zeros((R, BM), tl.float32), MDT)
                            xs = tl.sum(x.to(fdt).to(tl.float32), axis=0)
                            acc += (d - off * xs[None, :]) * s[:, None]
                else:  # FMT == 3: e2m1 -> fp16 bits of value * 2^-14 (subnormals for e = 0)
                    e8 = tl.load(Sp + row_s + c * SCS + j, mask=wm, other=127).to(tl.int32)
                    sw = _pow2(tl.minimum(e8 + 14, 254))
                    v = (((w << (9 - 3 * j)) & 0x0E000E00) | ((w << (3 - j)) & _SIGN))
                    wj = _halves(v, R)
                    wj = wj.to(tl.float16, bitcast=True)
                    if MDT == 2:
                        d = _dot(wj, x, tl.zeros((R, BM), tl.float32), 2)
                    else:
                        d = _dot(wj, _x_to_fp16(x), tl.zeros((R, BM), tl.float32), 1)
                    if ACT == 2:  # x holds e2m1 values; their scales per (token, group)
                        ea = tl.load(XSp + xs_row + c * 4 + j, mask=x_ok, other=127)
                        ea = ea.to(tl.int32)
                        sa = tl.where(ea > 0, _pow2(tl.maximum(ea, 1)), 5.877471754111438e-39)
                        acc += d * sw[:, None] * sa[None, :]
                    else:
                        acc += d * sw[:, None]
    return acc


@triton.jit
def _mm_loop(acc, Wp, Sp, row_w, row_s, wm, Xp, x_row, x_ok, XSp, xs_row, XSC,
             K: tl.constexpr, R: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
             FMT: tl.constexpr, ACT: tl.constexpr, MDT: tl.constexpr, UNROLL: tl.constexpr,
             OFFS: tl.constexpr, DQ: tl.constexpr, CS: tl.constexpr, SCS: tl.constexpr):
    if UNROLL:
        for i in tl.static_range(K // BK):
            acc = _step(acc, i * BK, Wp, Sp, row_w, row_s, wm, Xp, x_row, x_ok, XSp, xs_row,
                        XSC, R, BM, BK, FMT, ACT, MDT, OFFS, DQ, CS, SCS)
    else:
        for i in range(K // BK):
            acc = _step(acc, i * BK, Wp, Sp, row_w, row_s, wm, Xp, x_row, x_ok, XSp, xs_row,
                        XSC, R, BM, BK, FMT, ACT, MDT, OFFS, DQ, CS, SCS)
    return acc


@triton.jit
def _mm(acc, Wp, Sp, row_w, row_s, wm, Xp, x_row, x_ok, XSp, xs_row, XSC,
        K: tl.constexpr, R: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
        FMT: tl.constexpr, ACT: tl.constexpr, MDT: tl.constexpr, UNROLL: tl.constexpr,
        OFFS: tl.constexpr, DQ: tl.constexpr = 0, CS: tl.constexpr = 16,
        SCS: tl.constexpr = 4):
    """acc [R, BM] += W[rows, :K] @ X[:K, tokens] (K loop of `_step`; UNROLL: static loop).
    int4 and MXFP4 at DQ 3 (bf16 weight-only): the loop sums the weights * 2^-63
    (`_int4_sub_asm`, `_mx_bf16_asm`) into a fresh accumulator, then scaled by 2^63 (exact)
    and added to acc."""
    if (FMT == 2 or FMT == 3) and DQ == 3 and ACT == 0 and MDT == 0:
        part = _mm_loop(tl.zeros((R, BM), tl.float32), Wp, Sp, row_w, row_s, wm, Xp, x_row,
                        x_ok, XSp, xs_row, XSC, K, R, BM, BK, FMT, ACT, MDT, UNROLL, OFFS, DQ,
                        CS, SCS)
        return acc + part * MX_RESCALE
    return _mm_loop(acc, Wp, Sp, row_w, row_s, wm, Xp, x_row, x_ok, XSp, xs_row, XSC, K, R, BM,
                    BK, FMT, ACT, MDT, UNROLL, OFFS, DQ, CS, SCS)
