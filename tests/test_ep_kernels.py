"""EP dispatch into the Triton fused MoE: `local_topk` maps another rank's picks to local expert 0
with weight 0, so a token can carry the same local id several times. The kernel must still give
each rank's share, and the ranks' shares must sum to the unsplit experts' output (direct mode,
M <= 16, and sorted mode). Without a GPU the kernel runs under TRITON_INTERPRET=1 (set before the
kernel modules are decorated, as tests/test_kernels_moe.py does) in float16."""

from __future__ import annotations


import pytest
import torch
from kernel_interp import interpret_without_gpu

# re-decorate, in import order
GPU = interpret_without_gpu(
    "moe_routing", "moe_align", "fused_moe_common", "fused_moe_tc", "fused_moe_gemv", "fused_moe_fp8", "fused_moe")

from atom_stream.kernels import moe_ref as R
from atom_stream.kernels.fused_moe import fused_moe

from atom_stream.layers.parallel import TPInfo, local_topk

DEV = "cuda" if GPU else "cpu"
FAST = {"BN1": 64, "BN2": 128}  # few programs: the interpreter runs each one in Python


@pytest.mark.parametrize("M", [3, 19])  # direct mode (M <= 16) and sorted mode
def test_fused_moe_ep_shares_sum_to_unsplit(M):
    E, H, I, k, world = 8, 256, 128, 3, 2
    g = torch.Generator().manual_seed(M)
    w13 = (torch.randn(E, 2 * I, H, generator=g) * H ** -0.5).half()
    w2 = (torch.randn(E, H, I, generator=g) * I ** -0.5).half()
    x = torch.randn(M, H, generator=g).half()
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(M)])
    tw = torch.rand(M, k, generator=g) + 0.1
    ref = R.fused_moe_ref(x, w13, w2, tw, ids)
    total = torch.zeros(M, H, dtype=torch.float64)
    for rank in range(world):
        start, n = TPInfo(rank, world, ep=True).expert_range(E)
        lw, lids = local_topk(tw.to(DEV), ids.to(DEV), start, n)
        assert (lids >= 0).all() and (lids < n).all()
        y = fused_moe(x.to(DEV), w13[start:start + n].to(DEV).contiguous(),
                      w2[start:start + n].to(DEV).contiguous(), lw, lids.int(),
                      config=dict(FAST, poison=True))
        share = R.fused_moe_ref(x, w13[start:start + n], w2[start:start + n], lw.cpu(),
                                lids.cpu())
        assert torch.isfinite(y).all()
        err = float((y.cpu().double() - share.double()).norm() / share.double().norm())
        assert err < 5e-3, f"rank {rank}: rel err {err:.3g}"
        total += y.cpu().double()
    err = float((total - ref.double()).norm() / ref.double().norm())
    assert err < 5e-3, f"sum of shares: rel err {err:.3g}"


@pytest.mark.skipif(not GPU, reason="needs a GPU")
def test_ep_experts_module_under_cuda_graph():
    """Experts.forward of an EP rank (local_topk + fused MoE) captures into a CUDA graph and its
    replays equal eager runs for fresh routing; the two ranks' shares sum to the unsplit layer."""
    from types import SimpleNamespace

    from atom_stream.layers.parallel import tp_context
    from atom_stream.models.deepseek_v3 import Experts

    cfg = SimpleNamespace(n_routed_experts=8, hidden_size=256, moe_intermediate_size=128)
    M, k = 8, 3
    g = torch.Generator().manual_seed(0)
    full = Experts(cfg, torch.bfloat16, DEV)
    full.w13.copy_(torch.randn(full.w13.shape, generator=g) * 256 ** -0.5)
    full.w2.copy_(torch.randn(full.w2.shape, generator=g) * 128 ** -0.5)
    x = torch.zeros(M, 256, dtype=torch.bfloat16, device=DEV)
    tw = torch.zeros(M, k, device=DEV)
    ids = torch.zeros(M, k, dtype=torch.int64, device=DEV)
    ranks = []
    for rank in range(2):
        with tp_context(TPInfo(rank, 2, ep=True)):
            ex = Experts(cfg, torch.bfloat16, DEV)
        ex.w13.copy_(full.w13[4 * rank:4 * rank + 4])
        ex.w2.copy_(full.w2[4 * rank:4 * rank + 4])
        ranks.append(ex)
    for ex in ranks:  # warm up (Triton compile) outside the capture
        ex(x, tw, ids)
    torch.cuda.synchronize()
    graphs, outs = [], []
    for ex in ranks:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs.append(ex(x, tw, ids))
        graphs.append(graph)
    for step in range(3):
        x.copy_(torch.randn(M, 256, generator=g))
        tw.copy_(torch.rand(M, k, generator=g) + 0.1)
        ids.copy_(torch.stack([torch.randperm(8, generator=g)[:k] for _ in range(M)]))
        for graph in graphs:
            graph.replay()
        torch.cuda.synchronize()
        eager = [ex(x, tw, ids) for ex in ranks]
        for o, e in zip(outs, eager):
            assert torch.equal(o, e), f"step {step}: replay differs from eager"
        want = full(x, tw, ids).double()
        err = float(((outs[0].double() + outs[1].double()) - want).norm() / want.norm())
        assert err < 2e-2, f"step {step}: rel err {err:.3g}"
