"""FP8 KV cache (`kv_cache_dtype="fp8"`, model_spec §4e) through ModelRunner on the CPU:
decode logits (which read every cached latent back) within 5e-2 relative L2 of the float32 cache
(observed 2.6e-2; a bf16 cache gives 1.5e-3 on this tiny random model),
the pool's bytes exactly half of a bf16 pool with the same blocks, and checkpoint `k_scale`
tensors loaded into MLA.k_scale (and actually used)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from atom_stream.config import EngineConfig
from atom_stream.engine.model_runner import ModelRunner
from atom_stream.layers.attention import AttentionMetadata
import quant_writers as qw

TOL = 5e-2


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("kvsrc"))
    qw.make_tiny_hf(path, "kimi", seed=2)
    return path


def build(path, **kw):
    kw.setdefault("dtype", "float32")
    return ModelRunner(EngineConfig(model=path, device="cpu", num_kv_blocks=32, block_size=4,
                                    **kw))


def decode_logits(r, prompt, forced):
    """Prefill `prompt`, then decode the `forced` tokens one by one; logits of every decode."""
    m, bs, L = r.model, r.block_size, len(prompt)
    table = torch.arange(16, dtype=torch.int32)[None]
    md = AttentionMetadata([0, L], [L], table, torch.arange(L), 0, bs)
    m(torch.tensor(prompt), torch.arange(L), r.kv_caches, md)
    out = []
    for i, tok in enumerate(forced):
        p = L + i
        md = AttentionMetadata([0, 1], [p + 1], table, torch.tensor([p]), 1, bs,
                               decode_seq_lens=torch.tensor([p + 1]))
        out.append(m.compute_logits(m(torch.tensor([tok]), torch.tensor([p]), r.kv_caches, md)))
    return torch.cat(out)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


PROMPT = torch.randint(0, 320, (21,), generator=torch.Generator().manual_seed(4)).tolist()
FORCED = torch.randint(0, 320, (10,), generator=torch.Generator().manual_seed(5)).tolist()


def test_fp8_cache_logits_close_and_bytes_halved(src):
    full = build(src)
    fp8 = build(src, kv_cache_dtype="fp8")
    bf16 = build(src, dtype="bfloat16")
    assert fp8.kv_caches[0].dtype == torch.float8_e4m3fn
    nbytes = [sum(c.numel() * c.element_size() for c in r.kv_caches) for r in (fp8, bf16)]
    assert nbytes[0] * 2 == nbytes[1]
    ref = decode_logits(full, PROMPT, FORCED)
    assert rel(decode_logits(fp8, PROMPT, FORCED), ref) < TOL
    assert all(layer.self_attn.k_scale == 1.0 for layer in fp8.model.model.layers)


def test_checkpoint_k_scale_loads_and_is_used(src, tmp_path):
    def with_scales(dst, scales):
        os.makedirs(dst, exist_ok=True)
        tensors = load_file(os.path.join(src, "model.safetensors"))
        for i, s in enumerate(scales):
            tensors[f"model.layers.{i}.self_attn.k_scale"] = torch.tensor(s)
            tensors[f"model.layers.{i}.self_attn.v_scale"] = torch.tensor(s)
        save_file(tensors, os.path.join(dst, "model.safetensors"))
        cfg = json.load(open(os.path.join(src, "config.json")))
        json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
        return build(dst, kv_cache_dtype="fp8")

    scales = [0.02, 0.01, 0.015]  # latent values stay within 448 * k_scale
    r = with_scales(str(tmp_path / "ok"), scales)
    assert [layer.self_attn.k_scale for layer in r.model.model.layers] == pytest.approx(scales)
    ref = decode_logits(build(src), PROMPT, FORCED)
    assert rel(decode_logits(r, PROMPT, FORCED), ref) < TOL
    tiny = with_scales(str(tmp_path / "clipped"), [1e-4] * 3)  # clips at 0.0448: must hurt
    assert rel(decode_logits(tiny, PROMPT, FORCED), ref) > 5 * TOL
