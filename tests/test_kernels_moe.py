"""MoE kernels (kernels/moe_routing.py, moe_align.py, fused_moe.py) against kernels/moe_ref.py.

Without a GPU the Triton kernels run under TRITON_INTERPRET=1 (set here, before the kernel modules
are decorated) at small shapes with fp16/fp32 activations (the interpreter mishandles bf16 dots).
`-m gpu` runs them natively in bf16 at wider shapes, plus a CUDA-graph capture/replay check.
4-bit formats run the GEMV path for small M (default M <= 8) and the tensor-core path otherwise
(direct mode without align up to 16 tokens, then sorted); all three are checked, also with a
token that repeats an expert id (expert parallel). FP8C ("fp8_tensor"/"fp8_channel", W4A8):
tests/test_w4a8_kernel.py.
Every check draws fresh random inputs (never zeros) and poisons outputs before the run; the
fused-MoE references dequantize the weights and compute in float64.
"""

from __future__ import annotations

import json

import pytest
import torch
from kernel_interp import interpret_without_gpu

# re-decorate, in import order
GPU = interpret_without_gpu(
    "moe_routing", "moe_align", "fused_moe_common", "fused_moe_tc", "fused_moe_gemv", "fused_moe_fp8", "fused_moe")

from atom_stream.kernels import moe_ref as R
from atom_stream.kernels.fused_moe import (
    fused_moe,
    repack_int4_moe,
    repack_mxfp4_moe,
)
from atom_stream.kernels.moe_align import max_blocks, moe_align
from atom_stream.kernels.moe_routing import moe_routing

cpu_only = pytest.mark.skipif(GPU, reason="interpreter tests run where there is no GPU")
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a GPU")
DEV = "cuda" if GPU else "cpu"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite output (unwritten element?)"
    return float((a - b).norm() / b.norm())


def rand_ids(M, k, E, gen, device=DEV):
    return torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(M)]).int().to(device)


# ------------------------------------------------------------------------------- routing
@pytest.mark.parametrize("E,top_k,n_group,topk_group,norm", [
    (64, 6, 1, 1, True), (64, 6, 1, 1, False), (64, 6, 4, 2, True), (64, 6, 4, 2, False),
    (384, 8, 1, 1, True),
])
def test_routing_matches_reference(E, top_k, n_group, topk_group, norm):
    gen = torch.Generator().manual_seed(E + top_k + n_group + norm)
    for M in (1, 7):
        logits = (torch.randn(M, E, generator=gen) * 2).to(DEV)
        bias = (torch.randn(E, generator=gen) * 0.5).to(DEV)
        tw = torch.full((M, top_k), float("nan"), device=DEV)
        tid = torch.full((M, top_k), -1, dtype=torch.int32, device=DEV)
        moe_routing(logits, bias, top_k=top_k, n_group=n_group, topk_group=topk_group,
                    norm_topk_prob=norm, routed_scaling_factor=2.5, out=(tw, tid))
        rw, rid = R.moe_routing_ref(logits, bias, top_k=top_k, n_group=n_group,
                                    topk_group=topk_group, norm_topk_prob=norm,
                                    routed_scaling_factor=2.5)
        assert torch.equal(tid.long().cpu(), rid.cpu())  # same ids, same (falling) order
        assert torch.allclose(tw, rw, rtol=1e-5, atol=1e-6)
        if n_group > 1:  # every token's experts lie in at most topk_group groups
            for row in tid.cpu():
                assert len(set((row // (E // n_group)).tolist())) <= topk_group


def _stable_topk(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest along the last dim, ties in ascending index (torch.topk's tie
    order is unspecified, so moe_routing_ref cannot check it)."""
    return torch.sort(x, dim=-1, descending=True, stable=True).indices[..., :k]


@pytest.mark.parametrize("n_group,topk_group", [(1, 1), (4, 2)])
def test_routing_ties_pick_lowest_id_first(n_group, topk_group):
    """Exactly tied scores (few distinct logit values, no bias): experts and groups are picked
    lowest id first, the kernel's documented order, against a stable-sort reference; also with
    every score equal."""
    gen = torch.Generator().manual_seed(11 + n_group)
    E, top_k = 64, 6
    for M in (1, 5):
        for levels in (3, 1):
            logits = torch.randint(0, levels, (M, E), generator=gen).float() - 1.0
            sel = logits.sigmoid()
            if n_group > 1:
                g = sel.view(M, n_group, -1)
                gscore = torch.sort(g, -1, descending=True).values[..., :2].sum(-1)
                keep = torch.zeros_like(gscore, dtype=torch.bool).scatter_(
                    1, _stable_topk(gscore, topk_group), True)
                sel = sel.masked_fill(~keep.repeat_interleave(E // n_group, 1), float("-inf"))
            rid = _stable_topk(sel, top_k)
            tw = torch.full((M, top_k), float("nan"), device=DEV)
            tid = torch.full((M, top_k), -1, dtype=torch.int32, device=DEV)
            moe_routing(logits.to(DEV), None, top_k=top_k, n_group=n_group,
                        topk_group=topk_group, out=(tw, tid))
            assert torch.equal(tid.long().cpu(), rid)
            rw = logits.sigmoid().gather(1, rid)
            assert torch.allclose(tw.cpu(), rw / (rw.sum(-1, keepdim=True) + 1e-20), rtol=1e-5)


@pytest.mark.parametrize("inter", [48, 256, 1500])
def test_routing_fused_silu_mul(inter):
    """act=(gu, out): the same launch writes silu_mul(gu) (kernels/silu_mul.py's kernel is the
    reference, same rounding points) on strided views of one fp32 [M, E + 2I] GEMM output, as
    the model's fused router + shared gate/up GEMM hands them over; routing is unchanged."""
    from atom_stream.kernels.silu_mul import silu_mul
    gen = torch.Generator().manual_seed(inter)
    E, top_k, M = 64, 6, 3
    dt = torch.float16
    out = (torch.randn(M, E + 2 * inter, generator=gen) * 2).to(DEV)
    logits, gu = out[:, :E], out[:, E:]
    bias = (torch.randn(E, generator=gen) * 0.5).to(DEV)
    act = torch.full((M, inter), float("nan"), dtype=dt, device=DEV)
    _tw, tid = moe_routing(logits, bias, top_k=top_k, act=(gu, act))
    _rw, rid = R.moe_routing_ref(logits, bias, top_k=top_k)
    assert torch.equal(tid.long().cpu(), rid.cpu())
    ref = silu_mul(gu, out=torch.empty(M, inter, dtype=dt, device=DEV))
    assert torch.equal(act, ref)
    with pytest.raises(ValueError):
        moe_routing(logits, bias, top_k=top_k, act=(gu, act[:, :-1]))


def test_routing_bias_selects_but_does_not_weight():
    logits = torch.randn(3, 16, device=DEV)
    bias = torch.zeros(16, device=DEV) - 5.0
    bias[[2, 9]] = 10.0  # forces experts 2 and 9 whatever their scores
    tw, tid = moe_routing(logits, bias, top_k=2, norm_topk_prob=False)
    assert sorted(tid[0].tolist()) == [2, 9]
    s = logits.sigmoid()
    assert torch.allclose(tw, s.gather(1, tid.long()), rtol=1e-5)


# ------------------------------------------------------------------------------- align
@pytest.mark.parametrize("parallel", [False, True, "scan64"],
                         ids=["one-program", "parallel", "parallel-scan64"])
@pytest.mark.parametrize("M,k,E,S,BM", [(1, 8, 32, 0, 16), (20, 4, 16, 0, 16), (37, 3, 9, 1, 4),
                                        (300, 8, 64, 0, 16), (70, 8, 384, 1, 16)])
def test_align(M, k, E, S, BM, parallel, monkeypatch):
    """Both forms (one program; one launch of cdiv(P, 128) programs) against the reference, with
    poisoned outputs; (300, 8, 64) spans 19 programs, (70, 8, 384, 1) a Kimi-like 385 experts.
    "scan64": the parallel form reading the ids 64 at a time (the loop long prefills take)."""
    if parallel == "scan64":
        import atom_stream.kernels.moe_align as A
        monkeypatch.setattr(A, "PAR_SCAN", 64)
        parallel = True
    gen = torch.Generator().manual_seed(M * E)
    ids = rand_ids(M, k, E - S, gen)
    nblk = max_blocks(M * (k + S), E, BM)
    sp = torch.full((nblk * BM,), -7, dtype=torch.int32, device=DEV)
    be = torch.full((nblk,), -7, dtype=torch.int32, device=DEV)
    moe_align(ids, E, BM, n_shared=S, out=(sp, be), parallel=parallel)
    idsx = R.with_shared(torch.rand(M, k), ids.cpu(), E - S, S)[1]
    ref = R.moe_align_ref(idsx, E, BM)
    P = M * (k + S)
    got = [(int(be[b]), [int(p) for p in sp[b * BM:(b + 1) * BM] if p < P])
           for b in range(len(ref))]
    assert got == ref
    assert (be[len(ref):] == -1).all() and (sp[len(ref) * BM:] == P).all()
    pad = torch.cat([sp[b * BM:(b + 1) * BM][len(r[1]):] for b, r in enumerate(ref)])
    assert (pad == P).all()


def test_align_parallel_equals_one_program_on_skewed_routing():
    """Skewed routing (most tokens on a few hot experts: many blocks for one expert, most
    experts empty) across several programs: the parallel form's tables equal the one-program
    form's, sentinel rows and unused blocks included (outputs poisoned differently)."""
    gen = torch.Generator().manual_seed(3)
    M, k, E, BM = 200, 8, 96, 16
    hot = torch.randperm(E, generator=gen)[:k]
    ids = rand_ids(M, k, E, gen).cpu()
    skew = torch.rand(M, generator=gen) < 0.8
    ids[skew] = hot[torch.argsort(torch.rand(int(skew.sum()), k, generator=gen), dim=1)].int()
    ids = ids.to(DEV)
    nblk = max_blocks(M * k, E, BM)
    outs = []
    for parallel, poison in ((False, -7), (True, -9)):
        sp = torch.full((nblk * BM,), poison, dtype=torch.int32, device=DEV)
        be = torch.full((nblk,), poison, dtype=torch.int32, device=DEV)
        moe_align(ids, E, BM, out=(sp, be), parallel=parallel)
        outs.append((sp.cpu(), be.cpu()))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert (outs[1][1] >= -1).all() and (outs[1][0] >= 0).all()


# ------------------------------------------------------------------------------- fused MoE
def make_experts(fmt, E, H, I, gen, device=DEV):
    """(kernel weights dict, dequantized float w13, w2) with random data of the format."""
    def fl(*s):
        return torch.randn(*s, generator=gen)

    if fmt == "bf16":
        w13, w2 = fl(E, 2 * I, H) / H ** 0.5, fl(E, H, I) / I ** 0.5
        dt = torch.bfloat16 if GPU else torch.float16
        w13, w2 = w13.to(dt), w2.to(dt)
        return {"w13": w13.to(device), "w2": w2.to(device)}, w13.float(), w2.float()
    if fmt == "fp8_block":
        q13, s13 = R.quant_fp8_block(fl(E, 2 * I, H) / H ** 0.5)
        q2, s2 = R.quant_fp8_block(fl(E, H, I) / I ** 0.5)
        return ({"w13": q13.to(device), "w2": q2.to(device), "w13_scale": s13.to(device),
                     "w2_scale": s2.to(device), "quant": "fp8_block"},
                R.dequant_fp8_block(q13, s13), R.dequant_fp8_block(q2, s2))
    if fmt == "int4_g32":
        q13 = torch.randint(-8, 8, (E, 2 * I, H), generator=gen)
        q2 = torch.randint(-8, 8, (E, H, I), generator=gen)
        s13 = (torch.rand(E, 2 * I, H // 32, generator=gen) + 0.5) / (4 * H ** 0.5)
        s2 = (torch.rand(E, H, I // 32, generator=gen) + 0.5) / (4 * I ** 0.5)
        s13, s2 = s13.bfloat16(), s2.bfloat16()
        return ({"w13": repack_int4_moe(R.pack_int4(q13)).to(device),
                     "w2": repack_int4_moe(R.pack_int4(q2)).to(device), "w13_scale": s13.to(device),
                     "w2_scale": s2.to(device), "quant": "int4_g32"},
                R.dequant_int4(q13, s13), R.dequant_int4(q2, s2))
    assert fmt in ("mxfp4", "mxfp4_raw")
    m13 = torch.randint(0, 256, (E, 2 * I, H // 2), generator=gen, dtype=torch.uint8)
    m2 = torch.randint(0, 256, (E, H, I // 2), generator=gen, dtype=torch.uint8)
    e13 = torch.randint(118, 124, (E, 2 * I, H // 32), generator=gen, dtype=torch.uint8)
    e2 = torch.randint(118, 124, (E, H, I // 32), generator=gen, dtype=torch.uint8)
    ref = (R.dequant_mxfp4(m13, e13), R.dequant_mxfp4(m2, e2))
    if fmt == "mxfp4":
        m13, m2 = repack_mxfp4_moe(m13), repack_mxfp4_moe(m2)
    d = {"w13": m13.to(device), "w2": m2.to(device), "w13_scale": e13.to(device),
             "w2_scale": e2.to(device), "quant": "mxfp4", "allow_emulated_fp4": True}
    return (d, *ref)


CASES = [  # (format, activation_quant, x dtype, tolerance)
    ("bf16", None, torch.float16, 5e-3),
    ("fp8_block", None, torch.float16, 5e-3),
    ("fp8_block", "fp8", torch.float32, 1e-5),
    ("int4_g32", None, torch.float16, 5e-3),
    ("int4_g32", None, torch.float32, 1e-5),
    ("mxfp4", None, torch.float16, 5e-3),
    ("mxfp4", "mxfp4", torch.float32, 1e-5),
    ("mxfp4_raw", None, torch.float16, 5e-3),
    ("mxfp4_raw", "mxfp4", torch.float32, 1e-5),
]
QDQ = {None: None, "fp8": R.qdq_fp8_act, "mxfp4": R.qdq_mxfp4}


def check_fused(fmt, aq, xdt, tol, M, E, H, I, k, n_shared=0, config=None, seed=0,
                repeat=False):
    gen = torch.Generator().manual_seed(seed)
    kw, w13, w2 = make_experts(fmt, E, H, I, gen)
    x = torch.randn(M, H, generator=gen).to(xdt).to(DEV)
    ids = rand_ids(M, k, E - n_shared, gen)
    tw = (torch.rand(M, k, generator=gen) + 0.1).to(DEV)
    if repeat:  # expert parallel: other ranks' picks become local 0 at weight 0 (column 2 here
        # repeats column 0 at weight 0); token 0 also repeats an expert at a nonzero weight
        ids[:, 2] = ids[:, 0]
        tw[:, 2] = 0.0
        ids[0, 1] = ids[0, 0]
    out = torch.full((M, H), float("nan"), dtype=xdt, device=DEV)
    y = fused_moe(x, kw.pop("w13"), kw.pop("w2"), tw, ids, activation_quant=aq,
                  n_shared=n_shared, out=out, config=config, **kw)
    assert y is out
    ref = R.fused_moe_ref(x.cpu(), w13, w2, tw.cpu(), ids.cpu(), act_qdq=QDQ[aq],
                          n_shared=n_shared)
    err = rel_err(y.cpu(), ref)
    assert err < tol, f"{fmt}/{aq}/{xdt}: rel err {err:.3g}"


# few programs: the interpreter runs each one in Python
FAST = {"BN1": 64, "BN2": 128, "G1": 64, "G2": 128, "GC": 2}


@cpu_only
@pytest.mark.parametrize("fmt,aq,xdt,tol", CASES)
@pytest.mark.parametrize("M", [3, 19])  # 4-bit: GEMV path at 3; tensor-core sorted path at 19
def test_fused_moe_interpreted(fmt, aq, xdt, tol, M):
    check_fused(fmt, aq, xdt, tol, M, E=8, H=256, I=128, k=3, config=FAST, seed=M)


@cpu_only
@pytest.mark.parametrize("fmt,aq,xdt,tol", [c for c in CASES if c[0] in ("int4_g32", "mxfp4")])
def test_fused_moe_tensor_core_direct_mode(fmt, aq, xdt, tol):
    # 4-bit formats at M <= 16 through the tensor-core kernels without align (gemv_max=0)
    check_fused(fmt, aq, xdt, tol, 5, E=8, H=256, I=128, k=3, config=dict(FAST, gemv_max=0),
                seed=11)


@cpu_only
@pytest.mark.parametrize("fmt,aq,xdt,tol", CASES)
def test_fused_moe_direct_mode_repeated_ids(fmt, aq, xdt, tol):
    # tensor-core direct mode (M <= 16, no align) with a token repeating an expert id (at weight
    # 0 and > 0); intermediates poisoned with NaN so an unwritten y row reaches the output
    check_fused(fmt, aq, xdt, tol, 5, E=8, H=256, I=128, k=3, seed=21, repeat=True,
                config=dict(FAST, gemv_max=0, poison=True))


@cpu_only
@pytest.mark.parametrize("fmt,aq,xdt,tol", [c for c in CASES if c[0] in ("int4_g32", "mxfp4")]
                         + [("bf16", None, torch.float16, 5e-3)])
@pytest.mark.parametrize("M", [2, 19])
def test_fused_moe_gemv_and_sorted_repeated_ids(fmt, aq, xdt, tol, M):
    # the same routing through GEMV (4-bit, M=2) and sorted mode (M=19)
    check_fused(fmt, aq, xdt, tol, M, E=8, H=256, I=128, k=3, seed=22 + M, repeat=True,
                config=dict(FAST, poison=True))


@cpu_only
@pytest.mark.parametrize("fmt,aq,xdt,tol", [c for c in CASES
                                            if c[0] in ("int4_g32", "mxfp4") and c[1] is None])
@pytest.mark.parametrize("M,sk", [(1, 2), (3, 4)])
def test_fused_moe_gemv_split_k(fmt, aq, xdt, tol, M, sk):
    # the split-K GEMV gate_up (atomic fp32 partial sums, SiLU*mul formed in the down kernel)
    check_fused(fmt, aq, xdt, tol, M, E=8, H=512, I=128, k=3, seed=30 + M,
                config=dict(FAST, GC=1, SK=sk, poison=True), repeat=M > 2)


@cpu_only
@pytest.mark.parametrize("M,cfg", [(1, None), (18, None),
                                   (18, {"gemv_max": 32, "G1": 64, "G2": 128}),
                                   (5, {"gemv_max": 0, "small_m_max": 0})])
def test_fused_moe_shared_expert_and_default_tiles(M, cfg):
    # shared expert appended as 2 experts (intermediate 2 x I); default tiles (the down's NT2
    # clamped to H's 2 tiles here), sorted mode at M=18, direct at 5; GEMV at M=18 too
    check_fused("int4_g32", None, torch.float16, 5e-3, M, E=10, H=256, I=128, k=2, n_shared=2,
                config=cfg, seed=5 + M)


# DQ variants of the tensor-core K loop (kernels/fused_moe_common.py `_step4s`): group scales
# folded into the 16-bit weight operand (DQ=1: one MMA per scale group; DQ=2: one MMA per 128-K
# chunk with K interleaved); 2 warps (mma.sync on Hopper) is a config like any other. The
# interpreter runs the int4 fp16 branch (bf16 elementwise math is broken in the interpreter; the
# bf16 branches run in the GPU tests below). MXFP4 with fp16 activations and fp32 activations
# ignore DQ (the checks make sure the flag does not break them).
# DQ 3 (the int4 unpack in inline PTX) runs as DQ 1 here (tests/test_moe_int4_asm.py: the GPU).
DQ_CFGS = [{"DQ": 1}, {"DQ": 1, "W1": 2, "W2": 2, "BN1": 32, "BN2": 32, "XM": 1}, {"DQ": 2},
           {"DQ": 2, "BK1": 256, "BK2": 128}, {"DQ": 3}]


@cpu_only
@pytest.mark.parametrize("dq", DQ_CFGS, ids=["dq1", "dq1w2xm", "dq2", "dq2bk", "dq3"])
@pytest.mark.parametrize("fmt,xdt,tol", [("int4_g32", torch.float16, 5e-3),
                                         ("int4_g32", torch.float32, 1e-5),
                                         ("mxfp4", torch.float16, 5e-3)], ids=["i4h", "i4f", "mxh"])
@pytest.mark.parametrize("M", [5, 19])  # direct mode (gemv_max=0) at 5, sorted at 19
def test_fused_moe_dq_variants(dq, fmt, xdt, tol, M):
    check_fused(fmt, None, xdt, tol, M, E=8, H=256, I=128, k=3, seed=40 + M, repeat=True,
                config=dict(FAST, gemv_max=0, poison=True, **dq))


# cfg F16 (the AMD default): int4 with bf16 activations on fp16 MMAs, both tensor-core modes
# and both DQ branches the interpreter runs (DQ 1 and DQ 0), a repeated expert
@cpu_only
@pytest.mark.parametrize("cfg", [{"DQ": 1, "F16": 1}, {"DQ": 1, "F16": 2}, {"DQ": 3, "F16": 2},
                                 {"DQ": 0, "F16": 2}], ids=["dq1", "dq1both", "dq3", "dq0"])
@pytest.mark.parametrize("M", [5, 19])
def test_fused_moe_int4_f16_mma_with_bf16_activations(cfg, M):
    # 1e-2: bf16 act and output roundings (the bf16 GPU tests' bound; the bf16-MMA path in the
    # interpreter gives the same 0.009)
    check_fused("int4_g32", None, torch.bfloat16, 1e-2, M, E=8, H=256, I=128, k=3,
                seed=60 + M, repeat=True,
                config=dict(FAST, gemv_max=0, small_m_max=0, poison=True, **cfg))


@cpu_only
@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # silu of a -6e4 gate: 0
@pytest.mark.parametrize("f16", [1, 2])
def test_fused_moe_int4_f16_saturates_activations_beyond_fp16(f16):
    """bf16 activations past fp16's range (1e5) enter the fp16 MMAs as +-65504: the expert
    inputs (F16 1) or the inputs and the intermediate (F16 2); finite output, equal to the
    reference that saturates the same."""
    gen = torch.Generator().manual_seed(3)
    kw, w13, w2 = make_experts("int4_g32", 8, 256, 128, gen)
    x = torch.randn(6, 256, generator=gen)
    x[1, 7], x[4, 100] = 1e5, -3e5
    x = x.bfloat16()
    ids = rand_ids(6, 3, 8, gen)
    tw = torch.rand(6, 3, generator=gen) + 0.1
    out = torch.full((6, 256), float("nan"), dtype=torch.bfloat16)
    fused_moe(x, kw.pop("w13"), kw.pop("w2"), tw, ids, out=out,
              config=dict(FAST, gemv_max=0, small_m_max=0, F16=f16), **kw)
    assert torch.isfinite(out).all()
    ref = R.fused_moe_ref(x.float(), w13, w2, tw, ids, act_qdq=lambda t: t.clamp(-65504, 65504),
                          act_qdq2=(lambda t: t) if f16 == 1 else None)
    assert rel_err(out, ref) < 1e-2


def test_f16_mma_is_the_int4_default_on_amd_only(monkeypatch):
    from atom_stream.kernels.fused_moe import INT4, MXFP4, default_config
    monkeypatch.setattr(torch.version, "hip", None)
    assert default_config(INT4, 16, 144, 385, 7168, 256)["F16"] == 0
    monkeypatch.setattr(torch.version, "hip", "7.0.0")
    assert default_config(INT4, 16, 144, 385, 7168, 256)["F16"] == 1  # the gate_up only
    assert not default_config(MXFP4, 16, 144, 385, 7168, 256)["F16"]


def test_tensor_cores_take_m_from_3_where_dq3_compiles():
    # NVIDIA (tc_small: has_dq3_asm): 4-bit weight-only M >= TC_FROM_M on the tensor-core direct
    # mode, below it the small-M path; elsewhere (AMD, the interpreter) the small-M / GEMV caps
    # stay; w4a4 and explicit configs are untouched
    from atom_stream.kernels import fused_moe as F
    for fmt in (F.INT4, F.MXFP4):
        for M in (1, 2, 3, 4, 8):
            nv = F.default_config(fmt, M, M * 8, 384, 7168, 256, 0, 16, True)
            other = F.default_config(fmt, M, M * 8, 384, 7168, 256, 0, 16)
            small = 0 < M <= nv["small_m_max"] or M <= nv["gemv_max"]
            assert small == (M < F.TC_FROM_M) and nv["direct"]
            assert other["small_m_max"] == F.small_m_max() and other["gemv_max"] == 8
    w4a4 = F.default_config(F.MXFP4, 4, 32, 384, 7168, 256, F.A_MXFP4, 16, True)
    assert w4a4["small_m_max"] == 0 and w4a4["gemv_max"] == 16


@cpu_only
@pytest.mark.parametrize("fmt,aq,xdt,tol", CASES)
def test_fused_moe_direct_mode_routed_rows_only(fmt, aq, xdt, tol):
    # XM=1: direct-mode gate_up loads only the rows of tokens routed to its expert (the others
    # are zeros and never read by the down kernel); every format, repeated ids, poisoned
    check_fused(fmt, aq, xdt, tol, 6, E=8, H=256, I=128, k=3, seed=23, repeat=True,
                config=dict(FAST, gemv_max=0, poison=True, XM=1))


@cpu_only
@pytest.mark.parametrize("fmt,aq,xdt,tol", [c for c in CASES if c[0] != "mxfp4_raw"])
@pytest.mark.parametrize("dq", [0, 1])
def test_fused_moe_down_pipelined(fmt, aq, xdt, tol, dq):
    # DU=0: the down kernel's K loop over I as a (pipelined) loop of 2 iterations, not unrolled;
    # with the DQ=1 K loop, 2 warps, sorted mode, repeated ids, poisoned intermediates
    check_fused(fmt, aq, xdt, tol, 19, E=8, H=256, I=256, k=3, seed=50 + dq, repeat=True,
                config=dict(FAST, poison=True, DU=0, BK2=128, S2=3, DQ=dq, W2=2))


@cpu_only
@pytest.mark.parametrize("fmt,aq,xdt,tol", [c for c in CASES if c[0] != "mxfp4_raw"])
@pytest.mark.parametrize("M,nt", [(5, 2), (19, 4)])
def test_fused_moe_down_n_tiles_per_program(fmt, aq, xdt, tol, M, nt):
    # NT2: each down program loops over nt consecutive n-tiles of its block (direct mode at
    # M=5, sorted at 19), repeated ids, poisoned intermediates
    check_fused(fmt, aq, xdt, tol, M, E=8, H=256, I=128, k=3, seed=90 + nt, repeat=True,
                config=dict(FAST, poison=True, NT2=nt, BN2=256 // (2 * nt), gemv_max=0,
                            small_m_max=0))


@cpu_only
@pytest.mark.parametrize("fmt,xdt,tol", [("int4_g32", torch.float16, 5e-3),
                                         ("mxfp4", torch.float16, 5e-3),
                                         ("bf16", torch.float16, 5e-3)], ids=["i4", "mx", "bf"])
@pytest.mark.parametrize("BM,M", [(32, 70), (64, 150), (128, 150)])
def test_fused_moe_sorted_mode_wide_blocks(fmt, xdt, tol, BM, M):
    # prefill-sized blocks (BM tokens per expert block, the MMA's N side): several blocks per
    # expert, partial last blocks, a token repeating an expert, poisoned intermediates
    check_fused(fmt, None, xdt, tol, M, E=8, H=256, I=128, k=3, seed=70 + BM, repeat=True,
                config=dict(FAST, BM=BM, poison=True))


def test_default_down_tiles():
    # int4: 128-row down tiles, 7 per program on 4 warps at every tensor-core M (session 20);
    # MXFP4: its 64-row tiles on 2 warps, 7 per program in sorted mode only
    from atom_stream.kernels.fused_moe import default_config
    from atom_stream.kernels.fused_moe_common import INT4, MXFP4

    def down(fmt, M):
        c = default_config(fmt, M, M * 8, 384, 7168, 256, 0, 16)
        return c["BN2"], c["W2"], c.get("NT2", 1)
    assert [down(INT4, M) for M in (3, 16, 64, 256)] == [(128, 4, 7)] * 4
    assert [down(MXFP4, M) for M in (16, 64, 256)] == [(64, 2, 1), (64, 2, 7), (64, 2, 7)]


def test_default_gate_up_tiles_of_int4_direct_mode():
    # int4, row-tiled w13: 32-row gate_up tiles up to M=4 and 64 up to M=8, both with 256-K
    # steps (session 30), 128 rows at 8 < M <= 16 (session 29), where the expert intermediate
    # (and for BK1 the hidden size) divides into them; 64 rows, 128-K steps in sorted mode
    from atom_stream.kernels.fused_moe import default_config
    from atom_stream.kernels.fused_moe_common import INT4

    def tiles(M, I=256, wt=16, H=7168):
        c = default_config(INT4, M, M * 8, 384, H, I, 0, wt, True)
        return c["BN1"], c["BK1"]
    assert [tiles(M) for M in (3, 4, 5, 8, 9, 16, 17, 64)] == [
        (32, 256), (32, 256), (64, 256), (64, 256), (128, 128), (128, 128), (64, 128),
        (64, 128)]
    assert tiles(16, I=192) == (64, 128) and tiles(16, wt=1) == (16, 128)
    assert tiles(4, H=7168 + 128) == (64, 128) and tiles(4, wt=1) == (16, 128)


def test_default_block_rows_grow_with_prefill_m():
    # int4: 16 tokens per expert block up to M=512, then 32, then 64 above 2048 (measured);
    # MXFP4 keeps 16 (not measured)
    from atom_stream.kernels.fused_moe import default_config
    from atom_stream.kernels.fused_moe_common import INT4, MXFP4
    bm = {M: default_config(INT4, M, M * 9, 385, 7168, 256, 0, 16)["BM"]
          for M in (16, 256, 512, 513, 2048, 2049, 8192)}
    assert bm == {16: 16, 256: 16, 512: 16, 513: 32, 2048: 32, 2049: 64, 8192: 64}
    assert default_config(MXFP4, 8192, 8192 * 9, 385, 7168, 256, 0, 16)["BM"] == 16


@cpu_only
def test_fused_moe_int4_prefill_defaults():
    # M > 512 at the default block rows (32 tokens), int4 sorted mode, poisoned intermediates
    check_fused("int4_g32", None, torch.float16, 5e-3, 600, E=8, H=256, I=128, k=3, seed=81,
                repeat=True, config=dict(FAST, poison=True))


@cpu_only
def test_fused_moe_env_config_reaches_the_kernels(monkeypatch):
    # ATOM_STREAM_MOE_CFG (a decode-step A/B knob) overrides the defaults; "AP" sends sorted
    # mode's align to the one-launch form; an explicit config still wins over the env
    import atom_stream.kernels.fused_moe as fm
    import atom_stream.kernels.fused_moe_tc as tc
    seen = []
    real = tc.moe_align

    def spy(*a, **kw):
        seen.append(kw.get("parallel"))
        return real(*a, **kw)

    monkeypatch.setattr(tc, "moe_align", spy)
    # read at import: the module attribute as the variable's value would make it
    monkeypatch.setattr(fm, "ENV_CONFIG",
                        fm.parse_env_config(json.dumps(dict(FAST, AP=True, poison=True))))
    check_fused("int4_g32", None, torch.float16, 5e-3, 19, E=8, H=256, I=128, k=3, seed=61,
                repeat=True)
    check_fused("int4_g32", None, torch.float16, 5e-3, 19, E=8, H=256, I=128, k=3, seed=62,
                config={"AP": False})
    assert seen == [True, False]
    with pytest.raises(ValueError, match="JSON object"):
        fm.parse_env_config("[1]")
    assert fm.parse_env_config(None) == {} and fm.parse_env_config("  ") == {}
    # and the variable itself, read when the module is imported
    import os
    import subprocess
    import sys
    env = dict(os.environ, ATOM_STREAM_MOE_CFG='{"AP": true, "BN2": 128}')
    code = ("from atom_stream.kernels import fused_moe as f; import json; "
            "print(json.dumps(f.ENV_CONFIG))")
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                         capture_output=True, text=True).stdout
    assert json.loads(out) == {"AP": True, "BN2": 128}


@cpu_only
def test_fused_moe_dq_int4_fp16_is_scaled_in_fp16():
    # DQ=1 rounds each scaled int4 weight to fp16 once (q * s), DQ=0 keeps q exact and scales
    # the fp32 partial sums: both match the float64 reference, and they differ from each other
    # (so the DQ path really ran), by no more than fp16 weight rounding allows
    outs = []
    for dq in (0, 1):
        gen = torch.Generator().manual_seed(7)
        kw, w13, w2 = make_experts("int4_g32", 8, 256, 128, gen)
        x = torch.randn(19, 256, generator=gen).half()
        ids = rand_ids(19, 3, 8, gen)
        tw = torch.rand(19, 3, generator=gen) + 0.1
        outs.append(fused_moe(x, kw.pop("w13"), kw.pop("w2"), tw, ids,
                              config=dict(FAST, DQ=dq), **kw).double())
    ref = R.fused_moe_ref(x, w13, w2, tw, ids)
    assert rel_err(outs[0], ref) < 5e-3 and rel_err(outs[1], ref) < 5e-3
    assert not torch.equal(outs[0], outs[1])
    assert rel_err(outs[1], outs[0]) < 2e-3


def test_mxfp4_bf16_bit_trick_matches_dequant():
    # torch mirror of `_dq16`'s MXFP4 bf16 branch (the interpreter cannot run bf16 math):
    # kernel-layout word -> bf16 bits of e2m1 * 2^-126 per 16-bit half, times 2^63 and
    # 2^(e - 64) in bf16 = the exact dequantized weight, for every e8m0 byte in [1, 191]
    gen = torch.Generator().manual_seed(8)
    p = torch.randint(0, 256, (191, 64), generator=gen, dtype=torch.uint8)
    e8 = torch.arange(1, 192, dtype=torch.uint8)[:, None].expand(191, 4).contiguous()
    k = R.repack_mxfp4(p)[:, 0, :]  # [191, 16] words of one 128-K chunk
    want = R.dequant_mxfp4(p, e8).unflatten(-1, (4, 16, 2))  # [row, j, t, h]
    sign = -2147450880
    for j in range(4):
        if j == 3:
            v = ((k >> 3) & 0x01C001C0) | (k & sign)
        else:
            v = ((k << (6 - 3 * j)) & 0x01C001C0) | ((k << (3 - j)) & sign)
        scale = ((e8[:, j].int() + 63) << 7).to(torch.int16).view(torch.bfloat16)
        for h in range(2):
            bits = ((v >> (16 * h)) & 0xFFFF).to(torch.int32)
            b = torch.where(bits >= 2**15, bits - 2**16, bits).to(torch.int16).view(torch.bfloat16)
            got = (b * 2.0 ** 63) * scale[:, None]
            assert got.dtype == torch.bfloat16
            assert torch.equal(got.float(), want[:, j, :, h])


def test_fused_moe_rejects_raw_int4_layout():
    w = torch.zeros(2, 256, 32, dtype=torch.int32)
    x = torch.randn(1, 256)
    with pytest.raises(NotImplementedError):
        fused_moe(x, w, torch.zeros(2, 256, 16, dtype=torch.int32), torch.ones(1, 1),
                  torch.zeros(1, 1, dtype=torch.int32), quant="int4_g32",
                  w13_scale=torch.ones(2, 256, 8), w2_scale=torch.ones(2, 256, 4))


# ------------------------------------------------------------------------------- formats
def test_int4_pack_spec_and_round_trips():
    q = torch.arange(-8, 8).repeat(2)  # nibbles q + 8 = 0..15, LSB first
    w = R.pack_int4(q)
    assert w.tolist() == [0x76543210, 0xFEDCBA98 - 2**32] * 2
    gen = torch.Generator().manual_seed(1)
    q = torch.randint(-8, 8, (3, 5, 256), generator=gen)
    assert torch.equal(R.unpack_int4(R.pack_int4(q)), q.to(torch.int8))
    k = R.repack_int4(R.pack_int4(q))
    assert k.shape == (3, 5, 2, 16) and k.dtype == torch.int32  # still 4 bits per weight
    assert torch.equal(R.unrepack_int4(k), q.to(torch.int8))
    # the documented kernel order: nibble j (+4h) of word t in chunk c is k = 128c + 32j + 2t + h
    for c, j, t, h in ((0, 0, 0, 0), (1, 3, 15, 1), (0, 2, 7, 1), (1, 1, 4, 0)):
        nib = (k[..., c, t] >> (4 * (j + 4 * h))) & 0xF
        assert torch.equal(nib - 8, q[..., 128 * c + 32 * j + 2 * t + h])


def test_mxfp4_pack_spec_and_round_trips():
    assert R.pack_fp4(torch.tensor([1, 2, 0xF, 0x8])).tolist() == [0x21, 0x8F]
    assert R.e2m1_values(torch.arange(16)).tolist() == list(R.E2M1) + [-v for v in R.E2M1]
    gen = torch.Generator().manual_seed(2)
    p = torch.randint(0, 256, (2, 3, 128), generator=gen, dtype=torch.uint8)
    assert torch.equal(R.pack_fp4(R.unpack_fp4(p)), p)
    k = R.repack_mxfp4(p)
    assert k.shape == (2, 3, 2, 16) and torch.equal(R.unrepack_mxfp4(k), p)
    # the kernel's extraction gives fp16 bit patterns of e2m1 * 2^-14 for element 128c+32j+2t+h
    vals = R.e2m1_values(R.unpack_fp4(p))
    for j in range(4):
        v = ((k << (9 - 3 * j)) & 0x0E000E00) | ((k << (3 - j)) & -2147450880)
        for h in range(2):
            bits = ((v >> (16 * h)) & 0xFFFF).to(torch.int32)
            f16 = torch.where(bits >= 2**15, bits - 2**16, bits).to(torch.int16).view(torch.float16)
            want = vals.unflatten(-1, (2, 4, 16, 2))[..., :, j, :, h]  # [.., c, t]
            assert torch.equal(f16.float() * 2 ** 14, want)


def test_mxfp4_quant_rules():
    # a group whose amax is 6 * 2^e keeps scale 2^e; ties round to the even code
    x = torch.full((1, 32), 0.5)
    x[0, :8] = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    q, s = R.quant_mxfp4(x)
    assert s.tolist() == [[127]]
    codes = R.unpack_fp4(q)[0, :8].tolist()
    assert codes == [7, 0, 2, 2, 4, 4, 6, 6]
    gen = torch.Generator().manual_seed(3)
    y = torch.randn(4, 64, generator=gen) * 3
    d = R.qdq_mxfp4(y)
    assert torch.equal(R.qdq_mxfp4(d), d)  # idempotent: representable values are exact
    assert ((d - y).abs() <= y.abs().unflatten(-1, (-1, 32)).amax(-1).repeat_interleave(32, -1)
            / 4 + 1e-7).all()


def test_fp8_block_round_trip():
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(200, 300, generator=gen)
    q, s = R.quant_fp8_block(w)
    assert q.shape == w.shape and s.shape == (2, 3)
    assert rel_err(R.dequant_fp8_block(q, s), w) < 0.05
    q2, s2 = R.quant_fp8_block(R.dequant_fp8_block(q, s))
    assert torch.equal(R.dequant_fp8_block(q2, s2), R.dequant_fp8_block(q, s))


# ------------------------------------------------------------------------------- GPU
GPU_CASES = [("bf16", None, 1e-2), ("fp8_block", None, 1e-2), ("fp8_block", "fp8", 2e-2),
             ("int4_g32", None, 1e-2), ("mxfp4", None, 1e-2), ("mxfp4", "mxfp4", 2e-2)]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("fmt,aq,tol", GPU_CASES)
@pytest.mark.parametrize("M,config", [(1, None), (1, {"small_m_max": 0}), (77, None)])
def test_fused_moe_gpu(fmt, aq, tol, M, config):
    # M=1: the default (the small-M kernel for 4-bit weight-only) and the GEMV path
    check_fused(fmt, aq, torch.bfloat16, tol, M, E=64, H=1024, I=256, k=8, seed=M,
                config=config)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("fmt,aq", [("int4_g32", None), ("mxfp4", None), ("mxfp4", "mxfp4")])
def test_fused_moe_gpu_other_paths(fmt, aq):
    # GEMV path at M=16 and the tensor-core kernels in direct mode (no align)
    check_fused(fmt, aq, torch.bfloat16, 2e-2, 16, E=64, H=1024, I=256, k=8, seed=3,
                config={"gemv_max": 16})
    check_fused(fmt, aq, torch.bfloat16, 2e-2, 5, E=64, H=1024, I=256, k=8, seed=4,
                config={"gemv_max": 0})


@pytest.mark.gpu
@needs_gpu
def test_fused_moe_gpu_shared_and_raw_fp4():
    check_fused("int4_g32", None, torch.bfloat16, 1e-2, 33, E=34, H=512, I=256, k=6, n_shared=2)
    try:
        check_fused("mxfp4_raw", None, torch.bfloat16, 1e-2, 5, E=16, H=512, I=256, k=4)
    except Exception as e:  # noqa: BLE001 -- emulated tl.dot_scaled is a comparison path, not the H200 one
        pytest.skip(f"tl.dot_scaled unavailable here: {type(e).__name__}")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("M", [4, 40])
def test_fused_moe_cuda_graph_replay(M):
    gen = torch.Generator().manual_seed(M)
    kw, w13, w2 = make_experts("int4_g32", 32, 512, 256, gen)
    x = torch.randn(M, 512, generator=gen).bfloat16().cuda()
    ids = rand_ids(M, 8, 32, gen)
    tw = torch.rand(M, 8, generator=gen).cuda()
    args = (kw.pop("w13"), kw.pop("w2"))
    fused_moe(x, *args, tw, ids, **kw)  # compile outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = fused_moe(x, *args, tw, ids, **kw)
    for _ in range(2):
        x.copy_(torch.randn(M, 512, generator=gen).bfloat16())
        ids.copy_(rand_ids(M, 8, 32, gen))
        y.fill_(float("nan"))
        g.replay()
        ref = R.fused_moe_ref(x.cpu(), w13, w2, tw.cpu(), ids.cpu())
        assert rel_err(y.cpu(), ref) < 1e-2


_REAL = {}


def real_experts(fmt):
    """Kimi-K2.5 TP8 rank shapes (H 7168, I 256) with 32 experts (the reference dequantizes
    every expert in float64 on the CPU), built once per format."""
    if fmt not in _REAL:
        _REAL[fmt] = make_experts(fmt, 32, 7168, 256, torch.Generator().manual_seed(99))
    kw, w13, w2 = _REAL[fmt]
    return dict(kw), w13, w2


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("fmt", ["int4_g32", "mxfp4"])
@pytest.mark.parametrize("M", [16, 256])
@pytest.mark.parametrize("cfg", [
    {}, {"DQ": 1}, {"DQ": 1, "W1": 2, "W2": 2, "BN1": 32, "DU": 0, "BK2": 128, "S2": 3},
    {"DQ": 1, "W1": 2, "W2": 2, "BN1": 16, "BN2": 32, "XM": 1}, {"DQ": 2, "BN1": 64},
    {"AP": True, "BN2": 128, "W2": 8}, {"AP": True, "BN2": 256, "W2": 8},
    {"AP": True, "BN2": 128, "BK2": 256, "DU": 1, "W2": 8}, {"AP": True, "BK2": 256, "DU": 1},
    {"F16": 1}, {"F16": 2}, {"NT2": 4}, {"NT2": 7, "S2": 4}],
    ids=["old", "dq1", "dq1w2du", "dq1w2xm", "dq2", "ap128", "ap256", "ap128k", "apk", "f16",
         "f16both", "nt4", "nt7"])
def test_fused_moe_gpu_real_shape_dq(fmt, M, cfg):
    # bf16 activations through the bf16 DQ branches (int4 scaled in bf16, MXFP4 exact in bf16),
    # both tensor-core modes (direct at M=16), a token repeating an expert at weight 0 and > 0,
    # intermediates poisoned
    gen = torch.Generator().manual_seed(M + len(cfg))
    kw, w13, w2 = real_experts(fmt)
    x = torch.randn(M, 7168, generator=gen).bfloat16().cuda()
    ids = rand_ids(M, 8, 32, gen)
    tw = (torch.rand(M, 8, generator=gen) + 0.1).cuda()
    ids[:, 2] = ids[:, 0]
    tw[:, 2] = 0.0
    ids[0, 1] = ids[0, 0]
    out = torch.full((M, 7168), float("nan"), dtype=torch.bfloat16, device="cuda")
    fused_moe(x, kw.pop("w13"), kw.pop("w2"), tw, ids, out=out,
              config=dict(cfg, gemv_max=0, poison=True), **kw)
    ref = R.fused_moe_ref(x.cpu(), w13, w2, tw.cpu(), ids.cpu())
    assert rel_err(out.cpu(), ref) < 1e-2


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("M", [600, 2100])
def test_fused_moe_gpu_prefill_block_rows(M):
    # int4 at prefill M with the default 32 / 64-token expert blocks (real Kimi rank shapes,
    # 32 experts so every expert holds many pairs), a repeated expert, poisoned intermediates
    gen = torch.Generator().manual_seed(M)
    kw, w13, w2 = real_experts("int4_g32")
    x = torch.randn(M, 7168, generator=gen).bfloat16().cuda()
    ids = rand_ids(M, 8, 32, gen)
    tw = (torch.rand(M, 8, generator=gen) + 0.1).cuda()
    ids[0, 1] = ids[0, 0]
    out = torch.full((M, 7168), float("nan"), dtype=torch.bfloat16, device="cuda")
    fused_moe(x, kw.pop("w13"), kw.pop("w2"), tw, ids, out=out, config={"poison": True}, **kw)
    ref = R.fused_moe_ref(x.cpu(), w13, w2, tw.cpu(), ids.cpu())
    assert rel_err(out.cpu(), ref) < 1e-2


def test_parallel_align_scan_has_two_classes_both_warmed_up():
    # each scan width is a compiled variant: two, the small one met by the 64-token warm-up
    # prefill (64 x 9 pairs), the large one by the 256 / 1024-token ones (Kimi: top-8 + shared)
    from atom_stream.kernels.moe_align import PAR_SCAN, SMALL_SCAN, par_scan

    from atom_stream.engine.model_runner import WARMUP_PREFILL_LENS
    assert {par_scan(p) for p in range(1, 20000, 7)} == {SMALL_SCAN, PAR_SCAN}
    assert {par_scan(m * 9) for m in WARMUP_PREFILL_LENS} == {SMALL_SCAN, PAR_SCAN}
