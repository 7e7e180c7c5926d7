"""fused_moe's FP8C format ("fp8_tensor" / "fp8_channel": fp8 e4m3 experts with a per-tensor or
per-output-channel scale, fp8 activations per token or static; W4A8 after its load-time
conversion) against torch references, and W4A8MoEMethod.apply's dispatch.

Without a GPU the Triton kernels run under TRITON_INTERPRET=1 (set here before the kernel
modules are decorated, as tests/test_kernels_moe.py does) at small shapes in float32, where the
kernel must equal the float64 reference of the same quantization to ~1e-7: M=1 (GEMV), M=5
(tensor-core direct mode), M=40 (sorted mode), plus the crossings (GEMV at 5, direct at 1).
`-m gpu` runs bf16 at wider shapes, against w4a8.py's own torch reference, and a CUDA-graph
capture. Every check draws fresh random inputs and poisons outputs and intermediates.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from kernel_interp import interpret_without_gpu

# re-decorate under the interpreter, in order
GPU = interpret_without_gpu(
    "moe_align", "fused_moe_common", "fused_moe_tc", "fused_moe_gemv", "fused_moe_fp8", "fused_moe")

from atom_stream.kernels import moe_ref as R
from atom_stream.kernels.fused_moe import fused_moe

from atom_stream.layers.quant.w4a8 import W4A8MoEMethod

DEV = "cuda" if GPU else "cpu"
cpu_only = pytest.mark.skipif(GPU, reason="interpreter tests run where there is no GPU")
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a GPU")
FAST = {"BN1": 64, "BN2": 128, "FG1": 32, "FG2": 128, "poison": True}
PATHS = {"gemv": {}, "direct": {"gemv_max": 0}, "sorted": {"gemv_max": 0, "direct": False}}


def rel_err(a, b) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    assert torch.isfinite(a).all(), "non-finite output (unwritten element?)"
    return float((a - b).norm() / b.norm())


def make(E, H, I, gen, per_tensor):
    """(kernel kwargs, dequantized w13, w2) with random fp8 weights and scales."""
    q13, s13 = R.quant_fp8_channel(torch.randn(E, 2 * I, H, generator=gen) * H ** -0.5,
                                   per_tensor)
    q2, s2 = R.quant_fp8_channel(torch.randn(E, H, I, generator=gen) * I ** -0.5, per_tensor)
    kw = {"w13": q13.to(DEV), "w2": q2.to(DEV), "w13_scale": s13.to(DEV),
          "w2_scale": s2.to(DEV), "quant": "fp8_tensor" if per_tensor else "fp8_channel"}
    return kw, R.dequant_fp8_channel(q13, s13), R.dequant_fp8_channel(q2, s2)


def routing(M, k, E, gen, repeat=False):
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(M)])
    tw = torch.rand(M, k, generator=gen) + 0.1
    if repeat:  # EP-style: column 2 repeats column 0 at weight 0; token 0 repeats at weight > 0
        ids[:, 2] = ids[:, 0]
        tw[:, 2] = 0.0
        ids[0, 1] = ids[0, 0]
    return tw.to(DEV), ids.int().to(DEV)


def check(M, path, per_tensor=True, static=False, xdt=torch.float32, tol=1e-5, E=8, H=256,
          I=128, k=3, seed=0, repeat=False, config=None):
    gen = torch.Generator().manual_seed(seed)
    kw, w13, w2 = make(E, H, I, gen, per_tensor)
    x = (torch.randn(M, H, generator=gen) * 2).to(xdt).to(DEV)
    tw, ids = routing(M, k, E, gen, repeat)
    a13 = a2 = None
    if static:  # a scale below amax: the clamp at +-448 is exercised too
        a13 = torch.tensor(float(x.float().abs().max()) / 448 * 0.7, device=DEV)
        a2 = torch.tensor(0.002, device=DEV)
    out = torch.full((M, H), float("nan"), dtype=xdt, device=DEV)
    y = fused_moe(x, kw.pop("w13"), kw.pop("w2"), tw, ids, out=out, a13_scale=a13, a2_scale=a2,
                  config=dict(FAST, **PATHS[path], **(config or {})), **kw)
    assert y is out
    if static:
        def q1(t):
            return R.qdq_fp8_static(t, a13.cpu())

        def q2(t):
            return R.qdq_fp8_static(t, a2.cpu())
    else:
        q1 = q2 = R.qdq_fp8_token
    ref = R.fused_moe_ref(x.cpu(), w13, w2, tw.cpu(), ids.cpu(), act_qdq=q1, act_qdq2=q2)
    err = rel_err(y, ref)
    assert err < tol, f"M={M} {path} per_tensor={per_tensor} static={static}: rel err {err:.3g}"


@cpu_only
@pytest.mark.parametrize("M,path", [(1, "gemv"), (5, "direct"), (40, "sorted"), (5, "gemv"),
                                    (1, "direct")])
@pytest.mark.parametrize("per_tensor", [True, False])
def test_fp8c_paths_match_reference(M, path, per_tensor):
    check(M, path, per_tensor=per_tensor, seed=M + 10 * per_tensor)


@cpu_only
@pytest.mark.parametrize("M,path", [(1, "gemv"), (5, "direct"), (40, "sorted")])
def test_fp8c_static_activation_scales(M, path):
    check(M, path, static=True, per_tensor=False, seed=100 + M)


@cpu_only
@pytest.mark.parametrize("M,path", [(2, "gemv"), (5, "direct"), (20, "sorted")])
def test_fp8c_repeated_ids_and_zero_weights(M, path):
    check(M, path, per_tensor=False, repeat=True, seed=200 + M)


@cpu_only
def test_fp8c_fp16_and_default_tiles_small_model():
    # fp16 activations (intermediate rounded to fp16 before its quantization, as the model
    # dtype does in the reference) and the tiny-model shape of tests/test_quant_*: H=64, I=32
    check(3, "gemv", xdt=torch.float16, tol=1e-2, seed=7, config={"poison": True})
    for path in ("gemv", "direct", "sorted"):
        check(6, path, H=64, I=32, E=6, k=2, seed=8, config={"BN1": 16, "BN2": 64,
                                                              "FG1": 8, "FG2": 32})


def test_fp8c_rejects_what_it_does_not_run():
    x = torch.randn(1, 64)
    tw, ids = torch.ones(1, 1), torch.zeros(1, 1, dtype=torch.int32)
    q13 = torch.randn(2, 64, 64).to(torch.float8_e4m3fn)
    q2 = torch.randn(2, 64, 32).to(torch.float8_e4m3fn)
    s = torch.ones(2)
    with pytest.raises(NotImplementedError):  # e4m3fnuz (MI300) weights
        fused_moe(x, q13.float().to(torch.float8_e4m3fnuz), q2.float().to(torch.float8_e4m3fnuz),
                  tw, ids, quant="fp8_tensor", w13_scale=s, w2_scale=s)
    with pytest.raises(NotImplementedError):  # H not a multiple of 32
        fused_moe(torch.randn(1, 48), q13[..., :48].contiguous(), q2[:, :48].contiguous(), tw,
                  ids, quant="fp8_tensor", w13_scale=s, w2_scale=s)
    with pytest.raises(ValueError):  # scale neither [E] nor [E, N]
        fused_moe(x, q13, q2, tw, ids, quant="fp8_channel", w13_scale=torch.ones(2, 7),
                  w2_scale=s)
    with pytest.raises(ValueError):  # one static scale without the other
        fused_moe(x, q13, q2, tw, ids, quant="fp8_tensor", w13_scale=s, w2_scale=s,
                  a13_scale=torch.tensor(1.0))
    with pytest.raises(NotImplementedError):  # static scales are FP8C-only
        fused_moe(x, q13.float(), q2.float(), tw, ids, a13_scale=torch.tensor(1.0),
                  a2_scale=torch.tensor(1.0))


# ------------------------------------------------------------------------ W4A8MoEMethod.apply
def fake_experts(E, H, I, gen, dtype, static=False):
    q13, s13 = R.quant_fp8_channel(torch.randn(E, 2 * I, H, generator=gen) * H ** -0.5, True)
    q2, s2 = R.quant_fp8_channel(torch.randn(E, H, I, generator=gen) * I ** -0.5, True)
    ex = SimpleNamespace(w13_weight=q13, w2_weight=q2, w13_weight_scale=s13, w2_weight_scale=s2,
                         quant_dtype=dtype, num_experts=E, hidden=H, inter=I)
    if static:
        ex.w13_input_scale = torch.rand(E, generator=gen) * 0.01 + 0.005
        ex.w2_input_scale = torch.rand(E, generator=gen) * 0.002 + 0.001
    method = W4A8MoEMethod(SimpleNamespace(act="fp8_static" if static else "fp8_dynamic"))
    return ex, method


def to_dev(ex):
    return SimpleNamespace(**{k: v.to(DEV) if torch.is_tensor(v) else v
                              for k, v in vars(ex).items()})


@cpu_only
@pytest.mark.parametrize("M,cfg_path", [(1, "gemv"), (5, "direct"), (40, "sorted")])
@pytest.mark.parametrize("static", [False, True])
def test_kernel_equals_w4a8_reference_float32(M, cfg_path, static):
    """The kernel computes w4a8.py's apply_ref math (float32 model: same quantized values)."""
    gen = torch.Generator().manual_seed(300 + M + static)
    ex, method = fake_experts(8, 256, 128, gen, torch.float32, static)
    x = torch.randn(M, 256, generator=gen)
    tw, ids = routing(M, 3, 8, gen)
    ref = method.apply_ref(ex, x, tw, ids.long())
    assert torch.equal(method.apply(ex, x, tw, ids.long()), ref)  # the CPU runs the reference
    y = fused_moe(x, ex.w13_weight, ex.w2_weight, tw, ids, quant="fp8_tensor",
                  w13_scale=ex.w13_weight_scale, w2_scale=ex.w2_weight_scale,
                  a13_scale=ex.w13_input_scale.max() if static else None,
                  a2_scale=ex.w2_input_scale.max() if static else None,
                  config=dict(FAST, **PATHS[cfg_path]))
    assert rel_err(y, ref) < 1e-5


# ------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("M,path", [(1, "gemv"), (5, "direct"), (40, "sorted"), (16, "gemv"),
                                    (77, "sorted")])
@pytest.mark.parametrize("per_tensor", [True, False])
def test_fp8c_gpu(M, path, per_tensor):
    # dynamic: the intermediate's per-token fp8 scale comes from the kernel's fp32 sums but from
    # bf16-rounded values in the reference, so ~1% of its fp8 codes land one step (6-12%) apart:
    # measured 1.1-1.4% rel L2 on the H200 (2e-2 stated); static scales stay under 1e-2
    check(M, path, per_tensor=per_tensor, xdt=torch.bfloat16, tol=2e-2, E=64, H=1024, I=256, k=8,
          seed=M, config={"BN1": 16, "BN2": 64, "FG1": 8, "FG2": 32})
    check(M, path, per_tensor=per_tensor, static=True, xdt=torch.bfloat16, tol=1e-2, E=64,
          H=1024, I=256, k=8, seed=M + 1, repeat=True, config={"BN1": 16, "BN2": 64})


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("static", [False, True])
def test_w4a8_apply_cuda_graph_matches_reference(static):
    """apply on CUDA = the fused kernel: captured in a CUDA graph, its replays with fresh inputs
    and routing match w4a8.py's torch reference (bf16 model) within bf16 tolerance."""
    gen = torch.Generator().manual_seed(5)
    ex, method = fake_experts(32, 512, 256, gen, torch.bfloat16, static)
    exd = to_dev(ex)
    M = 4
    x = torch.randn(M, 512, generator=gen).bfloat16().cuda()
    tw, ids = routing(M, 8, 32, gen)
    ids = ids.long()
    method.apply(exd, x, tw, ids)  # compile outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = method.apply(exd, x, tw, ids)
    for _ in range(2):
        x.copy_(torch.randn(M, 512, generator=gen).bfloat16())
        tw2, ids2 = routing(M, 8, 32, gen)
        tw.copy_(tw2)
        ids.copy_(ids2.long())
        y.fill_(float("nan"))
        g.replay()
        ref = method.apply_ref(ex, x.cpu(), tw.cpu(), ids.cpu())
        assert rel_err(y, ref.float()) < 2e-2


def test_w4a8_loads_as_fnuz_on_mi300_with_identical_outputs(tmp_path):
    """MI300 (e4m3fnuz forced): W4A8's load-time FP8 weights are stored as fnuz with doubled
    scales (layers/quant/common.fp8_to_platform) and the model's logits equal the e4m3fn load's."""
    import quant_writers as qw
    from test_quant_formats import build, run

    from atom_stream.layers.quant import common

    src, q = str(tmp_path / "src"), str(tmp_path / "q")
    qw.make_tiny_hf(src, "kimi", seed=5)
    qw.write_quantized(src, q, "w4a8")
    fn_model = build(q)
    with common.force_platform_fp8(torch.float8_e4m3fnuz):
        uz_model = build(q)
    ex_fn = fn_model.model.model.layers[1].mlp.experts
    ex_uz = uz_model.model.model.layers[1].mlp.experts
    assert ex_fn.w13_weight.dtype == torch.float8_e4m3fn
    assert ex_uz.w13_weight.dtype == ex_uz.w2_weight.dtype == torch.float8_e4m3fnuz
    assert torch.equal(ex_uz.w13_weight_scale, 2 * ex_fn.w13_weight_scale)
    assert torch.equal(ex_uz.w13_weight.float() * ex_uz.w13_weight_scale[:, None, None],
                       ex_fn.w13_weight.float() * ex_fn.w13_weight_scale[:, None, None])
    (lf, tf), (lu, tu) = run(fn_model), run(uz_model)
    assert tf == tu and torch.equal(lf, lu)
