"""kernels/mla_decode_ladder.py (the MLA decode measurement ladder) against torch references.

CPU: TRITON_INTERPRET=1 (set before the kernel modules are decorated) at small shapes: H=3 or 20
(padded head tile / two head groups), R=64 in 4 chunks of 16 or R=32 in one, DR=16, page 8 <
BLOCK_N 16 (tiles span pages), variable lengths (0, 1, odd, several tiles, a length that leaves
an empty split), 3 splits. Every check draws fresh random inputs and poisons the outputs first
(NaN / an int sentinel): the programs that run must write their slot, the others must not.
R0 is compared bit-exactly (wrapping int32 word sums), R1 exactly (integer-valued cache: fp16 /
fp32 sums of half-integers are exact), R2 / R3 tightly (q drawn fp16-representable, so the
kernel's casts are exact), R4 partials against mla_decode_ref on each split's rows, R5 against
mla_decode_ref. The interpreter mishandles bf16 tl.dot: 16-bit caches are tested as fp16 and
fp32 (`-m gpu` runs bf16 and fp8 at the real 512 + 64 widths).
"""

from __future__ import annotations


import pytest
import torch
from kernel_interp import interpret_without_gpu

GPU = interpret_without_gpu("mla_decode_sched", "mla_decode_v3", "mla_decode", "mla_decode_ladder")

from atom_stream.kernels.mla_decode_ladder import ladder_launch, ladder_reference, split_bounds

cpu_only = pytest.mark.skipif(GPU, reason="interpreter tests run where there is no GPU")
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a GPU")
FP8 = torch.float8_e4m3fn
SENTINEL = -123456789
LENS = [0, 1, 37, 150, 64, 9]  # 64 with 3 splits of 32: the third split is empty
SCALE = 0.1447


def make_inputs(lens, H, R, DR, page, kv_dtype, q_dtype, k_scale, seed, ints=False,
                device="cpu"):
    """(q_nope, q_pe, cache, block tables with a spare column, seq_lens); random disjoint pages."""
    gen = torch.Generator().manual_seed(seed)
    width = max(-(-n // page) for n in lens) + 1
    nblocks = len(lens) * width + 3
    if ints:  # exact in fp8 / fp16 and in every partial sum below
        x = torch.randint(-4, 5, (nblocks, page, R + DR), generator=gen).float()
    else:
        x = torch.randn(nblocks, page, R + DR, generator=gen) * (2.0 / k_scale)
    cache = x.to(kv_dtype).contiguous()
    perm = torch.randperm(nblocks, generator=gen)[:len(lens) * width]
    bt = perm.view(len(lens), width).to(torch.int32)
    # fp16-representable q: the kernels cast q to fp16 for fp8 caches
    q = (torch.randn(len(lens), H, R + DR, generator=gen) * 0.5).half().to(q_dtype)
    lens_t = torch.tensor(lens, dtype=torch.int32)
    to = [t.to(device) for t in (q[..., :R], q[..., R:], cache, bt, lens_t)]
    return tuple(to)


def rel_err(a, b) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    assert torch.isfinite(a).all(), "non-finite output (an element left unwritten?)"
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def run_rung(level, path, kv_dtype, q_dtype, *, H=3, R=64, DR=16, chunk=16, lens=LENS, S=3,
             config=(16, 4, 1), k_scale=0.5, seed=0, device="cpu", page=8, min_split=16,
             lse_tol=None):
    """Launch on poisoned outputs, compare with ladder_reference; returns the relative error."""
    ints = level <= 1
    qn, qp, kv, bt, sl = make_inputs(lens, H, R, DR, page, kv_dtype, q_dtype, k_scale, seed,
                                     ints, device)
    B, G = len(lens), -(-H // 16)
    kw = {"path": path, "block_n": config[0], "min_split": min_split}
    ref, ran = ladder_reference(level, qn, qp, kv, bt, sl, SCALE, k_scale, S, **kw)
    lkw = {"path": path, "config": config, "chunk": chunk, "min_split": min_split}
    if level <= 3:  # level 0 returns 0.0 after its bit-exact checks
        val = torch.full((G, B, S), SENTINEL if level == 0 else float("nan"), device=device,
                         dtype=torch.int32 if level == 0 else torch.float32)
        ladder_launch(level, qn, qp, kv, bt, sl, SCALE, k_scale, S, val=val, **lkw)
        got = val.cpu()
        ranb = ran[None].expand(G, B, S)
        if level == 0:
            assert torch.all(got[~ranb] == SENTINEL), "a program that did not run wrote"
            assert torch.equal(got[ranb].long(), ref[ranb]), "R0 word sums differ"
            return 0.0
        assert torch.all(got[~ranb].isnan()), "a program that did not run wrote"
        return rel_err(got[ranb], ref[ranb])
    ws = (torch.full((B, H, S, R), float("nan"), device=device),
          torch.full((B, H, S), float("nan"), device=device))
    if level == 4:
        ladder_launch(4, qn, qp, kv, bt, sl, SCALE, k_scale, S, workspace=ws, **lkw)
        o, lse = ws[0].cpu(), ws[1].cpu()
        mask = ran[:, None, :].expand(B, H, S)
        assert torch.all(lse[~mask].isnan()) and torch.all(o[~mask].isnan())
        lse_err = float((lse[mask] - ref[1][mask]).abs().max())
        tol = lse_tol if lse_tol is not None else 1e-3 * float(ref[1][mask].abs().max()) + 1e-4
        assert lse_err < tol, lse_err
        return rel_err(o[mask], ref[0][mask])
    out = torch.full((B, H, R), float("nan"), dtype=q_dtype, device=device)
    ladder_launch(5, qn, qp, kv, bt, sl, SCALE, k_scale, S, workspace=ws, out=out, **lkw)
    for b, n in enumerate(lens):
        if n == 0:
            assert torch.all(out[b] == 0), "empty sequence must give 0"
    return rel_err(out, ref)


# (cache, q) dtypes x path: fp8 on every tile path; 16-bit caches (bf16 stand-ins) on v1's
CASES = [(FP8, torch.float32, "v1"), (FP8, torch.float32, "regs"), (FP8, torch.float32, "cpasync"),
         (torch.float16, torch.float16, "v1"), (torch.float32, torch.float32, "regs")]
TOL = {0: 1.0, 1: 1e-6, 2: 1e-6, 3: 1e-6, 4: 1e-3, 5: 1e-3}  # measured: <= 1.3e-7 / 1.3e-4


@cpu_only
@pytest.mark.parametrize("level", [0, 1, 2, 3, 4, 5])
@pytest.mark.parametrize("kv_dtype,q_dtype,path", CASES)
def test_rung_interpreted(level, kv_dtype, q_dtype, path):
    seed = hash((level, str(kv_dtype), path)) % 2**31
    err = run_rung(level, path, kv_dtype, q_dtype, seed=seed)
    # fp32 throughout: only summation order; 16-bit dots round p (R4 / R5)
    tol = TOL[level] if level <= 1 or kv_dtype == FP8 or q_dtype != torch.float32 else 2e-6
    assert err < tol, (level, path, err, seed)


# fp8-MMA paths (q / p as fp8 pairs): measured rel <= 1.0e-2 (R2 score sums), 4.5e-4 (R3),
# 5.1e-3 (R5); f8p1 (one fp8 p) 2.7e-2 at R5; R4's lse within 1.6e-2 (log2 units)
F8_CASES = [("f8", 2), ("f8", 3), ("f8", 4), ("f8", 5), ("f8r", 5), ("f8qk", 5), ("f8p1", 5)]
F8_TOL = {2: 3e-2, 3: 3e-3, 4: 3e-2, 5: 1.5e-2}


@cpu_only
@pytest.mark.parametrize("path,level", F8_CASES)
def test_fp8_mma_paths_interpreted(path, level):
    seed = hash((level, path)) % 2**31
    err = run_rung(level, path, FP8, torch.float32, seed=seed, lse_tol=5e-2)
    assert err < (6e-2 if path == "f8p1" else F8_TOL[level]), (level, path, err, seed)


@cpu_only
def test_fp8_mma_path_rejects_16bit_cache():
    with pytest.raises(AssertionError, match="needs an fp8 cache"):
        run_rung(2, "f8", torch.float16, torch.float16)


@cpu_only
@pytest.mark.parametrize("level", [1, 3, 5])
def test_two_head_groups_one_chunk(level):
    # H=20: two head groups read the same tiles; R=32 in one chunk; BLOCK_N 16 with page 32
    err = run_rung(level, "regs", FP8, torch.float32, H=20, R=32, chunk=32, page=32,
                   lens=[150, 70, 0], S=2, seed=level)
    assert err < TOL[level], err


@cpu_only
def test_split_bounds_match_v1():
    # v1's _split_len: ceil(n / S) rounded up to BLOCK_N, at least MIN_SPLIT
    assert split_bounds(150, 3, 16, 16) == [(0, 64), (64, 128), (128, 150)]
    assert split_bounds(64, 3, 16, 16) == [(0, 32), (32, 64), (64, 64)]
    assert split_bounds(1, 128, 64, 64)[:2] == [(0, 1), (64, 1)]
    assert split_bounds(8192, 5, 64, 64)[-1] == (6656, 8192)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("kv_dtype,path,config", [
    (FP8, "v1", (64, 8, 2)), (FP8, "regs", (64, 8, 1)), (FP8, "cpasync", (32, 4, 2)),
    (torch.bfloat16, "v1", (32, 4, 2)), (FP8, "f8", (64, 8, 2)), (FP8, "f8r", (64, 8, 1))])
def test_rungs_gpu(kv_dtype, path, config):
    """Every rung at the Kimi TP8 widths (H=8, 512 + 64, page 64) on a mixed-length batch."""
    lens = [1000, 2047, 77, 0, 5000, 1, 333]
    f8 = path.startswith("f8")
    for level in range(6):
        err = run_rung(level, path, kv_dtype, torch.bfloat16, H=8, R=512, DR=64, chunk=128,
                       lens=lens, S=9, config=config, k_scale=0.5, seed=level, device="cuda",
                       page=64, min_split=64, lse_tol=5e-2 if f8 else None)
        tol = F8_TOL.get(level, 1e-3) if f8 else (1e-3 if level <= 3 else 2e-2)
        assert err < tol, (level, err)
