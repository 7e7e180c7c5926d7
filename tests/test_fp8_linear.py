"""kernels/fp8_linear.py (FP8 block-scaled GEMM) vs its float64 torch reference, the MI300
e4m3fn -> e4m3fnuz load conversion (layers/quant/common.fp8_to_platform), and the FP8-block model
wired through both.

CPU: TRITON_INTERPRET=1 (set before the kernel modules are decorated), fp32/fp16 (the interpreter
truncates fp32 -> bf16 stores, so bf16 gets the 1e-2 bound there), small shapes with N and K
multiples and non-multiples of 128 (kv_a has 576 rows = 4.5 blocks). `-m gpu`: bf16 at the real
DeepSeek-V3/K2 shapes (q_a 7168->1536, kv_a 7168->576, q_b 1536->24576 at TP1, o_proj
16384->7168). Fresh random inputs per check (per-block scales spread over 2^-8..2^4 so a wrong
scale index cannot hide); outputs poisoned with NaN before each run.
"""

from __future__ import annotations

import os
import shutil
from types import SimpleNamespace

import pytest
import torch
from kernel_interp import interpret_without_gpu

GPU = interpret_without_gpu("kv_store", "norm_rope", "fp8_linear")  # dependencies first

from atom_stream.kernels import fp8_linear as fl
from atom_stream.layers.quant import (
    common, fp8_block, set_activation_quant, weight_bytes_report,
)

cpu_only = pytest.mark.skipif(GPU, reason="interpreter tests run where there is no GPU")
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a GPU")
FN, FNUZ = torch.float8_e4m3fn, torch.float8_e4m3fnuz
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 5e-3}


def make_inputs(M, N, K, dtype, device, seed, block=(128, 128), lead=()):
    """x [*lead, M, K] with per-128-group magnitudes spread out; fp8 weight [N, K] (includes
    -0.0 = 0x80 bytes); scale_inv with per-block magnitudes spread over 2^-8..2^4."""
    gen = torch.Generator(device=device).manual_seed(seed)  # on the GPU for the real shapes
    d = dict(generator=gen, device=device)
    x = torch.randn(*lead, M, K, **d)
    x *= torch.exp2(torch.randint(-4, 5, (*lead, M, (K + 127) // 128), **d).float()
                    ).repeat_interleave(128, -1)[..., :K]
    w = (torch.randn(N, K, **d) * 64).clamp(-440, 440).to(FN)
    w.view(torch.uint8)[torch.rand(N, K, **d) < 0.01] = 0x80
    nb, kb = -(-N // block[0]), -(-K // block[1])
    s = torch.rand(nb, kb, **d) * torch.exp2(torch.randint(-8, 5, (nb, kb), **d).float())
    s = (s + 1e-3) / (64 * K ** 0.5)  # outputs O(1..1e3): within fp16 range
    return x.to(dtype), w, s


def rel(a, ref) -> float:
    return ((a.double() - ref).norm() / ref.norm()).item()


def check(M, N, K, mode, dtype, device, seed, block=(128, 128), config=None, ue8m0=False,
          lead=(), fp8=FN, tol=None):
    x, w, s = make_inputs(M, N, K, dtype, device, seed, block, lead)
    w, s = common.fp8_to_platform(w, s, fp8)
    out = torch.full((*lead, M, N), float("nan"), dtype=dtype, device=device)
    y = fl.fp8_block_linear(x, w, s, block, mode=mode, ue8m0=ue8m0, out=out, config=config)
    assert y is out and torch.isfinite(y).all()  # every element written
    ref = fl.fp8_block_linear_ref(x, w, s, block, mode=mode, ue8m0=ue8m0)
    err = rel(y, ref)
    assert err < (tol or TOL[dtype]), (M, N, K, mode, dtype, err)
    return x, w, s, y


# ------------------------------------------------------------------ CPU (interpreter)
@cpu_only
@pytest.mark.parametrize("mode", ["w8a8", "weight_only"])
@pytest.mark.parametrize("M,N,K", [(1, 128, 128), (5, 200, 320), (33, 576, 256), (5, 64, 96),
                                   (17, 130, 384)])
def test_kernel_matches_reference_fp32(M, N, K, mode):
    check(M, N, K, mode, torch.float32, "cpu", seed=M * 1000 + N + K + (mode == "w8a8"))


@cpu_only
@pytest.mark.parametrize("dtype,tol", [(torch.float16, None), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("mode", ["w8a8", "weight_only"])
def test_kernel_half_inputs(dtype, tol, mode):
    check(6, 192, 256, mode, dtype, "cpu", seed=11 + (dtype == torch.float16), tol=tol)


@cpu_only
def test_split_k_matches_unsplit_and_is_deterministic():
    x, w, s, y1 = check(3, 160, 1024, "w8a8", torch.float32, "cpu", seed=21,
                        config=fl.Fp8LinearConfig(16, 64, split_k=1))
    cfg = fl.Fp8LinearConfig(16, 64, split_k=3)  # 8 K steps -> 3 + 3 + 2
    a = fl.fp8_block_linear(x, w, s, mode="w8a8", config=cfg)
    b = fl.fp8_block_linear(x, w, s, mode="w8a8", config=cfg)
    assert torch.equal(a, b) and rel(a, y1.double()) < 1e-6
    # the automatic choice splits this small grid (8 "SMs" on the CPU)
    assert fl.choose_split_k(3, 160, 1024, fl.default_config(3, 160, 1024), 128,
                             torch.device("cpu")) > 1
    check(3, 160, 1024, "weight_only", torch.float32, "cpu", seed=22)


@cpu_only
def test_strided_3d_input_ue8m0_and_64_blocks():
    x, w, s = make_inputs(4, 96, 256, torch.float32, "cpu", seed=31)
    wide = torch.randn(4, 300)
    wide[:, :256] = x
    y = fl.fp8_block_linear(wide[:, :256], w, s, mode="w8a8")  # row stride 300
    assert rel(y, fl.fp8_block_linear_ref(x, w, s, mode="w8a8")) < 1e-5
    check(3, 72, 200, "w8a8", torch.float32, "cpu", seed=32, lead=(2,), ue8m0=True)
    check(5, 100, 192, "w8a8", torch.float32, "cpu", seed=33, block=(64, 64))
    check(5, 100, 192, "weight_only", torch.float32, "cpu", seed=34, block=(64, 64))


@cpu_only
@pytest.mark.parametrize("mode", ["w8a8", "weight_only"])
def test_kernel_fnuz_weights(mode):
    """MI300 storage: converted weights (scale * 2) through the kernel. Weight-only gives the
    e4m3fn result bit for bit (the factor 2 is exact); w8a8 quantizes activations to fnuz."""
    x, w, _, y = check(7, 576, 384, mode, torch.float32, "cpu", seed=41, fp8=FNUZ)
    assert w.dtype == FNUZ
    if mode == "weight_only":
        x, w0, s0 = make_inputs(7, 576, 384, torch.float32, "cpu", seed=41)
        assert torch.equal(y, fl.fp8_block_linear(x, w0, s0, mode=mode))


def test_fnuz_conversion_all_bit_patterns():
    """Every e4m3fn byte (bar its two NaNs): converted value * 2 == original, exactly; 0x80
    (-0.0) becomes 0x00, never the fnuz NaN; with a block scale, dequantized values equal."""
    fn = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FN)
    fnuz, two = common.fp8_to_platform(fn, torch.tensor(1.0), FNUZ)
    assert fnuz.dtype == FNUZ and two.item() == 2.0
    v, u = fn.float(), fnuz.float()
    keep = ~torch.isnan(v)
    assert keep.sum() == 254
    assert torch.equal(u[keep] * 2, v[keep])
    assert not torch.isnan(u).any()
    assert fnuz.view(torch.uint8)[0x80] == 0 and torch.equal(
        fnuz.view(torch.uint8)[keep & (torch.arange(256) != 0x80)],
        fn.view(torch.uint8)[keep & (torch.arange(256) != 0x80)])
    w = fn[keep].reshape(2, 127)
    s = torch.tensor([[3.7e-3], [0.21]])
    wz, sz = common.fp8_to_platform(w, s, FNUZ)
    assert torch.equal(wz.float() * sz, w.float() * s)
    assert common.fp8_to_platform(w, s, FN) == (w, s)  # no-op where the platform is e4m3fn
    with pytest.raises(TypeError):
        common.e4m3fn_to_fnuz(wz)
    with common.force_platform_fp8(FNUZ):
        assert common.platform_fp8_dtype() == FNUZ
    assert common.platform_fp8_dtype() == FN


# ------------------------------------------------------------------ model level (CPU)
@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A tiny random model, its FP8-block checkpoint (with some -0.0 weight bytes and per-layer
    k_scale tensors added) and the dequantized reference checkpoint."""
    import quant_writers as qw
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("fp8lin")
    src, q, ref = str(root / "src"), str(root / "q"), str(root / "ref")
    qw.make_tiny_hf(src, "kimi", seed=3)
    deq = qw.write_quantized(src, q, "fp8_block")
    qw.write_reference(src, ref, deq)
    kv = str(root / "q_kv")  # the same plus negative zeros and k_scale (MI300 conversion test)
    shutil.copytree(q, kv)
    t = load_file(os.path.join(kv, "model.safetensors"))
    for name in [n for n in t if n.endswith("self_attn.o_proj.weight")]:
        t[name].view(torch.uint8)[:, ::7] = 0x80
    for i in range(3):
        t[f"model.layers.{i}.self_attn.k_scale"] = torch.tensor(0.02 + 0.01 * i)
    save_file(t, os.path.join(kv, "model.safetensors"))
    return SimpleNamespace(q=q, ref=ref, kv=kv)


def _run(r, n_decode=4):
    from test_quant_formats import run
    return run(r, n_decode=n_decode)


def _build(path, **kw):
    from test_quant_formats import build
    return build(path, **kw)


def test_model_cpu_path_unchanged_and_fp8_at_rest(ckpts):
    """The CPU engine path (torch reference) still equals the dequantized model (activation
    quant off), weights stay fp8 at rest (1 B/weight + fp32 block scales)."""
    q, ref = _build(ckpts.q), _build(ckpts.ref)
    set_activation_quant(q.model, False)
    (lq, tq), (lr, tr) = _run(q), _run(ref)
    assert tq == tr and torch.allclose(lq, lr, rtol=0, atol=1e-6)
    expect = 0
    for mod in q.model.modules():
        if isinstance(getattr(mod, "quant_method", None), fp8_block.Fp8BlockLinearMethod):
            assert mod.weight.dtype == FN and mod.weight.element_size() == 1
            expect += mod.weight.numel() + 4 * mod.weight_scale_inv.numel()
        elif isinstance(getattr(mod, "quant_method", None), fp8_block.Fp8BlockMoEMethod):
            expect += sum(b.numel() * b.element_size() for b in mod.buffers())
    assert expect > 0 and weight_bytes_report(q.model)["fp8_block"] == expect


@cpu_only
@pytest.mark.parametrize("act_quant", [True, False])
def test_model_through_kernel_matches_torch_path(ckpts, monkeypatch, act_quant):
    """The FP8-block linears routed through the interpreted kernel (w8a8 with activation quant,
    weight_only without) give the torch path's logits and tokens."""
    q = _build(ckpts.q)
    set_activation_quant(q.model, act_quant)
    lt, tt = _run(q)
    calls = []
    real = fl.fp8_block_linear

    def spy(*a, **kw):
        calls.append(kw["mode"])
        return real(*a, **kw)

    monkeypatch.setattr(fp8_block, "kernel_path", SimpleNamespace(active=lambda x: True))
    monkeypatch.setattr(fl, "fp8_block_linear", spy)
    lk, tk = _run(q)
    assert set(calls) == {"w8a8" if act_quant else "weight_only"}
    assert tk == tt and rel(lk, lt.double()) < 1e-5


def test_model_fnuz_conversion_matches_e4m3fn(ckpts):
    """With the platform forced to e4m3fnuz (MI300), FP8 weights (linears and experts) load as
    fnuz with doubled scales, no NaN (the -0.0 bytes became +0), k_scale doubles, and the model's
    logits equal the e4m3fn model's exactly (identical dequantized weights)."""
    fn_model = _build(ckpts.kv)
    with common.force_platform_fp8(FNUZ):
        uz_model = _build(ckpts.kv)
    attn = uz_model.model.model.layers[0].self_attn
    attn_fn = fn_model.model.model.layers[0].self_attn
    assert attn.o_proj.weight.dtype == FNUZ
    assert not torch.isnan(attn.o_proj.weight.float()).any()
    assert torch.equal(attn.o_proj.weight_scale_inv, 2 * attn_fn.o_proj.weight_scale_inv)
    ex = uz_model.model.model.layers[1].mlp.experts
    assert ex.w13_weight.dtype == FNUZ and ex.w2_weight.dtype == FNUZ
    assert not torch.isnan(ex.w13_weight.float()).any()
    for lyr in range(3):
        a = uz_model.model.model.layers[lyr].self_attn
        b = fn_model.model.model.layers[lyr].self_attn
        assert a.k_scale == pytest.approx(2 * b.k_scale) and b.k_scale == pytest.approx(
            0.02 + 0.01 * lyr)
    for mod_fn, mod_uz in zip(fn_model.model.modules(), uz_model.model.modules()):
        if isinstance(getattr(mod_fn, "quant_method", None), fp8_block.Fp8BlockLinearMethod):
            assert torch.equal(mod_uz.quant_method.dequantize(mod_uz),
                               mod_fn.quant_method.dequantize(mod_fn))
    (lf, tf), (lu, tu) = _run(fn_model), _run(uz_model)
    assert tf == tu and torch.equal(lf, lu)


# ------------------------------------------------------------------ GPU (native)
SHAPES = {"q_a": (1536, 7168), "kv_a": (576, 7168), "q_b": (24576, 1536), "o_proj": (7168, 16384)}


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("mode", ["w8a8", "weight_only"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("M", [1, 16, 64, 256])
def test_kernel_real_shapes_gpu(M, shape, mode):
    if mode == "w8a8" and not fl.fp8_dot_supported(torch.device("cuda")):
        pytest.skip("no fp8 dot on this GPU")
    N, K = SHAPES[shape]
    fp8 = common.platform_fp8_dtype()
    x, w, s, y = check(M, N, K, mode, torch.bfloat16, "cuda", seed=M + N, fp8=fp8)
    assert torch.equal(y, fl.fp8_block_linear(x, w, s, mode=mode))  # deterministic (split-K)
