"""Parity of the torch reference model with transformers' DeepseekV3ForCausalLM.

Three tiny random checkpoints (tests/hf_checkpoints.py) are written with save_pretrained and
loaded through our loader. Prefill logits must agree within 1e-4 relative (float32 vs HF float64),
and greedy decoding of 32 tokens must be token-identical, with decode running through the
absorbed path over a paged cache whose blocks are scattered and crossed (block size 4).
"""

from __future__ import annotations

import pytest
import torch

from atom_stream.config import ModelConfig
from atom_stream.layers.attention import AttentionMetadata
from atom_stream.loader import load_checkpoint
from atom_stream.models import MODEL_REGISTRY
from hf_checkpoints import FLAVOURS, write_hf_checkpoint

BLOCK = 4


@pytest.fixture(scope="module", params=sorted(FLAVOURS))
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = write_hf_checkpoint(str(path), request.param, seed=len(request.param))
    cfg = ModelConfig.from_pretrained(str(path))
    ours = MODEL_REGISTRY[cfg.architecture](cfg, 512, torch.float32)
    load_checkpoint(ours, str(path), cfg.num_hidden_layers, cfg.tie_word_embeddings)
    ours.process_weights_after_loading()
    return request.param, hf.double(), ours, cfg


class PagedSeq:
    """One sequence over a scattered block table (blocks taken in a shuffled order)."""

    def __init__(self, cfg: ModelConfig, num_blocks: int = 40, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.free = torch.randperm(num_blocks, generator=g).tolist()
        self.table: list[int] = []
        self.caches = [torch.full((num_blocks, BLOCK, cfg.kv_cache_dim), float("nan"))
                       for _ in range(cfg.num_hidden_layers)]
        self.length = 0

    def step_md(self, n: int, decode: bool) -> tuple[torch.Tensor, AttentionMetadata]:
        start, end = self.length, self.length + n
        while len(self.table) * BLOCK < end:
            self.table.append(self.free.pop())
        slots = torch.tensor([self.table[p // BLOCK] * BLOCK + p % BLOCK
                              for p in range(start, end)])
        bt = torch.tensor([self.table], dtype=torch.int32)
        md = AttentionMetadata([0, n], [end], bt, slots, 1 if decode else 0, BLOCK,
                               decode_seq_lens=torch.tensor([end]) if decode else None)
        self.length = end
        return torch.arange(start, end), md


def prefill_logits(ours, hf, cfg: ModelConfig, ids: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(our logits [T, V], transformers' [T, V]) for one prefill of `ids` from an empty cache."""
    seq = PagedSeq(cfg)
    pos, md = seq.step_md(len(ids), decode=False)
    logits = ours.compute_logits(ours(ids, pos, seq.caches, md))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    return logits, ref


def test_prefill_logits_match_hf(pair):
    name, hf, ours, cfg = pair
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, cfg.vocab_size, (37,), generator=g)
    logits, ref = prefill_logits(ours, hf, cfg, ids)
    rel = ((logits.double() - ref).norm() / ref.norm()).item()
    assert rel < 1e-4, f"{name}: prefill logits differ by {rel:.2e}"


def test_chunked_prefill_with_cached_prefix_matches_hf(pair):
    """Prefill in three chunks (the later ones read the prefix back from the paged cache)."""
    name, hf, ours, cfg = pair
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, cfg.vocab_size, (30,), generator=g)
    seq = PagedSeq(cfg, seed=3)
    outs = []
    for a, b in ((0, 9), (9, 22), (22, 30)):
        pos, md = seq.step_md(b - a, decode=False)
        outs.append(ours.compute_logits(ours(ids[a:b], pos, seq.caches, md)))
    logits = torch.cat(outs)
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    rel = ((logits.double() - ref).norm() / ref.norm()).item()
    assert rel < 1e-4, f"{name}: chunked prefill differs by {rel:.2e}"


def test_greedy_32_tokens_identical_to_hf(pair):
    name, hf, ours, cfg = pair
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, cfg.vocab_size, (13,), generator=g)
    with torch.no_grad():
        ref = hf.generate(prompt[None], attention_mask=torch.ones(1, len(prompt)),
                          max_new_tokens=32, do_sample=False, min_new_tokens=32,
                          eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    seq = PagedSeq(cfg, seed=9)
    pos, md = seq.step_md(len(prompt), decode=False)
    h = ours(prompt, pos, seq.caches, md)
    tokens = [int(ours.compute_logits(h[-1:]).argmax(-1))]
    for _ in range(31):
        pos, md = seq.step_md(1, decode=True)
        h = ours(torch.tensor(tokens[-1:]), pos, seq.caches, md)
        tokens.append(int(ours.compute_logits(h).argmax(-1)))
    assert len(seq.table) > 10  # crossed many block boundaries
    assert tokens == ref, f"{name}: greedy tokens diverge"


def test_absorbed_decode_equals_naive_path(pair):
    """The same query through the absorbed (decode) and naive (prefill) paths."""
    name, _, ours, cfg = pair
    g = torch.Generator().manual_seed(21)
    ids = torch.randint(0, cfg.vocab_size, (20,), generator=g)
    a = PagedSeq(cfg, seed=1)
    pos, md = a.step_md(19, decode=False)
    ours(ids[:19], pos, a.caches, md)
    pos, md = a.step_md(1, decode=True)
    dec = ours.compute_logits(ours(ids[19:], pos, a.caches, md))
    b = PagedSeq(cfg, seed=2)
    pos, md = b.step_md(20, decode=False)
    naive = ours.compute_logits(ours(ids, pos, b.caches, md))[-1:]
    assert torch.allclose(dec, naive, rtol=1e-4, atol=1e-5)


def test_llm_engine_greedy_matches_hf(tmp_path):
    """End to end through the engine (scheduler, paged cache of block 4, sampler)."""
    from atom_stream import LLM, SamplingParams

    hf = write_hf_checkpoint(str(tmp_path), "kimi", seed=12).double()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 320, (n,), generator=g) for n in (5, 18)]
    llm = LLM(model=str(tmp_path), device="cpu", dtype="float32", block_size=4,
              skip_tokenizer_init=True,
              num_kv_blocks=64, max_model_len=128)
    outs = llm.generate(prompt_token_ids=[p.tolist() for p in prompts],
                        sampling_params=SamplingParams(temperature=0, max_tokens=32,
                                                       ignore_eos=True))
    for p, out in zip(prompts, outs):
        with torch.no_grad():
            ref = hf.generate(p[None], attention_mask=torch.ones(1, len(p)), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
        assert list(out.token_ids) == ref
