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


def test_prefill_batch_packs_sequences_of_at_most_max_model_len():
    """The start-up forwards' batch: n tokens as max_len-token prompts (the last shorter), each
    in blocks of its own, positions restarting per prompt."""
    md, positions, blocks = model_runner.prefill_batch(70, 32, 16, torch.device("cpu"))
    assert md.seq_lens == [32, 32, 6] and md.query_start_loc == [0, 32, 64, 70]
    assert md.num_decodes == 0 and blocks == 5
    assert md.block_tables.tolist() == [[0, 1], [2, 3], [4, 0]]
    want_slots = list(range(32)) + list(range(32, 64)) + list(range(64, 70))
    assert md.slot_mapping.tolist() == want_slots
    assert positions.tolist() == list(range(32)) + list(range(32)) + list(range(6))
    md, positions, blocks = model_runner.prefill_batch(20, 32, 16, torch.device("cpu"))
    assert md.seq_lens == [20] and blocks == 2 and positions.tolist() == list(range(20))


def test_prefill_warmup_splits_lengths_above_max_model_len(monkeypatch):
    """max_model_len 24 < a warm-up length of 40: that step runs as prompts of 24 + 16 tokens
    (what the scheduler would batch); the largest step is max_num_batched_tokens unless
    max_num_seqs prompts of max_model_len cannot fill it; the batch's hidden states are those
    of the same prompts run one by one."""
    runner = ModelRunner(EngineConfig(model="demo", device="cpu", dtype="float32",
                                      num_kv_blocks=8, block_size=16, max_model_len=24,
                                      max_num_batched_tokens=64, max_num_seqs=2))
    assert runner.largest_prefill_tokens() == 48  # 2 sequences of 24, under the 64 budget
    monkeypatch.setattr(model_runner, "WARMUP_PREFILL_LENS", (40,))
    seen = []
    forward = runner.model.forward

    def spy(ids, positions, kv_caches, md):
        seen.append((md.seq_lens, positions.tolist()))
        return forward(ids, positions, kv_caches, md)

    monkeypatch.setattr(runner.model, "forward", spy)
    cfg = runner.model_config
    caches = [torch.zeros(4, 16, cfg.kv_cache_dim) for _ in range(cfg.num_hidden_layers)]
    assert runner._prefill_warmup(caches, 48) == [40]
    assert seen == [([24, 16], list(range(24)) + list(range(16)))]
    for c in caches:  # blocks 0-1 hold prompt 1 (24 slots), block 2 prompt 2 (16 slots)
        flat = c.view(-1, cfg.kv_cache_dim)
        assert flat[:24].abs().sum(-1).gt(0).all() and not flat[24:32].any()
        assert flat[32:48].abs().sum(-1).gt(0).all() and not flat[48:].any()

    md, positions, blocks = model_runner.prefill_batch(40, 24, 16, torch.device("cpu"))
    ids = torch.randint(0, cfg.vocab_size, (40,))
    fresh = [torch.zeros(blocks, 16, cfg.kv_cache_dim) for _ in range(cfg.num_hidden_layers)]
    with torch.inference_mode():
        both = forward(ids, positions, fresh, md)
        for lo, hi in ((0, 24), (24, 40)):
            one, pos, nb = model_runner.prefill_batch(hi - lo, 24, 16, torch.device("cpu"))
            alone = forward(ids[lo:hi], pos,
                            [torch.zeros(nb, 16, cfg.kv_cache_dim) for _ in fresh], one)
            torch.testing.assert_close(both[lo:hi], alone, rtol=1e-5, atol=1e-5)
