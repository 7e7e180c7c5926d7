"""Torch layer references against each other on fresh random inputs."""

from __future__ import annotations

import torch

from atom_stream.layers.attention import mla_decode_ref
from atom_stream.layers.moe import experts_dense_ref, experts_ref, route


def test_dense_experts_equal_sparse_reference():
    g = torch.Generator().manual_seed(0)
    T, H, I, E, k = 9, 32, 16, 8, 3
    x = torch.randn(T, H, generator=g)
    w13 = torch.randn(E, 2 * I, H, generator=g) / H**0.5
    w2 = torch.randn(E, H, I, generator=g) / I**0.5
    w, ids = route(torch.randn(T, E, generator=g), torch.randn(E, generator=g) * 0.1, top_k=k,
                   n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5)
    torch.testing.assert_close(experts_dense_ref(x, w13, w2, w, ids),
                               experts_ref(x, w13, w2, w, ids), rtol=1e-5, atol=1e-5)


def test_group_limited_routing_keeps_chosen_groups():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(50, 16, generator=g)
    w, ids = route(logits, None, top_k=4, n_group=4, topk_group=2, norm_topk_prob=True,
                   routed_scaling_factor=1.0)
    assert ((ids // 4).unique(dim=1).shape[1] <= 2) or all(
        len(set((r // 4).tolist())) <= 2 for r in ids)
    torch.testing.assert_close(w.sum(-1), torch.ones(50), rtol=1e-5, atol=1e-6)


def test_static_length_decode_equals_dynamic():
    g = torch.Generator().manual_seed(2)
    B, Hh, R, DR, bs, nb = 3, 2, 16, 8, 4, 12
    cache = torch.randn(nb, bs, R + DR, generator=g)
    tables = torch.randperm(nb, generator=g)[: B * 4].view(B, 4).int()
    lens = torch.tensor([5, 16, 1], dtype=torch.int32)
    q, qp = torch.randn(B, Hh, R, generator=g), torch.randn(B, Hh, DR, generator=g)
    a = mla_decode_ref(q, qp, cache, tables, lens, R, 0.3)
    b = mla_decode_ref(q, qp, cache, tables, lens, R, 0.3, static_len=True)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
