"""ModelRunner start-up choices, exercised on the CPU: `_prefill_warmup` (the prefills that
compile size-dependent kernels before the first request, run on GPUs after the profiling
forward) and `use_symm_allreduce` (which TP groups try the one-shot all-reduce)."""

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


def test_one_shot_all_reduce_only_for_tp_on_gpus_of_one_node(monkeypatch):
    """The symmetric-memory all-reduce reads peers' memory over P2P: only TP groups of one node
    on GPUs try it (multi-node TP keeps NCCL/RCCL), and ATOM_STREAM_SYMM_ALLREDUCE=0 turns it
    off."""
    from atom_stream.layers.parallel import TPInfo

    use = model_runner.use_symm_allreduce
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    one = EngineConfig(model="demo", tensor_parallel_size=2)
    two = EngineConfig(model="demo", tensor_parallel_size=2, nnodes=2, master_addr="10.0.0.1",
                      master_port=29500)
    monkeypatch.setattr(model_runner, "SYMM_ALLREDUCE", True)
    assert use(one, TPInfo(0, 2, None), cuda)
    assert not use(two, TPInfo(0, 2, None), cuda)
    assert not use(one, TPInfo(0, 2, None), cpu)
    assert not use(one, TPInfo(), cuda)
    assert not use(one, TPInfo(0, 2, object()), cuda)  # a private group (DP replicas)
    monkeypatch.setattr(model_runner, "SYMM_ALLREDUCE", False)
    assert not use(one, TPInfo(0, 2, None), cuda)
