"""Expert parallelism (`enable_expert_parallel`; EP group = TP group) on the CPU with gloo.

- EP=2 (2 ranks: attention/shared experts TP-sharded, routed experts split 4+4 at the full
  intermediate size) and TP=4 with EP (2 experts a rank) give the TP=1 greedy tokens in float32
  on the "deepseek" flavour (grouped routing, dense first layers); an INT4 (compressed-tensors)
  checkpoint under EP=2 gives its TP=1 tokens too.
- Through the engine (LLM -> TPExecutor, tp=2 + enable_expert_parallel): same tokens as tp=1.
- The loader never reads another rank's expert tensors and stacks its own un-narrowed; dummy
  weights are EP/TP-consistent.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import quant_writers as qw
import torch
import torch.multiprocessing as mp
from hf_checkpoints import write_hf_checkpoint

PROMPT = torch.randint(0, 320, (13,), generator=torch.Generator().manual_seed(9)).tolist()
N_TOKENS = 10


def _greedy(path: str, tp_info=None, ep: bool = False):
    """Prefill + greedy decode through a ModelRunner: (prefill logits, tokens, experts layout)."""
    from atom_stream.config import EngineConfig
    from atom_stream.engine.model_runner import ModelRunner
    from atom_stream.layers.attention import AttentionMetadata

    r = ModelRunner(EngineConfig(model=path, device="cpu", dtype="float32", num_kv_blocks=16,
                                 block_size=4, max_model_len=64, enable_expert_parallel=ep),
                    tp_info=tp_info)
    m, bs, L = r.model, r.block_size, len(PROMPT)
    table = torch.randperm(16, generator=torch.Generator().manual_seed(1)).int()[None]

    def md(start: int, n: int, decode: bool):
        slots = torch.tensor([int(table[0, p // bs]) * bs + p % bs
                              for p in range(start, start + n)])
        return AttentionMetadata([0, n], [start + n], table, slots, int(decode), bs,
                                 decode_seq_lens=torch.tensor([start + n], dtype=torch.int32))

    with torch.inference_mode():
        logits = m.compute_logits(m(torch.tensor(PROMPT), torch.arange(L), r.kv_caches,
                                    md(0, L, False)))
        toks = [int(logits[-1].argmax())]
        for p in range(L, L + N_TOKENS - 1):
            h = m(torch.tensor(toks[-1:]), torch.tensor([p]), r.kv_caches, md(p, 1, True))
            toks.append(int(m.compute_logits(h).argmax()))
    ex = next(mod for mod in m.modules() if type(mod).__name__ == "Experts")
    return logits, toks, (ex.expert_start, ex.num_local_experts, ex.inter)


def _worker(rank: int, world: int, init: str, paths: list[str], out: str) -> None:
    import sys
    sys.path.insert(0, os.path.dirname(__file__))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    from atom_stream.layers.parallel import TPInfo
    try:
        # EP enabled the way the engine does it: config.enable_expert_parallel -> TPInfo.ep
        res = {p: _greedy(p, TPInfo(rank, world), ep=True) for p in paths}
        torch.save(res, f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def _spawn(world: int, paths: list[str]) -> list[dict]:
    tmp = tempfile.mkdtemp()
    mp.start_processes(_worker, args=(world, f"file://{tmp}/rendezvous", paths, f"{tmp}/out"),
                       nprocs=world, join=True, start_method="spawn")
    return [torch.load(f"{tmp}/out.{r}") for r in range(world)]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ep")
    dense = str(root / "deepseek")
    write_hf_checkpoint(dense, "deepseek", seed=4)  # 8 experts, top-3 of 4 groups, I = 24
    src = str(root / "src")
    qw.make_tiny_hf(src, "kimi", seed=6)  # I = 32: one INT4 group per row at full I
    int4 = str(root / "int4")
    qw.write_quantized(src, int4, "int4")
    return dense, int4


@pytest.fixture(scope="module")
def want(ckpts):
    return {p: _greedy(p) for p in ckpts}


@pytest.fixture(scope="module")
def ep2(ckpts):
    return _spawn(2, list(ckpts))


def _check(got: dict, want: dict, path: str, what: str) -> None:
    logits, toks, _ = got[path]
    assert toks == want[path][1], f"{what} diverges from TP=1"
    assert torch.allclose(logits, want[path][0], rtol=1e-4, atol=1e-4)


def test_ep2_matches_single_rank(ckpts, want, ep2):
    dense = ckpts[0]
    for rank, got in enumerate(ep2):
        assert got[dense][2] == (4 * rank, 4, 24)  # 4 local experts, intermediate not split
        _check(got, want, dense, f"EP=2 rank {rank}")


def test_ep2_int4_matches_single_rank(ckpts, want, ep2):
    int4 = ckpts[1]
    for rank, got in enumerate(ep2):
        assert got[int4][2] == (4 * rank, 4, 32)
        _check(got, want, int4, f"INT4 EP=2 rank {rank}")


def test_tp4_ep_matches_single_rank(ckpts, want):
    dense = ckpts[0]
    for rank, got in enumerate(_spawn(4, [dense])):
        assert got[dense][2] == (2 * rank, 2, 24)
        _check(got, want, dense, f"TP=4+EP rank {rank}")


def test_tp2_ep_executor_matches_single_rank(ckpts):
    """The engine path: LLM -> TPExecutor (worker process, shm ring), EP from the config."""
    from atom_stream.llm import LLM
    from atom_stream.sampling_params import SamplingParams

    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 320, (n,), generator=g).tolist() for n in (5, 17, 11)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    kw = {"device": "cpu", "dtype": "float32", "num_kv_blocks": 32, "block_size": 4,
          "max_model_len": 64, "skip_tokenizer_init": True}
    single = LLM(ckpts[0], **kw)
    want = [o.token_ids for o in single.generate(prompt_token_ids=prompts,
                                                 sampling_params=params)]
    single.engine.shutdown()
    llm = LLM(ckpts[0], tensor_parallel_size=2, enable_expert_parallel=True, **kw)
    try:
        ex = llm.engine.runner.runner.model.model.layers[2].mlp.experts
        assert (ex.num_local_experts, ex.expert_start) == (4, 0)
        got = [o.token_ids for o in llm.generate(prompt_token_ids=prompts,
                                                 sampling_params=params)]
    finally:
        llm.engine.shutdown()
    assert got == want


# ---------------------------------------------------------------- loader and dummy weights
def _build(cfg, info):
    from atom_stream.layers.parallel import tp_context
    from atom_stream.layers.quant import apply_quantization, quant_init
    from atom_stream.models import MODEL_REGISTRY

    with tp_context(info):
        with quant_init(cfg):
            model = MODEL_REGISTRY[cfg.architecture](cfg, 64, torch.float32)
        hooks = apply_quantization(model, cfg)
    return model, hooks


@pytest.mark.parametrize("which", ["dense", "int4"])
def test_loader_reads_only_local_experts(ckpts, which):
    """Rank 1 of EP=2 reads experts 4..7 only and stacks them whole (no intermediate slice)."""
    from safetensors.torch import load_file

    from atom_stream.config import ModelConfig
    from atom_stream.layers.parallel import TPInfo
    from atom_stream.loader import WeightLoader, iter_checkpoint

    path = ckpts[0] if which == "dense" else ckpts[1]
    cfg = ModelConfig.from_pretrained(path)
    info = TPInfo(1, 2, ep=True)
    model, hooks = _build(cfg, info)
    loader = WeightLoader(model, cfg.num_hidden_layers, info)
    loader.custom.extend(hooks)
    read: list[str] = []
    for name, get, shape, _file in iter_checkpoint(path):
        def spy(get=get, name=name):
            read.append(name)
            return get()
        loader.load_one(name, spy, shape)
    loader.check_complete(cfg.tie_word_embeddings)
    for h in hooks:
        getattr(h, "check_complete", lambda: None)()
    experts_read = {int(n.split(".experts.")[1].split(".")[0]) for n in read if ".experts." in n}
    assert experts_read == {4, 5, 6, 7}
    full = load_file(os.path.join(path, "model.safetensors"))
    ex = model.model.layers[2].mlp.experts
    base = "model.layers.2.mlp.experts"
    if which == "dense":
        assert ex.w13.shape == (4, 48, cfg.hidden_size)
        for local in range(4):
            e = 4 + local
            want13 = torch.cat([full[f"{base}.{e}.gate_proj.weight"],
                                full[f"{base}.{e}.up_proj.weight"]])
            assert torch.equal(ex.w13[local], want13)
            assert torch.equal(ex.w2[local], full[f"{base}.{e}.down_proj.weight"])
    else:
        assert ex.w13_weight_packed.shape[0] == 4 and ex.w2_weight_packed.shape[0] == 4
        for local in range(4):
            e = 4 + local
            assert torch.equal(ex.w13_weight_packed[local, :32],
                               full[f"{base}.{e}.gate_proj.weight_packed"])
            assert torch.equal(ex.w2_weight_scale[local],
                               full[f"{base}.{e}.down_proj.weight_scale"].float())


def test_dummy_weights_tp_ep_consistent():
    """init_dummy_weights: every EP/TP rank holds exactly its slice of the TP=1 dummy model."""
    from atom_stream.config import ModelConfig
    from atom_stream.layers.parallel import TPInfo
    from atom_stream.loader import init_dummy_weights
    from atom_stream.models.demo import DEMO_CONFIG

    cfg = ModelConfig.from_dict(DEMO_CONFIG)
    ref, _ = _build(cfg, TPInfo())
    init_dummy_weights(ref, 7, TPInfo())
    rex = ref.model.layers[1].mlp
    for world in (2, 4):
        for rank in range(world):
            info = TPInfo(rank, world, ep=True)
            m, _ = _build(cfg, info)
            init_dummy_weights(m, 7, info)
            mex = m.model.layers[1].mlp
            n = 16 // world
            sl = slice(rank * n, (rank + 1) * n)
            assert torch.equal(mex.experts.w13, rex.experts.w13[sl])
            assert torch.equal(mex.experts.w2, rex.experts.w2[sl])
            i = 32 // world  # shared expert: still TP-sharded along the intermediate
            rows = slice(rank * i, (rank + 1) * i)
            assert torch.equal(mex.shared_experts.gate_proj.weight,
                               rex.shared_experts.gate_proj.weight[rows])
            assert torch.equal(mex.shared_experts.down_proj.weight,
                               rex.shared_experts.down_proj.weight[:, rows])
