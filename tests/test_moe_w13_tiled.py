"""Row-tiled 4-bit gate_up weights (kernels/fused_moe.tile_w13) on every fused_moe path.

Each case draws fresh int4 codes / MXFP4 bytes (packed with kernels/moe_ref.py), runs fused_moe
on the row-major repacked weights and again on their tile_w13 copy (outputs poisoned with NaN
first), and requires the two outputs BIT-identical (same arithmetic, only the addresses
change), and the row-major output within METHOD.md's bf16 tolerance of the float64 reference
(so identical also means right). Paths: M=1 (the M=1 gate_up kernel), M=3 (per-pair), M=4 with
the split-K small-M gate_up, M=5 GEMV, M=16 tensor cores direct, M=40 tensor cores sorted
(DQ 1 on the GPU, the DQ 0 K loop under the interpreter), and T = 8 / 16 / 32. CPU: interpreter
at H=256, I=128, E=8, top-2; `-m gpu`: the same shapes natively plus the Kimi-K2.5 TP8 rank rows
(H=7168, I=256) at M=1 / 16 / 64 with pinned tiles; each layout with its own default
tiles against the reference. Also: tile_w13 / untile_w13 round-trip, and a row-tiled w13
with row-major scales is a clear ValueError.
"""

from __future__ import annotations

import pytest
import torch
from kernel_interp import interpret_without_gpu

GPU = interpret_without_gpu(
    "moe_routing", "moe_align", "fused_moe_common", "fused_moe_tc", "fused_moe_gemv",
    "fused_moe_fp8", "moe_small_m_kernels", "moe_m1_gate_up", "moe_small_m", "fused_moe")

from atom_stream.kernels import moe_ref as R
from atom_stream.kernels import moe_small_m as SM
from atom_stream.kernels.fused_moe import fused_moe, tile_w13, untile_w13
from test_moe_small_m import make_experts as experts  # (w13, w2, s13, s2) on DEV, (d13, d2)

DEV = "cuda" if GPU else "cpu"
pytestmark = [pytest.mark.gpu] if GPU else []
QUANT = {"int4": "int4_g32", "mxfp4": "mxfp4"}
# (M, config): the path each M takes with these overrides
# (wide small-M tiles: fewer programs under the interpreter; tiles pinned, since the defaults
# differ by layout and another tile may round differently on the GPU's MMAs)
PATHS = [(1, {"small_m": {"MR": 16}}), (3, {"small_m": {"MR": 16}}),
         (4, {"small_m": {"M1": 0, "BN": 16}}), (5, {"small_m_max": 0}),
         (16, {"small_m_max": 0, "gemv_max": 0, "BN1": 32, "W1": 2}),
         (40, {"BN1": 32, "W1": 2})]
PINNED = {"BN1": 64, "W1": 4, "W2": 4, "small_m": {"MR": 8}}
# the hidden size of the small cases: 128 under the interpreter (half the programs and K loop
# of 256, the same tile paths: CI time), 256 on the GPU
H_CASE = 256 if GPU else 128


def run(fmt, M, E, H, I, k, T, config, seed, tiled_config=None):
    gen = torch.Generator().manual_seed(seed)
    (w13, w2, s13, s2), (d13, d2) = experts(fmt, E, H, I, gen)
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(M)]).int().to(DEV)
    tw = (torch.rand(M, k, generator=gen) + 0.1).to(DEV)
    x = (torch.randn(M, H, generator=gen) * 0.5).bfloat16().to(DEV)
    outs = []
    for (w, s), c in (((w13, s13), config), (tile_w13(w13, s13, T), tiled_config or config)):
        out = torch.full((M, H), float("nan"), dtype=torch.bfloat16, device=DEV)
        fused_moe(x, w, w2, tw, ids, quant=QUANT[fmt], w13_scale=s, w2_scale=s2, out=out,
                  config=dict(c or {}, poison=True))
        outs.append(out.cpu())
    ref = R.fused_moe_ref(x.cpu().double(), d13.double(), d2.double(), tw.cpu().double(),
                          ids.cpu().long())
    return outs, ref


@pytest.fixture(autouse=True)
def small_m_paths(monkeypatch):
    """The per-pair gate_up up to M = 3 (the default reaches 8; the interpreter is slow)."""
    monkeypatch.setattr(SM, "PAIR_M_MAX", 3)


# every path in int4; MXFP4 (the same tile offsets, other scale bytes) on the paths of M = 1,
# 16 and 40 only: its small-M cases at M = 3 / 4 / 5 cost ~50 s of CI under the interpreter
# and added no tiling logic (on the GPU every combination runs)
FMT_PATHS = [(f, M, c) for f in ("int4", "mxfp4") for M, c in PATHS
             if GPU or f == "int4" or M not in (3, 4, 5)]


@pytest.mark.parametrize("fmt,M,config", FMT_PATHS)
def test_tiled_equals_row_major(fmt, M, config):
    T = {1: 16, 3: 8, 4: 32, 5: 16, 16: 8, 40: 16}[M]
    (row, tiled), ref = run(fmt, M, 8, H_CASE, 128, 2, T, config,
                            seed=M + 100 * (fmt == "int4"))
    assert torch.isfinite(row).all() and torch.isfinite(tiled).all(), "output left unwritten"
    assert torch.equal(row, tiled), float((row.double() - tiled.double()).abs().max())
    assert float((row.double() - ref).norm() / ref.norm()) < 1e-2


# on the CPU one format per M (alternating; ~20 s of interpreted CI time saved: the default
# tiles differ by layout, not by format); on the GPU every combination
DEFAULT_CASES = [(f, M) for M in (1, 16, 40) for f in ("int4", "mxfp4")
                 if GPU or (f == "int4") == (M != 16)]


@pytest.mark.parametrize("fmt,M", DEFAULT_CASES)
def test_tiled_default_configs(fmt, M):
    """Each layout with its own default tiles (fused_moe / moe_small_m default_config's wt)."""
    (row, tiled), ref = run(fmt, M, 8, H_CASE, 128, 2, 16, None, seed=7 * M)
    for out in (row, tiled):
        assert torch.isfinite(out).all()
        assert float((out.double() - ref).norm() / ref.norm()) < 1e-2


@pytest.mark.skipif(not GPU, reason="real shapes natively only")
@pytest.mark.parametrize("fmt", ["int4", "mxfp4"])
@pytest.mark.parametrize("M", [1, 16, 64])
def test_tiled_real_rows_gpu(fmt, M):
    (row, tiled), ref = run(fmt, M, 64, 7168, 256, 8, 16, PINNED, seed=M)
    assert torch.equal(row, tiled)
    assert float((row.double() - ref).norm() / ref.norm()) < 1e-2


def test_tiled_256_k_gate_up_steps():
    """The row-tiled direct mode's gate_up in 256-K steps (two 128-K chunks per load, the
    default at M <= 8 on NVIDIA since session 30) on 32-row tiles, two steps of K: the same
    bits as the row-major layout, and the reference's sums."""
    config = {"small_m_max": 0, "gemv_max": 0, "BK1": 256, "BN1": 32, "W1": 4}
    (row, tiled), ref = run("int4", 4, 8, 512, 128, 2, 16, config, seed=31)
    assert torch.isfinite(tiled).all() and torch.equal(row, tiled)
    assert float((tiled.double() - ref).norm() / ref.norm()) < 1e-2


@pytest.mark.skipif(not GPU, reason="real shapes natively only")
@pytest.mark.parametrize("M", [3, 4, 8, 12, 16, 32, 64, 128])
def test_tiled_real_rows_default_configs_gpu(M):
    """int4 at the real widths, each layout at its own default tiles (the row-tiled sorted mode
    takes 4 gate_up stages at 16 < M <= 64, session 23; 3 elsewhere; the row-tiled direct mode
    128-row gate_up tiles at 8 < M <= 16, session 29, and 256-K steps at M <= 8 (32-row tiles
    at M <= 4), session 30)."""
    (row, tiled), ref = run("int4", M, 64, 7168, 256, 8, 16, None, seed=3 * M)
    for out in (row, tiled):
        assert float((out.double() - ref).norm() / ref.norm()) < 1e-2


def test_tile_round_trip_and_errors():
    gen = torch.Generator().manual_seed(7)
    (w13, w2, s13, s2), _ = experts("int4", 4, 256, 128, gen)
    wt, st = tile_w13(w13, s13, 16)
    assert tuple(wt.shape) == (4, 256 // 16, 2, 16, 16) and tuple(st.shape) == (4, 16, 2, 16, 4)
    w, s = untile_w13(wt, st)
    assert torch.equal(w, w13) and torch.equal(s, s13)
    # row n, chunk c of expert e sits at tile n // 16, slot n % 16 of chunk c
    assert torch.equal(wt[1, 3, 1, 5], w13[1, 3 * 16 + 5, 1])
    x = torch.randn(2, 256).bfloat16().to(DEV)
    ids = torch.zeros(2, 4, dtype=torch.int32, device=DEV)
    tw = torch.ones(2, 4, device=DEV)
    with pytest.raises(ValueError, match="tiled alike"):
        fused_moe(x, wt, w2, tw, ids, quant="int4_g32", w13_scale=s13, w2_scale=s2)
    with pytest.raises(ValueError, match="tiles of"):
        tile_w13(w13, s13, 24)
