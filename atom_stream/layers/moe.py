"""MoE routing and expert computation: torch reference (CPU) paths.

Routing (model_spec.md §3, HF DeepseekV3TopkRouter): scores = sigmoid(x @ Wg^T) in float32;
selection uses scores + e_score_correction_bias with group-limited top-k (group score = sum of
the top-2 biased scores in each group, keep `topk_group` groups, others -inf); the weights are
the UNBIASED scores of the chosen experts, renormalized when norm_topk_prob (+1e-20), times
routed_scaling_factor.

Experts are stacked expert-major: w13 [E, 2I, H] (gate rows, then up rows), w2 [E, H, I].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def route(router_logits: torch.Tensor, bias: torch.Tensor | None, *, top_k: int, n_group: int,
          topk_group: int, norm_topk_prob: bool, routed_scaling_factor: float,
          scoring_func: str = "sigmoid", group_score: str = "top2_sum"
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] (float32) -> (topk_weights [T, k] float32, topk_ids [T, k] int64).
    `group_score`: how a group is ranked for the group limit, "top2_sum" (V3's noaux_tc) or
    "max" (DeepSeek-V2's group_limited_greedy, transformers' DeepseekV2TopkRouter)."""
    logits = router_logits.float()
    scores = logits.sigmoid() if scoring_func == "sigmoid" else logits.softmax(-1)
    sel = scores + bias.float() if bias is not None else scores
    T, E = sel.shape
    if n_group > 1 and topk_group < n_group:
        grouped = sel.view(T, n_group, E // n_group)
        if group_score == "max":
            group_scores = grouped.amax(dim=-1)
        else:
            group_scores = grouped.topk(min(2, E // n_group), dim=-1)[0].sum(-1)
        group_idx = group_scores.topk(topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
        expert_mask = group_mask.unsqueeze(-1).expand(T, n_group, E // n_group).reshape(T, E)
        sel = sel.masked_fill(~expert_mask, float("-inf"))
    topk_ids = sel.topk(top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, topk_ids)
    if norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * routed_scaling_factor, topk_ids


def moe_loop(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
             num_experts: int, expert_fn) -> torch.Tensor:
    """sum_k w_k * expert_fn(e_k, x_rows) over the experts actually chosen (the CPU reference
    loop shared by the dense and quantized expert paths); accumulation in float32.

    While a CUDA/HIP graph is being captured (a model whose experts have no kernel layout, e.g. a
    tiny checkpoint with hidden % 128 != 0) the per-expert row counts cannot go to the host, so
    every expert runs on every row with the rows' weight for it (0 where not chosen): the same
    sum in the same expert order, graph-safe, E times the work."""
    T, H = x.shape
    out = torch.zeros(T, H, dtype=torch.float32, device=x.device)
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        for e in range(num_experts):
            w = (topk_weights.float() * (topk_ids == e)).sum(-1)[:, None]
            # where, not a product: an unchosen row's non-finite output must add nothing
            out += torch.where(w != 0, expert_fn(e, x).float() * w, 0.0)
        return out.to(x.dtype)
    flat_ids = topk_ids.reshape(-1)
    order = flat_ids.argsort(stable=True)
    counts = torch.bincount(flat_ids, minlength=num_experts).tolist()
    tok = order // topk_ids.shape[1]
    wts = topk_weights.reshape(-1)[order]
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        rows = tok[start:start + n]
        y = expert_fn(e, x[rows])
        out.index_add_(0, rows, y.float() * wts[start:start + n, None])
        start += n
    return out.to(x.dtype)


def experts_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                topk_ids: torch.Tensor) -> torch.Tensor:
    """sum_k w_k * down(silu(gate(x)) * up(x)) over the chosen experts; x [T, H] -> [T, H];
    per-expert math in x's dtype."""
    inter = w2.shape[-1]

    def expert(e: int, xs: torch.Tensor) -> torch.Tensor:
        h = F.linear(xs, w13[e])
        return F.linear(F.silu(h[:, :inter]) * h[:, inter:], w2[e])

    return moe_loop(x, topk_weights, topk_ids, w13.shape[0], expert)


def experts_dense_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                      topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """Same result as experts_ref without host syncs (graph-capturable): every expert runs on
    every token and is weighted by its routing weight (0 when not chosen). For small E only."""
    E = w13.shape[0]
    inter = w2.shape[-1]
    dense_w = torch.zeros(x.shape[0], E, dtype=torch.float32, device=x.device)
    dense_w.scatter_add_(1, topk_ids, topk_weights.float())
    h = torch.einsum("th,eih->tei", x, w13)
    act = F.silu(h[..., :inter]) * h[..., inter:]
    y = torch.einsum("tei,ehi->teh", act, w2)
    return (y.float() * dense_w[..., None]).sum(1).to(x.dtype)
