"""MLA prefill attention, naive form (model_spec §3.5): causal, variable length, cached prefix.

Inputs (flattened over S sequences):
- q [Tq, H, Dqk] (Dqk = 192: nope 128 | rope 64), k [Tk, H, Dqk], v [Tk, H, Dv] (Dv = 128);
  any token/head strides, last dim contiguous (so k/v may be views of one kv_b output).
- cu_seqlens_q [S+1], cu_seqlens_k [S+1] int32: sequence s owns q rows cu_q[s]:cu_q[s+1] and
  k/v rows cu_k[s]:cu_k[s+1], with len_k >= len_q. Its queries are the LAST len_q positions:
  query i sits at position len_k - len_q + i and attends keys 0..that position (prefix + new).
- max_seqlen_q: host int (grid size); scale: softmax_scale (192^-0.5 * mscale^2).
- returns o [Tq, H, Dv] in q's dtype (or `out`'s: fp32 keeps partial results unrounded).
  Softmax in fp32.
- causal=False (the Triton kernel and the reference): every query sees all of its sequence's
  keys (a piece of an older prefix; len_k < len_q allowed, len_k >= 1); lse [Tq, H] fp32,
  when given, receives each row's log-sum-exp of scale * q.k (natural log) so partial results
  over disjoint key sets merge (atom_stream/models/mla_prefix.merge_partial).

mla_prefill() picks the implementation: the Triton flash-style kernel below, or torch SDPA
per sequence (causal_lower_right mask); `PREFILL_BACKEND` holds the choice measured on H200
(bench/RESULTS.md). Dqk is split into two power-of-two parts (128 + 64) for the dots.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634
# Measured on H200 (bench/RESULTS.md, H=8): Triton 167 us vs SDPA 192 us at 4096 causal, 201 vs
# 715 us for 2048 new tokens on a 6144 prefix, 55 vs 250 us for 4 x 1024.
PREFILL_BACKEND = "triton"  # "triton" | "sdpa"


@triton.jit
def _mla_prefill_kernel(
    Q, K, V, O, LSE, CU_Q, CU_K, qk_scale, H,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_lt, stride_lh,
    DA: tl.constexpr, DB: tl.constexpr, DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_LSE: tl.constexpr,
):
    # heaviest (last) query tiles first: they see the most keys
    mb = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1)
    s = tl.program_id(2)
    q0 = tl.load(CU_Q + s)
    lq = tl.load(CU_Q + s + 1) - q0
    k0 = tl.load(CU_K + s)
    lk = tl.load(CU_K + s + 1) - k0
    if mb * BLOCK_M < lq:
        offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        mmask = offs_m < lq
        qpos = offs_m + (lk - lq)
        offs_a = tl.arange(0, DA)
        offs_v = tl.arange(0, DV)
        q_rows = Q + (q0 + offs_m).to(tl.int64)[:, None] * stride_qt + h * stride_qh
        qa = tl.load(q_rows + offs_a[None, :], mask=mmask[:, None], other=0.0)
        if DB > 0:
            offs_b = tl.arange(0, DB)
            qb = tl.load(q_rows + DA + offs_b[None, :], mask=mmask[:, None], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, DV], tl.float32)
        if CAUSAL:
            hi = tl.minimum(lk, (mb + 1) * BLOCK_M + lk - lq)
            full = (mb * BLOCK_M + lk - lq) // BLOCK_N * BLOCK_N  # tiles below need no mask
        else:  # every key: only the last tile's tail is masked
            hi = lk
            full = lk // BLOCK_N * BLOCK_N
        for n0 in range(0, hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            nmask = offs_n < lk
            k_rows = K + (k0 + offs_n).to(tl.int64)[:, None] * stride_kt + h * stride_kh
            ka = tl.load(k_rows + offs_a[None, :], mask=nmask[:, None], other=0.0)
            qk = tl.dot(qa, tl.trans(ka))
            if DB > 0:
                kb = tl.load(k_rows + DA + offs_b[None, :], mask=nmask[:, None], other=0.0)
                qk = tl.dot(qb, tl.trans(kb), qk)
            qk = qk * qk_scale
            if n0 >= full:
                if CAUSAL:
                    keep = (offs_n[None, :] <= qpos[:, None]) & nmask[None, :]
                else:
                    keep = nmask[None, :]
                qk = tl.where(keep, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + (k0 + offs_n).to(tl.int64)[:, None] * stride_vt + h * stride_vh
                        + offs_v[None, :], mask=nmask[:, None], other=0.0)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
            m_i = m_new
        o = acc / l_i[:, None]
        tl.store(O + (q0 + offs_m).to(tl.int64)[:, None] * stride_ot + h * stride_oh
                 + offs_v[None, :], o.to(O.dtype.element_ty), mask=mmask[:, None])
        if HAS_LSE:  # m_i, l_i are in the log2 domain (qk_scale holds log2(e))
            tl.store(LSE + (q0 + offs_m).to(tl.int64) * stride_lt + h * stride_lh,
                     (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=mmask)


def _split_dim(d: int) -> tuple[int, int]:
    da = triton.next_power_of_2(d)
    if da != d:
        da //= 2
    db = d - da
    assert db == 0 or (db & (db - 1) == 0), f"qk dim {d} must be a power of two or a sum of two"
    return da, db


def mla_prefill_triton(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, scale: float,
                       out: torch.Tensor | None = None, block_m: int = 128, block_n: int = 64,
                       num_warps: int = 8, num_stages: int | None = None, causal: bool = True,
                       lse: torch.Tensor | None = None) -> torch.Tensor:
    """num_stages None: 3 (measured on the H200), 2 under ROCm (3 stages of the K and V tiles
    at qk 192 / v 128 need ~168 KB of shared memory, over an MI300/MI355 CU's 160 KB LDS).
    causal / lse: the module docstring (lse [Tq, H] fp32; every sequence needs len_k >= 1 when
    it is given)."""
    if num_stages is None:
        num_stages = 2 if torch.version.hip else 3
    Tq, H, Dqk = q.shape
    Dv = v.shape[-1]
    assert k.shape[1:] == (H, Dqk) and v.shape[:2] == k.shape[:2]
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
    da, db = _split_dim(Dqk)
    S = cu_seqlens_q.shape[0] - 1
    if out is None:
        out = torch.empty(Tq, H, Dv, dtype=q.dtype, device=q.device)
    if lse is not None:
        assert lse.shape == (Tq, H) and lse.dtype == torch.float32
    if Tq == 0:
        return out
    grid = (triton.cdiv(max_seqlen_q, block_m), H, S)
    lse_arg = lse if lse is not None else out
    _mla_prefill_kernel[grid](
        q, k, v, out, lse_arg, cu_seqlens_q, cu_seqlens_k, float(scale) * _LOG2E, H,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), lse_arg.stride(0), lse_arg.stride(1),
        DA=da, DB=db, DV=Dv, BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=bool(causal),
        HAS_LSE=lse is not None, num_warps=num_warps, num_stages=num_stages)
    return out


def mla_prefill_sdpa(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, scale: float,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """torch SDPA per sequence (bottom-right causal). cu_seqlens are read on the host (sync)."""
    from torch.nn.attention.bias import causal_lower_right

    cq = cu_seqlens_q.tolist()
    ck = cu_seqlens_k.tolist()
    if out is None:
        out = torch.empty(q.shape[0], q.shape[1], v.shape[-1], dtype=q.dtype, device=q.device)
    for s in range(len(cq) - 1):
        qs = q[cq[s]:cq[s + 1]].transpose(0, 1).unsqueeze(0)
        ks = k[ck[s]:ck[s + 1]].transpose(0, 1).unsqueeze(0)
        vs = v[ck[s]:ck[s + 1]].transpose(0, 1).unsqueeze(0)
        if qs.shape[2] == ks.shape[2]:
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)
        else:
            mask = causal_lower_right(qs.shape[2], ks.shape[2])
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale)
        out[cq[s]:cq[s + 1]] = o[0].transpose(0, 1)
    return out


def mla_prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, scale: float,
                out: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """Dispatch to the measured-faster backend (PREFILL_BACKEND) unless `backend` is given."""
    backend = backend or PREFILL_BACKEND
    if backend == "sdpa":
        return mla_prefill_sdpa(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, scale, out)
    return mla_prefill_triton(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, scale, out)


def mla_prefill_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, scale: float, causal: bool = True,
                    lse: torch.Tensor | None = None) -> torch.Tensor:
    """Plain torch reference: explicit scores, fp32 softmax, per sequence and head (causal /
    lse: the module docstring)."""
    cq = cu_seqlens_q.tolist()
    ck = cu_seqlens_k.tolist()
    out = torch.empty(q.shape[0], q.shape[1], v.shape[-1], dtype=torch.float32, device=q.device)
    for s in range(len(cq) - 1):
        qs, ks, vs = (q[cq[s]:cq[s + 1]].float(), k[ck[s]:ck[s + 1]].float(),
                      v[ck[s]:ck[s + 1]].float())
        lq, lk = qs.shape[0], ks.shape[0]
        scores = torch.einsum("qhd,khd->hqk", qs, ks) * scale
        if causal:
            mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(diagonal=lk - lq)
            scores = scores.masked_fill(~mask, float("-inf"))
        out[cq[s]:cq[s + 1]] = torch.einsum("hqk,khd->qhd", torch.softmax(scores, -1), vs)
        if lse is not None:
            lse[cq[s]:cq[s + 1]] = torch.logsumexp(scores, -1).transpose(0, 1)
    return out.to(q.dtype)

