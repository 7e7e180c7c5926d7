"""MLA prefill after a long cached prefix in pieces (atom_stream/models/mla_prefix.py): the
prefill kernel's causal=False / lse= outputs against the reference (interpreted on the CPU,
natively with -m gpu), the log-sum-exp merge of partial attentions against one attention over
all keys, and the model and engine through pieces of a few tokens against the one-pass path
(transformers' logits; the cold run's tokens)."""

from __future__ import annotations

import random

import pytest
import torch
from kernel_interp import interpret_without_gpu

GPU = interpret_without_gpu("mla_prefill")

from atom_stream.kernels.mla_prefill import mla_prefill_ref, mla_prefill_triton
from test_kernels_attention import make_prefill, rel_err

from atom_stream.models import mla_prefix

cpu_only = pytest.mark.skipif(GPU, reason="interpreter tests run where there is no GPU")
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a GPU")


def check_kernel_lse(lq, lk, H, Dqk, Dv, dtype, device, seed, causal, tol, **kw):
    """The kernel's fp32 o and lse (poisoned first) == the reference's, for every row (lse: both
    in fp32 from the same rounded inputs, so within 1e-4 whatever the input dtype; one key
    wrongly masked moves it by ~1 / len_k)."""
    q, k, v, cq, ck = make_prefill(lq, lk, H, Dqk, Dv, dtype, device, seed)
    out = torch.full((sum(lq), H, Dv), float("nan"), device=device)
    lse = torch.full((sum(lq), H), float("nan"), device=device)
    mla_prefill_triton(q, k, v, cq, ck, max(lq), 0.2, out=out, causal=causal, lse=lse, **kw)
    lse_ref = torch.full_like(lse, float("nan"))
    ref = mla_prefill_ref(q.float(), k.float(), v.float(), cq, ck, 0.2, causal=causal,
                          lse=lse_ref)
    assert rel_err(out, ref) < tol
    assert torch.allclose(lse, lse_ref, atol=1e-4, rtol=1e-5)


@cpu_only
@pytest.mark.parametrize("causal", [True, False])
def test_prefill_kernel_lse_and_no_mask_interpreted(causal):
    """Sequences of keys 5 / 70 / 100 for 5 / 40 / 17 queries, and without the mask also 7 keys
    for 30 queries (a short last piece under a long chunk); fp32 and fp16 inputs."""
    lq, lk = ([5, 40, 17], [5, 70, 100]) if causal else ([5, 40, 17, 30], [5, 70, 100, 7])
    for dtype, tol in ((torch.float32, 2e-6), (torch.float16, 2e-3)):
        check_kernel_lse(lq, lk, 3, 48, 32, dtype, "cpu", seed=3 + causal, causal=causal,
                         tol=tol, block_m=16, block_n=16)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("causal", [True, False])
def test_prefill_kernel_lse_and_no_mask_gpu(causal):
    """At the real widths (qk 192, v 128, 8 heads), bf16 inputs, the default tiles; without the
    mask also 40 keys under 300 queries (the short last piece)."""
    lq, lk = ([1, 300, 1000], [1, 2300, 1000]) if causal else ([1, 300, 1000, 300],
                                                                [1, 2300, 1000, 40])
    check_kernel_lse(lq, lk, 8, 192, 128, torch.bfloat16, "cuda", seed=7, causal=causal,
                     tol=1e-2)


@pytest.mark.parametrize("causal", [True, False])
def test_attention_ref_lse_in_query_blocks(monkeypatch, causal):
    """attention_ref_lse (query blocks of 3 rows here) == the kernels' reference."""
    monkeypatch.setattr(mla_prefix, "REF_SCORE_BYTES", 4 * 2 * 23 * 3)
    q, k, v, cq, ck = make_prefill([11], [23], 2, 24, 16, torch.float32, "cpu", seed=5)
    lse_ref = torch.empty(11, 2)
    ref = mla_prefill_ref(q, k, v, cq, ck, 0.3, causal=causal, lse=lse_ref)
    o, lse = mla_prefix.attention_ref_lse(q, k, v, 0.3, causal)
    assert rel_err(o, ref) < 1e-6 and torch.allclose(lse, lse_ref, atol=1e-5, rtol=0)


def test_merge_partial_equals_attention_over_all_keys():
    """The queries' attention over keys split into an older prefix (in pieces of 7, no mask)
    and their own causal part, merged piece by piece == one causal attention over all keys."""
    q, k, v, cq, ck = make_prefill([9], [40], 3, 24, 16, torch.float32, "cpu", seed=8)
    want = mla_prefill_ref(q, k, v, cq, ck, 0.25)
    o, lse = mla_prefix.attention_ref_lse(q, k[31:], v[31:], 0.25, causal=True)
    for a in range(0, 31, 7):
        b = min(31, a + 7)
        mla_prefix.merge_partial(o, lse, *mla_prefix.attention_ref_lse(q, k[a:b], v[a:b], 0.25,
                                                                       causal=False))
    assert rel_err(o, want) < 1e-6


def test_prefix_chunk_tokens_bounds_the_transient():
    """PREFIX_CHUNK_BYTES over one prefix token's expanded bytes: ~25K tokens for a Kimi-K2.5
    TP8 rank (8 heads), ~2.3K for DeepSeek-V3 at TP1 (128 heads), bf16."""
    class Shape:  # MLA's attributes that the size depends on
        r, rope, nope, v_dim = 512, 64, 128, 128

    kimi, ds = Shape(), Shape()
    kimi.num_heads, ds.num_heads = 8, 128
    assert 24_000 < mla_prefix.prefix_chunk_tokens(kimi, torch.bfloat16) < 27_000
    assert 2_000 < mla_prefix.prefix_chunk_tokens(ds, torch.bfloat16) < 2_600
    assert mla_prefix.prefix_chunk_tokens(ds, torch.bfloat16, budget=1) == 1
    # the KV budget's reserve: a piece + two fp32 [T, H, v] partials and their lse
    assert mla_prefix.budget_reserve_bytes(8, 128, 8192) == (256 << 20) + 2 * 8192 * 8 * 129 * 4


def check_pieces_equal_one_pass(device, dtype, kv_dtype, H, r, rope, nope, vd, prefix, lq,
                                chunk, kernel, tol, seed):
    """prefill_over_long_prefix (pieces of `chunk`, the Triton kernel when `kernel`) == the
    one-pass naive attention (whole prefix expanded, layers.attention.mla_prefill_ref), over a
    scattered paged cache (page 16; fp8 caches dequantized by k_scale 0.5 on both sides)."""
    from types import SimpleNamespace

    from atom_stream.layers.attention import gather_kv
    from atom_stream.layers.attention import mla_prefill_ref as one_pass_ref
    from atom_stream.layers.linear import Linear

    g = torch.Generator().manual_seed(seed)
    page, n = 16, prefix + lq
    blocks = n // page + 5
    kv_b = Linear(r, H * (nope + vd), dtype=dtype, device=device)
    kv_b.weight.copy_(torch.randn(kv_b.weight.shape, generator=g) * r ** -0.5)
    mla = SimpleNamespace(r=r, rope=rope, nope=nope, v_dim=vd, num_heads=H, scale=0.13,
                          k_scale=0.5, kv_b_proj=kv_b)
    cache = (torch.randn(blocks, page, r + rope, generator=g) * 2).to(device).to(kv_dtype)
    table = torch.randperm(blocks, generator=g)[: -(-n // page)].to(torch.int32).to(device)
    q = torch.randn(lq, H, nope + rope, generator=g).to(device).to(dtype)
    new = torch.randn(lq, r + rope, generator=g).to(device).to(dtype)
    got = mla_prefix.prefill_over_long_prefix(mla, q, new[:, :r], new[:, r:], cache, table,
                                              prefix, chunk, lambda q, v: kernel)
    entries = torch.cat([gather_kv(cache, table, prefix, dtype, 0.5), new])
    k, v = mla_prefix.expand_kv(mla, kv_b.weight, entries[:, :r], entries[:, r:])
    want = one_pass_ref(q, k, v, 0.13)
    assert got.dtype == dtype and rel_err(got, want.float()) < tol


@pytest.mark.parametrize("kernel", [False, True])
def test_prefix_pieces_equal_one_pass(kernel):
    """Tiny widths on the CPU, fp32: 50 prefix tokens in pieces of 16 (the last one short), 7
    queries; kernel=True runs the Triton kernel interpreted (CPU only)."""
    if kernel and GPU:
        pytest.skip("the interpreted kernel runs where there is no GPU")
    check_pieces_equal_one_pass("cpu", torch.float32, torch.float32, 2, 32, 16, 16, 16, 50, 7,
                                16, kernel, 1e-5, seed=1 + kernel)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_prefix_pieces_equal_one_pass_gpu(kv_dtype):
    """The real widths (8 heads, r 512, rope 64, nope 128, v 128), bf16: a 5000-token prefix in
    pieces of 1024 under 300 queries, the Triton kernel."""
    check_pieces_equal_one_pass("cuda", torch.bfloat16, kv_dtype, 8, 512, 64, 128, 128, 5000,
                                300, 1024, True, 1e-2, seed=3)


def test_chunked_prefill_through_prefix_pieces_matches_hf(monkeypatch, tmp_path):
    """The model's chunked prefill (chunks 0-9, 9-22, 22-30: prefixes of 9 and 22 read back
    from the paged cache) with the prefix walked 4 tokens at a time: transformers' logits."""
    from hf_checkpoints import FLAVOURS, write_hf_checkpoint
    from test_model_parity import PagedSeq

    from atom_stream.config import ModelConfig
    from atom_stream.loader import load_checkpoint
    from atom_stream.models import MODEL_REGISTRY

    calls = []
    real = mla_prefix.prefill_over_long_prefix

    def spy(*a, **kw):
        calls.append(a[6])  # the prefix length
        return real(*a, **kw)

    monkeypatch.setattr(mla_prefix, "prefix_chunk_tokens", lambda mla, dtype: 4)
    monkeypatch.setattr(mla_prefix, "prefill_over_long_prefix", spy)
    for name in sorted(FLAVOURS):
        path = tmp_path / name
        hf = write_hf_checkpoint(str(path), name, seed=len(name)).double()
        cfg = ModelConfig.from_pretrained(str(path))
        ours = MODEL_REGISTRY[cfg.architecture](cfg, 512, torch.float32)
        load_checkpoint(ours, str(path), cfg.num_hidden_layers, cfg.tie_word_embeddings)
        ours.process_weights_after_loading()
        ids = torch.randint(0, cfg.vocab_size, (30,), generator=torch.Generator().manual_seed(4))
        seq = PagedSeq(cfg, seed=2)
        outs = []
        for a, b in ((0, 9), (9, 22), (22, 30)):
            pos, md = seq.step_md(b - a, decode=False)
            outs.append(ours.compute_logits(ours(ids[a:b], pos, seq.caches, md)))
        with torch.no_grad():
            ref = hf(ids[None]).logits[0]
        rel = ((torch.cat(outs).double() - ref).norm() / ref.norm()).item()
        assert rel < 1e-4, f"{name}: prefill through prefix pieces differs by {rel:.2e}"
    assert set(calls) == {9, 22}  # both later chunks took the pieces (every layer)


def test_prefix_cache_hit_through_pieces_gives_the_cold_tokens(monkeypatch):
    """The demo engine: a 200-token prefix cached by one request, then a second request whose
    prefill reads 192 of it back in pieces of 16 tokens: the tokens of a cold engine."""
    from test_engine_core import demo_engine, run

    from atom_stream import SamplingParams

    rng = random.Random(3)
    prefix = [rng.randrange(256) for _ in range(200)]
    a = prefix + [rng.randrange(256) for _ in range(9)]
    b = prefix + [rng.randrange(256) for _ in range(13)]
    p = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    want = run(demo_engine(num_kv_blocks=64, enable_prefix_caching=False),
               [("b", b, p)])[0]["b"].token_ids
    monkeypatch.setattr(mla_prefix, "prefix_chunk_tokens", lambda mla, dtype: 16)
    warm = demo_engine(num_kv_blocks=64)
    run(warm, [("a", a, p)])
    out = run(warm, [("b", b, p)])[0]["b"]
    assert out.usage.cached_tokens == 192
    assert out.token_ids == want


def test_bench_mla_prefix_smoke_on_cpu(tmp_path, capsys):
    """bench/mla_prefix.py --device cpu (the reference paths): one-pass and pieces rows, each
    checked against the one pass; the module's PREFIX_CHUNK_BYTES restored after."""
    import importlib.util
    import json
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench",
                        "mla_prefix.py")
    spec = importlib.util.spec_from_file_location("bench_mla_prefix", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    keep = mla_prefix.PREFIX_CHUNK_BYTES
    out = tmp_path / "rows.json"
    bench.main(["--device", "cpu", "--prefix", "100", "--q", "8", "--chunk-mib", "0.3",
                "--iters", "1", "--out", str(out)])
    rows = json.loads(out.read_text())
    assert [r["path"] for r in rows] == ["one pass", "pieces 0.3 MiB"]
    assert rows[1]["chunk_tokens"] < 100 and rows[1]["rel_err"] < 2e-2
    assert mla_prefix.PREFIX_CHUNK_BYTES == keep and "wrote" in capsys.readouterr().out
