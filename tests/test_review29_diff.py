"""Review of session 29's diff (structured outputs): the grammar compiler under concurrent
compiles (AsyncEngine runs them on its executor threads), and an abort that lands while a
request's structured outputs are being compiled."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time

import pytest

from atom_stream import AsyncEngine, EngineConfig, SamplingParams
from atom_stream.engine.llm_engine import LLMEngine
from atom_stream.structured import dfa as dfa_module
from atom_stream.structured.errors import GrammarError
from atom_stream.structured.guide import GuideState
from atom_stream.structured.params import GrammarCompiler, StructuredOutputsParams


class _SlowByteTokenizer:
    """A byte-level vocabulary (256 bytes + 8 specials) whose byte table takes a while, as a
    163,840-token one does: the window in which concurrent first compiles overlap."""

    def __init__(self) -> None:
        self.calls = 0

    def byte_table(self, skip_special_tokens: bool) -> list[bytes]:
        self.calls += 1
        time.sleep(0.05)
        specials = [b""] * 8 if skip_special_tokens else [b"<s>"] * 8
        return [bytes([i]) for i in range(256)] + specials


def _compile_together(compiler: GrammarCompiler, specs: list) -> list:
    """compiler.compile(spec) for every spec, each on its own thread, started together; the
    Grammar or the exception of each."""
    results: list = [None] * len(specs)
    start = threading.Barrier(len(specs))

    def run(i: int) -> None:
        start.wait()
        try:
            results[i] = compiler.compile(specs[i])
        except Exception as e:  # noqa: BLE001 - returned to the test
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(specs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return results


def test_concurrent_first_compiles_build_one_token_index():
    """Before: each thread saw no index yet and built its own (the byte table read again, the
    mask cache split between the copies)."""
    tok = _SlowByteTokenizer()
    compiler = GrammarCompiler(tok, 264)
    specs = [StructuredOutputsParams(regex=f"x{{{i + 1}}}") for i in range(4)]
    grammars = _compile_together(compiler, specs)
    assert len({id(g.index) for g in grammars}) == 1
    assert tok.calls == 2  # the table once with specials skipped, once as their text


def test_concurrent_compiles_of_one_spec_share_one_grammar():
    """Before: every thread that missed the cache built its own DFA, so the masks of that
    spec (json_object: every such request) were computed once per copy."""
    compiler = GrammarCompiler(_SlowByteTokenizer(), 264)
    grammars = _compile_together(compiler, [StructuredOutputsParams(json_object=True)] * 4)
    assert all(g is grammars[0] for g in grammars)
    assert compiler.compile(StructuredOutputsParams(json_object=True)) is grammars[0]


def test_concurrent_compiles_of_a_bad_spec_all_fail_and_nothing_is_kept():
    compiler = GrammarCompiler(_SlowByteTokenizer(), 264)
    bad = StructuredOutputsParams(regex="a{2,1}")
    errors = _compile_together(compiler, [bad] * 3)
    assert all(isinstance(e, GrammarError) for e in errors), errors
    assert not compiler._building and not compiler._cache
    with pytest.raises(GrammarError):
        compiler.compile(bad)


def _nested(rng: random.Random, depth: int):
    """A JSON value nesting objects and arrays at random, `depth` levels deep."""
    if depth == 0:
        return 1
    inner = _nested(rng, depth - 1)
    return {"k": inner} if rng.random() < 0.5 else [inner]


def _allowed_throughout(grammar, text: bytes) -> bool:
    """Whether every byte of `text` is allowed by `grammar`'s masks, byte tokens being ids."""
    guide, ids = GuideState(grammar, [257]), list(text)
    for k, t in enumerate(ids):
        bits = guide.bits(ids[:k])
        if not bits[t >> 3] >> (t & 7) & 1:
            return False
    return True


def test_json_object_dfa_worn_by_many_nestings_is_replaced_for_new_requests(monkeypatch):
    """The json_object DFA is shared by every such request and its states hold the stack of
    open containers, so distinct nestings add states until MAX_DFA_STATES; past it, valid
    tokens of later requests were refused (before: for the server's whole life)."""
    monkeypatch.setattr(dfa_module, "MAX_DFA_STATES", 400)
    compiler = GrammarCompiler(_SlowByteTokenizer(), 264)
    spec = StructuredOutputsParams(json_object=True, disable_any_whitespace=True)
    old = compiler.compile(spec)
    rng = random.Random(0)
    while old.dfa.num_states < 400:  # earlier requests' outputs
        old.dfa.walk(old.dfa.start, json.dumps(_nested(rng, 9), separators=(",", ":")).encode())
    doc = json.dumps([[[[[[[[[[{"k": [[1]]}]]]]]]]]]], separators=(",", ":")).encode()
    assert not _allowed_throughout(old, doc)  # what a request in flight may still meet
    new = compiler.compile(spec)
    assert new is not old and _allowed_throughout(new, doc)
    assert compiler.compile(spec) is new


async def test_abort_while_structured_outputs_compile_ends_the_stream(monkeypatch):
    """AsyncEngine.abort's contract: the stream ends with an "abort" delta, also when the
    request has not started yet. Here the abort lands while check_params (the grammar
    compile) runs off the loop."""
    entered, release = threading.Event(), threading.Event()
    check = LLMEngine.check_params

    def held_check(self, params):
        entered.set()
        release.wait(5)
        return check(self, params)

    monkeypatch.setattr(LLMEngine, "check_params", held_check)
    async with AsyncEngine(EngineConfig(model="demo", device="cpu", dtype="float32",
                                        num_kv_blocks=16)) as eng:
        params = SamplingParams(max_tokens=30, ignore_eos=True,
                                structured_outputs={"regex": "[a-z]{0,40}"})

        async def run():
            return [o async for o in eng.generate("hello", params, request_id="r")]

        task = asyncio.ensure_future(run())
        while not entered.is_set():
            await asyncio.sleep(0.001)
        await eng.abort("r")
        release.set()
        outs = await task
        assert outs[-1].finish_reason == "abort"
        assert sum(len(o.token_ids) for o in outs) == 0
