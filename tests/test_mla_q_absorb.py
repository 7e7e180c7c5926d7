"""kernels/mla_q_absorb.py: q_nope @ W_UK and q_pe's RoPE in one launch, against the torch
reference (bmm in fp32 + rope_interleaved_ref) and the two launches it replaces.

Fresh random inputs for every check; q_lat poisoned (NaN) before each run; q a strided per-head
view of a GEMM-like output (row stride padded) so the kernel's strides are exercised; token
counts below, at and above one BLOCK_T tile (16), R not a multiple of BLOCK_R; q_nope must stay
untouched. CPU: TRITON_INTERPRET=1 in fp32 / fp16 (the interpreter mishandles bf16 dots).
`-m gpu`: native bf16 at Kimi TP8 widths (8 heads, nope 128, R 512, rope 64).
"""

from __future__ import annotations

import pytest
import torch
from kernel_interp import interpret_without_gpu

GPU = interpret_without_gpu("norm_rope", "mla_q_absorb")

from atom_stream.kernels.mla_q_absorb import mla_q_absorb, mla_q_absorb_ref
from atom_stream.kernels.norm_rope import rope_interleaved_

DEV = "cuda" if GPU else "cpu"
cpu_only = pytest.mark.skipif(GPU, reason="interpreter tests run where there is no GPU")
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a GPU")


def make(T, H, nope, rope, R, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    D = nope + rope
    raw = torch.randn(T, H * D + 8, generator=g).to(dtype).to(DEV)
    q = raw[:, : H * D].view(T, H, D)
    w = (torch.randn(H, nope, R, generator=g) * nope ** -0.5).to(dtype).to(DEV)
    P = 61
    ang = torch.rand(P, rope // 2, generator=g, dtype=torch.float64) * 6.3
    cos, sin = ang.cos().float().to(DEV), ang.sin().float().to(DEV)
    pos = torch.randint(0, P, (T,), generator=g).to(DEV)
    return raw, q, w, cos, sin, pos


def rel(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite output (unwritten element?)"
    return float((a - b).norm() / b.norm())


def check(T, H, nope, rope, R, dtype, seed, tol):
    raw, q, w, cos, sin, pos = make(T, H, nope, rope, R, dtype, seed)
    raw_ref = raw.clone()
    q_ref = raw_ref[:, : q.shape[1] * q.shape[2]].view(q.shape)
    out = torch.full((T, H, R), float("nan"), dtype=dtype, device=DEV)
    got = mla_q_absorb(q, w, cos, sin, pos, out=out)
    ref = mla_q_absorb_ref(q_ref, w, cos, sin, pos)
    assert got is out
    assert rel(out, ref) < tol
    assert torch.equal(q[..., :nope], q_ref[..., :nope]), "q_nope must stay untouched"
    assert torch.equal(raw[:, -8:], raw_ref[:, -8:]), "the row padding must stay untouched"
    # the rotation: same fp32 math as rope_interleaved_, so equal up to one rounding
    assert rel(q[..., nope:], q_ref[..., nope:]) < (1e-6 if dtype == torch.float32 else 1e-2)


@cpu_only
@pytest.mark.parametrize("T", [1, 5, 16, 19])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_q_absorb_interpreted(T, dtype):
    check(T, 3, 16, 16, 48, dtype, seed=T * 7 + (dtype == torch.float16),
          tol=2e-6 if dtype == torch.float32 else 2e-3)


@cpu_only
def test_q_absorb_equals_the_two_launches_it_replaces():
    """rope_interleaved_ on q_pe (bit-equal under the interpreter: the same fp32 ops) and the
    fp32 bmm (q_lat within fp32 summation-order noise)."""
    _raw, q, w, cos, sin, pos = make(7, 2, 32, 16, 64, torch.float32, seed=5)
    q2 = q.clone()
    q_lat = mla_q_absorb(q, w, cos, sin, pos)
    ref = torch.bmm(q2[..., :32].transpose(0, 1), w).transpose(0, 1)
    rope_interleaved_(q2[..., 32:], None, cos, sin, pos)
    assert torch.equal(q, q2)
    assert rel(q_lat, ref) < 2e-6


@cpu_only
def test_q_absorb_rejects_bad_shapes():
    _raw, q, w, cos, sin, pos = make(2, 2, 16, 16, 32, torch.float32, seed=1)
    with pytest.raises(ValueError):
        mla_q_absorb(q, w[:1], cos, sin, pos)  # head count
    with pytest.raises(ValueError):
        mla_q_absorb(q, w.half(), cos, sin, pos)  # dtype
    with pytest.raises(ValueError):
        mla_q_absorb(q[..., :23], w, cos, sin, pos)  # odd rope width
    assert mla_q_absorb(q[:0], w, cos, sin, pos[:0]).shape == (0, 2, 32)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("T", [1, 8, 16, 64])
def test_q_absorb_gpu(T):
    check(T, 8, 128, 64, 512, torch.bfloat16, seed=T, tol=1e-2)
    check(T, 8, 128, 64, 512, torch.float32, seed=T + 1, tol=2e-6)
