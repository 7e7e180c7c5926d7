"""The 4-bit unpack in inline PTX (fused MoE cfg DQ 3: kernels/fused_moe_common._int4_sub_asm
and _mx_bf16_asm).

On any machine: the production down and gate_up kernels compile for sm_90 with it, offline (the
PTX assembles, no spills, and the K loop lost instructions: int4 its subtract and its separate
scale multiply, the nibble read as a bf16 subnormal and one fma per weight pair; MXFP4 its
second multiply), through bench/sass_count.py in a subprocess (a compiled-mode Triton, whatever
this process's interpreter setting). With `-m gpu` on NVIDIA: the unpack bit-equal to the
portable one (DQ 1) for every code at every position and a spread of scales (times 2^-63,
exactly, where the scaled weights stay bf16 normals), both equal to the format's values times
the scale rounded to bf16 once, and the whole MoE bit-equal between DQ 3 and DQ 1 in direct and
sorted mode, int4 and MXFP4. On the CPU too (CI): the PTX blocks' instructions run by a small
emulator (tests/ptx_emu.py) give those values, every code at every position.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from kernel_interp import interpret_without_gpu
from ptx_emu import run_ptx

GPU = interpret_without_gpu(
    "moe_routing", "moe_align", "fused_moe_common", "fused_moe_tc", "fused_moe_gemv",
    "fused_moe_fp8", "fused_moe")

import triton
import triton.language as tl
from atom_stream.kernels import fused_moe as fm
from atom_stream.kernels import fused_moe_common as fmc
from test_kernels_moe import rand_ids, real_experts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
ASM_GPU = GPU and fm.has_dq3_asm(torch.device("cuda"))
needs_asm_gpu = pytest.mark.skipif(not ASM_GPU, reason="needs an NVIDIA GPU (sm_80+)")


_SASS_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
import sass_count as sc
from atom_stream.kernels.fused_moe import default_config
out = {}
for kernel in ("down", "gate_up"):
    for fmt in ("int4", "mxfp4"):
        for dq in (1, 3):
            f = sc.FMTS[fmt]
            cfg = dict(default_config(f, 256, 256 * sc.KP, sc.E, sc.H, sc.I), DQ=dq)
            build = sc.down_kernel if kernel == "down" else sc.gate_up_kernel
            fn, sca, (warps, stages, weights) = build(f, cfg)
            res, sass = sc.compile_sass(fn, sca, warps, stages)
            out[f"{kernel} {fmt} {dq}"] = sc.report(kernel, res, sass, weights, warps)
print("JSON" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def sass():
    """bench/sass_count.py's report of both kernels, both formats, DQ 1 and 3 at M=256 (one
    subprocess: a compiled-mode Triton whatever this process's interpreter setting)."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    res = subprocess.run([sys.executable, "-c", _SASS_SCRIPT, os.path.join(ROOT, "bench")],
                         check=False, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    line = next(x for x in res.stdout.splitlines() if x.startswith("JSON"))
    return json.loads(line[4:])


@pytest.mark.skipif(not all(os.path.exists(os.path.join(BIN, b))
                            for b in ("ptxas-blackwell", "cuobjdump")),
                    reason="this Triton wheel ships no NVIDIA ptxas / cuobjdump")
@pytest.mark.parametrize("kernel", ["down", "gate_up"])
@pytest.mark.parametrize("fmt", ["int4", "mxfp4"])
def test_dq3_asm_compiles_for_sm90_with_fewer_instructions(sass, kernel, fmt):
    old, new = sass[f"{kernel} {fmt} 1"], sass[f"{kernel} {fmt} 3"]
    assert new["spill_bytes"] == 0 and new["regs"] <= 255
    assert new["loop_sass"] < old["loop_sass"]
    if fmt == "int4":  # no subtract, one fma per weight pair (and no multiply per pair)
        assert "HADD2" in old["loop_mix"] and "HADD2" not in new["loop_mix"]
        assert new["loop_mix"]["HFMA2"] <= old["loop_mix"]["HADD2"]
    assert new["loop_mix"].get("HMUL2", 0) * 2 <= old["loop_mix"]["HMUL2"]


def test_dq3_needs_a_compiled_nvidia_device():
    assert not fm.has_dq3_asm(torch.device("cpu"))


@triton.jit
def _dq_probe(W, S, OUT, R: tl.constexpr, FMT: tl.constexpr, ASM: tl.constexpr):
    """Words W int32 [R, 16], scales S [R, 4] (int4: bf16; MXFP4: e8m0 bytes) -> OUT bf16
    [R, 128]: group j at 32j + 2t + h (word t, half h), through _dq16."""
    r = tl.arange(0, R)
    w = tl.load(W + r[:, None] * 16 + tl.arange(0, 16)[None, :])
    s4 = tl.load(S + r[:, None] * 4 + tl.arange(0, 4)[None, :])
    if FMT == 3:
        s4 = s4.to(tl.int32)
    s0, s1, s2, s3 = fmc._split4(s4)
    for j in tl.static_range(4):
        v = fmc._dq16(w, j, fmc._sel4(s0, s1, s2, s3, j), R, FMT, 0, ASM)
        tl.store(OUT + r[:, None] * 128 + 32 * j + tl.arange(0, 32)[None, :], v)


def _words(R: int, gen: torch.Generator) -> torch.Tensor:
    """Random int32 words; the first 16 rows repeat nibble value v = row (int4: all 16 codes
    meet every shift; MXFP4's 3-bit fields and sign bits then vary too)."""
    w = torch.randint(-2**31, 2**31 - 1, (R, 16), generator=gen, dtype=torch.int64)
    for v in range(16):
        w[v] = sum(v << (4 * i) for i in range(8))
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)


def _int4_ref(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    R = w.shape[0]
    wl = w.long() & 0xFFFFFFFF
    out = torch.empty(R, 4, 16, 2)
    for j in range(4):
        for h in range(2):
            n = (wl >> (16 * h + 4 * j)) & 0xF
            out[:, j, :, h] = (n - 8).float() * s[:, j].float()[:, None]  # exact in fp32
    return out.reshape(R, 128).bfloat16()  # one rounding, to nearest even


E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def _mx_ref(w: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """The repacked MXFP4 layout (kernels/moe_ref.repack_mxfp4): per 16-bit half, group j's
    3-bit magnitude at bits 3j.., its sign at bit 12 + j; times 2^(e - 127) (exact)."""
    R = w.shape[0]
    wl = w.long() & 0xFFFFFFFF
    out = torch.empty(R, 4, 16, 2)
    for j in range(4):
        for h in range(2):
            half = (wl >> (16 * h)) & 0xFFFF
            mag = E2M1[(half >> (3 * j)) & 7]
            sign = 1.0 - 2.0 * ((half >> (12 + j)) & 1).float()
            out[:, j, :, h] = sign * mag * torch.exp2(e[:, j].float() - 127)[:, None]
    return out.reshape(R, 128).bfloat16()


def _pairs(h16: torch.Tensor) -> np.ndarray:
    """int16 bf16 bit patterns [R] -> uint32 [R, 16]: each in both halves (the asm's scale
    pairs, `_bf16_pair`), repeated over a row's 16 words."""
    h = h16.numpy().astype(np.uint32) & 0xFFFF
    return np.repeat(((h << 16) | h)[:, None], 16, axis=1)


@pytest.mark.parametrize("fmt", ["int4", "mxfp4"])
def test_dq3_ptx_blocks_on_the_cpu(fmt):
    # the inline-PTX blocks themselves (tests/ptx_emu.py runs their instructions), fed what
    # _dq16 feeds them: every code at every position gives the format's value times the scale
    # times 2^-63, rounded to bf16 once (exactly the GPU test's claim, checked in CI)
    R = 64
    gen = torch.Generator().manual_seed(11)
    w = _words(R, gen)
    if fmt == "int4":
        ex = torch.randint(-63, 56, (R, 4), generator=gen)
        s = (torch.exp2(ex.float()) * (1 + torch.rand(R, 4, generator=gen))
             * torch.sign(torch.randn(R, 4, generator=gen))).bfloat16()
        ref, blocks = _int4_ref(w, s), fmc._INT4_SUB_ASM.value
        sf = s.float()
        ins = [(_pairs((sf[:, j] * fmc.INT4_SUB_S.value).bfloat16().view(torch.int16)),
                _pairs((sf[:, j] * fmc.INT4_SUB_C.value).bfloat16().view(torch.int16)))
               for j in range(4)]
    else:
        e = torch.randint(65, 192, (R, 4), generator=gen, dtype=torch.uint8)
        ref, blocks = _mx_ref(w, e), fmc._MX_ASM.value
        ins = [(_pairs(((e[:, j].int().clamp(1, 191) + 63) << 7).to(torch.int16)),)
               for j in range(4)]
    wu = w.numpy().view(np.uint32)
    got = np.stack([run_ptx(blocks[j], wu, *ins[j]) for j in range(4)], axis=1)  # [R, 4, 16]
    halves = np.stack([got & 0xFFFF, got >> 16], axis=-1).reshape(R, 128).astype(np.int32)
    vals = torch.from_numpy(halves).to(torch.int16).view(torch.bfloat16).double() * 2.0 ** 63
    assert torch.equal(vals.bfloat16(), ref)


@pytest.mark.gpu
@needs_asm_gpu
@pytest.mark.parametrize("fmt", ["int4", "mxfp4"])
def test_dq3_unpack_is_bit_equal_to_the_portable_one(fmt):
    R = 64
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        w = _words(R, gen)
        if fmt == "int4":
            ex = torch.randint(-130, 100, (R, 4), generator=gen)
            s = (torch.exp2(ex.float()) * (1 + torch.rand(R, 4, generator=gen))
                 * torch.sign(torch.randn(R, 4, generator=gen))).bfloat16()
            ref, code = _int4_ref(w, s), 2
            # DQ 3 is exact while 2^-63 <= |s| < 2^57 (its scaled weights stay bf16 normals)
            exact = ((ex >= -63) & (ex < 56)).repeat_interleave(32, dim=1)
        else:  # e8m0 exponents where DQ 3 is exact (>= 65) up to the clamp (191)
            s = torch.randint(65, 192, (R, 4), generator=gen, dtype=torch.uint8)
            ref, code = _mx_ref(w, s), 3
            exact = torch.ones(R, 128, dtype=torch.bool)
        assert exact.sum() > R * 32
        for asm in (False, True):
            out = torch.full((R, 128), float("nan"), dtype=torch.bfloat16, device="cuda")
            _dq_probe[(1,)](w.cuda(), s.cuda(), out, R=R, FMT=code, ASM=asm, num_warps=4)
            got = (out.cpu().double() * (2.0 ** 63 if asm else 1.0)).bfloat16()
            ok = exact if asm else torch.ones_like(exact)
            assert torch.equal(got[ok], ref[ok]), f"ASM {asm}"


@pytest.mark.gpu
@needs_asm_gpu
@pytest.mark.parametrize("fmt", ["int4_g32", "mxfp4"])
@pytest.mark.parametrize("M", [16, 64, 256])
def test_fused_moe_dq3_is_bit_equal_to_dq1(fmt, M):
    # real Kimi TP8 rank shapes, direct mode at 16 and sorted above, a repeated expert,
    # poisoned intermediates; the same MMAs over the same bf16 operands (MXFP4: scaled by
    # 2^-63, summed, scaled back: exact)
    gen = torch.Generator().manual_seed(M)
    kw, _, _ = real_experts(fmt)
    w13, w2 = kw.pop("w13"), kw.pop("w2")
    x = torch.randn(M, 7168, generator=gen).bfloat16().cuda()
    ids = rand_ids(M, 8, 32, gen)
    ids[0, 1] = ids[0, 0]
    tw = (torch.rand(M, 8, generator=gen) + 0.1).cuda()
    outs = []
    for dq in (1, 3):
        out = torch.full((M, 7168), float("nan"), dtype=torch.bfloat16, device="cuda")
        fm.fused_moe(x, w13, w2, tw, ids, out=out,
                     config={"DQ": dq, "gemv_max": 0, "small_m_max": 0, "poison": True}, **kw)
        outs.append(out)
    assert torch.isfinite(outs[0]).all()
    assert torch.equal(outs[0], outs[1])
