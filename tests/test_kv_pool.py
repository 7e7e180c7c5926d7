"""engine/kv_pool: the CPU KV pool is zero, aligned, per-layer independent, and committed lazily."""

import os

import pytest
import torch

from atom_stream.engine.kv_pool import allocate_kv_caches, zeroed_host_tensor


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])
def test_zeroed_host_tensor_is_zero_aligned_and_writable(dtype):
    shape = (9, 16, 576)
    t = zeroed_host_tensor(shape, dtype)
    assert t.shape == shape and t.dtype == dtype and t.is_contiguous()
    assert t.data_ptr() % 64 == 0
    assert not t.float().abs().sum().item()
    t[3, 5] = torch.randn(576).to(dtype)
    assert t[3, 5].float().abs().sum().item() > 0 and not t[4].float().abs().sum().item()


def test_layers_are_independent():
    caches = allocate_kv_caches(3, (5, 4, 8), torch.bfloat16, torch.device("cpu"))
    assert len(caches) == 3
    caches[1].fill_(2.0)
    assert not caches[0].float().sum().item() and not caches[2].float().sum().item()
    assert len({c.data_ptr() for c in caches}) == 3


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_pool_pages_are_committed_only_when_written():
    before = _rss_bytes()
    t = zeroed_host_tensor((1024, 64, 8192), torch.bfloat16)  # 1 GiB
    after = _rss_bytes()
    assert after - before < 64 << 20, (before, after)
    t[:8] = 1.0  # 8 MiB written: those pages, and only about those, become resident
    assert _rss_bytes() - after < 72 << 20
    assert t[7].float().mean().item() == 1.0 and not t[8].float().abs().sum().item()


def test_demo_engine_pool_starts_zero():
    from atom_stream.config import EngineConfig
    from atom_stream.engine.llm_engine import LLMEngine
    # the CPU pool (a GPU engine writes its pool in the start-up warm-ups and graph captures)
    eng = LLMEngine(EngineConfig(model="demo", device="cpu", num_kv_blocks=16))
    try:
        caches = eng.runner.kv_caches
        assert len(caches) == eng.runner.model_config.num_hidden_layers
        assert all(c.shape[0] == 17 and not c.float().abs().sum().item() for c in caches)
    finally:
        eng.runner.shutdown()
