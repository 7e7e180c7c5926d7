"""kernels/moe_gemv_ladder.py (the M=1 MoE GEMV measurement ladder) against torch references.

CPU: TRITON_INTERPRET=1 (set before the kernel modules are decorated) at small shapes (H=256,
I=128, E=16, top-8). Weights are drawn as codes (int4 q / MXFP4 e2m1 + e8m0) and packed with
kernels/moe_ref.py, so the references use the drawn codes, never the kernel layout's unpacking.
Every check draws fresh random inputs, poisons the outputs first (NaN, or an int sentinel for
the read-only rungs), and compares: L0/D0 bit-exact (wrapping int32 sums), L1 exact (sums of
small integers / e2m1 values in fp32), L2-L4 and D4 rel L2 < 1e-5 against float64 (fp32
accumulation). The L4 -> D4 chain is the whole M=1 MoE: it must match
moe_ref.fused_moe_ref on the dense dequantized weights and moe_small_m_ref on the repacked ones.
`-m gpu`: every rung at the Kimi-K2.5 TP8 rank shape (H=7168, I=256, E=384) once.
"""

from __future__ import annotations


import pytest
import torch
from kernel_interp import interpret_without_gpu

GPU = interpret_without_gpu("moe_align", "moe_small_m_kernels", "moe_gemv_ladder")  # import order

from atom_stream.kernels import moe_ref as R
from atom_stream.kernels.moe_gemv_ladder import (
    act_natural,
    down_reference,
    down_rung,
    gate_up_reference,
    gate_up_rung,
)
from atom_stream.kernels.moe_small_m import moe_small_m_ref

cpu_only = pytest.mark.skipif(GPU, reason="interpreter tests run where there is no GPU")
DEV = "cuda" if GPU else "cpu"
H, I, E, TOPK = 256, 128, 16, 8
SENTINEL = -123456789


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    assert torch.isfinite(a).all(), "non-finite output (an element left unwritten?)"
    return float((a - b).norm() / b.norm())


def experts(fmt: str, gen: torch.Generator, e: int = E, h: int = H, i: int = I):
    """((w13, w2, s13, s2) kernel layout on DEV, (d13 [E, 2I, H], d2 [E, H, I]) float32
    dequantized from the drawn codes, (u13, u2) the UNSCALED values: q or e2m1)."""
    if fmt == "int4":
        q13 = torch.randint(-8, 8, (e, 2 * i, h), generator=gen)
        q2 = torch.randint(-8, 8, (e, h, i), generator=gen)
        s13 = ((torch.rand(e, 2 * i, h // 32, generator=gen) + 0.5) / (4 * h ** 0.5)).bfloat16()
        s2 = ((torch.rand(e, h, i // 32, generator=gen) + 0.5) / (4 * i ** 0.5)).bfloat16()
        w = (R.repack_int4(R.pack_int4(q13)), R.repack_int4(R.pack_int4(q2)), s13, s2)
        d = (R.dequant_int4(q13, s13), R.dequant_int4(q2, s2))
        u = (q13.double(), q2.double())
    else:
        m13 = torch.randint(0, 256, (e, 2 * i, h // 2), generator=gen, dtype=torch.uint8)
        m2 = torch.randint(0, 256, (e, h, i // 2), generator=gen, dtype=torch.uint8)
        e13 = torch.randint(112, 124, (e, 2 * i, h // 32), generator=gen, dtype=torch.uint8)
        e2 = torch.randint(116, 126, (e, h, i // 32), generator=gen, dtype=torch.uint8)
        w = (R.repack_mxfp4(m13), R.repack_mxfp4(m2), e13, e2)
        d = (R.dequant_mxfp4(m13, e13), R.dequant_mxfp4(m2, e2))
        u = (R.e2m1_values(R.unpack_fp4(m13)).double(), R.e2m1_values(R.unpack_fp4(m2)).double())
    return tuple(t.contiguous().to(DEV) for t in w), d, u


def routing(gen: torch.Generator, repeat: bool = False, topk: int = TOPK):
    ids = torch.randperm(E, generator=gen)[:topk].int()
    if repeat:  # expert parallel / a repeated pick: every column is its own pair
        ids[3] = ids[0]
    tw = torch.rand(topk, generator=gen) + 0.1
    return ids.to(DEV), tw.to(DEV)


def packed_words(w13: torch.Tensor, e: int) -> torch.Tensor:
    return w13[e].cpu().to(torch.int64)


def wrap32(v: torch.Tensor) -> torch.Tensor:
    return ((v + 2**31) % 2**32 - 2**31).to(torch.int32)


def run_gate_up(level, fmt, x, w13, s13, ids, R_, SK, CH):
    k = ids.numel()
    if level == 0:
        out = torch.full((SK, k, 2 * I), SENTINEL, dtype=torch.int32, device=DEV)
    elif level < 4:
        out = torch.full((SK, k, 2 * I), float("nan"), device=DEV)
    else:
        out = torch.full((k, I), float("nan"), device=DEV)
    part = torch.full((SK, k, 2 * I), float("nan"), device=DEV) if SK > 1 else None
    y = gate_up_rung(level, x, w13, s13, ids, out, fmt=fmt, R=R_, SK=SK, CH=CH, part=part)
    assert y is out
    return out


# (R, SK, CH), large R: the interpreter's cost is per program, so few programs
CONFIGS = [(64, 1, 1),  # full K in 2 steps (prefetch + wrap)
           (128, 2, 1),  # split-K: one step per program; L4 via the separate reduce launch
           (32, 1, 2)]  # full K in one step


# every level on the full-K and split-K configs; the one-step config for the x / silu rungs
CASES = [(lv, f, c) for lv, f in [(0, "int4"), (1, "int4"), (1, "mxfp4"), (2, "int4"),
                                  (2, "mxfp4"), (3, "int4"), (3, "mxfp4"), (4, "int4"),
                                  (4, "mxfp4")]
         for c in (CONFIGS if lv >= 3 else CONFIGS[:2])]


@cpu_only
@pytest.mark.parametrize("level,fmt,cfg", CASES)
def test_gate_up_rung(level, fmt, cfg):
    R_, SK, CH = cfg
    gen = torch.Generator().manual_seed(100 * level + 10 * R_ + SK + (fmt == "mxfp4"))
    (w13, _, s13, _), (d13, _), (u13, _) = experts(fmt, gen)
    x = torch.randn(H, generator=gen).bfloat16().to(DEV)
    ids, _ = routing(gen, repeat=level == 4, topk=4)
    out = run_gate_up(level, fmt, x, w13, s13, ids, R_, SK, CH).cpu()
    idl = ids.tolist()
    if level == 0:  # independent: the packed words themselves, summed per row and K chunk
        want = torch.stack([wrap32(packed_words(w13, e).reshape(2 * I, SK, -1).sum(-1)).T
                            for e in idl], 1)
        assert torch.equal(out, want)
        return
    if level == 1:
        want = torch.stack([u13[e].reshape(2 * I, SK, -1).sum(-1).T for e in idl], 1)
        assert torch.equal(out.double(), want), "L1 must be exact (sums of small integers)"
        return
    dd = d13.double()
    if level == 2:
        want = torch.stack([dd[e].reshape(2 * I, SK, -1).sum(-1).T for e in idl], 1)
    else:
        prod = [dd[e] * x.cpu().double()[None, :] for e in idl]
        want = torch.stack([p.reshape(2 * I, SK, -1).sum(-1).T for p in prod], 1)
        if level == 4:
            h = want.sum(0)
            want = torch.nn.functional.silu(h[:, :I]) * h[:, I:]
            out = act_natural(out)
    assert rel_err(out, want) < 1e-5
    # the bench's GPU check uses the module's reference: it must agree too
    ref = gate_up_reference(level, x, w13, s13, ids, fmt=fmt, SK=SK).cpu()
    assert rel_err(ref, want) < 1e-12


@cpu_only
@pytest.mark.parametrize("fmt,BN", [("int4", 32), ("mxfp4", 64)])
def test_down_rungs(fmt, BN):
    gen = torch.Generator().manual_seed(7 + BN)
    (_, w2, _, s2), (_, d2), _ = experts(fmt, gen)
    ids, tw = routing(gen, repeat=True)
    act = torch.randn(TOPK, I, generator=gen).to(DEV)  # (down order: any values do)
    y0 = torch.full((H,), SENTINEL, dtype=torch.int32, device=DEV)
    down_rung(0, act, w2, s2, ids, tw, y0, fmt=fmt, BN=BN)
    want0 = wrap32(sum(packed_words(w2, e).reshape(H, -1).sum(-1) for e in ids.tolist()))
    assert torch.equal(y0.cpu(), want0)
    y = torch.full((H,), float("nan"), device=DEV)
    assert down_rung(4, act, w2, s2, ids, tw, y, fmt=fmt, BN=BN) is y
    a = act_natural(act).cpu().double()
    want = sum(float(tw[k]) * (d2[e].double() @ a[k]) for k, e in enumerate(ids.tolist()))
    assert rel_err(y, want) < 1e-5
    assert rel_err(down_reference(4, act, w2, s2, ids, tw, fmt=fmt), want) < 1e-12
    assert torch.equal(down_reference(0, act, w2, s2, ids, tw, fmt=fmt).cpu(), want0)


@cpu_only
@pytest.mark.parametrize("fmt,SK", [("int4", 1), ("mxfp4", 2)])
def test_chain_is_the_moe(fmt, SK):
    """L4 then D4 = the whole M=1 MoE (fp32 output, no rounding)."""
    gen = torch.Generator().manual_seed(31 + SK)
    (w13, w2, s13, s2), (d13, d2), _ = experts(fmt, gen)
    x = torch.randn(H, generator=gen).bfloat16().to(DEV)
    ids, tw = routing(gen, repeat=True, topk=4)
    act = run_gate_up(4, fmt, x, w13, s13, ids, 64, SK, 1)
    y = torch.full((H,), float("nan"), device=DEV)
    down_rung(4, act, w2, s2, ids, tw, y, fmt=fmt, BN=64)
    ref = R.fused_moe_ref(x.cpu()[None], d13, d2, tw.cpu()[None], ids.cpu()[None])[0]
    assert rel_err(y, ref) < 1e-5
    ref2 = moe_small_m_ref(x[None], w13, w2, s13, s2, tw[None], ids[None], fmt)[0]
    assert rel_err(y, ref2) < 1e-5


@cpu_only
def test_bad_configs_raise():
    gen = torch.Generator().manual_seed(3)
    (w13, w2, s13, s2), _, _ = experts("int4", gen)
    x = torch.randn(H, generator=gen).bfloat16()
    ids, tw = routing(gen)
    out = torch.empty(3, TOPK, 2 * I)
    with pytest.raises(ValueError):  # SK 3 does not tile H/128 = 2
        gate_up_rung(2, x, w13, s13, ids, out, SK=3)
    with pytest.raises(ValueError):  # L4 split-K without its workspace
        gate_up_rung(4, x, w13, s13, ids, torch.empty(TOPK, I), SK=2, CH=1)
    with pytest.raises(ValueError):  # int4 rung with e8m0 scales
        gate_up_rung(2, x, w13, s13.view(torch.uint8)[..., ::2].contiguous(), ids,
                     torch.empty(1, TOPK, 2 * I))
    with pytest.raises(ValueError):  # D0 writes int32
        down_rung(0, torch.empty(TOPK, I), w2, s2, ids, tw, torch.empty(H))


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a GPU")
@pytest.mark.parametrize("fmt", ["int4", "mxfp4"])
def test_real_shape_gpu(fmt):
    gen = torch.Generator(device="cuda").manual_seed(0)
    h, i, e = 7168, 256, 384
    w13 = torch.randint(-2**31, 2**31 - 1, (e, 2 * i, h // 128, 16), generator=gen,
                        device="cuda", dtype=torch.int32)
    w2 = torch.randint(-2**31, 2**31 - 1, (e, h, i // 128, 16), generator=gen, device="cuda",
                       dtype=torch.int32)
    if fmt == "int4":
        s13 = ((torch.rand(e, 2 * i, h // 32, generator=gen, device="cuda") + 0.5) / 340).bfloat16()
        s2 = ((torch.rand(e, h, i // 32, generator=gen, device="cuda") + 0.5) / 64).bfloat16()
    else:
        s13 = torch.randint(112, 124, (e, 2 * i, h // 32), generator=gen, device="cuda",
                            dtype=torch.int32).to(torch.uint8)
        s2 = torch.randint(116, 126, (e, h, i // 32), generator=gen, device="cuda",
                           dtype=torch.int32).to(torch.uint8)
    x = torch.randn(h, generator=gen, device="cuda").bfloat16()
    ids = torch.randperm(e, generator=gen, device="cuda")[:TOPK].int()
    tw = torch.rand(TOPK, generator=gen, device="cuda")
    for R_, SK in ((16, 7), (4, 1)):
        for level in range(5):
            shape = (TOPK, i) if level == 4 else (SK, TOPK, 2 * i)
            out = torch.full(shape, SENTINEL if level == 0 else float("nan"), device="cuda",
                             dtype=torch.int32 if level == 0 else torch.float32)
            part = torch.empty(SK, TOPK, 2 * i, device="cuda") if SK > 1 else None
            gate_up_rung(level, x, w13, s13, ids, out, fmt=fmt, R=R_, SK=SK, part=part)
            ref = gate_up_reference(level, x, w13, s13, ids, fmt=fmt, SK=SK)
            if level == 0:
                assert torch.equal(out, ref)
            else:
                assert rel_err(act_natural(out) if level == 4 else out, ref) < 1e-5, level
    act = torch.randn(TOPK, i, device="cuda")
    y = torch.full((h,), float("nan"), device="cuda")
    down_rung(4, act, w2, s2, ids, tw, y, fmt=fmt, BN=16)
    assert rel_err(y, down_reference(4, act, w2, s2, ids, tw, fmt=fmt)) < 1e-5
