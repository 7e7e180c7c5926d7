"""ModelRunner._prefill_warmup: the start-up prefills that compile size-dependent kernels before
the first request (run on GPUs after the profiling forward; exercised here on the CPU)."""

from __future__ import annotations

import torch

from atom_stream.config import EngineConfig
from atom_stream.engine import model_runner
from atom_stream.engine.model_runner import ModelRunner


def test_prefill_warmup_runs_each_length_below_the_profile_size(monkeypatch):
    runner = ModelRunner(EngineConfig(model="demo", device="cpu", dtype="float32",
                                      num_kv_blocks=8, block_size=16, max_model_len=128))
    monkeypatch.setattr(model_runner, "WARMUP_PREFILL_LENS", (40, 8, 64, 100))
    seen = []
    forward = runner.model.forward

    def spy(ids, positions, kv_caches, md):
        seen.append((ids.shape[0], md.seq_lens, md.num_decodes, int(positions[-1])))
        return forward(ids, positions, kv_caches, md)

    monkeypatch.setattr(runner.model, "forward", spy)
    cfg = runner.model_config
    caches = [torch.zeros(5, 16, cfg.kv_cache_dim) for _ in range(cfg.num_hidden_layers)]
    assert runner._prefill_warmup(caches, 64) == [40, 8]  # 64 and 100 are not below 64
    assert seen == [(40, [40], 0, 39), (8, [8], 0, 7)]
    for c in caches:  # the KV of the warm-up prompts went into the scratch caches
        flat = c.view(-1, cfg.kv_cache_dim)
        assert flat[:40].abs().sum(-1).gt(0).all() and not flat[40:].any()
    # the runner's own pool is untouched
    assert all(not k.any() for k in runner.kv_caches)
