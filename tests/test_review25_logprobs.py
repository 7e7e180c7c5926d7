"""Review 25: the in-process logprobs in vLLM's shape. `LLM.generate` / `AsyncEngine.generate`
outputs carry `logprobs` as one `dict[int, Logprob]` per token (the sampled token first, then the
top-k in rank order; ranks 1-based; `decoded_token` the token decoded alone) and
`prompt_logprobs` as `[None, dict, ...]`; the servers keep reading the engine form
(`engine_logprobs` / `engine_prompt_logprobs`), so their bytes are unchanged."""

from __future__ import annotations

import atom_stream
from atom_stream import AsyncEngine, EngineConfig, Logprob, RequestOutput, SamplingParams
from atom_stream.sampling_params import RequestOutputKind
from atom_stream.server.openai_stream import StreamContext, chat_logprobs, prompt_logprobs_json

KW = {"device": "cpu", "dtype": "float32", "num_kv_blocks": 64}
PROMPT = [7, 3, 99, 41, 5, 18]


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, **kw)


def check_position(d: dict, tid: int, engine_entry: tuple, decode) -> None:
    """One position's dict against its engine entry `(sampled_lp, [(id, lp), ...top-k])`."""
    sampled, tops = engine_entry
    assert all(isinstance(v, Logprob) for v in d.values())
    assert next(iter(d)) == tid  # vLLM: the sampled token first
    top_ids = [t for t, _ in tops]
    assert list(d) == [tid] + [t for t in top_ids if t != tid]  # then the top-k, rank order
    assert len(d) == len(tops) + (tid not in top_ids)
    for r, (t, v) in enumerate(tops, 1):
        assert (d[t].logprob, d[t].rank) == (v, r)
    if tid not in top_ids:
        assert d[tid].logprob == sampled and d[tid].rank > len(tops)
    assert all(v.decoded_token == decode(t) for t, v in d.items())


def test_llm_generate_logprobs_are_vllm_dicts(llm):
    assert atom_stream.Logprob is Logprob and "Logprob" in atom_stream.__all__
    tok = llm.tokenizer

    def decode(t):
        return tok.decode([t], skip_special_tokens=False)

    for params in (greedy(5, logprobs=3),
                   SamplingParams(max_tokens=5, seed=4, ignore_eos=True, logprobs=2),
                   greedy(3, logprobs=0)):
        (out,) = llm.generate([PROMPT], params)
        c = out.outputs[0]
        assert isinstance(c.logprobs, list) and len(c.logprobs) == len(c.token_ids)
        for tid, d, e in zip(c.token_ids, c.logprobs, c.engine_logprobs, strict=True):
            check_position(d, tid, e, decode)
        # cumulative_logprob: the sampled logprobs summed (unchanged)
        assert c.cumulative_logprob == sum(e[0] for e in c.engine_logprobs)
        if params.temperature == 0.0:  # greedy: the sampled token is the best one
            assert all(d[t].rank == 1 for t, d in zip(c.token_ids, c.logprobs))
    (plain,) = llm.generate([PROMPT], greedy(2))
    assert plain.logprobs is None and plain.prompt_logprobs is None


def test_prompt_logprobs_lead_with_none_and_match_the_http_form(llm):
    (out,) = llm.generate([PROMPT], greedy(1, prompt_logprobs=2))
    plp = out.prompt_logprobs
    assert plp[0] is None and len(plp) == len(PROMPT)
    for p in range(1, len(PROMPT)):
        d = plp[p]
        assert next(iter(d)) == PROMPT[p]
        assert d[PROMPT[p]].rank == out.prompt_logprob_ranks[p - 1]
        assert [v.rank for t, v in d.items() if t != PROMPT[p]] == sorted(
            v.rank for t, v in d.items() if t != PROMPT[p])
    # what /v1/completions sends (vLLM's serialized Logprob) is the same dicts
    http = prompt_logprobs_json(llm.tokenizer, out.prompt_token_ids,
                                out.engine_prompt_logprobs, out.prompt_logprob_ranks)
    assert http[0] is None
    for h, d in zip(http[1:], plp[1:], strict=True):
        assert list(h) == list(d)
        assert [(x.logprob, x.rank, x.decoded_token) for x in h.values()] == [
            (x.logprob, x.rank, x.decoded_token) for x in d.values()]


def test_chat_top_logprobs_are_the_first_k_entries_of_the_dict(llm):
    # vLLM's chat serving takes the first top_logprobs items of this dict
    (out,) = llm.generate([PROMPT], SamplingParams(max_tokens=6, seed=9, ignore_eos=True,
                                                   logprobs=2))
    ctx = StreamContext("r", 0, "m", llm.tokenizer, 2)
    chat = chat_logprobs(ctx, out.token_ids, out.engine_logprobs)
    for entry, d in zip(chat.content, out.logprobs, strict=True):
        want = [(v.decoded_token, max(v.logprob, -9999.0)) for v in d.values()][:2]
        assert [(t.token, t.logprob) for t in entry.top_logprobs] == want


def test_order_ranks_and_merge_on_engine_entries():
    # sampled 9 outside the top-2: first, rank k + 1 without runner ranks, its own rank with
    o = RequestOutput("r", [9, 4], engine_logprobs=[(-3.0, [(4, -0.5), (6, -1.0)]),
                                                    (-0.5, [(4, -0.5), (6, -1.0)])])
    assert [list(d) for d in o.logprobs] == [[9, 4, 6], [4, 6]]
    assert o.logprobs[0][9] == Logprob(-3.0, 3, None)  # no tokenizer: decoded_token None
    assert o.logprobs[1][4] == Logprob(-0.5, 1, None)
    ranked = RequestOutput("r", [9], engine_logprobs=[(-3.0, [(4, -0.5)])], logprob_ranks=[17])
    assert ranked.logprobs[0][9].rank == 17 and ranked.logprobs[0][4].rank == 1
    # merge after the dicts were read: the new positions are built, the old ones kept
    first = o.logprobs[0]
    o.merge(RequestOutput("r", [6], engine_logprobs=[(-1.0, [(6, -1.0), (4, -1.5)])]))
    assert len(o.logprobs) == 3 and o.logprobs[0] is first
    assert list(o.logprobs[2]) == [6, 4] and o.logprobs[2][4].rank == 2
    assert o.logprobs is o.logprobs  # cached, not rebuilt per access


def test_outputs_without_logprobs_carry_no_logprob_state(llm):
    eng = llm.engine
    eng.add_request("plain", list(PROMPT), greedy(3))
    outs = []
    while eng.has_unfinished_requests():
        outs.extend(eng.step())
    assert len(outs) == 3
    assert all(o.engine_logprobs is None and o.logprobs is None
               and set(o.__dict__) <= {"_num_cached"}
               for o in outs)


async def test_async_engine_streams_vllm_logprobs_in_every_output_kind():
    async with AsyncEngine(EngineConfig(model="demo", **KW)) as eng:
        params = greedy(6, logprobs=2)
        deltas = [o async for o in eng.generate(PROMPT, params)]
        streamed = [list(d) for o in deltas for d in o.logprobs]
        merged = RequestOutput(deltas[0].request_id)
        for d in deltas:
            merged.merge(d)  # the tokenizer (decoded_token) comes along
        assert streamed == [list(d) for d in merged.logprobs]
        tok = eng.tokenizer
        for tid, d in zip(merged.token_ids, merged.logprobs, strict=True):
            assert next(iter(d)) == tid and d[tid].rank == 1
            assert d[tid].decoded_token == tok.decode([tid], skip_special_tokens=False)
        cum = greedy(6, logprobs=2, output_kind=RequestOutputKind.CUMULATIVE)
        snaps, early = [], {}
        async for s in eng.generate(PROMPT, cum):
            if len(snaps) % 2 == 0:  # read as it comes (the others only at the end)
                early[len(snaps)] = s.logprobs
            snaps.append(s)
        assert [len(s.logprobs) for s in snaps] == [len(s.token_ids) for s in snaps]
        assert len(snaps[-1].logprobs) == 6
        for i, lps in early.items():  # handed-out outputs never change afterwards
            assert snaps[i].logprobs is lps and len(lps) == len(snaps[i].token_ids)
        assert snaps[-1].logprobs == merged.logprobs
        plp = greedy(1, prompt_logprobs=1, output_kind=RequestOutputKind.FINAL_ONLY)
        (final,) = [o async for o in eng.generate(PROMPT, plp)]
        assert final.prompt_logprobs[0] is None and len(final.prompt_logprobs) == len(PROMPT)
        assert all(x.decoded_token is not None for d in final.prompt_logprobs[1:]
                   for x in d.values())


def test_n_choices_each_carry_vllm_logprobs(llm):
    (out,) = llm.generate([PROMPT], SamplingParams(n=2, seed=3, max_tokens=4, logprobs=1,
                                                   ignore_eos=True))
    for c in out.outputs:
        assert len(c.logprobs) == 4 and all(next(iter(d)) == t
                                            for t, d in zip(c.token_ids, c.logprobs))
    assert out.logprobs == out.outputs[0].logprobs


def test_no_tokenizer_gives_no_decoded_token():
    with atom_stream.LLM("demo", skip_tokenizer_init=True, **KW) as llm:
        (out,) = llm.generate(prompt_token_ids=[PROMPT], sampling_params=greedy(2, logprobs=1))
    assert all(v.decoded_token is None for d in out.logprobs for v in d.values())


def test_sampled_rank_outside_the_top_k_is_its_true_rank(llm):
    """The sampled token's rank is its rank in the raw distribution (the sampler counts the
    entries >= it, as vLLM), also when it is outside the top-k: the same seeded run with k = 0
    and k = 20 (logprobs do not change what is sampled) agree: a token in the top-20 has its
    top-20 place as rank at k = 0 too, and one outside it a rank > 20."""
    params = {"max_tokens": 24, "seed": 11, "ignore_eos": True, "temperature": 2.0}
    (k0,) = llm.generate([PROMPT], SamplingParams(logprobs=0, **params))
    (k20,) = llm.generate([PROMPT], SamplingParams(logprobs=20, **params))
    assert k0.token_ids == k20.token_ids
    ranks = []
    for tid, d0, (_, tops) in zip(k0.token_ids, k0.logprobs, k20.engine_logprobs, strict=True):
        top_ids = [t for t, _ in tops]
        rank = d0[tid].rank
        ranks.append(rank)
        assert rank == top_ids.index(tid) + 1 if tid in top_ids else rank > 20
    assert len(set(ranks)) > 2  # a hot sample: not all rank 1 (nor all k + 1)
