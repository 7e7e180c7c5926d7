"""Attention kernels (kernels/mla_decode.py + mla_decode_sched.py, kv_store.py, mla_prefill.py)
against torch references.

Without a GPU the Triton kernels run under TRITON_INTERPRET=1 (set here, before the kernel modules
are decorated) at small shapes with fp32/fp16 dots (the interpreter mishandles bf16 tl.dot).
`-m gpu` runs them natively in bf16 / fp8 at the real MLA widths (512 + 64, 192 / 128).
Every check draws fresh random inputs and poisons outputs (and scratch) with NaN first.
Decode runs every variant: "v1" (split per sequence, two launches), "v2" (device work list;
fused last-arriver merge or merge kernel; fp8 modes 0-3) and "v3" (v1's splits, fused
last-arriver merge or merge kernel, fp8 through registers or cp.async); v2/v3 check also that
the partial slots written are exactly the multi-split sequences' and that the counters end at
zero (and run twice on one workspace).
"""

from __future__ import annotations


import pytest
import torch
from kernel_interp import interpret_without_gpu

GPU = interpret_without_gpu(
    "kv_store", "mla_decode_sched", "mla_decode", "mla_prefill", "norm_rope")

from atom_stream.kernels import mla_decode as dec
from atom_stream.kernels import mla_decode_sched as sched
from atom_stream.kernels.kv_store import kv_store, kv_store_ref
from atom_stream.kernels.mla_prefill import (
    mla_prefill_ref,
    mla_prefill_sdpa,
    mla_prefill_triton,
)
from atom_stream.kernels.norm_rope import rope_interleaved_ref

cpu_only = pytest.mark.skipif(GPU, reason="interpreter tests run where there is no GPU")
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a GPU")
FP8 = torch.float8_e4m3fn


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite output (unwritten element?)"
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def make_cache(num_blocks, page, D, dtype, device, k_scale=1.0, gen=None):
    x = torch.randn(num_blocks, page, D, generator=gen, device=device)
    if dtype in (torch.float8_e4m3fn, torch.float8_e4m3fnuz):
        return (x * 2.0 / k_scale).to(dtype)
    return x.to(dtype)


def make_tables(lens, page, num_blocks, device, gen=None, width=None):
    """Random, disjoint block tables (default width: the longest sequence + 1 spare column)."""
    width = width or max(max(-(-n // page) for n in lens), 1) + 1
    perm = torch.randperm(num_blocks, generator=gen, device="cpu")[: len(lens) * width]
    return perm.view(len(lens), width).to(torch.int32).to(device)


def run_decode(B, H, R, DR, page, lens, q_dtype, kv_dtype, num_splits, device, seed,
               k_scale=1.0, fused_q=False, config=None, chunk=128, variant="v1", merge=None,
               fp8_mode=1, ws=None, fp8_path="regs", uv_dim=0, rope=False):
    """(out, ref): o_latent from mla_decode and mla_decode_ref; with uv_dim > 0 the uv= form
    instead, (y, y_ref) with a random W_UV [H, uv_dim, R] and y_ref = ref rounded to q's dtype
    times W_UV^T per head in fp32 (the rounding points of the merge + bmm it replaces).
    rope: mla_decode gets q_pe unrotated with rope=(cos, sin, positions) (random tables and
    positions); the reference gets q_pe rotated by rope_interleaved_ref."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    num_blocks = len(lens) * (max(-(-n // page) for n in lens) + 1) + 3
    kv = make_cache(num_blocks, page, R + DR, kv_dtype, "cpu", k_scale, gen).to(device)
    bt = make_tables(lens, page, num_blocks, device, gen)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    q = (torch.randn(B, H, R + DR, generator=gen) * 0.5).to(q_dtype).to(device)
    qn, qp = q[..., :R], q[..., R:]
    scale = 0.1447
    out = torch.full((B, H, R), float("nan"), dtype=q_dtype, device=device)
    if ws is None:
        ws = dec.alloc_decode_workspace(B, H, R, num_splits, device, variant=variant)
    ws[0].fill_(float("nan"))
    ws[1].fill_(float("nan"))
    kw = dict(out=out, num_splits=num_splits, workspace=ws, config=config, chunk=chunk,
              variant=variant, merge=merge, fp8_mode=fp8_mode, fp8_path=fp8_path)
    if uv_dim:
        w_uv = (torch.randn(H, uv_dim, R, generator=gen) * 0.2).to(q_dtype).to(device)
        y = torch.full((B, H, uv_dim), float("nan"), dtype=q_dtype, device=device)
        kw["uv"] = (w_uv, y)
    qp_ref = qp.clone()
    if rope:
        ang = torch.rand(37, DR // 2, generator=gen) * 6.3
        cos, sin = ang.cos().to(device), ang.sin().to(device)
        pos = torch.randint(0, 37, (B,), generator=gen).to(device)
        kw["rope"] = (cos, sin, pos)
        qp_ref = rope_interleaved_ref(qp_ref, cos, sin, pos)
    if fused_q:
        got = dec.mla_decode(q, None, kv, bt, seq_lens, scale, k_scale, rope_dim=DR, **kw)
    else:
        got = dec.mla_decode(qn, qp, kv, bt, seq_lens, scale, k_scale, **kw)
    ref = dec.mla_decode_ref(qn.float(), qp_ref.float(), kv, bt, seq_lens, scale, k_scale)
    if uv_dim:
        assert got is y
        return y, torch.einsum("bhr,hvr->bhv", ref.to(q_dtype).float(), w_uv.float())
    assert got is out
    return out, ref


def check_v2_scratch(ws, lens, P, block_n, merge):
    """Slots written == items of multi-item sequences (schedule_ref); counters back at zero."""
    max_s = dec.FUSED_MAX_S if merge == "fused" else dec.MAX_SPLITS
    max_s = min(max_s, 1 << P.bit_length()) if merge == "fused" else max_s
    items = sched.schedule_ref(lens, P, block_n, dec.V2_MIN_CHUNK, max_s)
    per_seq = {b: sum(1 for i in items if i[0] == b) for b in range(len(lens))}
    want = {k for k, it in enumerate(items) if per_seq[it[0]] > 1}
    got = set(torch.nonzero(~ws[1].isnan().all(1)).flatten().tolist())
    assert got == want, (got, want)
    assert torch.all(ws[2] == 0), "counters must be reset for the next launch"
    return want


# ------------------------------------------------------------------ CPU (interpreter)
@cpu_only
@pytest.mark.parametrize("q_dtype,kv_dtype", [(torch.float32, torch.float32),
                                              (torch.float16, torch.float16),
                                              (torch.float32, FP8)])
@pytest.mark.parametrize("num_splits,R,chunk", [(1, 32, 32), (4, 32, 16), (4, 64, 16),
                                                (1, 64, 16)])
def test_decode_interpreted(q_dtype, kv_dtype, num_splits, R, chunk):
    # H=3 (padded head tile), page 8 < BLOCK_N (tiles span pages), lengths 0/1/odd/long;
    # R split in 1, 2 and 4 chunks (the real 512 runs as 4 x 128)
    lens = [0, 1, 37, 300]
    k_scale = 0.37 if kv_dtype == FP8 else 1.25  # non-fp8 caches fold it into the scales
    out, ref = run_decode(4, 3, R, 16, 8, lens, q_dtype, kv_dtype, num_splits, "cpu",
                          seed=hash((str(q_dtype), str(kv_dtype), num_splits, R)) % 2**31,
                          k_scale=k_scale, chunk=chunk, config=(32, 4, 1))
    assert torch.all(out[0] == 0), "empty sequence must give 0"
    # fp8 caches run the dots in fp16 (q and p rounded to fp16)
    tol = 2e-6 if q_dtype == torch.float32 and kv_dtype != FP8 else 2e-3
    assert rel_err(out, ref) < tol


@cpu_only
def test_decode_interpreted_many_heads_fused_q():
    # H=20 > BLOCK_H: two head groups; single q [B, H, R + DR]; page 32 with BLOCK_N 16
    out, ref = run_decode(2, 20, 16, 16, 32, [150, 70], torch.float32, torch.float32, 3, "cpu",
                          seed=11, fused_q=True, config=(16, 4, 1), chunk=8)
    assert rel_err(out, ref) < 2e-6


@cpu_only
@cpu_only
def test_warmup_decode_runs_every_batch_size(monkeypatch):
    # one mla_decode call per batch size 1..max_batch at the model's widths (what the runner's
    # start-up warm-up compiles; on the CPU the interpreter runs them)
    calls = []
    real = dec.mla_decode

    def spy(q, qp, cache, bt, lens, scale, **kw):
        calls.append((q.shape, qp.shape, cache.dtype, int(lens.sum())))
        return real(q, qp, cache, bt, lens, scale, **kw)

    monkeypatch.setattr(dec, "mla_decode", spy)
    assert dec.warmup_decode(2, 32, 16, 4, torch.float32, torch.float32, "cpu", 3) == 3
    assert [c[0] for c in calls] == [(b, 2, 32) for b in (1, 2, 3)]
    assert all(c[1][-1] == 16 and c[2] == torch.float32 for c in calls)
    # the uv= form (merge + W_UV) for every batch size up to its limit, capped by max_batch
    calls.clear()
    assert dec.warmup_decode(2, 32, 16, 4, torch.float32, torch.float32, "cpu", 3, v_dim=8,
                             uv_max_batch=4) == 6
    assert [c[0] for c in calls] == [(b, 2, 32) for b in (1, 2, 3, 1, 2, 3)]


def test_num_splits_heuristic():
    assert dec.decode_num_splits(1, 8, 8192, variant="v1") > 1
    assert dec.decode_num_splits(1, 8, 10, variant="v1") == 1
    assert dec.decode_num_splits(4096, 8, 8192, variant="v1") == 1
    assert dec.decode_num_splits(1, 8, variant="v1") <= dec.MAX_SPLITS
    # v2: P = V2_WAVES * SMs (8 on CPU) per head group, capped by B * max_len / V2_MIN_CHUNK
    assert dec.decode_num_splits(64, 8, variant="v2") == dec.V2_WAVES * 8
    assert dec.decode_num_splits(64, 128, variant="v2") == dec.V2_WAVES  # 8 head groups
    assert dec.decode_num_splits(1, 8, 10, variant="v2") == 1


@cpu_only
def test_schedule_ref_balances():
    # uniform: equal items, no more than P; short sequences at large B: one item each (direct)
    items = sched.schedule_ref([8192] * 64, 264, 32, 64, 16)
    assert len(items) == 256 and {e - s for _, s, e in items} == {2048}
    assert len(sched.schedule_ref([1024] * 256, 264, 32, 64, 16)) == 256
    gen = torch.Generator().manual_seed(5)
    lens = torch.randint(0, 16384, (64,), generator=gen).tolist() + [0]
    items = sched.schedule_ref(lens, 264, 32, 64, 128)
    assert len(items) <= 264 + len(lens)
    assert max(e - s for _, s, e in items) <= 1.6 * sum(lens) / 264 + 32
    # every token of every sequence is covered exactly once; empty sequences get one item
    for b, n in enumerate(lens):
        spans = sorted((s, e) for bb, s, e in items if bb == b)
        assert spans[0][0] == 0 and spans[-1][1] == n
        assert all(a[1] == c[0] for a, c in zip(spans, spans[1:]))


@cpu_only
@pytest.mark.parametrize("merge", ["fused", "kernel"])
@pytest.mark.parametrize("q_dtype,kv_dtype,fp8_mode", [
    (torch.float32, torch.float32, 1), (torch.float16, torch.float16, 1),
    (torch.float32, FP8, 0), (torch.float32, FP8, 1), (torch.float32, FP8, 2),
    (torch.float32, FP8, 3)])
def test_decode_v2_interpreted(merge, q_dtype, kv_dtype, fp8_mode):
    # odd batch, H=3, page 8 < BLOCK_N, lengths 0 / 1 / odd / long; P=6 splits 700 in 4, 260 in 2
    lens = [0, 1, 37, 700, 5, 260, 9]
    P = 6
    k_scale = 0.37 if kv_dtype == FP8 else 1.25
    seed = hash((merge, str(q_dtype), str(kv_dtype), fp8_mode)) % 2**31
    ws = dec.alloc_decode_workspace(7, 3, 32, P, "cpu", variant="v2")
    out, ref = run_decode(7, 3, 32, 16, 8, lens, q_dtype, kv_dtype, P, "cpu", seed=seed,
                          k_scale=k_scale, chunk=16, config=(16, 4, 1), variant="v2",
                          merge=merge, fp8_mode=fp8_mode, ws=ws)
    assert torch.all(out[0] == 0), "empty sequence must give 0"
    tol = 2e-6 if q_dtype == torch.float32 and kv_dtype != FP8 else 2e-3
    assert rel_err(out, ref) < tol
    assert len(check_v2_scratch(ws, lens, P, 16, merge)) == 6  # the merge path ran


@cpu_only
def test_decode_v2_replay_and_direct():
    """Same workspace twice with new inputs (the fused merge's counters must reset), then
    num_splits=1 (one item per sequence: no partials) and a fused q at R=64 in 4 chunks."""
    lens = [150, 0, 70, 3]
    ws = dec.alloc_decode_workspace(4, 20, 16, 5, "cpu", variant="v2")
    for seed in (21, 22):
        out, ref = run_decode(4, 20, 16, 16, 32, lens, torch.float32, torch.float32, 5, "cpu",
                              seed=seed, config=(16, 4, 1), chunk=8, variant="v2",
                              merge="fused", ws=ws, fused_q=True)
        assert rel_err(out, ref) < 2e-6 and torch.all(out[1] == 0)
        check_v2_scratch(ws, lens, 5, 16, "fused")
    out, ref = run_decode(3, 3, 64, 16, 8, [77, 0, 9], torch.float32, torch.float32, 1, "cpu",
                          seed=23, config=(16, 4, 1), chunk=16, variant="v2")
    assert rel_err(out, ref) < 2e-6 and torch.all(out[1] == 0)


def check_v3_scratch(ws, lens, S, block_n):
    """Partial slots written == the active splits of multi-split sequences; counters at zero."""
    want = set()
    for b, n in enumerate(lens):
        act = -(-n // dec.split_len_host(n, S, block_n, dec.MIN_SPLIT))
        if act > 1:
            want |= {(b, s) for s in range(act)}
    got = {tuple(x) for x in torch.nonzero(~ws[1].isnan().all(1)).tolist()}
    assert got == want, (got, want)
    assert torch.all(ws[2] == 0), "counters must be reset for the next launch"
    return want


@cpu_only
@pytest.mark.parametrize("merge,q_dtype,kv_dtype,fp8_path", [
    ("fused", torch.float32, torch.float32, "regs"),
    ("kernel", torch.float32, torch.float32, "regs"),
    ("fused", torch.float16, torch.float16, "regs"),
    ("fused", torch.float32, FP8, "regs"), ("kernel", torch.float32, FP8, "regs"),
    ("fused", torch.float32, FP8, "cpasync"),
    ("fused", torch.float32, torch.float8_e4m3fnuz, "regs")])
def test_decode_v3_interpreted(merge, q_dtype, kv_dtype, fp8_path):
    # odd batch, H=3, page 8 < BLOCK_N; S=6: 700 -> 6 splits, 260 -> 5 (>= MIN_SPLIT each),
    # 37/5/9/1 direct, 0 -> zeros.
    # Two launches on one workspace with fresh inputs (the fused merge must reset its counters).
    lens = [0, 1, 37, 700, 5, 260, 9]
    S = 6
    fp8 = kv_dtype in (FP8, torch.float8_e4m3fnuz)
    k_scale = 0.37 if fp8 else 1.25
    ws = dec.alloc_decode_workspace(7, 3, 32, S, "cpu", variant="v3")
    for rep in range(2):
        seed = hash((merge, str(q_dtype), str(kv_dtype), fp8_path, rep)) % 2**31
        out, ref = run_decode(7, 3, 32, 16, 8, lens, q_dtype, kv_dtype, S, "cpu", seed=seed,
                              k_scale=k_scale, chunk=16, config=(16, 4, 1), variant="v3",
                              merge=merge, fp8_path=fp8_path, ws=ws)
        assert torch.all(out[0] == 0), "empty sequence must give 0"
        # fp8 caches: dots in fp16 (q and p rounded to fp16), k_scale applied in fp32
        tol = 2e-6 if q_dtype == torch.float32 and not fp8 else 2e-3
        assert rel_err(out, ref) < tol
        assert len(check_v3_scratch(ws, lens, S, 16)) == 11  # the merge path ran


@cpu_only
@pytest.mark.parametrize("variant,S,kv_dtype", [
    ("v1", 1, torch.float32), ("v1", 4, torch.float32), ("v3", 6, torch.float32),
    ("v3", 1, torch.float32), ("v3", 6, FP8), ("v2", 4, torch.float32),
    ("v3", 24, torch.float32), ("v1", 24, torch.float32)])
@pytest.mark.parametrize("uv_dim", [16, 24])
def test_decode_merge_uv_interpreted(variant, S, kv_dtype, uv_dim):
    """mla_decode(uv=(w_uv, y)): W_UV folded into the merge launch (v1 / v3; v2 runs a bmm)
    equals the attention reference times W_UV, for direct, split and empty sequences (y
    poisoned first; uv_dim 24 leaves a partial BLOCK_V tile). The attention runs with its
    merge deferred, so v3's fused merge is never taken here. S = 24: the 2000-token sequence
    has 21 active splits, more than one 16-split step of the merge loop."""
    lens = [0, 1, 37, 700, 5, 260, 9, 2000]
    fp8 = kv_dtype == FP8
    for rep in range(2):
        y, ref = run_decode(8, 3, 32, 16, 8, lens, torch.float32, kv_dtype, S, "cpu",
                            seed=hash((variant, S, str(kv_dtype), uv_dim, rep)) % 2**31,
                            k_scale=0.37 if fp8 else 1.25, chunk=16, config=(16, 4, 1),
                            variant=variant, merge="fused" if variant == "v3" else None,
                            uv_dim=uv_dim)
        assert torch.all(y[0] == 0), "empty sequence must give 0"
        assert rel_err(y, ref) < (2e-3 if fp8 else 2e-6)


@cpu_only
def test_decode_v3_many_heads_direct_and_splits():
    """H=20 (two head groups, one counter each), fused q, R=64 in 4 chunks; then S=1 (no
    workspace at all) and the heuristic's split counts."""
    lens = [150, 0, 70, 3]
    out, ref = run_decode(4, 20, 64, 16, 32, lens, torch.float32, torch.float32, 3, "cpu",
                          seed=31, config=(16, 4, 1), chunk=16, variant="v3", fused_q=True)
    assert rel_err(out, ref) < 2e-6 and torch.all(out[1] == 0)
    out, ref = run_decode(3, 3, 32, 16, 8, [77, 0, 9], torch.float32, torch.float32, 1, "cpu",
                          seed=32, config=(16, 4, 1), chunk=16, variant="v3")
    assert rel_err(out, ref) < 2e-6 and torch.all(out[1] == 0)


@cpu_only
def test_v3_split_lowering_at_h200_scale(monkeypatch):
    """v3 aims at WAVES x SMs programs (a ceil) and lowers S just above V3_FUSED_MAX_S to it.
    With the CPU's small SM count S never exceeds 16, so the heuristic runs here as on a
    132-SM GPU."""
    monkeypatch.setattr(dec, "CPU_SMS", 132)
    cap = dec.V3_FUSED_MAX_S
    assert dec.decode_num_splits(16, 8, 8192, variant="v3") == cap  # ceil(264 / 16) = 17
    assert dec.decode_num_splits(8, 8, 8192, variant="v3") == 33
    for B, L in ((1, 8192), (2, 8192), (4, 300), (12, 8192), (64, 8192)):
        ceil = min(-(-dec.WAVES * 132 // B), -(-L // dec.MIN_SPLIT), dec.MAX_SPLITS)
        s3 = dec.decode_num_splits(B, 8, L, variant="v3")
        assert s3 == (cap if cap < ceil < 2 * cap else ceil)


@cpu_only
def test_v1_splits_fill_whole_waves_of_four_ctas(monkeypatch):
    """v1's count on a 132-SM GPU (the H200 sweep's best at B = 16 / 64, bench/RESULTS.md
    session 13): B x S x groups programs fit V1_WAVES x SMs, S the largest such, capped by
    MAX_SPLITS and the length."""
    monkeypatch.setattr(dec, "CPU_SMS", 132)
    wave = dec.V1_WAVES * 132
    assert dec.decode_num_splits(16, 8, 8192, variant="v1") == 33
    assert dec.decode_num_splits(64, 8, 8192, variant="v1") == 8
    assert dec.decode_num_splits(256, 8, 1024, variant="v1") == 2
    assert dec.decode_num_splits(1, 8, 8192, variant="v1") == dec.MAX_SPLITS
    assert dec.decode_num_splits(1, 8, 1024, variant="v1") == 16  # the length caps it
    assert dec.decode_num_splits(64, 128, 8192, variant="v1") == 1  # 8 head groups
    for B in range(1, 600, 7):
        S = dec.decode_num_splits(B, 8, None, variant="v1")
        assert S == 1 or B * S <= wave
        assert S == dec.MAX_SPLITS or B * (S + 1) > wave


@cpu_only
def test_v5_splits_fill_whole_waves(monkeypatch):
    """v5's split count on a 132-SM GPU: B x S programs never exceed one wave of WAVES x SMs
    (unless S is 1), and S is the largest such (capped by MAX_SPLITS and the length)."""
    monkeypatch.setattr(dec, "CPU_SMS", 132)
    wave = dec.WAVES * 132
    assert dec.decode_num_splits(64, 8, 8192, variant="v5") == 4  # v1 / v3: 5 (320 programs)
    assert dec.decode_num_splits(256, 8, 1024, variant="v5") == 1
    assert dec.decode_num_splits(16, 8, 8192, variant="v5") == 16
    assert dec.decode_num_splits(1, 8, 8192, variant="v5") == dec.MAX_SPLITS
    assert dec.decode_num_splits(2, 8, 300, variant="v5") == 5  # the length caps it
    for B in range(1, 600, 7):
        S = dec.decode_num_splits(B, 8, None, variant="v5")
        assert S == 1 or B * S <= wave
        assert S == dec.MAX_SPLITS or B * (S + 1) > wave


@cpu_only
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float8_e4m3fn])
def test_decode_auto_variant_is_the_measured_choice(kv_dtype):
    """variant="auto" (the default) == v5 with the merge kernel on e4m3fn caches, v1 otherwise:
    same bits, same split count and workspace layout."""
    fp8 = kv_dtype == torch.float8_e4m3fn
    want, merge = ("v5", "kernel") if fp8 else ("v1", None)
    assert dec.resolve_variant("auto", kv_dtype) == (want, merge)
    assert dec.decode_num_splits(3, 4, 5000, "cpu", kv_dtype=kv_dtype) == \
        dec.decode_num_splits(3, 4, 5000, "cpu", variant=want)
    lens, S = [70, 1, 33], 3
    ws = dec.alloc_decode_workspace(3, 4, 32, S, "cpu", kv_dtype=kv_dtype)
    assert len(ws) == len(dec.alloc_decode_workspace(3, 4, 32, S, "cpu", variant=want))
    auto, ref = run_decode(3, 4, 32, 32, 16, lens, torch.float32, kv_dtype, S, "cpu", seed=41,
                           k_scale=0.5, variant="auto", ws=ws, chunk=32, config=(16, 4, 1))
    explicit, _ = run_decode(3, 4, 32, 32, 16, lens, torch.float32, kv_dtype, S, "cpu", seed=41,
                             k_scale=0.5, variant=want, merge=merge, chunk=32, config=(16, 4, 1))
    assert torch.equal(auto, explicit)
    assert (auto - ref).abs().max().item() < 2e-3 * ref.abs().max().item() + 1e-4


@cpu_only
def test_decode_auto_needs_the_cache_dtype_and_a_matching_workspace():
    """MI300's e4m3fnuz stays on v1 until measured there; 'auto' without a dtype and a
    workspace of another variant are errors, not a wrong launch."""
    assert dec.resolve_variant("auto", torch.float8_e4m3fnuz) == ("v1", None)
    assert dec.resolve_variant("v2", None) == ("v2", None)
    with pytest.raises(ValueError, match="kv_dtype"):
        dec.decode_num_splits(2, 8, 100, "cpu")
    with pytest.raises(ValueError, match="kv_dtype"):
        dec.alloc_decode_workspace(2, 8, 32, 3, "cpu")
    ws_v1 = dec.alloc_decode_workspace(3, 4, 32, 3, "cpu", variant="v1")
    with pytest.raises(ValueError, match="workspace"):
        run_decode(3, 4, 32, 16, 16, [70, 1, 33], torch.float32, torch.float8_e4m3fn, 3, "cpu",
                   seed=42, k_scale=0.5, variant="auto", ws=ws_v1)


@cpu_only
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16, torch.float8_e4m3fn,
                                      torch.float8_e4m3fnuz])
def test_kv_store_interpreted(kv_dtype):
    check_kv_store(kv_dtype, torch.float32 if kv_dtype != torch.float16 else torch.float16,
                   R=32, DR=16, device="cpu", seed=hash(str(kv_dtype)) % 2**31)


def check_kv_store(kv_dtype, in_dtype, R, DR, device, seed):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    nb, page, T = 7, 4, 11
    fp8 = kv_dtype in (torch.float8_e4m3fn, torch.float8_e4m3fnuz)
    k_scale = 0.25 if fp8 else 1.0
    kv = torch.full((nb, page, R + DR), float("nan"), device=device).to(kv_dtype)
    kv_ref = kv.clone()
    src = (torch.randn(T, R + DR + 8, generator=gen) * 40).to(in_dtype).to(device)
    c = src[:, :R]  # strided views, as the model hands them over
    k_pe = src[:, R + 8:].unsqueeze(1)  # [T, 1, DR]
    slots = torch.randperm(nb * page, generator=gen)[:T].to(device)
    slots[3] = -1
    kv_store(kv, slots, c, k_pe, k_scale)
    kv_store_ref(kv_ref, slots, c, k_pe, k_scale)
    # bit-equal to the reference (NaN poison included: untouched slots keep their bytes)
    assert torch.equal(kv.view(torch.uint8), kv_ref.view(torch.uint8))
    written = torch.zeros(nb * page, dtype=torch.bool, device=device)
    written[slots[slots >= 0]] = True
    flat = kv.view(nb * page, -1).float()
    assert torch.isfinite(flat[written]).all() and flat[~written].isnan().all()
    # the single-entry form [T, R + DR] gives the same bytes
    kv2 = torch.full((nb, page, R + DR), float("nan"), device=device).to(kv_dtype)
    entry = torch.cat([c, k_pe[:, 0]], -1)
    kv_store(kv2, slots, entry, None, k_scale, rope_dim=DR)
    assert torch.equal(kv2.view(torch.uint8), kv.view(torch.uint8))


def make_prefill(lq, lk, H, Dqk, Dv, dtype, device, seed):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    cq = torch.tensor([0] + lq, dtype=torch.int32).cumsum(0).to(torch.int32).to(device)
    ck = torch.tensor([0] + lk, dtype=torch.int32).cumsum(0).to(torch.int32).to(device)
    q = torch.randn(sum(lq), H, Dqk, generator=gen).to(dtype).to(device)
    kv = torch.randn(sum(lk), H, Dqk + Dv, generator=gen).to(dtype).to(device)
    return q, kv[..., :Dqk], kv[..., Dqk:], cq, ck


@cpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("Dqk", [48, 32])
def test_prefill_interpreted(dtype, Dqk):
    lq, lk = [5, 40, 17], [5, 70, 100]  # no prefix, prefix 30, prefix 83
    q, k, v, cq, ck = make_prefill(lq, lk, 3, Dqk, 32, dtype, "cpu", seed=Dqk + (dtype == torch.float16))
    out = torch.full((sum(lq), 3, 32), float("nan"), dtype=dtype)
    mla_prefill_triton(q, k, v, cq, ck, max(lq), 0.2, out=out, block_m=16, block_n=16)
    ref = mla_prefill_ref(q.float(), k.float(), v.float(), cq, ck, 0.2)
    tol = 2e-6 if dtype == torch.float32 else 2e-3
    assert rel_err(out, ref) < tol
    out2 = torch.full_like(out, float("nan"))
    mla_prefill_sdpa(q, k, v, cq, ck, max(lq), 0.2, out=out2)
    assert rel_err(out2, ref) < tol


# ------------------------------------------------------------------ GPU (native)
@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, FP8])
@pytest.mark.parametrize("H", [8, 16, 128])
@pytest.mark.parametrize("page", [16, 64])
@pytest.mark.parametrize("splits", [None, 1, 7])
@pytest.mark.parametrize("variant", ["v1", "v2", "v3"])
def test_decode_gpu(kv_dtype, H, page, splits, variant):
    lens = [1, 0, 700, 4097, 33]
    B = len(lens)
    ns = splits or dec.decode_num_splits(B, H, max(lens), "cuda", variant=variant)
    k_scale = 0.5 if kv_dtype == FP8 else 1.0
    out, ref = run_decode(B, H, 512, 64, page, lens, torch.bfloat16, kv_dtype, ns, "cuda",
                          seed=H * 1000 + page + ns, k_scale=k_scale, fused_q=(H == 16),
                          variant=variant)
    assert torch.all(out[1] == 0)
    assert rel_err(out, ref) < 1e-2


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("kv_dtype,fp8_mode", [(torch.bfloat16, 1), (FP8, 0), (FP8, 1), (FP8, 2),
                                               (FP8, 3)])
@pytest.mark.parametrize("merge", ["fused", "kernel"])
@pytest.mark.parametrize("cfg", [(32, 4, 2), (64, 8, 2), (16, 4, 2)])
def test_decode_v2_gpu(kv_dtype, fp8_mode, merge, cfg):
    """Every v2 path at the real widths: odd batch, empty and long sequences, 3 launch configs;
    the written slots must match the schedule and the counters end at zero."""
    gen = torch.Generator().manual_seed(7)
    lens = [0, 1, 5000, 63] + torch.randint(1, 3000, (13,), generator=gen).tolist()
    B, H = len(lens), 8
    P = dec.decode_num_splits(B, H, None, "cuda", variant="v1")
    ws = dec.alloc_decode_workspace(B, H, 512, P, "cuda", variant="v2")
    for seed in (1, 2):  # twice on one workspace: the counters must have been reset
        out, ref = run_decode(B, H, 512, 64, 64, lens, torch.bfloat16, kv_dtype, P, "cuda",
                              seed=seed, k_scale=0.5 if kv_dtype == FP8 else 1.0,
                              variant="v2", merge=merge, fp8_mode=fp8_mode, config=cfg, ws=ws)
        assert torch.all(out[0] == 0)
        assert rel_err(out, ref) < 1e-2
        check_v2_scratch(ws, lens, P, cfg[0], merge)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, FP8])
@pytest.mark.parametrize("variant,merge", [("v1", None), ("v2", "fused"), ("v2", "kernel"),
                                           ("v3", "fused"), ("v3", "kernel")])
def test_decode_cuda_graph(kv_dtype, variant, merge):
    """Capture once, then replay with new lengths / tables / queries written into the buffers
    (v2 fused: the counters reset inside the graph)."""
    B, H, R, DR, page, max_len = 6, 8, 512, 64, 64, 3000
    nb = B * (max_len // page + 2) + 4
    ns = dec.decode_num_splits(B, H, max_len, "cuda", variant=variant)
    kv = make_cache(nb, page, R + DR, kv_dtype, "cuda")
    q = torch.empty(B, H, R + DR, dtype=torch.bfloat16, device="cuda")
    bt = torch.empty(B, max_len // page + 2, dtype=torch.int32, device="cuda")
    lens = torch.empty(B, dtype=torch.int32, device="cuda")
    out = torch.empty(B, H, R, dtype=torch.bfloat16, device="cuda")
    ws = dec.alloc_decode_workspace(B, H, R, ns, "cuda", variant=variant)

    def fill(seed):
        gen = torch.Generator(device="cpu").manual_seed(seed)
        lens_h = torch.randint(1, max_len, (B,), generator=gen).tolist()
        q.copy_(torch.randn(B, H, R + DR, generator=gen).to(torch.bfloat16))
        bt.copy_(make_tables(lens_h, page, nb, "cpu", gen, width=bt.shape[1]))
        lens.copy_(torch.tensor(lens_h, dtype=torch.int32))
        out.fill_(float("nan"))

    def step():
        dec.mla_decode(q[..., :R], q[..., R:], kv, bt, lens, 0.14, 1.0, out=out,
                       num_splits=ns, workspace=ws, variant=variant, merge=merge)

    fill(0)
    step()  # compile outside capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    for seed in (1, 2, 3):
        fill(seed)
        g.replay()
        ref = dec.mla_decode_ref(q[..., :R].float(), q[..., R:].float(), kv, bt, lens, 0.14)
        assert rel_err(out, ref) < 1e-2
        if variant in ("v2", "v3"):
            assert torch.all(ws[2] == 0)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("kv_dtype,fp8_path", [(torch.bfloat16, "regs"), (FP8, "regs"),
                                               (FP8, "cpasync")])
@pytest.mark.parametrize("merge,cfg,S", [
    (None, None, 4), (None, None, 16), (None, None, 40), ("kernel", None, 16),
    (None, (16, 4, 1), 16), (None, (32, 8, 1), 16), (None, (32, 4, 2), 4)])
def test_decode_v3_gpu(kv_dtype, fp8_path, merge, cfg, S):
    """Every v3 path at the real widths (Kimi TP8: H=8, page 64): odd batch, empty and long
    sequences, the fused-merge buckets (S <= 4, <= 16) and many splits; twice on one workspace
    (counters reset); the written partial slots must be exactly the active splits."""
    gen = torch.Generator().manual_seed(S)
    lens = [0, 1, 5000, 63] + torch.randint(1, 3000, (13,), generator=gen).tolist()
    B, H = len(lens), 8
    ws = dec.alloc_decode_workspace(B, H, 512, S, "cuda", variant="v3")
    for seed in (1, 2):
        out, ref = run_decode(B, H, 512, 64, 64, lens, torch.bfloat16, kv_dtype, S, "cuda",
                              seed=seed, k_scale=0.5 if kv_dtype == FP8 else 1.0, variant="v3",
                              merge=merge, fp8_path=fp8_path, config=cfg, ws=ws)
        assert torch.all(out[0] == 0)
        assert rel_err(out, ref) < 1e-2
        path = 1 if fp8_path == "regs" else 0
        check_v3_scratch(ws, lens, S, (cfg or dec._v3_cfg(kv_dtype, B, path))[0])


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, FP8])
def test_warmup_decode_leaves_nothing_to_compile_gpu(kv_dtype, monkeypatch):
    """After warmup_decode(max_batch=40) at the Kimi TP8 widths, decode as the model calls it
    (variant "auto", its merge) at other batch sizes, real (random) lengths and block tables
    of other widths compiles no Triton kernel (engine/compile_watch counts), and is still
    right: the split count, workspace strides and table stride are not specialized on."""
    from atom_stream.engine import compile_watch
    knobs = pytest.importorskip("triton.knobs")
    # none before the warm-up (an engine test earlier in the process may have installed the
    # watch: it would count the warm-up's own compiles); restored after the test
    for hook in ("jit_cache_hook", "jit_post_compile_hook"):
        monkeypatch.setattr(knobs.runtime, hook, None)
    monkeypatch.setattr(compile_watch, "_installed", False)
    monkeypatch.setattr(compile_watch, "stats", compile_watch.CompileStats())
    dec.warmup_decode(8, 512, 64, 64, kv_dtype, torch.bfloat16, "cuda", 40, v_dim=128,
                      uv_max_batch=4)
    assert compile_watch.watch()
    for B in (7, 13, 29, 37):
        gen = torch.Generator().manual_seed(B)
        lens = torch.randint(1, 3000, (B,), generator=gen).tolist()
        S = dec.decode_num_splits(B, 8, None, "cuda", "auto", kv_dtype)
        ws = dec.alloc_decode_workspace(B, 8, 512, S, "cuda", variant="auto", kv_dtype=kv_dtype)
        out, ref = run_decode(B, 8, 512, 64, 64, lens, torch.bfloat16, kv_dtype, S, "cuda",
                              seed=B, variant="auto", ws=ws)
        assert rel_err(out, ref) < 1e-2
    for B in (1, 3):  # the merge + W_UV form the model takes at <= 4 decode rows
        S = dec.decode_num_splits(B, 8, None, "cuda", "auto", kv_dtype)
        ws = dec.alloc_decode_workspace(B, 8, 512, S, "cuda", variant="auto", kv_dtype=kv_dtype)
        y, ref = run_decode(B, 8, 512, 64, 64, [2500, 40, 700][:B], torch.bfloat16, kv_dtype,
                            S, "cuda", seed=B, variant="auto", ws=ws, uv_dim=128)
        assert rel_err(y, ref) < 1e-2
    assert compile_watch.stats.count == 0, compile_watch.stats.recent[-4:]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, FP8])
def test_kv_store_gpu(kv_dtype):
    check_kv_store(kv_dtype, torch.bfloat16, R=512, DR=64, device="cuda",
                   seed=hash(str(kv_dtype)) % 2**31)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("H", [8, 16])
def test_prefill_gpu(H):
    lq, lk = [1, 300, 1000, 77], [1, 300, 2500, 1077]
    q, k, v, cq, ck = make_prefill(lq, lk, H, 192, 128, torch.bfloat16, "cuda", seed=H)
    ref = mla_prefill_ref(q.float(), k.float(), v.float(), cq, ck, 0.1447)
    for fn in (mla_prefill_triton, mla_prefill_sdpa):
        out = torch.full((sum(lq), H, 128), float("nan"), dtype=torch.bfloat16, device="cuda")
        fn(q, k, v, cq, ck, max(lq), 0.1447, out=out)
        assert rel_err(out, ref) < 1e-2, fn.__name__
