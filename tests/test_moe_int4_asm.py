"""The int4 unpack in inline PTX (fused MoE cfg DQ 3: kernels/fused_moe_common._int4_bf16_asm).

On any machine: the production down and gate_up kernels compile for sm_90 with it, offline (the
PTX assembles, no spills, and the K loop lost its separate subtract: the variant really changed
the code), through bench/sass_count.py in a subprocess (a compiled-mode Triton, whatever this
process's interpreter setting). With `-m gpu` on NVIDIA: bit-equal to the portable unpack (DQ 1)
for every nibble at every position and a spread of scales, both equal to (n - 8) * s rounded to
bf16 once, and the whole MoE bit-equal between DQ 3 and DQ 1 in direct and sorted mode.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from kernel_interp import interpret_without_gpu

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
ASM_GPU = GPU and fm.has_int4_asm(torch.device("cuda"))
needs_asm_gpu = pytest.mark.skipif(not ASM_GPU, reason="needs an NVIDIA GPU (sm_80+)")


def _sass(kernel: str, dq: int) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="0")
    res = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "sass_count.py"),
                          "--kernel", kernel, "--M", "256", "--cfg", json.dumps({"DQ": dq})],
                         check=False, capture_output=True, text=True, env=env, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not all(os.path.exists(os.path.join(BIN, b))
                            for b in ("ptxas-blackwell", "cuobjdump")),
                    reason="this Triton wheel ships no NVIDIA ptxas / cuobjdump")
@pytest.mark.parametrize("kernel", ["down", "gate_up"])
def test_int4_asm_compiles_for_sm90_and_fuses_the_subtract(kernel):
    old, new = _sass(kernel, 1), _sass(kernel, 3)
    assert new["spill_bytes"] == 0 and new["regs"] <= 255
    assert "HADD2" in old["loop_mix"] and "HADD2" not in new["loop_mix"]
    assert new["loop_mix"].get("HFMA2", 0) >= old["loop_mix"]["HADD2"]
    assert new["loop_sass"] < old["loop_sass"]


def test_dq3_needs_a_compiled_nvidia_device():
    assert not fm.has_int4_asm(torch.device("cpu"))


@triton.jit
def _dq_probe(W, S, OUT, R: tl.constexpr, ASM: tl.constexpr):
    """Words W int32 [R, 16], scales S bf16 [R, 4] -> OUT bf16 [R, 128]: group j at 32j + 2t + h
    (word t, half h), through _dq16."""
    r = tl.arange(0, R)
    w = tl.load(W + r[:, None] * 16 + tl.arange(0, 16)[None, :])
    s4 = tl.load(S + r[:, None] * 4 + tl.arange(0, 4)[None, :])
    s02, s13 = tl.split(tl.reshape(s4, (R, 2, 2)))
    s0, s2 = tl.split(s02)
    s1, s3 = tl.split(s13)
    for j in tl.static_range(4):
        if j == 0:
            sj = s0
        elif j == 1:
            sj = s1
        elif j == 2:
            sj = s2
        else:
            sj = s3
        v = fmc._dq16(w, j, sj, R, 2, 0, ASM)
        tl.store(OUT + r[:, None] * 128 + 32 * j + tl.arange(0, 32)[None, :], v)


def _probe_inputs(R: int, gen: torch.Generator):
    """Every row a random word set; the first 16 rows put nibble value v = row at every position
    (so all 16 values meet every shift); scales span bf16's range (subnormal to 2^100, signs)."""
    w = torch.randint(-2**31, 2**31 - 1, (R, 16), generator=gen, dtype=torch.int64)
    for v in range(16):
        w[v] = sum(v << (4 * i) for i in range(8))
    w = torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)
    mag = torch.exp2(torch.randint(-130, 100, (R, 4), generator=gen).float())
    s = (mag * (1 + torch.rand(R, 4, generator=gen)) * torch.sign(torch.randn(R, 4, generator=gen)))
    return w, s.bfloat16()


def _probe_ref(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    R = w.shape[0]
    wl = w.long() & 0xFFFFFFFF
    out = torch.empty(R, 4, 16, 2)
    for j in range(4):
        for h in range(2):
            n = (wl >> (16 * h + 4 * j)) & 0xF
            out[:, j, :, h] = (n - 8).float() * s[:, j].float()[:, None]  # exact in fp32
    return out.reshape(R, 128).bfloat16()  # one rounding, to nearest even


@pytest.mark.gpu
@needs_asm_gpu
def test_int4_asm_unpack_is_bit_equal_to_the_portable_one():
    R = 64
    for seed in range(3):
        w, s = _probe_inputs(R, torch.Generator().manual_seed(seed))
        ref = _probe_ref(w, s)
        outs = []
        for asm in (False, True):
            out = torch.full((R, 128), float("nan"), dtype=torch.bfloat16, device="cuda")
            _dq_probe[(1,)](w.cuda(), s.cuda(), out, R=R, ASM=asm, num_warps=4)
            outs.append(out.cpu())
        assert torch.equal(outs[0], ref)
        assert torch.equal(outs[1], ref)


@pytest.mark.gpu
@needs_asm_gpu
@pytest.mark.parametrize("M", [16, 64, 256])
def test_fused_moe_dq3_is_bit_equal_to_dq1(M):
    # real Kimi TP8 rank shapes, direct mode at 16 and sorted above, a repeated expert,
    # poisoned intermediates; the same MMAs over the same bf16 operands
    gen = torch.Generator().manual_seed(M)
    kw, _, _ = real_experts("int4_g32")
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
