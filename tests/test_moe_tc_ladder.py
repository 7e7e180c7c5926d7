"""bench/moe_tc_ladder_kernels.py (the tensor-core 4-bit MoE gate_up ladder) against torch.

CPU: TRITON_INTERPRET=1 at small shapes (H=256, I=32, E=8, top-2, M=5; fp16 operands: the
interpreter mishandles bf16 dots); `-m gpu`: H=7168, I=256, 32 experts, M=8, top-8, bf16. Weights are
drawn as int4 codes and packed with kernels/moe_ref.py, so the references never use the kernel
layout. Every check draws fresh inputs and poisons the outputs (NaN) first. G0 is bit-exact, G1/G2
(fp32 sums) within 1e-5 relative of fp64, G3 (the whole gate_up) within 1e-2 relative L2 of fp64
on the 16-bit-rounded weights, every real slot written. Row-tiled weights and the persistent
launch give the same results as the production layout and grid.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from kernel_interp import interpret_without_gpu

GPU = interpret_without_gpu("moe_align", "fused_moe_common")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))

import moe_tc_ladder_kernels as L
from atom_stream.kernels import moe_ref as R
from atom_stream.kernels.moe_align import moe_align

DEV = "cuda" if GPU else "cpu"
SHAPE = ({"H": 7168, "I": 256, "E": 32, "TOPK": 8, "M": 8} if GPU
         else {"H": 256, "I": 32, "E": 8, "TOPK": 2, "M": 5})
MDT = 0 if GPU else 1
pytestmark = [pytest.mark.gpu] if GPU else []  # native on the device (`-m gpu`)


def draw(seed: int):
    g = torch.Generator().manual_seed(seed)
    H, I, E, K, M = (SHAPE[k] for k in ("H", "I", "E", "TOPK", "M"))
    q = torch.randint(-8, 8, (E, 2 * I, H), generator=g, dtype=torch.int8)
    s13 = ((torch.rand(E, 2 * I, H // 32, generator=g) + 0.5) / (4 * H ** 0.5)).bfloat16()
    w13 = R.repack_int4(R.pack_int4(q)).contiguous()
    d13 = R.dequant_int4(q, s13)
    ids = torch.rand(M, E, generator=g).topk(K, dim=-1).indices.int()
    x = (torch.randn(M, H, generator=g) * 0.5).bfloat16()
    sp, be = moe_align(ids.to(DEV), E, 16)
    return x.to(DEV), w13.to(DEV), s13.to(DEV), d13, sp, be


def launch(rung, x, w13, s13, sp, be, *, BN, tiled, nprog, wt=0, st=0):
    I = s13.shape[1] // 2
    ntiles = be.numel() * (I // BN)
    out = torch.full((ntiles,), float("nan"), device=DEV)
    act = torch.full((be.numel() * 16, I), float("nan"), device=DEV, dtype=torch.bfloat16)
    w = L.tile_weights(w13, BN) if tiled else (R.tile_rows(w13, wt) if wt else w13)
    E, N, K = s13.shape
    s = R.tile_rows(s13.view(E, N, K // 4, 4), st) if st else s13
    L.gate_up_rung(rung, x, w, s, sp, be, out, act, top_k=SHAPE["TOPK"], BN=BN, tiled=tiled,
                   nprog=nprog, mdt=MDT, warps=4 if BN >= 32 else 2, wt=wt, st=st)
    return out.cpu(), act.cpu()


OPTS = [(False, 0), (True, 0), (False, 3), (True, 5)]
LAYOUTS = [(16, 0), (8, 16), (32, 32)]  # (word tile rows, scale tile rows)


def test_tile_rows_layout():
    w13 = draw(2)[1].cpu()
    t = R.tile_rows(w13, 8)
    E, nt, nch, T, C = t.shape
    assert (nt, T, C) == (w13.shape[1] // 8, 8, 16)
    for e, n, c in [(0, 0, 0), (E - 1, w13.shape[1] - 1, nch - 1), (1, 13, 1)]:
        assert torch.equal(t[e, n // 8, c, n % 8], w13[e, n, c])


def test_tile_weights_layout():
    w13 = draw(1)[1]
    BN = 8
    t = L.tile_weights(w13, BN).cpu()
    w = w13.cpu()
    I = SHAPE["I"]
    E, nj, nch, r, _ = t.shape
    assert (nj, r) == (I // BN, 2 * BN)
    for e, jt, c, row in [(0, 0, 0, 0), (E - 1, nj - 1, nch - 1, 2 * BN - 1), (1, 1, 1, BN)]:
        src = jt * BN + row if row < BN else I + jt * BN + row - BN
        assert torch.equal(t[e, jt, c, row], w[e, src, c])


@pytest.mark.parametrize("rung", [0, 1, 2])
@pytest.mark.parametrize("tiled,nprog,wt,st", [(*OPTS[0], 0, 0), (*OPTS[3], 0, 0),
                                               (False, 0, 16, 16)])
def test_read_rungs(rung, tiled, nprog, wt, st):
    x, w13, s13, d13, sp, be = draw(10 + rung + 3 * tiled + wt)
    BN = 16
    out, _ = launch(rung, x, w13, s13, sp, be, BN=BN, tiled=tiled, nprog=nprog, wt=wt, st=st)
    ref = L.ref_rung_sums(rung, x.cpu(), w13.cpu(), s13.cpu(), d13, sp, be,
                          top_k=SHAPE["TOPK"], BN=BN, mdt=MDT)
    assert ref, "no real block"
    for tile, want in ref.items():
        if rung == 0:
            got = int(out[tile:tile + 1].view(torch.int32))
            assert got == want, (tile, got, want)
        else:
            assert abs(float(out[tile]) - want) <= 1e-5 * max(abs(want), 1.0), (tile, want)


@pytest.mark.parametrize("tiled,nprog,wt,st", [(*o, 0, 0) for o in OPTS]
                         + [(False, 0, *lay) for lay in LAYOUTS] + [(False, 3, 16, 16)])
@pytest.mark.parametrize("BN", [8, 16])
def test_gate_up_rung(tiled, nprog, wt, st, BN):
    if GPU and BN < 16:
        pytest.skip("the GPU check runs the production tile heights")
    x, w13, s13, d13, sp, be = draw(20 + BN + tiled + nprog + wt + st)
    _, act = launch(3, x, w13, s13, sp, be, BN=BN, tiled=tiled, nprog=nprog, wt=wt, st=st)
    wq = d13.to(torch.float16 if MDT else torch.bfloat16).float()
    ref = L.ref_gate_up(x.cpu(), wq, sp, be, top_k=SHAPE["TOPK"])
    real = ~torch.isnan(ref[:, 0])
    assert real.sum() == SHAPE["M"] * SHAPE["TOPK"]
    a, b = act[real].double(), ref[real]
    assert torch.isfinite(a).all(), "a real slot left unwritten"
    assert float((a - b).norm() / b.norm()) < 1e-2
