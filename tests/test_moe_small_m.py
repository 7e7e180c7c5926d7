"""kernels/moe_small_m.py (small-M 4-bit fused MoE on CUDA cores) against kernels/moe_ref.py.

CPU: TRITON_INTERPRET=1 (set before the kernel modules are decorated) at tiny shapes (H=256,
I=128, E=8-16, top-2..4), bf16 activations; the interpreter runs every program in Python, so the
configs use few, large tiles. `-m gpu`: the real Kimi-K2.5 TP8 rank shape (H=7168, I=256,
E=384, top-8) at M = 1, 16, 64, 256, the default config and the split-K / token-pair variants,
plus a CUDA-graph capture/replay with new routing. Every check draws fresh random inputs (never
zeros), repeats expert ids inside a token (one at weight 0, as expert parallelism produces),
poisons the intermediate and the output (NaN) first, and compares with a float64 reference in
rel L2 (bf16 output: < 1e-2 per METHOD.md; fp32 output: < 1e-5, i.e. the kernel's math is exact
up to fp32 summation order).
"""

from __future__ import annotations

import pytest
import torch
from kernel_interp import interpret_without_gpu

# re-decorate, in import order
GPU = interpret_without_gpu(
    "moe_routing", "moe_align", "fused_moe_common", "fused_moe_tc", "fused_moe_gemv", "fused_moe_fp8", "moe_small_m_kernels", "moe_small_m", "fused_moe")

from atom_stream.kernels import moe_ref as R
from atom_stream.kernels import moe_small_m as SM
from atom_stream.kernels.fused_moe import fused_moe, small_m_max
from atom_stream.kernels.moe_small_m import (
    default_config,
    moe_small_m,
    moe_small_m_ref,
)

cpu_only = pytest.mark.skipif(GPU, reason="interpreter tests run where there is no GPU")
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a GPU")
DEV = "cuda" if GPU else "cpu"


@pytest.fixture(autouse=True)
def split_k_gate_up(monkeypatch):
    """This file tests the small-M split-K gate_up (config "M1" 0) and the dispatch as it was
    built for it (small-M at M <= SMALL_M_MAX): the per-pair gate_up that the defaults now
    take at M <= 8 (ATOM_STREAM_MOE_M1_KERNEL / _PAIR_M_MAX) has tests/test_moe_m1_gate_up.py
    (and its many small programs make these shapes slow under the interpreter)."""
    monkeypatch.setattr(SM, "M1_KERNEL", False)
    monkeypatch.setattr(SM, "PAIR_M_MAX", 1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    assert torch.isfinite(a).all(), "non-finite output (unwritten element or intermediate?)"
    return float((a - b).norm() / b.norm())


def make_experts(fmt, E, H, I, gen, dense=True):
    """(w13, w2, s13, s2) in the kernel layout on DEV, and (when dense) the dequantized float
    w13 [E, 2I, H], w2 [E, H, I] on the CPU. Random codes and scales of the format. dense=False
    (the real 384-expert shapes) draws the kernel-layout words directly on DEV (every 32-bit
    pattern is valid in both formats): no CPU packing of 2 G elements."""
    if not dense:
        seed = int(torch.randint(1 << 30, (1,), generator=gen))
        g = torch.Generator(device=DEV).manual_seed(seed)

        def words(*shape):
            return torch.randint(-2**31, 2**31 - 1, shape, generator=g, device=DEV,
                                 dtype=torch.int32)

        w13, w2 = words(E, 2 * I, H // 128, 16), words(E, H, I // 128, 16)
        if fmt == "int4":
            s13 = ((torch.rand(E, 2 * I, H // 32, generator=g, device=DEV) + 0.5)
                   / (4 * H ** 0.5)).bfloat16()
            s2 = ((torch.rand(E, H, I // 32, generator=g, device=DEV) + 0.5)
                  / (4 * I ** 0.5)).bfloat16()
        else:
            s13 = torch.randint(112, 124, (E, 2 * I, H // 32), generator=g, device=DEV,
                                dtype=torch.int32).to(torch.uint8)
            s2 = torch.randint(116, 126, (E, H, I // 32), generator=g, device=DEV,
                               dtype=torch.int32).to(torch.uint8)
        return (w13, w2, s13, s2), (None, None)
    if fmt == "int4":
        q13 = torch.randint(-8, 8, (E, 2 * I, H), generator=gen)
        q2 = torch.randint(-8, 8, (E, H, I), generator=gen)
        s13 = ((torch.rand(E, 2 * I, H // 32, generator=gen) + 0.5) / (4 * H ** 0.5)).bfloat16()
        s2 = ((torch.rand(E, H, I // 32, generator=gen) + 0.5) / (4 * I ** 0.5)).bfloat16()
        w = (R.repack_int4(R.pack_int4(q13)), R.repack_int4(R.pack_int4(q2)), s13, s2)
        ref = (R.dequant_int4(q13, s13), R.dequant_int4(q2, s2))
    else:
        m13 = torch.randint(0, 256, (E, 2 * I, H // 2), generator=gen, dtype=torch.uint8)
        m2 = torch.randint(0, 256, (E, H, I // 2), generator=gen, dtype=torch.uint8)
        # spread of exponents, including the e2m1 subnormal-range products of small scales
        e13 = torch.randint(112, 124, (E, 2 * I, H // 32), generator=gen, dtype=torch.uint8)
        e2 = torch.randint(116, 126, (E, H, I // 32), generator=gen, dtype=torch.uint8)
        w = (R.repack_mxfp4(m13), R.repack_mxfp4(m2), e13, e2)
        ref = (R.dequant_mxfp4(m13, e13), R.dequant_mxfp4(m2, e2))
    return tuple(t.contiguous().to(DEV) for t in w), ref


def make_routing(M, k, E, gen, repeat=True):
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(M)]).int()
    tw = torch.rand(M, k, generator=gen) + 0.1
    if repeat and k >= 3:  # expert parallel: column 2 repeats column 0 at weight 0
        ids[:, 2] = ids[:, 0]
        tw[:, 2] = 0.0
    if repeat and k >= 2:  # and token 0 repeats an expert at a nonzero weight
        ids[0, 1] = ids[0, 0]
    return ids.to(DEV), tw.to(DEV)


def check(fmt, M, E, H, I, k, config=None, seed=0, out_dtype=torch.bfloat16, tol=1e-2,
          n_shared=0):
    gen = torch.Generator().manual_seed(seed)
    (w13, w2, s13, s2), (d13, d2) = make_experts(fmt, E, H, I, gen)
    x = torch.randn(M, H, generator=gen).bfloat16().to(DEV)
    ids, tw = make_routing(M, k, E - n_shared, gen)
    out = torch.full((M, H), float("nan"), dtype=out_dtype, device=DEV)
    y = moe_small_m(x, w13, w2, s13, s2, tw, ids, fmt, dict(config or {}, poison=True),
                    n_shared=n_shared, out=out)
    assert y is out
    ref = R.fused_moe_ref(x.cpu(), d13, d2, tw.cpu(), ids.cpu(), n_shared=n_shared)
    err = rel_err(y, ref)
    assert err < tol, f"{fmt} M={M} {config}: rel err {err:.3g}"
    return err


# few, large tiles: the interpreter runs each program in Python
ONE = {"BN": 128, "BN2": 256, "CH": 2}


@cpu_only
@pytest.mark.parametrize("fmt", ["int4", "mxfp4"])
@pytest.mark.parametrize("M,k,cfg", [
    (1, 4, {"SK": 2, "CH": 1}),  # split-K: partials + semaphore fix-up, prefetch across steps
    (3, 4, {"BT": 2}),  # two tokens per weight pass, a half-empty tile
    (1, 3, {"SK": 2, "CH": 1, "VT": 1, "DW": 1}),  # vector-id tail, all-pairs down, KP2 > KP
    (3, 4, {"BT": 2, "VT": 1, "DW": 1}),
])
def test_interpreted_exact_fp32_out(fmt, M, k, cfg):
    # fp32 output: no final rounding, so the dequantization and sums must be exact to fp32.
    # Twice: the split-K semaphores must be back at 0 after a launch (they are reused).
    for seed in (M, M + 50)[:2 if cfg.get("SK", 1) > 1 else 1]:
        check(fmt, M, E=16, H=256, I=128, k=k, config=dict(ONE, **cfg), seed=seed,
              out_dtype=torch.float32, tol=1e-5)


@cpu_only
@pytest.mark.parametrize("fmt,M,E,k,cfg", [
    ("int4", 1, 16, 4, {"BN": 32, "BN2": 128, "CH": 1, "SK": 2}),  # EARLY prefetch, split-K
    ("mxfp4", 3, 16, 4, {"BT": 1, "BN": 64}),
    ("int4", 16, 16, 2, {"BT": 2, "MC": 4}),  # token scans in chunks of 4
    ("mxfp4", 24, 4, 2, {"BT": 2, "MC": 8, "PC": 8}),  # ~12 tokens per expert: token loops
    ("int4", 5, 4, 3, {"VT": 1, "DW": 1, "BT": 1, "MC": 4}),  # KP2 = 4 > KP = 3
])
def test_interpreted_bf16(fmt, M, E, k, cfg):
    H = 256 if cfg.get("SK", 1) > 1 else 128
    cfg = {**ONE, "CH": H // 128, "BN2": H, **cfg}
    check(fmt, M, E=E, H=H, I=128, k=k, config=cfg, seed=10 + M)


@cpu_only
def test_shared_expert_and_reference_agree():
    # two shared experts (ids E-2, E-1 at weight 1.0), and the touched-expert reference used
    # at the GPU shapes equals fused_moe_ref on the dense dequantized weights
    err = check("int4", 2, E=10, H=256, I=128, k=2, config=ONE, seed=5, n_shared=2)
    assert err < 1e-2
    for M, cfg in ((1, {"VT": 1, "DW": 1, "SK": 2, "CH": 1}), (3, {"VT": 1, "DW": 1})):
        check("mxfp4", M=M, E=11, H=256, I=128, k=3, config=dict(ONE, **cfg),
              seed=8, n_shared=2, out_dtype=torch.float32, tol=1e-5)
    gen = torch.Generator().manual_seed(6)
    (w13, w2, s13, s2), (d13, d2) = make_experts("mxfp4", 8, 128, 128, gen)
    x = torch.randn(3, 128, generator=gen).bfloat16()
    ids, tw = make_routing(3, 3, 8, gen)
    a = moe_small_m_ref(x, w13, w2, s13, s2, tw, ids, "mxfp4")
    b = R.fused_moe_ref(x, d13, d2, tw.cpu(), ids.cpu())
    assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    # a hidden view at an odd element offset (not int32-aligned) gives the same result
    cfg = {"BN": 128, "BN2": 128, "CH": 1}
    y = moe_small_m(x, w13, w2, s13, s2, tw, ids, "mxfp4", cfg)
    x_odd = torch.cat([x.new_ones(1), x.flatten()])[1:].view(3, 128)
    assert x_odd.storage_offset() == 1
    assert torch.equal(moe_small_m(x_odd, w13, w2, s13, s2, tw, ids, "mxfp4", cfg), y)
    assert rel_err(y, b) < 1e-2


@cpu_only
def test_rejects_bad_inputs():
    gen = torch.Generator().manual_seed(7)
    (w13, w2, s13, s2), _ = make_experts("int4", 4, 128, 128, gen, dense=False)
    x = torch.randn(1, 128, generator=gen).bfloat16()
    ids, tw = make_routing(1, 2, 4, gen, repeat=False)
    with pytest.raises(NotImplementedError):
        moe_small_m(x.float(), w13, w2, s13, s2, tw, ids, "int4")
    with pytest.raises(NotImplementedError):
        moe_small_m(x, w13, w2, s13, s2, tw, ids, "fp8")
    with pytest.raises(NotImplementedError):  # raw compressed-tensors layout
        moe_small_m(x, w13.flatten(-2), w2, s13, s2, tw, ids, "int4")
    with pytest.raises(ValueError):  # mxfp4 scales are uint8
        moe_small_m(x, w13, w2, s13, s2, tw, ids, "mxfp4")
    with pytest.raises(ValueError):  # BN does not divide I
        moe_small_m(x, w13, w2, s13, s2, tw, ids, "int4", {"BN": 256})
    with pytest.raises(ValueError):
        moe_small_m(x, w13, w2, s13, s2, tw, ids, "int4", out=torch.empty(2, 128))
    cfg = default_config(1, 7168, 256, 8)
    assert (7168 // (128 * cfg["CH"])) % cfg["SK"] == 0 and 256 % cfg["BN"] == 0


def fused_both(fmt, M, E, H, I, k, seed, n_shared=0, small_cfg=None, dev=None):
    """fused_moe on one fresh routing with the small-M path on (small_m_max=4, counted through a
    spy on moe_small_m) and off (0: the GEMV path): (y_on, y_off, float64 ref, calls)."""
    dev = dev or DEV
    gen = torch.Generator().manual_seed(seed)
    dense = dev == "cpu"
    (w13, w2, s13, s2), (d13, d2) = make_experts(fmt, E, H, I, gen, dense=dense)
    x = torch.randn(M, H, generator=gen).bfloat16().to(dev)
    ids, tw = make_routing(M, k, E - n_shared, gen)
    quant = "int4_g32" if fmt == "int4" else "mxfp4"
    calls = []
    real = SM.moe_small_m

    def spy(*a, **kw):
        calls.append(a[7])
        return real(*a, **kw)

    ys = []
    SM.moe_small_m = spy
    try:
        for on in (4, 0):
            out = torch.full((M, H), float("nan"), dtype=torch.bfloat16, device=dev)
            cfg = {"small_m_max": on, "poison": True, "small_m": small_cfg,
                   "G1": 64, "G2": 128, "GC": H // 128}  # few GEMV programs (interpreter)
            y = fused_moe(x, w13, w2, tw, ids, quant=quant, w13_scale=s13, w2_scale=s2,
                          n_shared=n_shared, out=out, config=cfg)
            assert y is out
            ys.append(y)
    finally:
        SM.moe_small_m = real
    if dense:
        ref = R.fused_moe_ref(x.cpu(), d13, d2, tw.cpu(), ids.cpu(), n_shared=n_shared)
    else:
        ref = moe_small_m_ref(x, w13, w2, s13, s2, tw, ids, fmt, n_shared=n_shared)
    return ys[0], ys[1], ref, calls


@cpu_only
@pytest.mark.parametrize("fmt,M,k,n_shared,cfg", [
    ("int4", 1, 4, 0, {"BN": 64, "BN2": 256, "CH": 1, "SK": 2}),  # split-K, EARLY prefetch
    ("mxfp4", 1, 3, 1, {"BN": 128, "BN2": 256}),  # a shared expert
    ("int4", 4, 4, 0, {"BN": 128, "BN2": 256}),  # token compaction, repeated ids
    ("mxfp4", 3, 2, 0, {"BN": 128, "BN2": 256, "BT": 2}),
])
def test_fused_moe_dispatches_small_m(fmt, M, k, n_shared, cfg):
    # fused_moe at M <= small_m_max (4-bit, weight-only, bf16) runs moe_small_m, and it equals
    # fused_moe with the path disabled (GEMV) and the float64 reference
    y_on, y_off, ref, calls = fused_both(fmt, M, E=12, H=256, I=128, k=k, seed=40 + M,
                                         n_shared=n_shared, small_cfg=cfg)
    assert calls == [fmt]  # only the small_m_max=4 call went there
    assert rel_err(y_on, ref) < 1e-2 and rel_err(y_off, ref) < 1e-2
    assert rel_err(y_on, y_off) < 1e-2


@cpu_only
def test_fused_moe_small_m_not_taken():
    # M > small_m_max (SMALL_M_MAX here: split_k_gate_up), fp16 activations, w4a4: never the
    # small-M path
    M = small_m_max() + 1
    gen = torch.Generator().manual_seed(3)
    (w13, w2, s13, s2), _ = make_experts("mxfp4", 8, 128, 128, gen)
    ids, tw = make_routing(M, 2, 8, gen)
    calls = []
    real = SM.moe_small_m
    SM.moe_small_m = lambda *a, **kw: calls.append(1)
    try:
        cfg = {"G1": 64, "G2": 128, "GC": 1, "BN1": 64, "BN2": 128}
        x = torch.randn(M, 128, generator=gen).bfloat16()
        fused_moe(x, w13, w2, tw, ids, quant="mxfp4", w13_scale=s13, w2_scale=s2, config=cfg)
        fused_moe(x[:1].half(), w13, w2, tw[:1], ids[:1], quant="mxfp4", w13_scale=s13,
                  w2_scale=s2, config=cfg)
        fused_moe(x[:1], w13, w2, tw[:1], ids[:1], quant="mxfp4", w13_scale=s13, w2_scale=s2,
                  activation_quant="mxfp4", config=cfg)
    finally:
        SM.moe_small_m = real
    assert calls == []


# ------------------------------------------------------------------------------- GPU
H_, I_, E_, K_ = 7168, 256, 384, 8  # Kimi-K2.5 TP8 rank


def check_real(fmt, M, config=None, seed=0, tol=1e-2):
    gen = torch.Generator().manual_seed(seed)
    (w13, w2, s13, s2), _ = make_experts(fmt, E_, H_, I_, gen, dense=False)
    x = torch.randn(M, H_, generator=gen).bfloat16().to(DEV)
    ids, tw = make_routing(M, K_, E_, gen)
    out = torch.full((M, H_), float("nan"), dtype=torch.bfloat16, device=DEV)
    moe_small_m(x, w13, w2, s13, s2, tw, ids, fmt, dict(config or {}, poison=True), out=out)
    ref = moe_small_m_ref(x, w13, w2, s13, s2, tw, ids, fmt)
    err = rel_err(out, ref)
    assert err < tol, f"{fmt} M={M} {config}: rel err {err:.3g}"


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("fmt", ["int4", "mxfp4"])
@pytest.mark.parametrize("M", [1, 16, 64, 256])
def test_gpu_real_shape(fmt, M):
    check_real(fmt, M, seed=M)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("fmt", ["int4", "mxfp4"])
@pytest.mark.parametrize("M,cfg", [(1, {"SK": 1}), (1, {"SK": 7, "BN": 4}), (4, {"SK": 7}),
                                   (16, {"BT": 2, "BN": 8}), (64, {"BT": 1, "BN2": 16}),
                                   (1, {"VT": 1, "DW": 1, "PDL": 1, "W2": 8}),
                                   (4, {"VT": 1, "DW": 1, "PDL": 1, "BN2": 16}),
                                   (1, {"PDL": 1}), (16, {"VT": 1, "DW": 1, "BT": 2})])
def test_gpu_variants(fmt, M, cfg):
    check_real(fmt, M, cfg, seed=100 + M)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("fmt", ["int4", "mxfp4"])
@pytest.mark.parametrize("M", [1, 4])
def test_gpu_fused_moe_dispatch_real_shape(fmt, M):
    y_on, y_off, ref, calls = fused_both(fmt, M, E_, H_, I_, K_, seed=200 + M, dev="cuda")
    assert calls == [fmt]
    assert rel_err(y_on, ref) < 1e-2 and rel_err(y_on, y_off) < 1e-2


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("M,cfg", [(1, {"SK": 2, "CH": 4}), (40, {"BT": 2}),
                                   (1, {"SK": 2, "CH": 4, "VT": 1, "DW": 1, "PDL": 1})])
def test_gpu_cuda_graph_replay(M, cfg):
    # split-K at M=1: the semaphores must come back to 0 after every replay
    gen = torch.Generator().manual_seed(M)
    (w13, w2, s13, s2), _ = make_experts("int4", 64, 1024, 256, gen, dense=False)
    x = torch.randn(M, 1024, generator=gen).bfloat16().cuda()
    ids, tw = make_routing(M, 8, 64, gen)
    moe_small_m(x, w13, w2, s13, s2, tw, ids, "int4", cfg)  # compile outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = moe_small_m(x, w13, w2, s13, s2, tw, ids, "int4", cfg)
    for _ in range(3):  # new inputs and routing each replay (also re-uses the semaphores)
        x.copy_(torch.randn(M, 1024, generator=gen).bfloat16())
        i2, t2 = make_routing(M, 8, 64, gen)
        ids.copy_(i2)
        tw.copy_(t2)
        y.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        ref = moe_small_m_ref(x, w13, w2, s13, s2, tw, ids, "int4")
        assert rel_err(y, ref) < 1e-2
