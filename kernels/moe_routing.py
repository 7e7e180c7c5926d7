"""DeepseekV3 / Kimi noaux_tc routing in one Triton kernel (model_spec §3, MoE steps 1-5).

    s   = sigmoid(logits)                       (fp32)
    sel = s + e_score_correction_bias           (selection only)
    group-limited top-k: group score = sum of the top-2 `sel` in each of n_group groups, keep the
      best topk_group groups, mask the other experts to -inf; ids = top_k of sel
    w   = s[ids] (UNBIASED), / (sum + 1e-20) if norm_topk_prob, then * routed_scaling_factor

moe_routing(logits [M, E] (any float dtype; the router GEMM is the caller's, in fp32 per §3),
            bias [E] fp32 | None, *, top_k, n_group=1, topk_group=1, norm_topk_prob=True,
            routed_scaling_factor=1.0, out=None)
    -> (topk_weights [M, top_k] fp32, topk_ids [M, top_k] int32)
ids come in falling order of `sel` (ties: lowest expert id first). One program per token; no
host syncs, so it can be captured in a CUDA/HIP graph. The shared expert is not part of routing:
fused_moe(..., n_shared=S) appends it with weight 1.0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _routing_kernel(
    LOGITS, BIAS, TW, TID, stride_lm, stride_wm, stride_im, scaling,
    E: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, GS: tl.constexpr, GSP: tl.constexpr,
    TOPK: tl.constexpr, TOPKP: tl.constexpr, TOPK_GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
    RENORM: tl.constexpr,
):
    m = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, GP)[:, None]
    j = tl.arange(0, GSP)[None, :]
    e = g * GS + j  # expert id, [GP, GSP]
    valid = (g < G) & (j < GS)
    ninf = float("-inf")
    x = tl.load(LOGITS + m * stride_lm + e, mask=valid, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-x))
    sel = s
    if HAS_BIAS:
        sel = s + tl.load(BIAS + e, mask=valid, other=0.0).to(tl.float32)
    sel = tl.where(valid, sel, ninf)
    big = GP * GSP
    if G > 1:
        # group score = top-2 sum; the first max is removed by index so that ties count twice
        m1 = tl.max(sel, axis=1)
        i1 = tl.min(tl.where(sel == m1[:, None], j, big), axis=1)
        m2 = tl.max(tl.where(j == i1[:, None], ninf, sel), axis=1)
        gs = tl.where(tl.arange(0, GP) < G, m1 + m2, ninf)
        keep = tl.zeros((GP,), tl.int1)
        for _ in tl.static_range(TOPK_GROUP):
            gm = tl.max(gs, axis=0)
            gi = tl.min(tl.where(gs == gm, tl.arange(0, GP), big), axis=0)
            keep = keep | (tl.arange(0, GP) == gi)
            gs = tl.where(tl.arange(0, GP) == gi, ninf, gs)
        sel = tl.where(keep[:, None], sel, ninf)
    k = tl.arange(0, TOPKP)
    ids = tl.zeros((TOPKP,), tl.int32)
    ws = tl.zeros((TOPKP,), tl.float32)
    for i in tl.static_range(TOPK):
        mx = tl.max(tl.max(sel, axis=1), axis=0)
        idx = tl.min(tl.min(tl.where(sel == mx, e, big), axis=1), axis=0)
        hit = e == idx
        wi = tl.sum(tl.sum(tl.where(hit, s, 0.0), axis=1), axis=0)
        ids = tl.where(k == i, idx, ids)
        ws = tl.where(k == i, wi, ws)
        sel = tl.where(hit, ninf, sel)
    if RENORM:
        ws = ws / (tl.sum(ws, axis=0) + 1e-20)
    ws = ws * scaling
    tl.store(TW + m * stride_wm + k, ws, mask=k < TOPK)
    tl.store(TID + m * stride_im + k, ids, mask=k < TOPK)


def moe_routing(logits: torch.Tensor, bias: torch.Tensor | None, *, top_k: int, n_group: int = 1,
                topk_group: int = 1, norm_topk_prob: bool = True,
                routed_scaling_factor: float = 1.0,
                out: tuple[torch.Tensor, torch.Tensor] | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """See the module docstring. `out` = (topk_weights, topk_ids) buffers to write into."""
    M, E = logits.shape
    if E % n_group or not 1 <= topk_group <= n_group:
        raise ValueError(f"bad grouping: E={E}, n_group={n_group}, topk_group={topk_group}")
    gs = E // n_group
    if n_group > 1 and gs < 2:
        raise ValueError("group-limited routing needs at least 2 experts per group")
    if top_k > topk_group * gs:
        raise ValueError(f"top_k={top_k} exceeds the {topk_group * gs} experts left after grouping")
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    if out is None:
        tw = torch.empty(M, top_k, dtype=torch.float32, device=logits.device)
        tid = torch.empty(M, top_k, dtype=torch.int32, device=logits.device)
    else:
        tw, tid = out
    if M == 0:
        return tw, tid
    has_bias = bias is not None
    _routing_kernel[(M,)](
        logits, bias if has_bias else logits, tw, tid, logits.stride(0), tw.stride(0),
        tid.stride(0), float(routed_scaling_factor),
        E=E, G=n_group, GP=triton.next_power_of_2(n_group), GS=gs, GSP=triton.next_power_of_2(gs),
        TOPK=top_k, TOPKP=triton.next_power_of_2(top_k), TOPK_GROUP=topk_group,
        HAS_BIAS=has_bias, RENORM=norm_topk_prob, num_warps=4 if E >= 256 else 1,
    )
    return tw, tid
