"""bench/moe_down_ladder_kernels.py (the 4-bit MoE down-kernel ladder) against torch, on fresh
random int4 words, scales and activations (TRITON_INTERPRET=1 on the CPU; natively with -m gpu).
Unwritten outputs are poisoned (NaN) so a program that skips its work fails."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from kernel_interp import interpret_without_gpu

GPU = interpret_without_gpu("fused_moe_common", "moe_align", "fused_moe_tc")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))

import moe_down_ladder_kernels as L
from atom_stream.kernels import moe_ref as R
from atom_stream.kernels.moe_align import moe_align

DEV = "cuda" if GPU else "cpu"
E, H, I, TOPK, BM, BN = 6, 256, 256, 3, 16, 64
pytestmark = [pytest.mark.gpu] if GPU else []  # native on the device (`-m gpu`)


def data(seed: int, M: int = 20):
    g = torch.Generator().manual_seed(seed)
    w2 = torch.randint(-2**31, 2**31 - 1, (E, H, I // 128, 16), generator=g, dtype=torch.int32)
    s2 = (torch.rand(E, H, I // 32, generator=g) * 0.01 + 0.005).bfloat16()
    ids = torch.stack([torch.randperm(E, generator=g)[:TOPK] for _ in range(M)]).int()
    sp, be = moe_align(ids.to(DEV), E, BM)
    dt = torch.bfloat16 if GPU else torch.float16  # the interpreter mishandles bf16 dots
    act = torch.randn(be.numel() * BM, I, generator=g).to(dt)
    d2 = torch.stack([R.dequant_int4(R.unrepack_int4(w2[e]), s2[e]) for e in range(E)])
    return w2, s2, ids, sp, be, act, d2, M * TOPK


@pytest.mark.parametrize("wt", [1, 16])
@pytest.mark.parametrize("rung", [0, 1, 2])
def test_rung_sums(rung, wt):
    w2, s2, _ids, sp, be, act, d2, P = data(10 + rung)
    mdt = 0 if GPU else 1
    w, s = L.tile_w2(w2, s2, wt) if wt > 1 else (w2, s2)
    out = torch.full((be.numel() * (H // BN),), float("nan"), device=DEV)
    y = torch.empty(P, H, dtype=act.dtype, device=DEV)
    L.down_rung(rung, act.to(DEV), w.to(DEV), s.to(DEV), sp, be, y, out, num_pairs=P, BN=BN,
                wt=wt, mdt=mdt)
    want = L.ref_rung(rung, act, w2, s2, d2, sp, be, num_pairs=P, BN=BN, mdt=mdt)
    assert want
    got = out.cpu()
    for prog, v in want.items():
        if rung == 0:
            assert int(got[prog:prog + 1].view(torch.int32)) == torch.tensor(
                v, dtype=torch.int64).to(torch.int32).item()
        else:
            assert abs(float(got[prog]) - v) <= 2e-3 * max(1.0, abs(v)), (prog, got[prog], v)


@pytest.mark.parametrize("wt", [1, 16])
def test_d3_and_prod_store_y(wt):
    w2, s2, ids, sp, be, act, d2, P = data(30 + wt)
    want = L.ref_down(act, d2, sp, be, P)
    w, s = L.tile_w2(w2, s2, wt) if wt > 1 else (w2, s2)
    runs = [("D3", lambda y: L.down_rung(3, act.to(DEV), w.to(DEV), s.to(DEV), sp, be, y,
                                         torch.empty(1, device=DEV), num_pairs=P, BN=BN, wt=wt,
                                         mdt=0 if GPU else 1))]
    if wt == 1 and GPU:  # the production kernel runs bf16 MMAs only (the interpreter: no)
        runs.append(("PROD", lambda y: L.prod_down(act.to(DEV), w2.to(DEV), s2.to(DEV),
                                                   ids.to(DEV), sp, be, y, num_pairs=P,
                                                   BN=BN)()))
    for name, run in runs:
        y = torch.full((P, H), float("nan"), dtype=act.dtype, device=DEV)
        run(y)
        for p, ref in want.items():
            got = y[p].double().cpu()
            assert torch.isfinite(got).all(), f"{name}: pair {p} unwritten"
            assert (got - ref).norm() / ref.norm() < 1e-2, name
