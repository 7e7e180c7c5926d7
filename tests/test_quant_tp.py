"""Quantized checkpoints under tensor parallelism (TP=2, gloo, CPU): the quant loader slices
packed tensors per rank (INT4 words / group scales, MXFP4 bytes / e8m0 scales, W4A8 int32 words
and per-channel scales) like the dense loader slices weights. INT4 and MXFP4 give the TP=1
greedy tokens. W4A8 re-quantizes each rank's shard with its own FP8 scale (and quantizes its
share of the intermediate activations per token), so instead each rank's converted experts are
checked against the writer's dequantized weights sliced for that rank: within FP8 rounding
(relative L2 < 4e-2; a wrong slice is off by > 1)."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

import quant_writers as qw

FORMATS = ("int4", "mxfp4", "w4a8")
PROMPT = torch.randint(0, 320, (15,), generator=torch.Generator().manual_seed(8)).tolist()


def _run(path, tp_info=None):
    from atom_stream.config import EngineConfig
    from atom_stream.engine.model_runner import ModelRunner
    from test_quant_formats import run

    r = ModelRunner(EngineConfig(model=path, device="cpu", dtype="float32", num_kv_blocks=32,
                                 block_size=4), tp_info=tp_info)
    if "w4a8" in path:  # layer 1's experts, dequantized from the FP8 they were converted to
        ex = r.model.model.layers[1].mlp.experts
        return (ex.w13_weight.float() * ex.w13_weight_scale[:, None, None],
                ex.w2_weight.float() * ex.w2_weight_scale[:, None, None])
    return run(r, PROMPT, n_decode=8)


def _worker(rank, world, init, root, out):
    import sys
    sys.path.insert(0, os.path.dirname(__file__))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    from atom_stream.layers.parallel import TPInfo
    try:
        res = {f: _run(os.path.join(root, f), TPInfo(rank, world)) for f in FORMATS}
        torch.save(res, f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("qtp")
    src = str(root / "src")
    qw.make_tiny_hf(src, "kimi", seed=6, moe_intermediate_size=64)  # 32 per rank at TP=2
    deq = {fmt: qw.write_quantized(src, str(root / fmt), fmt) for fmt in FORMATS}
    return str(root), deq["w4a8"]


def test_tp2_quantized_matches_single_rank(root):
    root, w4a8 = root
    want = {f: _run(os.path.join(root, f)) for f in FORMATS}
    tmp = tempfile.mkdtemp()
    mp.start_processes(_worker, args=(2, f"file://{tmp}/rendezvous", root, f"{tmp}/out"),
                       nprocs=2, join=True, start_method="spawn")
    for rank in range(2):
        got = torch.load(f"{tmp}/out.{rank}")
        for fmt in ("int4", "mxfp4"):
            assert got[fmt][1] == want[fmt][1], f"{fmt}: rank {rank} of TP=2 diverges"
            assert torch.allclose(got[fmt][0], want[fmt][0], rtol=1e-4, atol=1e-4)
        w13, w2 = got["w4a8"]
        inter = w2.shape[-1]
        rows = slice(rank * inter, (rank + 1) * inter)
        for e in range(w13.shape[0]):
            base = f"model.layers.1.mlp.experts.{e}."
            for got_w, ref in ((w13[e, :inter], w4a8[base + "gate_proj.weight"][rows]),
                               (w13[e, inter:], w4a8[base + "up_proj.weight"][rows]),
                               (w2[e], w4a8[base + "down_proj.weight"][:, rows])):
                assert ((got_w - ref).norm() / ref.norm()).item() < 4e-2
