"""Paged MLA decode, variant "v2": a balanced work list computed on the device, one launch.

Same math and tensor contracts as kernels/mla_decode.py (its docstring); this module holds the
kernels, mla_decode() dispatches to them. What differs from "v1" (split = a fixed fraction of each
sequence, always two launches):

- Work list. Every program loads all B lengths (one vector load, BLOCK_B = a power of two >= B),
  and derives the same schedule: sequence b gets n_b = clamp(round(len_b * P / sum(len)), 1, MAX_S)
  items of chunk_b tokens (chunk_b = len_b / n_b rounded up to BLOCK_N, >= MIN_CHUNK). Items are
  numbered sequence by sequence; program p of grid (head_groups, P + B) takes item p
  (sum n_b <= P + B: each n_b <= len_b * P / sum + 1), so the item lengths are about
  sum(len) / P whatever the length mix (no varlen tail, no per-row wave quantization), and the
  grid depends only on B, H and P (graph-safe; no host sync). Empty sequences get one item that
  writes zeros.
- Merge. An item that covers a whole sequence (n_b == 1) writes the output directly. Otherwise it
  stores its partial (o normalized, lse base 2) into slot p of the workspace and:
  MERGE == 1 ("fused"): bumps the (b, head group) counter (barrier, then an acq_rel atomic); the
  last arriver merges the n_b slots (loads bypass L1) and resets the counter to 0, so the next
  launch / graph replay starts from zeros. MERGE == 0: a second kernel merges (like v1).
- fp8 caches (fp8_mode): 0 = v1's per-element dequant (fp8 -> fp32 * k_scale -> fp16);
  1 = k_scale folded out (scores scaled by qk_scale * k_scale, the output by k_scale, once), the
  tile cast fp8 -> fp16 and multiplied by a run-time 1.0 in fp16 (one HMUL2 per 2 values; a bare
  cast lets Triton move it behind the shared-memory load, see bench/notes_mla_decode.md);
  2 = folded, the conversion done as integer bit moves (e4m3 bits placed in an fp16 give
  value * 2^(bias - 15), exact; 2^(15 - bias) goes into the scales); 3 = folded, bare cast.

Workspace (alloc_sched_workspace): opart [P + B, H, R] fp32, lse [P + B, H] fp32,
counters [B * head_groups] int32 (must be zero before the first launch; kernels leave it zero).
Concurrent launches on different streams need separate workspaces.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import envs

# mla_decode.py reloads this module when the interpreter setting changed since it was imported
INTERPRET = envs.triton_interpreted()


@triton.jit
def _schedule(LENS, B, P, key, BY_ITEM: tl.constexpr, BLOCK_B: tl.constexpr,
              BLOCK_N: tl.constexpr, MIN_CHUNK: tl.constexpr, MAX_S: tl.constexpr):
    """-> (b, seq_len, chunk, first, n) for work item `key` (BY_ITEM) or sequence `key`.
    b == B (and n == 0) when item `key` does not exist."""
    offs = tl.arange(0, BLOCK_B)
    lens = tl.load(LENS + offs, mask=offs < B, other=0)
    total = tl.maximum(tl.sum(lens, 0), 1)
    share = lens.to(tl.float32) * P / total.to(tl.float32)
    n = tl.minimum(tl.maximum(tl.floor(share + 0.5).to(tl.int32), 1), MAX_S)
    chunk = tl.cdiv(tl.cdiv(lens, n), BLOCK_N) * BLOCK_N
    chunk = tl.maximum(chunk, MIN_CHUNK)
    n = tl.maximum(tl.cdiv(lens, chunk), 1)
    n = tl.where(offs < B, n, 0)
    incl = tl.cumsum(n, 0)
    if BY_ITEM:
        b = tl.sum((incl <= key).to(tl.int32), 0)
    else:
        b = key
    sel = offs == b
    seq_len = tl.sum(tl.where(sel, lens, 0), 0)
    chunk_b = tl.sum(tl.where(sel, chunk, 0), 0)
    n_b = tl.sum(tl.where(sel, n, 0), 0)
    first = tl.sum(tl.where(sel, incl, 0), 0) - n_b
    return b, seq_len, chunk_b, first, n_b


@triton.jit
def _cvt(x, k_scale, cdt: tl.constexpr, CVT: tl.constexpr):
    """Cache tile -> dot operand dtype. CVT 0: plain cast (16/32-bit caches; fp8 mode 3);
    1: fp8 mode 0 (x * k_scale in fp32); 2: fp8 mode 2 (e4m3 bits moved into an fp16);
    3: fp8 mode 1 (cast, then * k_scale in fp16; the caller passes k_scale = 1.0)."""
    if CVT == 0:
        return x.to(cdt)
    elif CVT == 1:
        return (x.to(tl.float32) * k_scale).to(cdt)
    elif CVT == 3:
        return x.to(cdt) * tl.cast(k_scale, cdt)
    else:
        u = x.to(tl.uint8, bitcast=True).to(tl.uint16)
        return ((u & 0x80) << 8 | (u & 0x7F) << 7).to(tl.float16, bitcast=True)


@triton.jit
def _mla_decode_v2(
    QN, QP, KV, BT, LENS, OPART, LSE, CNT, OUT,
    qk_scale, k_scale, out_scale, B, P, H,
    stride_qn_b, stride_qn_h, stride_qp_b, stride_qp_h, stride_bt_b,
    stride_ps, stride_ph, stride_ls, stride_ob, stride_oh,
    R: tl.constexpr, DR: tl.constexpr, CH: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
    MIN_CHUNK: tl.constexpr, MAX_S: tl.constexpr, MERGE: tl.constexpr, F16: tl.constexpr,
    CVT: tl.constexpr, MW: tl.constexpr,
):
    # F16: fp8 cache, dots in fp16 (else in q's dtype); CVT: see _cvt
    NC: tl.constexpr = R // CH
    hg = tl.program_id(0)
    p = tl.program_id(1)
    b, seq_len, chunk, first, n = _schedule(LENS, B, P, p, True, BLOCK_B, BLOCK_N, MIN_CHUNK,
                                            MAX_S)
    if b < B:
        start = (p - first) * chunk
        end = tl.minimum(start + chunk, seq_len)
        heads = hg * BLOCK_H + tl.arange(0, BLOCK_H)
        hmask = heads < H
        hm = hmask[:, None]
        offs_c = tl.arange(0, CH)
        offs_p = tl.arange(0, DR)
        cdt: tl.constexpr = tl.float16 if F16 else QN.dtype.element_ty
        q_ptr = QN + b * stride_qn_b + heads[:, None] * stride_qn_h + offs_c[None, :]
        q_pe = tl.load(QP + b * stride_qp_b + heads[:, None] * stride_qp_h + offs_p[None, :],
                       mask=hm, other=0.0).to(cdt)
        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc0 = tl.zeros([BLOCK_H, CH], tl.float32)
        acc1 = acc0
        acc2 = acc0
        acc3 = acc0
        bt_row = BT + b * stride_bt_b
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            nmask = offs_n < end
            page = tl.load(bt_row + offs_n // PAGE, mask=nmask, other=0)
            row = KV + ((page.to(tl.int64) * PAGE + offs_n % PAGE) * (R + DR))[:, None]
            nm = nmask[:, None]
            # all loads first (as v1's _load_tile): fewer live registers than interleaving
            kp = tl.load(row + R + offs_p[None, :], mask=nm, other=0.0)
            c0 = tl.load(row + offs_c[None, :], mask=nm, other=0.0)
            c1 = c0
            c2 = c0
            c3 = c0
            if NC > 1:
                c1 = tl.load(row + CH + offs_c[None, :], mask=nm, other=0.0)
            if NC > 2:
                c2 = tl.load(row + 2 * CH + offs_c[None, :], mask=nm, other=0.0)
                c3 = tl.load(row + 3 * CH + offs_c[None, :], mask=nm, other=0.0)
            kp = _cvt(kp, k_scale, cdt, CVT)
            c0 = _cvt(c0, k_scale, cdt, CVT)
            qk = tl.dot(q_pe, tl.trans(kp))
            qk = tl.dot(tl.load(q_ptr, mask=hm, other=0.0).to(cdt), tl.trans(c0), qk)
            if NC > 1:
                c1 = _cvt(c1, k_scale, cdt, CVT)
                qk = tl.dot(tl.load(q_ptr + CH, mask=hm, other=0.0).to(cdt), tl.trans(c1), qk)
            if NC > 2:
                c2 = _cvt(c2, k_scale, cdt, CVT)
                qk = tl.dot(tl.load(q_ptr + 2 * CH, mask=hm, other=0.0).to(cdt), tl.trans(c2), qk)
                c3 = _cvt(c3, k_scale, cdt, CVT)
                qk = tl.dot(tl.load(q_ptr + 3 * CH, mask=hm, other=0.0).to(cdt), tl.trans(c3), qk)
            qk = tl.where(nmask[None, :], qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            alpha = tl.exp2(m_i - m_new)
            pr = tl.exp2(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(pr, 1)
            pc = pr.to(cdt)
            acc0 = tl.dot(pc, c0, acc0 * alpha[:, None])
            if NC > 1:
                acc1 = tl.dot(pc, c1, acc1 * alpha[:, None])
            if NC > 2:
                acc2 = tl.dot(pc, c2, acc2 * alpha[:, None])
                acc3 = tl.dot(pc, c3, acc3 * alpha[:, None])
            m_i = m_new
        if n == 1:  # the whole sequence: final output (seq_len 0 -> zeros)
            norm = out_scale / tl.where(l_i > 0, l_i, 1.0)
            _store_o(OUT + b * stride_ob + heads[:, None] * stride_oh + offs_c[None, :],
                     acc0, acc1, acc2, acc3, norm, hm, CH, NC)
        else:
            tl.store(LSE + p * stride_ls + heads, m_i + tl.log2(l_i), mask=hmask)
            _store_o(OPART + p * stride_ps + heads[:, None] * stride_ph + offs_c[None, :],
                     acc0, acc1, acc2, acc3, 1.0 / l_i, hm, CH, NC)
        if MERGE:
            if n > 1:
                # all warps' partial stores precede the (one-thread, release) atomic
                tl.debug_barrier()
                cnt_ptr = CNT + b * tl.num_programs(0) + hg
                if tl.atomic_add(cnt_ptr, 1, sem="acq_rel") == n - 1:
                    _merge_heads(OPART, LSE, OUT, first, n, hg * BLOCK_H, H, out_scale,
                                 stride_ps, stride_ph, stride_ls,
                                 OUT + b * stride_ob, stride_oh,
                                 R, BLOCK_H, MAX_S, MW)
                    tl.store(cnt_ptr, 0)  # ready for the next launch


@triton.jit
def _store_o(dst, acc0, acc1, acc2, acc3, norm, hm, CH: tl.constexpr, NC: tl.constexpr):
    """Store the NC chunk accumulators * norm (per head) in dst's dtype."""
    odt = dst.dtype.element_ty
    tl.store(dst, (acc0 * norm[:, None]).to(odt), mask=hm)
    if NC > 1:
        tl.store(dst + CH, (acc1 * norm[:, None]).to(odt), mask=hm)
    if NC > 2:
        tl.store(dst + 2 * CH, (acc2 * norm[:, None]).to(odt), mask=hm)
        tl.store(dst + 3 * CH, (acc3 * norm[:, None]).to(odt), mask=hm)


@triton.jit
def _merge_heads(OPART, LSE, OUT, first, n, h0, H, out_scale, stride_ps, stride_ph, stride_ls,
                 out_row, stride_oh, R: tl.constexpr, BLOCK_H: tl.constexpr,
                 BLOCK_S: tl.constexpr, MW: tl.constexpr):
    """Merge slots first..first+n-1 (n <= BLOCK_S) for heads h0..h0+BLOCK_H-1 into out_row,
    MW latent columns at a time ([BLOCK_S, BLOCK_H, MW] tiles; loads bypass L1: the slots were
    written by other programs of this launch)."""
    offs_s = tl.arange(0, BLOCK_S)
    heads = h0 + tl.arange(0, BLOCK_H)
    smask = offs_s < n
    m2 = smask[:, None] & (heads < H)[None, :]
    lse = tl.load(LSE + (first + offs_s)[:, None] * stride_ls + heads[None, :], mask=m2,
                  other=float("-inf"), cache_modifier=".cg")
    mx = tl.max(lse, 0)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    w = tl.where(m2, tl.exp2(lse - mx[None, :]), 0.0)
    den = tl.sum(w, 0)
    w = w * (out_scale / tl.where(den > 0, den, 1.0))[None, :]
    offs_r = tl.arange(0, MW)
    base = (OPART + (first + offs_s)[:, None, None] * stride_ps
            + heads[None, :, None] * stride_ph + offs_r[None, None, :])
    m3 = m2[:, :, None]
    dst = out_row + heads[:, None] * stride_oh + offs_r[None, :]
    for c in range(R // MW):  # a loop, not unrolled: keeps the attention loop spill-free
        parts = tl.load(base + c * MW, mask=m3, other=0.0, cache_modifier=".cg")
        o = tl.sum(tl.where(m3, parts * w[:, :, None], 0.0), 0)
        tl.store(dst + c * MW, o.to(out_row.dtype.element_ty), mask=(heads < H)[:, None])


@triton.jit
def _mla_merge_v2(
    OPART, LSE, LENS, OUT, out_scale, B, P, stride_ps, stride_ph, stride_ls, stride_ob,
    stride_oh, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, MIN_CHUNK: tl.constexpr,
    MAX_S: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """MERGE == 0: grid (H, B, R / BLOCK_R); sequences with one item were written by stage 1."""
    h = tl.program_id(0)
    b0 = tl.program_id(1)
    rc = tl.program_id(2)
    b, _len, _chunk, first, n = _schedule(LENS, B, P, b0, False, BLOCK_B, BLOCK_N, MIN_CHUNK,
                                            MAX_S)
    if n > 1:
        offs_s = tl.arange(0, BLOCK_S)
        smask = offs_s < n
        lse = tl.load(LSE + (first + offs_s) * stride_ls + h, mask=smask, other=float("-inf"))
        mx = tl.max(lse, 0)
        w = tl.where(smask, tl.exp2(lse - mx), 0.0)
        w = w * (out_scale / tl.sum(w, 0))
        offs_r = rc * BLOCK_R + tl.arange(0, BLOCK_R)
        parts = tl.load(OPART + (first + offs_s)[:, None] * stride_ps + h * stride_ph
                        + offs_r[None, :], mask=smask[:, None], other=0.0)
        o = tl.sum(tl.where(smask[:, None], parts * w[:, None], 0.0), 0)
        tl.store(OUT + b * stride_ob + h * stride_oh + offs_r, o.to(OUT.dtype.element_ty))


def alloc_sched_workspace(batch: int, num_heads: int, kv_lora_rank: int, programs: int,
                          block_h: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(opart [P + B, H, R] fp32, lse [P + B, H] fp32, counters [B * head_groups] int32 zeros)."""
    slots = programs + batch
    return (torch.empty(slots, num_heads, kv_lora_rank, dtype=torch.float32, device=device),
            torch.empty(slots, num_heads, dtype=torch.float32, device=device),
            torch.zeros(batch * triton.cdiv(num_heads, block_h), dtype=torch.int32,
                        device=device))


def launch_v2(q_nope, q_pe, kv_cache, block_tables, seq_lens, out, qk_scale, k_scale, out_scale,
              programs, workspace, *, f16, cvt, merge, block_h, block_n, warps, stages, chunk,
              min_chunk, max_s):
    """Launch the v2 kernels (see the module docstring); scales already folded by the caller."""
    B, H, R = q_nope.shape
    DR = q_pe.shape[-1]
    page = kv_cache.shape[1]
    opart, lse, cnt = workspace
    hg = triton.cdiv(H, block_h)
    if programs > 1:
        assert opart.shape == (programs + B, H, R) and lse.shape == (programs + B, H)
        assert cnt.numel() >= B * hg and cnt.dtype == torch.int32
    block_b = max(64, triton.next_power_of_2(B))
    max_s = min(max_s, triton.next_power_of_2(programs + 1)) if merge else max_s
    # merge tile [max_s, block_h, mw] of about 4K fp32 values
    mw = max(16, min(R, 4096 // (max_s * block_h)))
    _mla_decode_v2[(hg, programs + B)](
        q_nope, q_pe, kv_cache, block_tables, seq_lens, opart, lse, cnt, out,
        qk_scale, k_scale, out_scale, B, programs, H,
        q_nope.stride(0), q_nope.stride(1), q_pe.stride(0), q_pe.stride(1), block_tables.stride(0),
        opart.stride(0), opart.stride(1), lse.stride(0), out.stride(0), out.stride(1),
        R=R, DR=DR, CH=chunk, PAGE=page, BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_B=block_b,
        MIN_CHUNK=min_chunk, MAX_S=max_s, MERGE=int(merge), F16=f16, CVT=cvt, MW=mw,
        num_warps=warps, num_stages=stages,
    )
    if not merge:
        block_s = triton.next_power_of_2(max_s)
        block_r = min(R, max(16, 4096 // block_s))
        _mla_merge_v2[(H, B, R // block_r)](
            opart, lse, seq_lens, out, out_scale, B, programs, opart.stride(0), opart.stride(1),
            lse.stride(0), out.stride(0), out.stride(1),
            BLOCK_B=block_b, BLOCK_N=block_n, MIN_CHUNK=min_chunk, MAX_S=max_s,
            BLOCK_S=block_s, BLOCK_R=block_r, num_warps=4,
        )
    return out


def schedule_ref(lens: list[int], programs: int, block_n: int, min_chunk: int,
                 max_s: int) -> list[tuple[int, int, int]]:
    """Host mirror of _schedule (tests, bench): the work items (b, start, end) in item order."""
    total = max(sum(lens), 1)
    items = []
    for b, n_tok in enumerate(lens):
        n = min(max(int(float(n_tok) * programs / total + 0.5), 1), max_s)
        per = (n_tok + n - 1) // n
        chunk = max((per + block_n - 1) // block_n * block_n, min_chunk)
        n = max(-(-n_tok // chunk), 1)
        items += [(b, j * chunk, min((j + 1) * chunk, n_tok)) for j in range(n)]
    return items
