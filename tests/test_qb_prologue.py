"""kernels/mla_prologue.qb_prologue (one token: the q_b GEMV with the q_a norm folded in, plus the
kv part of the MLA prologue, in one launch) against the two launches it replaces
(mla_prologue, then kernels/gemv.py's q_b GEMV) and the torch reference (qb_prologue_ref).

Fresh random inputs per seed (tests/test_mla_prologue.make_inputs: strided views of one
GEMM-like row, a poisoned cache, a padding slot -1 for some seeds); q poisoned by the kernel's
own allocation check (isfinite). The kv part is the same code as mla_prologue's: kv in place
and every cache byte must be equal to it; q within the dtype's rounding of the reference (the
GEMV reads the normed row unrounded). CPU: TRITON_INTERPRET=1 in fp32 / fp16 (bf16 / fp8
caches); `-m gpu`: bf16 at a Kimi TP8 rank's widths (q_lora 1536, 8 x 192 q_b rows, r 512,
rope 64) with the model's q_b tiles.
"""

from __future__ import annotations

import pytest
import torch
from kernel_interp import interpret_without_gpu

GPU = interpret_without_gpu("kv_store", "norm_rope", "gemv", "mla_prologue")

from atom_stream.kernels import gemv as gv
from atom_stream.kernels import mla_prologue as mp
from test_mla_prologue import NATIVE_FP8, make_inputs

DEV = "cuda" if GPU else "cpu"
cpu_only = pytest.mark.skipif(GPU, reason="interpreter tests run where there is no GPU")
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a GPU")


def rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    assert torch.isfinite(a).all(), "non-finite output"
    return float((a - b).norm() / b.norm())


def check(QL, R, DR, N, dtype, cache_dtype, seed, tol, config=None, k_scale=0.7, pad=False):
    inp = make_inputs(1, QL, R, DR, dtype, cache_dtype, DEV, seed)
    if pad:  # padding: nothing stored
        inp["slots"].fill_(-1)
    else:
        inp["slots"].abs_()
    g = torch.Generator().manual_seed(seed + 1)
    w = (torch.randn(N, QL, generator=g) * QL ** -0.5).to(dtype).to(DEV)
    W = inp["width"]
    runs = {}
    for name in ("fused", "two", "ref"):
        raw, cache = inp["raw"].clone(), inp["cache"].clone()
        qkv = raw[:, :W]
        args = (qkv[:, :QL], qkv[:, QL:], inp["q_weight"], inp["kv_weight"], 1e-6, 1e-5,
                inp["cos"], inp["sin"], inp["positions"], cache, inp["slots"], k_scale)
        if name == "fused":
            q = mp.qb_prologue(args[0], args[1], w, *args[2:], config=config)
        elif name == "two":
            q = gv.gemv(mp.mla_prologue(*args), w, config=config)
        else:
            q = mp.qb_prologue_ref(args[0], args[1], w, *args[2:])
        runs[name] = (q, raw, cache)
    (q, raw, cache), (q2, raw2, cache2), (qr, _, _) = runs["fused"], runs["two"], runs["ref"]
    assert rel(q, qr) < tol and rel(q2, qr) < tol
    assert torch.equal(raw, raw2)  # q_c untouched, c / k_pe written in place alike
    assert torch.equal(cache.view(torch.uint8), cache2.view(torch.uint8))
    # the entry is stored, or (padding) no byte of the cache changed
    same = torch.equal(cache.view(torch.uint8), inp["cache"].view(torch.uint8))
    assert same == pad


@cpu_only
@pytest.mark.parametrize("dtype,cache_dtype", [(torch.float32, torch.float32),
                                               (torch.float16, torch.float16),
                                               (torch.float16, NATIVE_FP8)])
def test_qb_prologue_interpreted(dtype, cache_dtype):
    tol = 2e-6 if dtype == torch.float32 else 2e-3
    for seed in range(3):
        check(96, 32, 16, 40, dtype, cache_dtype, seed, tol, pad=seed == 2,
              config={"BLOCK_N": 4, "BLOCK_K": 64, "UNROLL": seed % 2 == 0})


@cpu_only
def test_qb_prologue_rejects_rows_and_dtypes():
    x = torch.randn(2, 32)
    kv = torch.randn(2, 48)
    args = (torch.ones(32), torch.ones(32), 1e-6, 1e-6, torch.ones(4, 8), torch.ones(4, 8),
            torch.zeros(2, dtype=torch.long), torch.zeros(4, 4, 48), torch.zeros(2))
    with pytest.raises(ValueError, match="one contiguous q_c row"):
        mp.qb_prologue(x, kv, torch.randn(8, 32), *args)
    with pytest.raises(ValueError, match="one contiguous q_c row"):
        mp.qb_prologue(x[:1], kv[:1], torch.randn(8, 32).half(), *args)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, NATIVE_FP8])
def test_qb_prologue_gpu(cache_dtype):
    from atom_stream.models import mla
    for seed in range(3):
        check(1536, 512, 64, 8 * 192, torch.bfloat16, cache_dtype, seed, 1e-2,
              config=mla.QB_GEMV_CONFIG, pad=seed == 1)
