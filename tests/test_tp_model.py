"""Tensor parallelism at the model level on the CPU (gloo): TP=2 and TP=4 shards of a tiny
checkpoint give the same greedy tokens as TP=1, in float32."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

from hf_checkpoints import write_hf_checkpoint


def _greedy(path: str, prompt: list[int], n: int) -> list[int]:
    from atom_stream.config import ModelConfig
    from atom_stream.loader import load_checkpoint
    from atom_stream.models import MODEL_REGISTRY
    from test_model_parity import PagedSeq

    cfg = ModelConfig.from_pretrained(path)
    model = MODEL_REGISTRY[cfg.architecture](cfg, 256, torch.float32)
    load_checkpoint(model, path, cfg.num_hidden_layers, cfg.tie_word_embeddings)
    model.process_weights_after_loading()
    seq = PagedSeq(cfg)
    ids = torch.tensor(prompt)
    pos, md = seq.step_md(len(prompt), decode=False)
    toks = [int(model.compute_logits(model(ids, pos, seq.caches, md)[-1:]).argmax(-1))]
    for _ in range(n - 1):
        pos, md = seq.step_md(1, decode=True)
        h = model(torch.tensor(toks[-1:]), pos, seq.caches, md)
        toks.append(int(model.compute_logits(h).argmax(-1)))
    return toks


def _worker(rank: int, world: int, init: str, path: str, prompt: list[int], n: int, out: str):
    import sys
    sys.path.insert(0, os.path.dirname(__file__))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    from atom_stream.layers.parallel import TPInfo, tp_context
    try:
        with tp_context(TPInfo(rank, world)):
            toks = _greedy(path, prompt, n)
        torch.save(toks, f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tp_deepseek"))
    write_hf_checkpoint(path, "deepseek", seed=4)
    return path


@pytest.mark.parametrize("world", [2, 4])
def test_tp_matches_single_rank(ckpt, world):
    g = torch.Generator().manual_seed(world)
    prompt = torch.randint(0, 320, (12,), generator=g).tolist()
    want = _greedy(ckpt, prompt, 12)
    tmp = tempfile.mkdtemp()
    init = f"file://{tmp}/rendezvous"
    mp.start_processes(_worker, args=(world, init, ckpt, prompt, 12, f"{tmp}/out"),
                       nprocs=world, join=True, start_method="spawn")
    for rank in range(world):
        assert torch.load(f"{tmp}/out.{rank}") == want, f"rank {rank} of TP={world} diverges"
