"""DeepseekV3 / Kimi noaux_tc routing in one Triton kernel (model_spec §3, MoE steps 1-5).

    s   = sigmoid(logits)                       (fp32)
    sel = s + e_score_correction_bias           (selection only)
    group-limited top-k: group score = sum of the top-2 `sel` in each of n_group groups, keep the
      best topk_group groups, mask the other experts to -inf; ids = top_k of sel
    w   = s[ids] (UNBIASED), / (sum + 1e-20) if norm_topk_prob, then * routed_scaling_factor

moe_routing(logits [M, E] (any float dtype; the router GEMM is the caller's, in fp32 per §3),
            bias [E] fp32 | None, *, top_k, n_group=1, topk_group=1, norm_topk_prob=True,
            routed_scaling_factor=1.0, out=None, act=None)
    -> (topk_weights [M, top_k] fp32, topk_ids [M, top_k] int32)
act=(gu [M, 2I], act_out [M, I]) also writes act_out = SiLU(gu[:, :I]) * gu[:, I:] in the same
launch (kernels/silu_mul.py's rounding): the fused router + shared gate/up GEMM's second half.
ids come in falling order of `sel` (ties: lowest expert id first). One program per token; no
host syncs, so it can be captured in a CUDA/HIP graph. The shared expert is not part of routing:
fused_moe(..., n_shared=S) appends it with weight 1.0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# One warp: the top-k is TOPK single-key max reductions over <= 512 lanes, cheapest within a warp
# (no shared-memory round trips). bench/kernels_moe.py --set routing times 1, 2 and 4.
NUM_WARPS = 1


@triton.jit
def _routing_kernel(
    LOGITS, BIAS, TW, TID, GU, ACT, stride_lm, stride_wm, stride_im, stride_gm, stride_am,
    scaling, I,
    E: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, GS: tl.constexpr, GSP: tl.constexpr,
    TOPK: tl.constexpr, TOPKP: tl.constexpr, TOPK_GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
    RENORM: tl.constexpr, HAS_ACT: tl.constexpr, BLOCK_I: tl.constexpr,
):
    m = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, GP)[:, None]
    j = tl.arange(0, GSP)[None, :]
    e = g * GS + j  # expert id, [GP, GSP]
    valid = (g < G) & (j < GS)
    ninf = float("-inf")
    row = LOGITS + m * stride_lm
    x = tl.load(row + e, mask=valid, other=0.0).to(tl.float32)
    sel = 1.0 / (1.0 + tl.exp(-x))
    if HAS_BIAS:
        sel = sel + tl.load(BIAS + e, mask=valid, other=0.0).to(tl.float32)
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
    # top-k by ONE max per pick: key = (sel's bits made order-preserving as a signed int32) in
    # the high word, (big - 1 - e) in the low word, so the max is the highest score and, among
    # equal scores, the lowest expert id; the winner's key is then knocked out.
    bits = sel.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64) << 32
    key = key | (big - 1 - e).to(tl.int64)
    k = tl.arange(0, TOPKP)
    ids = tl.zeros((TOPKP,), tl.int32)
    for i in tl.static_range(TOPK):
        mx = tl.max(tl.max(key, axis=1), axis=0)
        ids = tl.where(k == i, (big - 1 - (mx & 0xFFFFFFFF)).to(tl.int32), ids)
        key = tl.where(key == mx, -9223372036854775807 - 1, key)
    # the weights are the UNBIASED scores of the picks: recomputed from the logits (same ops)
    kmask = k < TOPK
    xs = tl.load(row + ids, mask=kmask, other=0.0).to(tl.float32)
    ws = tl.where(kmask, 1.0 / (1.0 + tl.exp(-xs)), 0.0)
    if RENORM:
        ws = ws / (tl.sum(ws, axis=0) + 1e-20)
    ws = ws * scaling
    tl.store(TW + m * stride_wm + k, ws, mask=kmask)
    tl.store(TID + m * stride_im + k, ids, mask=kmask)
    if HAS_ACT:  # the shared expert's SiLU(gate) * up, kernels/silu_mul.py's rounding points
        for i0 in range(0, I, BLOCK_I):
            offs = i0 + tl.arange(0, BLOCK_I)
            am = offs < I
            gt = tl.load(GU + m * stride_gm + offs, mask=am, other=0.0).to(tl.float32)
            up = tl.load(GU + m * stride_gm + I + offs, mask=am, other=0.0).to(tl.float32)
            s = (gt / (1.0 + tl.exp(-gt))).to(ACT.dtype.element_ty).to(tl.float32)
            tl.store(ACT + m * stride_am + offs, (s * up).to(ACT.dtype.element_ty), mask=am)


def moe_routing(logits: torch.Tensor, bias: torch.Tensor | None, *, top_k: int, n_group: int = 1,
                topk_group: int = 1, norm_topk_prob: bool = True,
                routed_scaling_factor: float = 1.0,
                out: tuple[torch.Tensor, torch.Tensor] | None = None,
                act: tuple[torch.Tensor, torch.Tensor] | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """See the module docstring. `out` = (topk_weights, topk_ids) buffers to write into;
    `act` = (gu [M, 2I], act_out [M, I]): the same launch also writes
    act_out = silu_mul(gu) (kernels/silu_mul.py, same rounding), e.g. the shared expert's half
    of the fused router GEMM's output."""
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
    gu, act_out, inter = logits, tw, 0
    if act is not None:
        gu, act_out = act
        inter = gu.shape[-1] // 2
        if (gu.shape != (M, 2 * inter) or act_out.shape != (M, inter) or gu.stride(-1) != 1
                or act_out.stride(-1) != 1):
            raise ValueError(f"moe_routing act: want gu [M, 2I] and out [M, I] with contiguous "
                             f"last dims, got {tuple(gu.shape)} / {tuple(act_out.shape)}")
    _routing_kernel[(M,)](
        logits, bias if has_bias else logits, tw, tid, gu, act_out, logits.stride(0),
        tw.stride(0), tid.stride(0), gu.stride(0), act_out.stride(0),
        float(routed_scaling_factor), inter,
        E=E, G=n_group, GP=triton.next_power_of_2(n_group), GS=gs, GSP=triton.next_power_of_2(gs),
        TOPK=top_k, TOPKP=triton.next_power_of_2(top_k), TOPK_GROUP=topk_group,
        HAS_BIAS=has_bias, RENORM=norm_topk_prob, HAS_ACT=act is not None,
        BLOCK_I=min(1024, triton.next_power_of_2(max(inter, 1))), num_warps=NUM_WARPS,
    )
    return tw, tid
