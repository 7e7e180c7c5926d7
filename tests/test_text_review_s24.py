"""Session 24: text of generated output with the real tokenizer formats the server loads.

Kimi's tiktoken format (`write_kimi_tokenizer`) and a Hugging Face byte-level BPE tokenizer
(`write_hf_tokenizer`, DeepSeek-V3's kind) serve a real HTTP app (build_app, its lifespan owning
an AsyncEngine) whose model is scripted: `TextRunner` emits exactly the token ids a test chooses
(single bytes of multi-byte characters, merged tokens, special tokens, ids of a model vocabulary
padded beyond the tokenizer's), so the checks are exact. What a vLLM user expects:
- streamed deltas concatenate to the non-streamed text; a character split over byte tokens comes
  out whole (no U+FFFD inside a stream), an unfinished one at max_tokens is dropped (vLLM);
- special tokens skipped or kept as `tokenizer.decode` shows them;
- stop strings matched across tokens and inside multi-byte characters, trimmed (or kept with
  include_stop_str_in_output), `stop_reason` the string, the ids of the tokens that produced the
  stop kept; held-back text released at max_tokens and at EOS;
- logprob tokens decoded one by one (U+FFFD and its UTF-8 bytes for a partial byte), an id past
  the tokenizer's vocabulary decoded to "" rather than failing the response;
- /tokenize and /detokenize round trips.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from unittest import mock

import pytest
from engine_fakes import DEMO_MODEL_CONFIG
from starlette.testclient import TestClient
from tokenizer_fixtures import write_hf_tokenizer, write_kimi_tokenizer

from atom_stream.config import EngineConfig
from atom_stream.engine.async_engine import AsyncEngine
from atom_stream.engine.sequence import StepOutput
from atom_stream.server.app import ServerConfig, build_app
from atom_stream.tokenizer import load_tokenizer

PAD = 64  # model vocabulary rows past the tokenizer's (DeepSeek-V3 pads its vocabulary too)
FFFD = "\ufffd"
TEXT = "a你😀é"


class TextRunner:
    """The ModelRunner contract for one scripted output: every request gets `script` (then
    EOS). With logprobs asked for, each position's top list is `alt` (-0.1) then the sampled
    token (-0.25); prompt logprobs give every prompt token -1.0 with `alt` second."""

    def __init__(self, vocab: int, eos: int):
        self.model_config = dataclasses.replace(DEMO_MODEL_CONFIG, vocab_size=vocab)
        self.num_kv_blocks = 64
        self.eos = eos
        self.script: list[int] = []
        self.alt = 0

    def execute(self, batch):
        out, lps, plps = [], [], {}
        for i, (seq, sample) in enumerate(zip(batch.seqs, batch.sample)):
            if seq.params.prompt_logprobs is not None:
                start = seq.num_computed_tokens
                chunk = seq.token_ids[start:start + batch.num_new_tokens[i]]
                plps[i] = [(-1.0, [(t, -1.0), (self.alt, -2.0)]) for t in chunk][start == 0:]
            if not sample:
                continue
            k = seq.num_output_tokens
            tok = self.script[k] if k < len(self.script) else self.eos
            out.append(tok)
            n = seq.params.logprobs
            lps.append(None if n is None else (-0.25, [(self.alt, -0.1), (tok, -0.25)][:n]))
        return StepOutput(token_ids=out, logprobs=lps if any(lps) else None,
                          prompt_logprobs=plps or None)

    def shutdown(self) -> None:
        pass


@dataclasses.dataclass
class Served:
    tok: object
    runner: TextRunner
    client: TestClient

    def byte_ids(self, data: bytes) -> list[int]:
        """One token per byte (both vocabularies hold the 256 one-byte tokens)."""
        one = {b: i for i, b in enumerate(self.tok.byte_table(True)) if len(b) == 1}
        return [one[bytes([x])] for x in data]

    def special(self) -> int:
        name = "<|im_user|>" if "Kimi" in type(self.tok).__name__ else "<|start|>"
        (sid,) = self.tok.encode(name)
        return sid

    def post(self, route: str, **body) -> dict:
        body = {"model": "demo", "max_tokens": 40, **body}
        r = self.client.post(route, json=body)
        assert r.status_code == 200, r.text
        if not body.get("stream"):
            return r.json()
        assert r.text.endswith("data: [DONE]\n\n"), r.text[-300:]
        return [json.loads(p[len("data: "):]) for p in r.text.split("\n\n")[:-2]]


@contextlib.contextmanager
def serve(tok):
    runner = TextRunner(tok.vocab_size + PAD, tok.eos_token_ids[0])
    engine = AsyncEngine(EngineConfig(model="demo"), runner=runner, tokenizer=tok)
    with mock.patch("atom_stream.engine.dp.make_async_engine", lambda cfg: engine):
        app = build_app(EngineConfig(model="demo", device="cpu"), ServerConfig())
        with TestClient(app) as client:
            yield Served(tok, runner, client)


@pytest.fixture(scope="module", params=["kimi", "hf"])
def srv(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    write = write_kimi_tokenizer if request.param == "kimi" else write_hf_tokenizer
    with serve(load_tokenizer(write(str(path)))) as s:
        yield s


def completion(s: Served, **kw) -> tuple[dict, list[str], dict]:
    """(the non-streamed choice, the streamed texts, the streamed finish choice)."""
    ns = s.post("/v1/completions", prompt="hi", **kw)["choices"][0]
    events = s.post("/v1/completions", prompt="hi", stream=True, **kw)
    texts = [c["text"] for e in events for c in e["choices"]]
    fin = [c for e in events for c in e["choices"] if c["finish_reason"]]
    assert len(fin) == 1
    return ns, texts, fin[0]


def chat(s: Served, **kw) -> tuple[dict, list[str], dict]:
    msgs = [{"role": "user", "content": "hi"}]
    ns = s.post("/v1/chat/completions", messages=msgs, **kw)["choices"][0]
    events = s.post("/v1/chat/completions", messages=msgs, stream=True, **kw)
    texts = [c["delta"].get("content") or "" for e in events for c in e["choices"]]
    fin = [c for e in events for c in e["choices"] if c["finish_reason"]]
    assert len(fin) == 1
    return ns, texts, fin[0]


# ------------------------------------------------------------------------------ UTF-8
def test_split_characters_stream_whole_and_match_the_non_streamed_text(srv):
    srv.runner.script = srv.byte_ids(TEXT.encode()) + srv.tok.encode(" world")
    for route in (completion, chat):
        ns, texts, fin = route(srv)
        text = ns["text"] if route is completion else ns["message"]["content"]
        assert text == "".join(texts) == TEXT + " world"
        assert not any(FFFD in t for t in texts), texts
        assert (ns["finish_reason"], fin["finish_reason"]) == ("stop", "stop")
    # max_tokens inside the emoji: the unfinished character is dropped (vLLM flushes nothing)
    ns, texts, fin = completion(srv, max_tokens=6)
    assert ns["text"] == "".join(texts) == "a你"
    assert (ns["finish_reason"], fin["finish_reason"]) == ("length", "length")


def test_special_tokens_skipped_or_kept_as_decode_shows_them(srv):
    # a special token between the bytes of a character: kept, it breaks the character
    b = srv.byte_ids("你".encode())
    srv.runner.script = [*srv.tok.encode("he"), srv.special(), *srv.tok.encode("llo"),
                         b[0], b[1], srv.special(), b[2], *srv.tok.encode("ok")]
    for skip in (True, False):
        for spaces in (True, False):
            ns, texts, _ = completion(srv, skip_special_tokens=skip,
                                      spaces_between_special_tokens=spaces)
            want = srv.tok.decode(srv.runner.script, skip_special_tokens=skip)
            assert ns["text"] == "".join(texts) == want
    assert completion(srv)[0]["text"] == "hello你ok"


# ------------------------------------------------------------------------------ stop strings
@pytest.mark.parametrize(("stop", "include", "text", "n_tokens"), [
    (["lo w"], False, "hel", 2),  # across the tokens "hello" " world"
    (["o wor"], True, "hello wor", 2),  # kept, cut inside the token " world"
    (["好"], False, "hello world 你", None),  # a character built from byte tokens
    (["zz", "😀 e"], False, "hello world 你好", None),  # the second stop listed
    (["😀"], True, "hello world 你好😀", None),
])
def test_stop_strings_over_real_tokens(srv, stop, include, text, n_tokens):
    head = srv.tok.encode("hello world ")
    srv.runner.script = head + srv.byte_ids("你好😀".encode()) + srv.tok.encode(" end")
    for route in (completion, chat):
        ns, texts, fin = route(srv, stop=stop, include_stop_str_in_output=include,
                               return_token_ids=True)
        got = ns["text"] if route is completion else ns["message"]["content"]
        assert got == "".join(texts) == text
        assert not any(FFFD in t for t in texts), texts
        for c in (ns, fin):
            assert (c["finish_reason"], c["stop_reason"]) == ("stop", stop[-1])
        # vLLM keeps the ids of every token up to the one that completed the stop string
        want = n_tokens if n_tokens is not None else len(head) + len(
            (text.removeprefix("hello world ") + stop[-1] * (not include)).encode())
        assert ns["token_ids"] == srv.runner.script[:want]


def test_held_back_text_is_released_at_max_tokens_and_at_eos(srv):
    srv.runner.script = srv.tok.encode("hello world") + srv.byte_ids("你".encode())
    stop = ["world!", "你X"]  # "world" and "你" are held back while they may begin a stop
    n = len(srv.runner.script)
    for max_tokens, reason, text in ((n - 3, "length", "hello world"),
                                     (n + 5, "stop", "hello world你")):
        for route in (completion, chat):
            ns, texts, fin = route(srv, stop=stop, max_tokens=max_tokens)
            got = ns["text"] if route is completion else ns["message"]["content"]
            assert got == "".join(texts) == text
            for c in (ns, fin):
                assert (c["finish_reason"], c["stop_reason"]) == (reason, None)


def test_stop_string_that_is_a_special_tokens_text(srv):
    sid = srv.special()
    name = srv.tok.decode([sid], skip_special_tokens=False)
    srv.runner.script = [*srv.tok.encode("ab"), sid, *srv.tok.encode("cd")]
    ns, texts, fin = completion(srv, stop=[name], skip_special_tokens=False)
    assert ns["text"] == "".join(texts) == "ab"
    assert fin["stop_reason"] == ns["stop_reason"] == name
    ns, texts, fin = completion(srv, stop=[name])  # skipped: its text never appears
    assert ns["text"] == "".join(texts) == "abcd" and ns["stop_reason"] is None


# ------------------------------------------------------------------------------ logprobs
def test_logprob_tokens_of_partial_bytes_are_fffd_with_its_bytes(srv):
    srv.runner.script = srv.byte_ids("你".encode()) + srv.tok.encode(" world")
    srv.runner.alt = srv.byte_ids(b"\xe5")[0]
    ns, _, _ = chat(srv, logprobs=True, top_logprobs=2)
    content = ns["logprobs"]["content"]
    assert [c["token"] for c in content[:4]] == [FFFD, FFFD, FFFD, " world"]
    assert content[0]["bytes"] == list(FFFD.encode()) == [239, 191, 189]
    assert content[3]["bytes"] == list(b" world")
    assert content[0]["top_logprobs"][1] == {"token": FFFD, "logprob": -0.1,
                                             "bytes": [239, 191, 189]}
    lp = completion(srv, logprobs=1, return_tokens_as_token_ids=True)[0]["logprobs"]
    assert lp["tokens"][:4] == [f"token_id:{t}" for t in srv.runner.script]


def test_logprobs_of_ids_past_the_tokenizers_vocabulary_decode_to_empty(srv):
    """A padded model vocabulary (ids the tokenizer has not) sampled or in the top-k: the
    response is served, those tokens read "" (a HF fast tokenizer's decode), not a 500."""
    past = srv.tok.vocab_size + 3
    srv.runner.script = [*srv.tok.encode("ab"), srv.tok.vocab_size + 1, *srv.tok.encode("c")]
    srv.runner.alt = past
    ns, texts, fin = completion(srv, logprobs=1)
    assert ns["text"] == "".join(texts) == "abc"
    assert "" in ns["logprobs"]["tokens"]
    assert all("" in top for top in ns["logprobs"]["top_logprobs"])
    ns, _, fin = chat(srv, logprobs=True, top_logprobs=2)
    assert {"token": "", "logprob": -0.1, "bytes": []} in fin["logprobs"]["content"][0][
        "top_logprobs"]
    body = srv.post("/v1/completions", prompt="hi", max_tokens=1, prompt_logprobs=1)
    (second,) = [p for p in body["choices"][0]["prompt_logprobs"] if p]
    assert second[str(past)]["decoded_token"] == ""


def test_echo_of_a_prompt_with_ids_past_the_tokenizers_vocabulary(srv):
    """Completions echo of a token-id prompt holding an id the model has but the tokenizer
    has not: served (that id echoes as ""), not a 500 that left its started choices live."""
    srv.runner.script = srv.tok.encode("c")
    ids = [*srv.tok.encode("ab"), srv.tok.vocab_size + 1]
    for stream in (False, True):
        body = srv.post("/v1/completions", prompt=ids, echo=True, max_tokens=1, stream=stream)
        text = body["choices"][0]["text"] if not stream else "".join(
            c["text"] for e in body for c in e["choices"])
        assert text.startswith("ab") and text == "ab" + srv.tok.decode(srv.runner.script[:1]), (
            text)
    assert srv.client.get("/load").json()["server_load"] == 0  # no choice left live


def test_detokenize_of_ids_past_the_tokenizers_vocabulary(srv):
    """/detokenize takes the model's ids: those the tokenizer has not decode to "" (as in the
    logprobs and the echo), not a 500."""
    ids = [*srv.tok.encode("ab"), srv.tok.vocab_size + 1, *srv.tok.encode("c")]
    assert srv.post("/detokenize", tokens=ids)["prompt"] == "abc"


# ------------------------------------------------------------------------------ tokenize
def test_tokenize_detokenize_round_trip(srv):
    sid = srv.special()
    name = srv.tok.decode([sid], skip_special_tokens=False)
    for text in ("hello world 你好😀", f"a{name}b", " \r\n  x"):
        t = srv.post("/tokenize", prompt=text, add_special_tokens=False)
        assert t["tokens"] == srv.tok.encode(text) and t["count"] == len(t["tokens"])
        assert srv.post("/detokenize", tokens=t["tokens"])["prompt"] == text
    part = srv.byte_ids("你".encode())[:2]  # a character cut short decodes to U+FFFD
    assert srv.post("/detokenize", tokens=part)["prompt"] == FFFD
