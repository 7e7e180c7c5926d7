"""kernels/moe_m1_gate_up.py (the per-pair gate_up behind config "M1" /
ATOM_STREAM_MOE_M1_KERNEL at M == 1 and ATOM_STREAM_MOE_PAIR_M_MAX at M > 1) against
kernels/moe_ref.py, the small-M path it replaces and fused_moe's default dispatch.

CPU: TRITON_INTERPRET=1 at tiny shapes (H=256, I=128, E=8-16, top-2..4; the interpreter runs
each program in Python, so large MR: few programs). Fresh random inputs every check (never
zeros), repeated expert ids inside a token (one at weight 0, as expert parallelism gives) and
across tokens (M = 2, 3, 5), shared experts, a hidden row stride != H; act and output poisoned
with NaN first. fp32 output: rel L2 < 1e-5 against the float64 reference and against the old
path (both exact up to fp32 summation order); bf16: 1e-2.
`-m gpu`: the Kimi-K2.5 TP8 rank shape (H=7168, I=256, E=384, top-8): at M = 1 the default MR 4
and the neighbours, PDL, and a CUDA-graph replay with new routing; at M = 2, 4, 16, 32 the
per-pair path through fused_moe against the float64 reference and fused_moe's default
dispatch, and a CUDA-graph replay at M = 32.
"""

from __future__ import annotations

import functools
import importlib

import pytest
import torch
from kernel_interp import interpret_without_gpu

GPU = interpret_without_gpu(  # dependencies first
    "moe_routing", "moe_align", "fused_moe_common", "fused_moe_tc", "fused_moe_gemv",
    "fused_moe_fp8", "moe_small_m_kernels", "moe_m1_gate_up", "moe_gemv_ladder", "moe_small_m",
    "fused_moe")

from atom_stream.kernels import fused_moe as FM
from atom_stream.kernels import moe_m1_gate_up as M1
from atom_stream.kernels import moe_ref as R
from atom_stream.kernels import moe_small_m as SM
from atom_stream.kernels.moe_gemv_ladder import act_natural
from atom_stream.kernels.moe_small_m_kernels import INT4, MXFP4
from test_moe_small_m import fused_both, make_experts, make_routing, rel_err

cpu_only = pytest.mark.skipif(GPU, reason="interpreter tests run where there is no GPU")
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a GPU")
DEV = "cuda" if GPU else "cpu"
OLD = {"M1": 0, "BN": 128, "BN2": 256}  # the old path in few programs (interpreter)


def both_paths(fmt, E, H, I, k, m1_cfg, seed, n_shared=0, out_dtype=torch.float32, dense=True,
               repeat=True):
    """(y_new, y_old, reference) for one fresh token and routing: the M1 path with m1_cfg, the
    old small-M path, and the float64 reference (fused_moe_ref on the dense dequantized weights,
    or moe_small_m_ref on the kernel layout when dense=False)."""
    gen = torch.Generator().manual_seed(seed)
    (w13, w2, s13, s2), (d13, d2) = make_experts(fmt, E, H, I, gen, dense=dense)
    x = torch.randn(1, H, generator=gen).bfloat16().to(DEV)
    ids, tw = make_routing(1, k, E - n_shared, gen, repeat)  # repeat: columns 1, 2 = column 0
    ys = []
    for cfg in (dict(m1_cfg, M1=1), OLD if dense else {"M1": 0}):
        out = torch.full((1, H), float("nan"), dtype=out_dtype, device=DEV)
        y = SM.moe_small_m(x, w13, w2, s13, s2, tw, ids, fmt, dict(cfg, poison=True),
                           n_shared=n_shared, out=out)
        assert y is out
        ys.append(y)
    if dense:
        ref = R.fused_moe_ref(x.cpu(), d13, d2, tw.cpu(), ids.cpu(), n_shared=n_shared)
    else:
        ref = SM.moe_small_m_ref(x, w13, w2, s13, s2, tw, ids, fmt, n_shared=n_shared)
    return ys[0], ys[1], ref


@cpu_only
@pytest.mark.parametrize("fmt", ["int4", "mxfp4"])
@pytest.mark.parametrize("k,n_shared,cfg", [
    (4, 1, {"MR": 64, "CH": 1, "BN2": 256}),  # 2 steps: prefetch and the wrapped x index
    (5, 0, {"MR": 128, "CH": 2, "BN2": 128}),  # one step of the whole K
])
def test_exact_fp32_vs_ref_and_old_path(fmt, k, n_shared, cfg):
    # fp32 output (no final rounding): the new gate_up and the old one feed the same down
    # kernel, so both must equal the float64 reference to fp32 summation order
    y_new, y_old, ref = both_paths(fmt, 16, 256, 128, k, cfg, seed=k + 10 * n_shared,
                                   n_shared=n_shared)
    assert rel_err(y_new, ref) < 1e-5
    assert rel_err(y_new, y_old) < 1e-5


@cpu_only
@pytest.mark.parametrize("fmt,cfg", [("int4", {"MR": 8, "CH": 2}),  # 8-row tiles, 2 pairs
                                     ("mxfp4", {"MR": 16, "CH": 1, "W1": 2})])
def test_bf16_small_tiles(fmt, cfg):
    y_new, y_old, ref = both_paths(fmt, 10, 256, 128, 2, dict(cfg, BN2=256), seed=3,
                                   out_dtype=torch.bfloat16, repeat=False)
    assert rel_err(y_new, ref) < 1e-2
    assert rel_err(y_new, y_old) < 1e-2


@cpu_only
@pytest.mark.parametrize("fmt", ["int4", "mxfp4"])
def test_act_every_pair(fmt):
    # the kernel alone: every act row (repeated ids, a shared expert, int64 ids) is
    # silu(gate_e x) * up_e x in the down order, from a NaN-poisoned act
    gen = torch.Generator().manual_seed(21)
    E, H, I, k = 12, 256, 128, 3
    (w13, _, s13, _), (d13, _) = make_experts(fmt, E, H, I, gen)
    x = torch.randn(1, H, generator=gen).bfloat16().to(DEV)
    ids, _ = make_routing(1, k, E - 1, gen, repeat=False)
    ids[0, 2] = ids[0, 0]  # a repeated id (expert parallelism); column 1 another expert
    ids = ids.long()
    act = torch.full((k + 1, I), float("nan"), device=DEV)
    s13v = s13.view(torch.int16) if fmt == "int4" else s13
    code = INT4 if fmt == "int4" else MXFP4
    assert M1.m1_gate_up(x.view(torch.int32), w13, s13v, ids, act, code, top_k=k, n_shared=1,
                         R=64, CH=1) is act
    experts = ids[0].tolist() + [E - 1]
    assert experts[2] == experts[0]
    h = torch.stack([d13[e].double() @ x[0].cpu().double() for e in experts])
    want = torch.nn.functional.silu(h[:, :I]) * h[:, I:]
    assert rel_err(act_natural(act), want) < 1e-5


FUSED_DEFAULT = {"small_m_max": 4, "small_m": OLD,  # PAIR_M_MAX 1: small-M at M <= 4, GEMV
                 "G1": 128, "G2": 256, "GC": 2}  # in few programs (interpreter, H = 256)


def multi_token_case(fmt, M, k, n_shared, seed, E=12, H=256, I=128):
    """Weights (kernel layout, dense dequantized), x [M, H] bf16 with row stride H + 64 (a view),
    routing with repeats inside a token (make_routing) and across tokens (every token's column
    0 is token 0's), fresh from seed."""
    gen = torch.Generator().manual_seed(seed)
    (w13, w2, s13, s2), (d13, d2) = make_experts(fmt, E, H, I, gen)
    x = torch.randn(M, H + 64, generator=gen).bfloat16().to(DEV)[:, 32:H + 32]
    ids, tw = make_routing(M, k, E - n_shared, gen)
    ids[1:, 0] = ids[0, 0]
    return (w13, w2, s13, s2), (d13, d2), x, ids, tw


@cpu_only
@pytest.mark.parametrize("fmt", ["int4", "mxfp4"])
@pytest.mark.parametrize("M,k,n_shared,cfg", [
    (2, 3, 1, {"MR": 256, "CH": 1, "BN2": 256}),  # 2 steps: prefetch and the wrapped x index
    (3, 4, 0, {"MR": 128, "CH": 2, "BN2": 128}),  # 2 programs per pair
    (5, 2, 2, {"MR": 256, "CH": 2, "BN2": 256}),  # M > 4: fused_moe's default is GEMV
])
def test_multi_token_vs_ref_and_fused_default(fmt, M, k, n_shared, cfg, m1_calls):
    # M tokens, per-pair gate_up through fused_moe (small_m_max M, "M1": 1) with an fp32 out:
    # exact to the float64 reference; equal to fused_moe's default dispatch (bf16)
    (w13, w2, s13, s2), (d13, d2), x, ids, tw = multi_token_case(fmt, M, k, n_shared,
                                                                  seed=M + 10 * k)
    assert x.stride(0) == 256 + 64
    ref = R.fused_moe_ref(x.cpu(), d13, d2, tw.cpu(), ids.cpu(), n_shared=n_shared)
    kw = {"quant": "int4_g32" if fmt == "int4" else "mxfp4", "w13_scale": s13, "w2_scale": s2,
          "n_shared": n_shared}
    out = torch.full((M, 256), float("nan"), device=DEV)
    y_pair = FM.fused_moe(x, w13, w2, tw, ids, out=out, config={
        "small_m_max": M, "small_m": dict(cfg, M1=1), "poison": True}, **kw)
    assert y_pair is out and m1_calls == [1]
    assert rel_err(y_pair, ref) < 1e-5
    y_def = FM.fused_moe(x, w13, w2, tw, ids, config=dict(FUSED_DEFAULT, poison=True), **kw)
    assert m1_calls == [1]  # the default dispatch at M > 1 never takes it
    assert y_def.dtype == torch.bfloat16 and rel_err(y_def, y_pair) < 1e-2


@cpu_only
@pytest.mark.parametrize("fmt", ["int4", "mxfp4"])
def test_multi_token_act_rows(fmt):
    # the kernel alone at M = 3: act row m * KP + k is silu(gate_e x_m) * up_e x_m, with int64
    # ids of row stride != top_k (a column slice), x of row stride != H / 2
    E, I, k, M = 10, 128, 3, 3
    (w13, _, s13, _), (d13, _), x, ids, _ = multi_token_case(fmt, M, k, 1, seed=31, E=E)
    wide = torch.zeros(M, k + 2, dtype=torch.int64, device=DEV)
    wide[:, 1:k + 1] = ids
    ids = wide[:, 1:k + 1]
    act = torch.full((M * (k + 1), I), float("nan"), device=DEV)
    s13v = s13.view(torch.int16) if fmt == "int4" else s13
    assert M1.m1_gate_up(x.view(torch.int32), w13, s13v, ids, act, INT4 if fmt == "int4" else
                         MXFP4, top_k=k, n_shared=1, R=256, CH=2) is act
    experts = [e for m in range(M) for e in ids[m].tolist() + [E - 1]]
    xs = x.cpu().double()
    h = torch.stack([d13[e].double() @ xs[p // (k + 1)] for p, e in enumerate(experts)])
    want = torch.nn.functional.silu(h[:, :I]) * h[:, I:]
    assert rel_err(act_natural(act), want) < 1e-5


@pytest.fixture
def m1_calls(monkeypatch):
    """A list that gets one entry per m1_gate_up launch (a spy on the module attribute)."""
    calls = []
    real = M1.m1_gate_up
    monkeypatch.setattr(M1, "m1_gate_up", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


@pytest.fixture
def sm_env(monkeypatch):
    """set(**env): set environment variables and reload moe_small_m (it reads them at import);
    afterwards the environment as it was, then the module as it reads it."""
    def set_env(**env):
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        importlib.reload(SM)
    yield set_env
    monkeypatch.undo()
    importlib.reload(SM)


@cpu_only
def test_env_switch_and_dispatch(sm_env, m1_calls):
    # ATOM_STREAM_MOE_M1_KERNEL=1 turns "M1" on at M == 1 only; config {"M1": 0} overrides
    sm_env(ATOM_STREAM_MOE_M1_KERNEL="1", ATOM_STREAM_MOE_PAIR_M_MAX="1")
    assert SM.default_config(1, 7168, 256, 8)["M1"] == 1
    assert SM.default_config(2, 7168, 256, 8)["M1"] == 0
    gen = torch.Generator().manual_seed(4)
    (w13, w2, s13, s2), (d13, d2) = make_experts("int4", 8, 128, 128, gen)
    x = torch.randn(2, 128, generator=gen).bfloat16()
    ids, tw = make_routing(2, 2, 8, gen, repeat=False)
    cfg = {"MR": 128, "BN": 128, "BN2": 128}
    for M, over, n in ((1, {}, 1), (2, {}, 1), (1, {"M1": 0}, 1)):
        y = SM.moe_small_m(x[:M], w13, w2, s13, s2, tw[:M], ids[:M], "int4",
                           dict(cfg, **over, poison=True))
        assert len(m1_calls) == n, (M, over)
        ref = R.fused_moe_ref(x[:M], d13, d2, tw[:M], ids[:M])
        assert rel_err(y, ref) < 1e-2


@cpu_only
def test_env_pair_m_max_dispatch(sm_env, m1_calls):
    # ATOM_STREAM_MOE_PAIR_M_MAX=6: moe_small_m's "M1" on at M <= 6 and fused_moe sends 4-bit
    # weight-only calls up to M = 6 there (M = 5, 6: otherwise GEMV); 1 = today's dispatch
    sm_env(ATOM_STREAM_MOE_M1_KERNEL="1", ATOM_STREAM_MOE_PAIR_M_MAX="6")
    assert [SM.default_config(M, 7168, 256, 8)["M1"] for M in range(1, 9)] == [1] * 6 + [0] * 2
    fm_cfg = functools.partial(FM.default_config, FM.INT4, 6, 48, 384, 7168, 256)
    assert fm_cfg()["small_m_max"] == max(6, FM.SMALL_M_MAX)
    assert fm_cfg(FM.A_MXFP4)["small_m_max"] == 0  # w4a4: never the small-M path
    gen = torch.Generator().manual_seed(40)
    (w13, w2, s13, s2), (d13, d2) = make_experts("mxfp4", 8, 256, 128, gen)
    x = torch.randn(6, 256, generator=gen).bfloat16()
    ids, tw = make_routing(6, 2, 8, gen)
    y = FM.fused_moe(x, w13, w2, tw, ids, quant="mxfp4", w13_scale=s13, w2_scale=s2,
                     config={"poison": True, "small_m": {"MR": 128, "CH": 2, "BN2": 256}})
    assert m1_calls == [1]
    assert rel_err(y, R.fused_moe_ref(x, d13, d2, tw, ids)) < 1e-2
    sm_env(ATOM_STREAM_MOE_PAIR_M_MAX="1")
    assert SM.default_config(2, 7168, 256, 8)["M1"] == 0
    assert fm_cfg()["small_m_max"] == FM.SMALL_M_MAX


@cpu_only
def test_small_m_max_zero_turns_the_small_m_path_off(sm_env, monkeypatch):
    # ATOM_STREAM_MOE_SMALL_M_MAX=0 (the README's A/B switch) means no small-M path at any M,
    # also with the per-pair gate_up's PAIR_M_MAX above it
    sm_env(ATOM_STREAM_MOE_PAIR_M_MAX="8")
    assert FM.small_m_max() == max(8, FM.SMALL_M_MAX)
    monkeypatch.setattr(FM, "SMALL_M_MAX", 0)
    assert FM.small_m_max() == 0
    assert FM.default_config(FM.INT4, 1, 8, 384, 7168, 256)["small_m_max"] == 0


@cpu_only
def test_fused_moe_takes_m1_path(m1_calls):
    # fused_moe at M=1 with small_m {"M1": 1}: the new gate_up, equal to the GEMV path
    y_on, y_off, ref, sm_calls = fused_both(
        "mxfp4", 1, E=12, H=256, I=128, k=4, seed=77, n_shared=1,
        small_cfg={"M1": 1, "MR": 64, "CH": 1, "BN2": 256})
    assert sm_calls == ["mxfp4"] and m1_calls == [1]
    assert rel_err(y_on, ref) < 1e-2 and rel_err(y_on, y_off) < 1e-2


@cpu_only
def test_rejects_bad_tiles():
    gen = torch.Generator().manual_seed(9)
    (w13, w2, s13, s2), _ = make_experts("int4", 4, 256, 128, gen, dense=False)
    x = torch.randn(1, 256, generator=gen).bfloat16()
    ids, tw = make_routing(1, 2, 4, gen, repeat=False)
    for cfg in ({"MR": 3}, {"MR": 1}, {"MR": 512}, {"CH": 4}):  # CH 4 > H/128 = 2
        with pytest.raises(ValueError):
            SM.moe_small_m(x, w13, w2, s13, s2, tw, ids, "int4", dict(cfg, M1=1))
    with pytest.raises(ValueError):  # act must be fp32 [KP, I]
        M1.m1_gate_up(x.view(torch.int32), w13, s13.view(torch.int16), ids,
                      torch.empty(3, 128), INT4, top_k=2)


# ------------------------------------------------------------------------------- GPU
H_, I_, E_, K_ = 7168, 256, 384, 8  # Kimi-K2.5 TP8 rank


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("fmt", ["int4", "mxfp4"])
@pytest.mark.parametrize("cfg", [{}, {"MR": 2}, {"MR": 8}, {"MR": 4, "W1": 2}, {"CH": 4},
                                 {"PDL": 1}, {"PDL": 1, "DW": 1, "VT": 1}])
def test_gpu_real_shape(fmt, cfg):
    for n_shared in (0, 1):
        y_new, y_old, ref = both_paths(fmt, E_, H_, I_, K_, cfg, seed=len(cfg) + n_shared,
                                       n_shared=n_shared, out_dtype=torch.bfloat16,
                                       dense=False)
        assert rel_err(y_new, ref) < 1e-2 and rel_err(y_new, y_old) < 1e-2
    # fp32 out: 7168-term fp32 sums in another order than the old split-K path's
    y_new, y_old, ref = both_paths(fmt, E_, H_, I_, K_, cfg, seed=5, dense=False)
    assert rel_err(y_new, ref) < 1e-4 and rel_err(y_new, y_old) < 1e-4


def real_case(fmt, M, seed, n_shared=0):
    """Kimi-shape weights on the GPU, x [M, H], routing with repeats (make_routing)."""
    gen = torch.Generator().manual_seed(seed)
    w, _ = make_experts(fmt, E_, H_, I_, gen, dense=False)
    x = torch.randn(M, H_, generator=gen).bfloat16().cuda()
    ids, tw = make_routing(M, K_, E_ - n_shared, gen)
    return w, x, ids, tw, gen


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("fmt", ["int4", "mxfp4"])
@pytest.mark.parametrize("M", [2, 4, 16, 32])
def test_gpu_pair_m(fmt, M):
    # the per-pair path through fused_moe (small_m_max M, "M1": 1) vs the float64 reference
    # and fused_moe's default dispatch (PAIR_M_MAX 1: small-M at M <= 4, tensor cores at 16, 32)
    for n_shared in (0, 1):
        (w13, w2, s13, s2), x, ids, tw, _ = real_case(fmt, M, M + n_shared, n_shared)
        kw = {"quant": "int4_g32" if fmt == "int4" else "mxfp4", "w13_scale": s13,
              "w2_scale": s2, "n_shared": n_shared}
        ref = SM.moe_small_m_ref(x, w13, w2, s13, s2, tw, ids, fmt, n_shared=n_shared)
        ys = []
        for cfg in ({"small_m_max": M, "small_m": {"M1": 1}},
                    {"small_m_max": 4, "small_m": {"M1": 0}}):
            out = torch.full((M, H_), float("nan"), dtype=torch.bfloat16, device="cuda")
            ys.append(FM.fused_moe(x, w13, w2, tw, ids, out=out, config=dict(cfg, poison=True),
                                   **kw))
        assert rel_err(ys[0], ref) < 1e-2 and rel_err(ys[0], ys[1]) < 2e-2
    # fp32 out: the same products as the reference, 7168-term fp32 sums
    out = torch.full((M, H_), float("nan"), device="cuda")
    SM.moe_small_m(x, w13, w2, s13, s2, tw, ids, fmt, {"M1": 1, "poison": True}, out=out)
    assert rel_err(out, SM.moe_small_m_ref(x, w13, w2, s13, s2, tw, ids, fmt)) < 1e-4


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("fmt", ["int4", "mxfp4"])
@pytest.mark.parametrize("M", [1, 32])
def test_gpu_cuda_graph_replay(fmt, M):
    (w13, w2, s13, s2), x, ids, tw, gen = real_case(fmt, M, seed=M)
    cfg = {"M1": 1}
    SM.moe_small_m(x, w13, w2, s13, s2, tw, ids, fmt, cfg)  # compile outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = SM.moe_small_m(x, w13, w2, s13, s2, tw, ids, fmt, cfg)
    for _ in range(3):  # new input and routing each replay
        x.copy_(torch.randn(M, H_, generator=gen).bfloat16())
        i2, t2 = make_routing(M, K_, E_, gen)
        ids.copy_(i2)
        tw.copy_(t2)
        y.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        assert rel_err(y, SM.moe_small_m_ref(x, w13, w2, s13, s2, tw, ids, fmt)) < 1e-2
