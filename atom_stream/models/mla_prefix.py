"""MLA prefill after a long cached prefix, in bounded memory.

The naive prefill (models/mla.MLA._prefill_one) expands the whole cached prefix through
kv_b_proj and materializes K: ~H x (2 nope + v + rope) x 2 bytes per prefix token (7 KB for a
Kimi-K2.5 TP8 rank, 115 KB for DeepSeek-V3 at TP1), so a chunk after a 256K-token prefix needed
~2 GB (Kimi TP8), after 128K ~15 GB (DeepSeek TP1), of transient memory that the KV-budget
profile (run without a prefix) never saw. Past `prefix_chunk_tokens` of prefix, the attention
runs instead as partial attentions merged by their log-sum-exp (as vLLM's chunked-context MLA
prefill):

    (o, lse)  = causal attention of the chunk's queries over the chunk's own tokens
    for each prefix piece of <= chunk tokens, oldest first:
        (o', lse') = attention of the same queries over the piece (no mask: all older)
        (o, lse)  <- merge_partial(o, lse, o', lse')

Each piece is gathered from the cache, expanded and dropped before the next, so the transient
is bounded by PREFIX_CHUNK_BYTES whatever the prefix length. Partials stay fp32 until the end.
Attention by kernels/mla_prefill.py's Triton kernel (causal=False, lse=) where the naive path
would use it (mla._prefill_kernel_ok), else `attention_ref_lse` (fp32, query blocks of bounded
score memory).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from atom_stream.layers.attention import gather_kv
from atom_stream.layers.linear import dense_weight

# Expanded prefix (gathered latent, kv_b_proj output, K) per piece: 256 MiB is ~25K tokens of a
# Kimi TP8 rank, ~2.3K of DeepSeek TP1. Below one piece of prefix nothing changes (the naive
# one-pass path runs).
PREFIX_CHUNK_BYTES = 256 << 20
# fp32 scores per query block of attention_ref_lse
REF_SCORE_BYTES = 256 << 20


def prefix_chunk_tokens(mla, dtype: torch.dtype, budget: int | None = None) -> int:
    """Prefix tokens per piece: the budget (PREFIX_CHUNK_BYTES) over one token's expanded bytes
    (latent gathered in `dtype` plus its fp32 dequantization, kv_b output, K), >= 1."""
    e = dtype.itemsize
    latent = mla.r + mla.rope
    per_token = (e + 4) * latent + e * mla.num_heads * (2 * mla.nope + mla.v_dim + mla.rope)
    return max(1, (PREFIX_CHUNK_BYTES if budget is None else budget) // per_token)


def budget_reserve_bytes(num_heads: int, v_dim: int, max_chunk_tokens: int) -> int:
    """What a prefill chunk after a long prefix holds beyond a profiling forward without one
    (ModelRunner's KV budget): a piece (PREFIX_CHUNK_BYTES) and the fp32 partials o, o'
    ([T, H, v] each, T = max_chunk_tokens, H per rank) with their lse."""
    return PREFIX_CHUNK_BYTES + 2 * max_chunk_tokens * num_heads * (v_dim + 1) * 4


def attention_ref_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(o [Lq, H, dv] fp32, lse [Lq, H] fp32, natural log) of q [Lq, H, dqk] over k [Lk, H, dqk],
    v [Lk, H, dv]; causal: the queries are the last Lq of the Lk positions, else every query
    sees every key. fp32 scores in query blocks of at most REF_SCORE_BYTES."""
    lq, H = q.shape[:2]
    lk = k.shape[0]
    o = torch.empty(lq, H, v.shape[-1], dtype=torch.float32, device=q.device)
    lse = torch.empty(lq, H, dtype=torch.float32, device=q.device)
    kf, vf = k.float(), v.float()
    step = max(1, REF_SCORE_BYTES // (4 * H * max(lk, 1)))
    for s in range(0, lq, step):
        e = min(lq, s + step)
        scores = torch.einsum("qhd,khd->hqk", q[s:e].float(), kf) * scale
        if causal:  # query s + i sits at position lk - lq + s + i
            pos = torch.arange(s, e, device=q.device)[:, None] + (lk - lq)
            scores.masked_fill_(torch.arange(lk, device=q.device)[None, :] > pos, float("-inf"))
        blk = torch.logsumexp(scores, -1)  # [H, e - s]
        o[s:e] = torch.einsum("hqk,khd->qhd", torch.exp(scores - blk[..., None]), vf)
        lse[s:e] = blk.transpose(0, 1)
    return o, lse


def merge_partial(o: torch.Tensor, lse: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor
                  ) -> None:
    """Fold the attention of the same queries over another, disjoint key set into (o, lse), in
    place: o [T, H, Dv] fp32, lse [T, H] fp32 (natural log-sum-exp), o2 / lse2 likewise (o2 is
    overwritten: no third [T, H, Dv] buffer). o = (o e^lse + o2 e^lse2) / (e^lse + e^lse2),
    lse = log(e^lse + e^lse2)."""
    m = torch.maximum(lse, lse2)
    w, w2 = torch.exp(lse - m), torch.exp(lse2 - m)
    den = w + w2
    o.mul_((w / den)[..., None]).add_(o2.mul_((w2 / den)[..., None]))
    lse.copy_(m + torch.log(den))


def expand_kv(mla, w_kv_b: torch.Tensor, c: torch.Tensor, k_pe: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(k [n, H, nope + rope], v [n, H, v] view) from latent c [n, r] and k_pe [n, rope];
    w_kv_b: kv_b_proj's dense weight [H * (nope + v), r]. The naive prefill's expansion (also
    MLA._prefill_one's)."""
    n = c.shape[0]
    kv = F.linear(c, w_kv_b).view(n, mla.num_heads, mla.nope + mla.v_dim)
    k = torch.cat([kv[..., : mla.nope], k_pe[:, None, :].expand(-1, mla.num_heads, -1)], dim=-1)
    return k, kv[..., mla.nope:]


def _attend(mla, q, k, v, causal: bool, kernel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if kernel:
        from triton.runtime.errors import OutOfResources

        from atom_stream.kernels.mla_prefill import mla_prefill_triton

        lq, lk = q.shape[0], k.shape[0]
        o = torch.empty(lq, q.shape[1], v.shape[-1], dtype=torch.float32, device=q.device)
        lse = torch.empty(lq, q.shape[1], dtype=torch.float32, device=q.device)
        cu = torch.tensor([0, lq, 0, lk], dtype=torch.int32).to(q.device, non_blocking=True)
        try:
            mla_prefill_triton(q, k, v, cu[:2], cu[2:], lq, mla.scale, out=o, causal=causal,
                               lse=lse)
            return o, lse
        except OutOfResources as e:  # tiles over this GPU's shared memory: the reference
            from atom_stream.models.mla import prefill_kernel_failed

            prefill_kernel_failed(e)  # and for every later piece and chunk (kernel_ok)
    return attention_ref_lse(q, k, v, mla.scale, causal)


def prefill_over_long_prefix(mla, q: torch.Tensor, c_new: torch.Tensor, k_pe_new: torch.Tensor,
                             kv_cache: torch.Tensor, block_table: torch.Tensor, prefix: int,
                             chunk: int, kernel_ok) -> torch.Tensor:
    """MLA._prefill_one's result for a chunk after `prefix` cached tokens, one prefix piece of
    <= `chunk` tokens at a time (module docstring). q [Lq, H, nope + rope] (q_pe rotated), c_new
    [Lq, r], k_pe_new [Lq, rope]; kernel_ok(q, v) -> whether the Triton kernel runs. Returns
    [Lq, H, v] in q's dtype."""
    w = dense_weight(mla.kv_b_proj)  # once: a quantized kv_b_proj dequantizes here
    k, v = expand_kv(mla, w, c_new, k_pe_new)
    o, lse = _attend(mla, q, k, v, True, bool(kernel_ok(q, v)))
    del k, v
    for a in range(0, prefix, chunk):
        cached = gather_kv(kv_cache, block_table, min(prefix, a + chunk), c_new.dtype,
                           mla.k_scale, start=a)
        k, v = expand_kv(mla, w, cached[:, : mla.r], cached[:, mla.r:])
        del cached
        merge_partial(o, lse, *_attend(mla, q, k, v, False, bool(kernel_ok(q, v))))
        del k, v
    return o.to(q.dtype)
