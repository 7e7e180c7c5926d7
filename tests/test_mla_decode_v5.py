"""MLA decode variant "v5" (kernels/mla_decode_v5.py: fp8 caches read as 16-bit pairs) against
the torch reference, interpreted on the CPU at small widths and natively with `-m gpu` at the
Kimi TP8 widths. The pair unpack is checked exhaustively against torch's fp8 conversion."""

from __future__ import annotations

import zlib

import pytest
import torch
from kernel_interp import interpret_without_gpu

GPU = interpret_without_gpu("mla_decode_v3", "mla_decode_v5", "mla_decode")

import triton
import triton.language as tl
from atom_stream.kernels import mla_decode as dec
from atom_stream.kernels import mla_decode_v5 as v5
from test_kernels_attention import FP8, check_v3_scratch, rel_err, run_decode

FNUZ = torch.float8_e4m3fnuz
cpu_only = pytest.mark.skipif(GPU, reason="interpreter tests run where there is no GPU")
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a GPU")


@triton.jit
def _unpack_probe(W, LO, HI, N: tl.constexpr, ASM: tl.constexpr):
    offs = tl.program_id(0) * N + tl.arange(0, N)
    lo, hi = v5._unpack(tl.load(W + offs), ASM)
    tl.store(LO + offs, lo)
    tl.store(HI + offs, hi)


@pytest.mark.parametrize("dt,asm", [(FP8, False), (FNUZ, False), (FP8, True)])
def test_unpack_is_exact_for_every_code_pair(dt, asm):
    """Every (low, high) byte pair: lo / hi == the codes' fp8 values (asm: the native cvt, on
    NVIDIA GPUs) or the values * 2^(bias - 15) (bit moves), bit-exact in fp16, NaN codes
    skipped; so v5 sees exactly the cache's values."""
    dev = "cuda" if GPU else "cpu"
    if asm and not v5.native_cvt(dt, torch.device(dev)):
        pytest.skip("the native e4m3x2 cvt needs a compiled NVIDIA launch")
    bias = 8 if dt == FNUZ else 7
    codes = torch.arange(256, dtype=torch.int32)
    pairs = (codes[:, None] | (codes[None, :] << 8)).flatten()  # low | high << 8, all 65536
    w16 = torch.where(pairs >= 32768, pairs - 65536, pairs).to(torch.int16).to(dev)
    lo = torch.full((65536,), float("nan"), dtype=torch.float16, device=dev)
    hi = torch.full_like(lo, float("nan"))
    _unpack_probe[(64,)](w16, lo, hi, N=1024, ASM=int(asm))
    vals = codes.to(torch.uint8).view(dt).float() * (1.0 if asm else 2.0 ** (bias - 15))
    want_lo = vals[pairs & 255]
    want_hi = vals[pairs >> 8]
    ok_lo, ok_hi = torch.isfinite(want_lo), torch.isfinite(want_hi)
    assert ok_lo.sum() >= 65536 - 2 * 256  # only the NaN codes are skipped
    assert torch.equal(lo.cpu().float()[ok_lo], want_lo[ok_lo])
    assert torch.equal(hi.cpu().float()[ok_hi], want_hi[ok_hi])


@cpu_only
@pytest.mark.parametrize("merge,q_dtype,kv_dtype,R,chunk", [
    ("fused", torch.float32, FP8, 64, 32), ("kernel", torch.float32, FP8, 64, 32),
    ("fused", torch.float16, FP8, 128, 32), ("fused", torch.float32, FNUZ, 32, 32),
    ("kernel", torch.float32, FP8, 64, 64)])
def test_decode_v5_interpreted(merge, q_dtype, kv_dtype, R, chunk):
    """Odd batch, H=3, page 8 < BLOCK_N, lens with empty / direct / multi-split sequences
    (S=6), R in 1, 2 or 4 pair chunks; twice on one workspace with fresh inputs (the fused
    merge resets its counters); the partial slots written are exactly the active splits'."""
    lens = [0, 1, 37, 700, 5, 260, 9]
    S = 6
    ws = dec.alloc_decode_workspace(7, 3, R, S, "cpu", variant="v5")
    for rep in range(2):
        seed = zlib.crc32(f"{merge} {q_dtype} {kv_dtype} {R} {chunk} {rep}".encode())
        out, ref = run_decode(7, 3, R, 32, 8, lens, q_dtype, kv_dtype, S, "cpu", seed=seed,
                              k_scale=0.37, chunk=chunk, config=(16, 4, 1), variant="v5",
                              merge=merge, ws=ws)
        assert torch.all(out[0] == 0), "empty sequence must give 0"
        assert rel_err(out, ref) < 2e-3  # q and p rounded to fp16, as v3's fp8 path
        assert len(check_v3_scratch(ws, lens, S, 16)) == 11  # the merge path ran


@cpu_only
@pytest.mark.parametrize("S", [6, 1])
def test_decode_v5_merge_uv_interpreted(S):
    """uv=(w_uv, y): v5 with its merge deferred to the merge + W_UV launch equals the reference
    times W_UV (direct, split and empty sequences; y poisoned; twice on one workspace)."""
    lens = [0, 1, 37, 700, 5, 260, 9]
    ws = dec.alloc_decode_workspace(7, 3, 64, S, "cpu", variant="v5")
    for rep in range(2):
        y, ref = run_decode(7, 3, 64, 32, 8, lens, torch.float32, FP8, S, "cpu",
                            seed=zlib.crc32(f"uv {S} {rep}".encode()), k_scale=0.37, chunk=32,
                            config=(16, 4, 1), variant="v5", ws=ws if S > 1 else None,
                            uv_dim=40)
        assert torch.all(y[0] == 0), "empty sequence must give 0"
        assert rel_err(y, ref) < 2e-3
        if S > 1:
            assert len(check_v3_scratch(ws, lens, S, 16)) == 11  # partials, no counters used


def test_split_len_host():
    """split_len_host = the kernels' split length: ceil(len / S) rounded up to BLOCK_N, at
    least MIN_SPLIT (the Kimi decode's S=128 at B=1, BLOCK_N 64)."""
    f = dec.split_len_host
    assert [f(n, 128, 64) for n in (1, 1024, 8192, 32768)] == [64, 64, 64, 256]
    assert f(10**6, 128, 64) == 7872 and f(700, 6, 16, 16) == 128


@cpu_only
@pytest.mark.parametrize("config", [(2, 1), (4, 2), (1, 4)])
def test_decode_v5_merge_uv_config_interpreted(monkeypatch, config):
    """MERGE_UV_CONFIG (splits per step, warps): the merge + W_UV walk of a 700-token
    sequence's 6 partials in steps of 2, 4, 1 splits (several steps, a partial last one)
    equals the reference."""
    monkeypatch.setattr(dec._v3, "MERGE_UV_CONFIG", config)
    lens = [0, 1, 37, 700, 5, 260, 9]
    S = 6
    ws = dec.alloc_decode_workspace(7, 3, 64, S, "cpu", variant="v5")
    y, ref = run_decode(7, 3, 64, 32, 8, lens, torch.float32, FP8, S, "cpu",
                        seed=zlib.crc32(f"uv config {config}".encode()), k_scale=0.37,
                        chunk=32, config=(16, 4, 1), variant="v5", ws=ws, uv_dim=40)
    assert torch.all(y[0] == 0), "empty sequence must give 0"
    assert rel_err(y, ref) < 2e-3
    check_v3_scratch(ws, lens, S, 16)


@cpu_only
@pytest.mark.parametrize("variant,kv_dtype,merge,S", [
    ("v5", FP8, "kernel", 6), ("v5", FP8, "fused", 6), ("v5", FNUZ, "kernel", 1),
    ("v3", FP8, None, 6), ("v1", torch.float32, None, 6)])
def test_decode_rope_interpreted(variant, kv_dtype, merge, S):
    """rope=(cos, sin, positions): q_pe arrives unrotated; v5 rotates it as it loads it, the
    other variants in place first; all equal the reference on the rotated q_pe (direct, split
    and empty sequences; twice with fresh inputs and positions)."""
    lens = [0, 1, 37, 700, 5, 260, 9]
    for rep in range(2):
        out, ref = run_decode(7, 3, 64, 32, 8, lens, torch.float32, kv_dtype, S, "cpu",
                              seed=zlib.crc32(f"rope {variant} {merge} {S} {rep}".encode()),
                              k_scale=0.37, chunk=32, config=(16, 4, 1), variant=variant,
                              merge=merge, rope=True)
        assert torch.all(out[0] == 0), "empty sequence must give 0"
        assert rel_err(out, ref) < 2e-3


@cpu_only
def test_v5_falls_back_to_v3_where_it_does_not_apply():
    """A 16-bit cache, or rope 16 (pairs < 16), runs v3 on the same workspace: still exact."""
    lens = [3, 90, 17]
    for kv_dtype, DR in ((torch.float32, 32), (FP8, 16)):
        ws = dec.alloc_decode_workspace(3, 2, 32, 2, "cpu", variant="v5")
        out, ref = run_decode(3, 2, 32, DR, 8, lens, torch.float32, kv_dtype, 2, "cpu",
                              seed=DR, k_scale=0.5, chunk=16, config=(16, 4, 1),
                              variant="v5", ws=ws)
        assert rel_err(out, ref) < (2e-6 if kv_dtype == torch.float32 else 2e-3)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("kv_dtype", [FP8, FNUZ])
@pytest.mark.parametrize("merge,cfg,S", [
    (None, None, 4), (None, None, 16), (None, None, 40), ("kernel", None, 16),
    (None, (64, 4, 2), 16), (None, (64, 8, 2), 16), (None, (32, 4, 3), 4)])
def test_decode_v5_gpu(kv_dtype, merge, cfg, S):
    """v5 at the real widths (Kimi TP8: H=8, page 64, 512 + 64): odd batch, empty and long
    sequences, both merges, twice on one workspace; partial slots = the active splits."""
    gen = torch.Generator().manual_seed(S)
    lens = [0, 1, 5000, 63] + torch.randint(1, 3000, (13,), generator=gen).tolist()
    B, H = len(lens), 8
    ws = dec.alloc_decode_workspace(B, H, 512, S, "cuda", variant="v5")
    for seed in (1, 2):
        out, ref = run_decode(B, H, 512, 64, 64, lens, torch.bfloat16, kv_dtype, S, "cuda",
                              seed=seed, k_scale=0.5, variant="v5", merge=merge, config=cfg,
                              ws=ws)
        assert torch.all(out[0] == 0)
        assert rel_err(out, ref) < 1e-2
        check_v3_scratch(ws, lens, S, (cfg or dec.V5_CONFIG)[0])


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("kv_dtype,S,uv", [(FP8, 16, 0), (FP8, 1, 0), (FNUZ, 16, 0),
                                           (FP8, 16, 128)])
def test_decode_v5_rope_gpu(kv_dtype, S, uv):
    """v5 with q_pe's RoPE in the launch at the real widths (with the merge + W_UV form too)."""
    lens = [0, 1, 5000, 63, 700, 2048, 17]
    B, H = len(lens), 8
    for seed in (1, 2):
        out, ref = run_decode(B, H, 512, 64, 64, lens, torch.bfloat16, kv_dtype, S, "cuda",
                              seed=seed, k_scale=0.5, variant="v5", rope=True, uv_dim=uv)
        assert torch.all(out[0] == 0)
        assert rel_err(out, ref) < 1e-2


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("variant,kv_dtype", [("v5", FP8), ("v1", torch.bfloat16),
                                              ("v3", torch.bfloat16)])
@pytest.mark.parametrize("S", [1, 7, 40])
def test_decode_merge_uv_gpu(variant, kv_dtype, S):
    """uv=(W_UV, y) at the real widths (H=8, page 64, 512 + 64, v 128): the merge launch with
    W_UV folded in equals the reference times W_UV, for empty, direct and split sequences."""
    gen = torch.Generator().manual_seed(S)
    lens = [0, 1, 5000, 63] + torch.randint(1, 3000, (5,), generator=gen).tolist()
    B, H = len(lens), 8
    ws = dec.alloc_decode_workspace(B, H, 512, S, "cuda", variant=variant)
    for seed in (1, 2):
        y, ref = run_decode(B, H, 512, 64, 64, lens, torch.bfloat16, kv_dtype, S, "cuda",
                            seed=seed, k_scale=0.5, variant=variant, ws=ws, uv_dim=128)
        assert torch.all(y[0] == 0)
        assert rel_err(y, ref) < 1e-2


class MergeUvSpy:
    """Stands in for _v3._mla_merge_uv: records each launch's reduction constexprs (SC,
    BLOCK_S, num_warps) and launches the real kernel."""

    def __init__(self, real):
        self.real, self.seen = real, []

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.seen.append((kw["SC"], kw["BLOCK_S"], kw["num_warps"]))
            return self.real[grid](*args, **kw)
        return launch


@cpu_only
@pytest.mark.parametrize("variant,config", [("v5", (32, 4)), ("v5", (4, 2)), ("v1", (4, 2))])
def test_merge_uv_is_batch_invariant_interpreted(monkeypatch, variant, config):
    """The split count follows the batch size (decode_num_splits), so a sequence whose splits
    are MIN_SPLIT-bound (the same token ranges at S 6 and 12) must give bit-identical y from
    attention + merge + W_UV at either count, and the merge's reduction shapes (SC, BLOCK_S,
    warps) may not depend on S: the interpreter's sums cannot show an order change, so the
    launch constants are checked too."""
    monkeypatch.setattr(dec._v3, "MERGE_UV_CONFIG", config)
    spy = MergeUvSpy(dec._v3._mla_merge_uv)
    monkeypatch.setattr(dec._v3, "_mla_merge_uv", spy)
    lens = [6 * dec.MIN_SPLIT - 5, 2 * dec.MIN_SPLIT + 1, 37, 0]
    ys = []
    for S in (6, 12):
        ws = dec.alloc_decode_workspace(4, 3, 64, S, "cpu", variant=variant)
        y, ref = run_decode(4, 3, 64, 32, 8, lens, torch.float32,
                            FP8 if variant == "v5" else torch.float32, S, "cpu", seed=77,
                            k_scale=0.37, chunk=32, config=(16, 4, 1), variant=variant, ws=ws,
                            uv_dim=40)
        assert rel_err(y, ref) < 2e-3
        ys.append(y)
    assert torch.equal(ys[0], ys[1])
    assert len(spy.seen) == 2 and spy.seen[0] == spy.seen[1], spy.seen


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("variant,kv_dtype", [("v5", FP8), ("v1", torch.bfloat16)])
@pytest.mark.parametrize("counts", [(8, 32), (64, 128)])
def test_merge_uv_is_batch_invariant_gpu(variant, kv_dtype, counts):
    """As the interpreted test, at the real widths (H=8, 512 + 64, page 64, v 128) and split
    counts 8 / 32 and 64 / 128 (the counts vary over B <= 4 where there are several head
    groups, e.g. DeepSeek at TP1: S 33 / 16 / 8 at B = 1 / 2 / 4 on the H200; lengths <= the
    smaller count x MIN_SPLIT, so the same token ranges; 4093 tokens: 64 active splits, two
    steps of the walk): y bit-identical. The interpreter's sums cannot show an order change; the GPU's tree
    reductions do (a split-count-capped walk broke the GPU engine's pipelined == sync test in
    session 22)."""
    n = counts[0] * dec.MIN_SPLIT
    lens = [n - 3, 2 * dec.MIN_SPLIT + 1, 37, 0, min(300, n)]
    ys = []
    for S in counts:
        ws = dec.alloc_decode_workspace(5, 8, 512, S, "cuda", variant=variant)
        y, ref = run_decode(5, 8, 512, 64, 64, lens, torch.bfloat16, kv_dtype, S, "cuda",
                            seed=5, k_scale=0.5, variant=variant, ws=ws, uv_dim=128)
        assert rel_err(y, ref) < 1e-2
        ys.append(y)
    assert torch.equal(ys[0], ys[1])


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("config", [(32, 4), (16, 4), (32, 8), (64, 8)])
def test_decode_v5_merge_uv_config_gpu(monkeypatch, config):
    """Each MERGE_UV_CONFIG the bench times, at the real widths (H=8, page 64, 512 + 64, v 128;
    S=128 as the decode step launches B <= 2): the reference times W_UV."""
    monkeypatch.setattr(dec._v3, "MERGE_UV_CONFIG", config)
    lens = [32768, 8192, 0, 1, 700, 4097]
    B, H, S = len(lens), 8, 128
    ws = dec.alloc_decode_workspace(B, H, 512, S, "cuda", variant="v5")
    for seed in (1, 2):
        y, ref = run_decode(B, H, 512, 64, 64, lens, torch.bfloat16, FP8, S, "cuda",
                            seed=seed, k_scale=0.5, variant="v5", ws=ws, uv_dim=128)
        assert torch.all(y[2] == 0)
        assert rel_err(y, ref) < 1e-2
        check_v3_scratch(ws, lens, S, dec.V5_CONFIG[0])


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("H", [16, 128])
def test_decode_v5_more_heads_gpu(H):
    """Kimi at TP4 (16 heads) and DeepSeek at TP1 (128 heads: 8 head groups, one counter
    each) through "auto" (v5 on e4m3fn), with the model's own split count."""
    lens = [0, 3000, 1, 700, 64, 129, 4097]
    B = len(lens)
    S = dec.decode_num_splits(B, H, None, "cuda", "auto", FP8)
    ws = dec.alloc_decode_workspace(B, H, 512, S, "cuda", variant="auto", kv_dtype=FP8)
    out, ref = run_decode(B, H, 512, 64, 64, lens, torch.bfloat16, FP8, S, "cuda", seed=H,
                          k_scale=0.25, variant="auto", ws=ws)
    assert torch.all(out[0] == 0)
    assert rel_err(out, ref) < 1e-2
