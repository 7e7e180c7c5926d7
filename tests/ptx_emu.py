"""A tiny emulator for the inline-PTX blocks of the fused MoE's DQ 3 unpack (CPU, numpy).

run_ptx(asm, *inputs) executes one `tl.inline_asm_elementwise` block ("{ .reg ...; op d, a, b;
... }") elementwise over uint32 arrays: $1.. are the inputs, $0 the result. It knows exactly the
instructions those blocks use: mov.b32, shl.b32, shr.u32, and.b32, lop3.b32 (any truth table)
and fma.rn.bf16x2 (per 16-bit half: the exact a * b + c rounded once to bf16, nearest-even,
subnormal inputs kept; exact in float64 for the operands the unpack feeds it, whose products
and sums need far fewer than 53 bits). Anything else raises, so a new instruction in a block
must be taught here before its CPU test can pass.
"""

from __future__ import annotations

import re

import numpy as np

M32 = np.uint64(0xFFFFFFFF)


def _bf16_to_f64(h: np.ndarray) -> np.ndarray:
    return (h.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def _f64_to_bf16(x: np.ndarray) -> np.ndarray:
    """Nearest-even bf16 bits of x, which must be exact in float32 (no double rounding)."""
    f = x.astype(np.float32)
    assert np.array_equal(f.astype(np.float64), x, equal_nan=True), "not exact in fp32"
    b = f.view(np.uint32).astype(np.uint64)
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint32) & 0xFFFF


def _fma_bf16x2(a, b, c):
    out = np.zeros_like(a)
    for sh in (0, 16):
        ha, hb, hc = ((v >> sh) & 0xFFFF for v in (a, b, c))
        r = _f64_to_bf16(_bf16_to_f64(ha) * _bf16_to_f64(hb) + _bf16_to_f64(hc))
        out |= r << sh
    return out


def _lop3(a, b, c, lut: int):
    """PTX lop3: bit i of the result is bit (a_i << 2 | b_i << 1 | c_i) of lut."""
    out = np.zeros_like(a)
    for k in range(8):
        if lut >> k & 1:
            term = np.full_like(a, 0xFFFFFFFF)
            for v, bit in ((a, 4), (b, 2), (c, 1)):
                term &= v if k & bit else ~v
            out |= term
    return out & 0xFFFFFFFF


def run_ptx(asm: str, *inputs: np.ndarray) -> np.ndarray:
    """The block's $0 for uint32 inputs $1, $2, ... (equal shapes)."""
    regs = {f"${i + 1}": np.asarray(v, dtype=np.uint32).copy() for i, v in enumerate(inputs)}
    shape = next(iter(regs.values())).shape

    def val(tok: str) -> np.ndarray:
        tok = tok.strip()
        if tok in regs:
            return regs[tok]
        return np.full(shape, int(tok, 0) & 0xFFFFFFFF, dtype=np.uint32)

    body = asm.strip()
    assert body.startswith("{") and body.endswith("}"), asm
    for stmt in (s.strip() for s in body[1:-1].split(";")):
        if not stmt or stmt.startswith(".reg"):
            continue
        op, args = stmt.split(None, 1)
        d, *src = [t.strip() for t in args.split(",")]
        x = [val(t) for t in src]
        if op == "mov.b32":
            r = x[0].copy()
        elif op == "shl.b32":
            r = ((x[0].astype(np.uint64) << x[1].astype(np.uint64)) & M32).astype(np.uint32)
        elif op == "shr.u32":
            r = x[0] >> x[1]
        elif op == "and.b32":
            r = x[0] & x[1]
        elif op == "lop3.b32":
            r = _lop3(x[0], x[1], x[2], int(src[3], 0))
        elif op == "fma.rn.bf16x2":
            r = _fma_bf16x2(*x)
        else:
            raise NotImplementedError(f"ptx_emu: {op}")
        if not re.fullmatch(r"\$0|[A-Za-z_]\w*", d):
            raise ValueError(f"ptx_emu: destination {d!r}")
        regs[d] = r.astype(np.uint32)
    return regs["$0"]
