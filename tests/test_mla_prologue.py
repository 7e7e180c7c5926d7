"""kernels/mla_prologue.py (latent norms + k_pe RoPE + KV store in one launch) and its switch.

Kernel checks (fresh random inputs, q_out and every cache slot poisoned before each run; random
slots with padding -1; q_c / kv strided views of one GEMM-like output):
- against the torch reference (mla_prologue_ref: norm_rope / kv_store references composed):
  q_out, the in-place c / k_pe within 4 ulps of the dtype (rsqrt rounding; and the interpreter
  casts fp32 -> bf16 by truncation, tests/test_model_kernels.py), q_c untouched;
- the cache: unwritten slots (padding, other slots) byte-equal to the poison; written slots equal
  to the kernel's own c / k_pe stored (bf16/fp32) or quantized with exact division (fp8 codes
  bit-equal, e4m3fn and e4m3fnuz, k_scale not a power of two);
- against the four launches it replaces (fused_add_rmsnorm x2, rope_interleaved_, kv_store):
  bit-equal under the interpreter, within 2 ulps / one fp8 code step natively.
Model level: MLA with FUSED_PROLOGUE on vs off (kernel path forced on the CPU) gives the same
hidden states, logits and caches (bit-equal under the interpreter) over a prefill step and a
mixed decode + prefill step, and the spy sees the prologue replace the latent norms / KV store.
CPU: TRITON_INTERPRET=1 at tiny shapes. `-m gpu`: native at the real widths (T 1/16/256,
q_lora 1536, r 512, rope 64).
"""

from __future__ import annotations

import collections
import os

import pytest
import torch
from kernel_interp import interpret_without_gpu

GPU = interpret_without_gpu("kv_store", "norm_rope", "mla_prologue")  # dependencies first

from atom_stream.kernels import kv_store as kvs_mod
from atom_stream.kernels import mla_decode as mla_mod
from atom_stream.kernels import mla_prologue as mp
from atom_stream.kernels import norm_rope as nr_mod
from test_model_kernels import Pool, build_models, rel, tiny_config

from atom_stream.models import kernel_path
from atom_stream.models import mla as mla_model

cpu_only = pytest.mark.skipif(GPU, reason="interpreter tests run where there is no GPU")
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a GPU")
FP8 = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)
NATIVE_FP8 = torch.float8_e4m3fnuz if getattr(torch.version, "hip", None) else torch.float8_e4m3fn


def make_inputs(T, QL, R, DR, dtype, cache_dtype, device, seed, block=4):
    """Random GEMM-like qkv (row stride padded: views are strided), norm weights, cos/sin
    tables, positions, slots (distinct, ~1/4 padding -1) and a poisoned cache."""
    g = torch.Generator().manual_seed(seed)
    width = QL + R + DR
    raw = (torch.randn(T, width + 8, generator=g) * 2).to(dtype).to(device)
    P = 97
    ang = torch.rand(P, DR // 2, generator=g, dtype=torch.float64) * 6.3
    num_blocks = max(4, 2 * T // block + 2)
    slots = torch.randperm(num_blocks * block, generator=g)[:T]
    slots[torch.rand(T, generator=g) < 0.25] = -1
    poison = torch.randint(0, 256, (num_blocks, block, R + DR), generator=g, dtype=torch.uint8)
    if cache_dtype in FP8:
        poison[poison & 0x7F == 0x7F] = 0x11  # no NaN codes (e4m3fn) in the poison
        cache = poison.view(cache_dtype)
    else:
        cache = torch.randn(num_blocks, block, R + DR, generator=g).to(cache_dtype)
    return {
        "raw": raw, "width": width,
        "q_weight": (torch.rand(QL, generator=g) + 0.5).to(dtype).to(device),
        "kv_weight": (torch.rand(R, generator=g) + 0.5).to(dtype).to(device),
        "cos": ang.cos().float().to(device), "sin": ang.sin().float().to(device),
        "positions": torch.randint(0, P, (T,), generator=g).to(device),
        "slots": slots.to(device), "cache": cache.to(device)}


def run_kernel(inp, QL, k_scale, fn=mp.mla_prologue):
    """Runs fn on fresh copies; returns (q_out, raw GEMM-like output after, cache after): q_c and
    kv are strided views into raw[:, :width] (row stride width + 8)."""
    raw, cache = inp["raw"].clone(), inp["cache"].clone()
    qkv = raw[:, :inp["width"]]
    args = (qkv[:, :QL], qkv[:, QL:], inp["q_weight"], inp["kv_weight"], 1e-6, 1e-5, inp["cos"],
            inp["sin"], inp["positions"], cache, inp["slots"], k_scale)
    if fn is mp.mla_prologue:
        q_out = torch.full((qkv.shape[0], QL), float("nan"), dtype=qkv.dtype, device=qkv.device)
        ret = fn(*args, q_out=q_out)
        assert ret is q_out
    else:
        q_out = fn(*args)
    return q_out, raw, cache


def unfused(q_c, kv, q_weight, kv_weight, eps_q, eps_kv, cos, sin, positions, cache, slots,
            k_scale):
    """The four launches the prologue replaces (models/mla.MLA._prologue's kernel calls)."""
    R = kv_weight.shape[0]
    q_out = nr_mod.fused_add_rmsnorm(q_c, None, q_weight, eps_q)[0]
    kv[:, :R] = nr_mod.fused_add_rmsnorm(kv[:, :R], None, kv_weight, eps_kv)[0]
    dummy_q = torch.zeros(kv.shape[0], 1, kv.shape[1] - R, dtype=kv.dtype, device=kv.device)
    nr_mod.rope_interleaved_(dummy_q, kv[:, R:], cos, sin, positions)
    kvs_mod.kv_store(cache, slots, kv[:, :R], kv[:, R:], k_scale, rope_dim=kv.shape[1] - R)
    return q_out


def ulp_close(a, b, dtype, ulps):
    """|a - b| <= ulps units in the last place of b (b's binade) in `dtype`."""
    a, b = a.double().cpu(), b.double().cpu()
    unit = torch.finfo(dtype).eps * torch.exp2(torch.floor(torch.log2(
        b.abs().clamp(min=torch.finfo(dtype).tiny))))
    return bool(((a - b).abs() <= ulps * unit).all())


def check(T, QL, R, DR, dtype, cache_dtype, device, seed, k_scale):
    inp = make_inputs(T, QL, R, DR, dtype, cache_dtype, device, seed)
    q_out, qkv, cache = run_kernel(inp, QL, k_scale)
    q_ref, qkv_ref, _ = run_kernel(inp, QL, k_scale, fn=mp.mla_prologue_ref)
    W = QL + R + DR
    # outputs and in-place results vs the torch reference; q_c and the pad columns untouched
    assert torch.isfinite(q_out).all()
    # a few ulps: rsqrt vs 1/sqrt and two roundings (x * rstd, then * w); the interpreter
    # truncates to bf16 where torch rounds to nearest (measured: <= 3 ulps)
    assert ulp_close(q_out, q_ref, dtype, 4), f"q_out {rel(q_out, q_ref):.2e}"
    assert ulp_close(qkv[:, QL:W], qkv_ref[:, QL:W], dtype, 4), "c / k_pe"
    assert torch.equal(qkv[:, :QL], inp["raw"][:, :QL])  # q_c is read only
    assert torch.equal(qkv[:, W:], inp["raw"][:, W:])  # nothing past the row's kv
    # the cache: the poison outside the kept slots, the kernel's own c / k_pe inside
    slots = inp["slots"].cpu()
    keep = slots >= 0
    flat, flat0 = cache.view(-1, R + DR).cpu(), inp["cache"].view(-1, R + DR).cpu()
    untouched = torch.ones(flat.shape[0], dtype=torch.bool)
    untouched[slots[keep]] = False
    as_bytes = (lambda x: x.view(torch.uint8)) if cache_dtype in FP8 else (lambda x: x)
    assert torch.equal(as_bytes(flat[untouched]), as_bytes(flat0[untouched])), "stray writes"
    entry = qkv[:, QL:W].cpu()[keep].float()
    if cache_dtype in FP8:
        fmax = torch.finfo(cache_dtype).max
        want = mp.exact_div(entry, k_scale).clamp(-fmax, fmax).to(cache_dtype)
    else:
        want = entry.to(cache_dtype)
    assert torch.equal(as_bytes(flat[slots[keep]]), as_bytes(want)), "stored entries"
    assert keep.any() or T < 4
    # vs the unfused launches
    q_un, qkv_un, cache_un = run_kernel(inp, QL, k_scale, fn=unfused)
    if GPU:
        # same math; a reduction may round differently by an ulp (then an fp8 code by one step)
        assert ulp_close(q_out, q_un, dtype, 2) and ulp_close(qkv, qkv_un, dtype, 2)
        if cache_dtype in FP8:
            steps = (cache.view(torch.uint8).int() - cache_un.view(torch.uint8).int()).abs()
            assert (steps <= 1).all()
        else:
            assert ulp_close(cache, cache_un, cache_dtype, 2)
    else:
        assert torch.equal(q_out, q_un) and torch.equal(qkv, qkv_un)
        assert torch.equal(as_bytes(cache), as_bytes(cache_un))


# ------------------------------------------------------------------ CPU (interpreter)
@cpu_only
@pytest.mark.parametrize("dtype,cache_dtype", [
    (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float8_e4m3fn), (torch.bfloat16, torch.float8_e4m3fnuz),
    (torch.float32, torch.float8_e4m3fn)])
def test_prologue_interpreted(dtype, cache_dtype):
    seed = 11 * (dtype == torch.bfloat16) + 3 * (cache_dtype in FP8) + (
        cache_dtype == torch.float8_e4m3fnuz)
    # QL 24: not a power of two (masked block); R 32, rope 16 (8 pairs)
    check(7, 24, 32, 16, dtype, cache_dtype, "cpu", seed, k_scale=0.37 if cache_dtype in FP8
          else 1.0)


@cpu_only
def test_prologue_odd_latent_width_and_empty():
    check(5, 16, 24, 8, torch.float32, torch.float8_e4m3fn, "cpu", seed=21, k_scale=1.0)
    inp = make_inputs(0, 16, 32, 16, torch.float32, torch.float32, "cpu", seed=22)
    q_out, _, cache = run_kernel(inp, 16, 1.0)
    assert q_out.shape == (0, 16) and torch.equal(cache, inp["cache"])


def test_prologue_rejects_odd_pair_count():
    inp = make_inputs(2, 16, 32, 12, torch.float32, torch.float32, "cpu", seed=23)
    with pytest.raises(AssertionError, match="power of two"):
        run_kernel(inp, 16, 1.0)


# ------------------------------------------------------------------ model level
@pytest.fixture
def spy(monkeypatch):
    calls = collections.Counter()
    for mod, name in ((nr_mod, "fused_add_rmsnorm"), (nr_mod, "rope_interleaved_"),
                      (kvs_mod, "kv_store"), (mp, "mla_prologue")):
        fn = getattr(mod, name)

        def wrapped(*a, _fn=fn, _name=name, **k):
            calls[_name] += 1
            if _name == "rope_interleaved_":
                calls["rope_with_k"] += a[1] is not None
            return _fn(*a, **k)
        monkeypatch.setattr(mod, name, wrapped)
    return calls


def upcast_decode(monkeypatch):
    """CPU bf16: the interpreter mis-computes bf16 tl.dot (test_model_kernels), so mla_decode
    runs on fp32 copies of q and the (dequantized) cache; both switch settings use it."""
    fn = mla_mod.mla_decode

    def run(q_nope, q_pe, kv_cache, block_tables, seq_lens, scale, k_scale, **k):
        cache = kv_cache.float() * (k_scale if kv_cache.dtype in FP8 else 1.0)
        return fn(q_nope.float(), q_pe.float(), cache, block_tables, seq_lens, scale, 1.0,
                  **k).to(q_nope.dtype)
    monkeypatch.setattr(mla_mod, "mla_decode", run)


def run_switch(dtype, cache_dtype, device, seed, spy, monkeypatch):
    cfg = tiny_config(32)
    models = [build_models(cfg, dtype, device, seed, decisive_routing=True)[1] for _ in range(2)]
    pools = [Pool(cfg, dtype, device, seed + 1) for _ in range(2)]
    for m, pool in zip(models, pools):
        if cache_dtype != dtype:  # fp8 latent cache with a per-layer scale
            pool.fast = [c.to(cache_dtype) for c in pool.fast]
            for lyr in m.model.layers:
                lyr.self_attn.k_scale = 0.37
    g = torch.Generator().manual_seed(seed + 2)
    steps = [([(0, 5), (1, 9), (2, 6)], 0), ([(0, 1), (1, 1), (2, 7), (3, 4)], 2)]
    n = cfg.num_hidden_layers
    for parts, nd in steps:
        ids = torch.randint(0, cfg.vocab_size, (sum(n for _, n in parts),), generator=g)
        outs = []
        for on, m, pool in zip((False, True), models, pools):
            (_, _), (pos, md) = pool.step(parts, nd)
            monkeypatch.setattr(mla_model, "FUSED_PROLOGUE", on)
            before = spy.copy()
            with kernel_path.force_kernels(not GPU):
                h = m(ids.to(device), pos, pool.fast, md)
            outs.append((h, m.compute_logits(h)))
            d = spy - before
            assert d["mla_prologue"] == n * on and d["kv_store"] == n * (not on)
            assert d["rope_interleaved_"] == n and d["rope_with_k"] == n * (not on)
            assert d["fused_add_rmsnorm"] == 2 * n + 1 + (0 if on else 2 * n)
        (h0, lg0), (h1, lg1) = outs
        assert torch.isfinite(h1).all()
        if GPU:  # a reduction may round differently: same tolerance as test_model_kernels
            assert rel(h1, h0) < 1e-2 and rel(lg1, lg0) < 1e-2
        else:
            assert torch.equal(h1, h0) and torch.equal(lg1, lg0)
        for c0, c1 in zip(pools[0].fast, pools[1].fast):
            if GPU:
                assert rel(c1.float(), c0.float()) < 1e-2
            else:
                assert torch.equal(c1.view(torch.uint8), c0.view(torch.uint8))


@cpu_only
@pytest.mark.parametrize("dtype,cache_dtype", [
    (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float8_e4m3fn)])
def test_switch_same_logits_interpreter(dtype, cache_dtype, spy, monkeypatch):
    if dtype == torch.bfloat16:
        upcast_decode(monkeypatch)
    run_switch(dtype, cache_dtype, "cpu", seed=31, spy=spy, monkeypatch=monkeypatch)


def test_switch_default_on():
    """On unless the env var says 0 (flipped after the session-14 GPU A/B)."""
    env = os.environ.get("ATOM_STREAM_FUSED_PROLOGUE", "1")
    assert mla_model.FUSED_PROLOGUE == (env == "1")


# ------------------------------------------------------------------ GPU (native)
@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("T", [1, 16, 256])
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, NATIVE_FP8])
def test_prologue_gpu(T, cache_dtype):
    check(T, 1536, 512, 64, torch.bfloat16, cache_dtype, "cuda", seed=T,
          k_scale=0.37 if cache_dtype in FP8 else 1.0)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, NATIVE_FP8])
def test_switch_same_logits_gpu(cache_dtype, spy, monkeypatch):
    run_switch(torch.bfloat16, cache_dtype, "cuda", seed=41, spy=spy, monkeypatch=monkeypatch)
