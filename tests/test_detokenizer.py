"""IncrementalDetokenizer (byte path: demo, Kimi, HF byte-level; text path: forced) and
StopStringChecker, against whole-text oracles with random texts, chunkings and stop strings, and
against vLLM's rules (vllm/v1/engine/detokenizer.py): nothing flushed at the end, the prompt
priming the decoder, the stop-string window around min_tokens; also through LLMEngine."""

from __future__ import annotations

import codecs
import random

import pytest
from engine_fakes import EOS, ScriptedRunner
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from tokenizer_fixtures import write_hf_tokenizer, write_kimi_tokenizer

from atom_stream import EngineConfig, SamplingParams
from atom_stream.detokenizer import IncrementalDetokenizer, StopStringChecker
from atom_stream.engine.llm_engine import LLMEngine
from atom_stream.tokenizer import DemoTokenizer, load_tokenizer

FFFD = "\ufffd"
FAST = settings(max_examples=120, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
# emoji (4 bytes), CJK (3), combining marks, ZWJ sequences, control chars, CRLF
TRICKY = "😀👩‍👩‍👧 你好世界 e\u0301 \x00\x07\r\n\r\n ½ 𝔘𝔫𝔦 " + "🇫🇷"


class TextOnly:
    """Hides a tokenizer's byte table, forcing the prefix/read-offset text path."""

    def __init__(self, tok):
        self._tok = tok
        self.vocab_size = tok.vocab_size

    def decode(self, ids, skip_special_tokens=True):
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    kimi = load_tokenizer(write_kimi_tokenizer(str(tmp_path_factory.mktemp("kimi"))))
    hf = load_tokenizer(write_hf_tokenizer(str(tmp_path_factory.mktemp("hf"))))
    demo = DemoTokenizer()
    return {"demo": demo, "kimi": kimi, "hf": hf, "demo-text": TextOnly(demo),
            "kimi-text": TextOnly(kimi), "hf-text": TextOnly(hf)}


def stream(tok, ids, chunks=None, skip=True, prompt=None):
    """Push `ids` (one by one, or in the given chunk sizes); returns (deltas, flushed)."""
    det = IncrementalDetokenizer(tok, prompt_token_ids=prompt, skip_special_tokens=skip)
    deltas, i = [], 0
    for n in chunks or [1] * len(ids):
        deltas.append(det.push(ids[i:i + n]))
        i += n
    return deltas, det.flush()


def encode(tokenizers, name, text):
    return tokenizers[name.removesuffix("-text")].encode(text)


def test_paths_are_chosen(tokenizers):
    from atom_stream.detokenizer import _ByteDetokenizer, _TextDetokenizer
    for name, tok in tokenizers.items():
        det = IncrementalDetokenizer(tok)
        assert isinstance(det, IncrementalDetokenizer)
        assert isinstance(det, _TextDetokenizer if name.endswith("-text") else _ByteDetokenizer)


@pytest.mark.parametrize("name", ["demo", "kimi", "hf", "demo-text", "kimi-text", "hf-text"])
def test_tricky_text_token_by_token(tokenizers, name):
    ids = encode(tokenizers, name, TRICKY)
    assert len(ids) > len(TRICKY) // 2  # many characters really are split over tokens
    deltas, flushed = stream(tokenizers[name], ids, prompt=[104, 105])
    assert all(FFFD not in d for d in deltas)
    assert "".join(deltas) + flushed == TRICKY and flushed == ""


SPECIAL_MARKUP = ("<|", "<think>", "</think>", "[BOS]", "[EOS]", "[EOT]", "[UNK]", "[PAD]")


@FAST
@given(st.text(), st.randoms(use_true_random=False), st.sampled_from(
    ["demo", "kimi", "hf", "demo-text", "kimi-text"]))
def test_random_text_random_chunks(tokenizers, text, rnd, name):
    # a special token's markup ("<|im_assistant|>", K2.5's "<think>") encodes to that special,
    # which decoding skips: not plain text (hypothesis found both)
    assume(not any(m in text for m in SPECIAL_MARKUP))
    ids = encode(tokenizers, name, text)
    chunks, left = [], len(ids)
    while left:
        chunks.append(min(left, rnd.randint(1, 4)))
        left -= chunks[-1]
    deltas, flushed = stream(tokenizers[name], ids, chunks)
    so_far = ""
    for d in deltas:  # every emission is final: no U+FFFD for a held partial character
        so_far += d
        assert text.startswith(so_far)
    assert so_far + flushed == text


def test_text_path_bounded_window_never_streams_a_partial_character(tokenizers):
    # 32 tokens held (every chunk ends inside a 4-byte character): the bounded window emits
    # only up to the last complete character (it used to stream the unfinished one as U+FFFD;
    # found by the hypothesis test above in a CI run)
    text = "00\U00010000\x80\x80\U00010000\U000100000\x80\U00010000\U00010000\U00010000"
    ids = encode(tokenizers, "demo-text", text)
    deltas, flushed = stream(tokenizers["demo-text"], ids, [4, 1, 4, 2, 4, 1, 4, 4, 4, 2, 2, 1])
    so_far = ""
    for d in deltas:
        so_far += d
        assert text.startswith(so_far), so_far
    assert so_far + flushed == text


@FAST
@given(st.binary(max_size=30), st.sampled_from(["demo", "demo-text"]))
def test_invalid_bytes_match_full_decode(tokenizers, data, name):
    # up to the last token after which the decode does not end in U+FFFD (vLLM drops the rest)
    ids = list(data)
    deltas, flushed = stream(tokenizers[name], ids)
    assert "".join(deltas) + flushed == vllm_text(b"", data)
    full = data.decode("utf-8", "replace")
    assert full.startswith("".join(deltas))
    if not full.endswith(FFFD):
        assert "".join(deltas) == full


@pytest.mark.parametrize("name", ["demo", "demo-text"])
def test_invalid_bytes_come_out_with_the_text_after_them(tokenizers, name):
    # vLLM (DecodeStream.step, detokenize_incrementally) emits nothing while the decoded text
    # ends in U+FFFD, even for a byte that can never start a character
    det = IncrementalDetokenizer(tokenizers[name])
    assert det.push([0xFF]) == ""
    assert det.push([0xE4, 0xBD]) == ""  # a valid prefix of 你: held
    assert det.push([0x41]) == FFFD + FFFD + "A"  # interrupted: invalid now
    assert det.push([0x42, 0xE4]) == "B"  # token by token, as vLLM: "B" before the E4
    assert det.push([0xBD, 0xA0]) == "你"
    assert det.push([0xE4]) == ""
    assert det.flush() == ""  # unfinished at the end: dropped
    assert det.push([0xE4, 0xBD, 0xA0]) == "你"  # flush reset the state


@pytest.mark.parametrize("name", ["demo", "kimi", "hf", "kimi-text"])
def test_special_tokens_skipped_or_kept(tokenizers, name):
    tok = tokenizers[name.removesuffix("-text")]
    eos = tok.eos_token_ids[0]
    ids = tok.encode("ab") + [eos] + tok.encode("你")
    skipped, f1 = stream(tokenizers[name], ids, skip=True)
    kept, f2 = stream(tokenizers[name], ids, skip=False)
    assert "".join(skipped) + f1 == "ab你"
    assert "".join(kept) + f2 == "ab" + tok.decode([eos], skip_special_tokens=False) + "你"


def test_special_between_partial_bytes_matches_decode(tokenizers):
    tok = tokenizers["demo"]
    ids = [0xE4, 0xBD, 262, 0xA0, 97]
    for skip in (True, False):
        deltas, flushed = stream(tok, ids, skip=skip)
        assert "".join(deltas) + flushed == tok.decode(ids, skip_special_tokens=skip)


def test_out_of_vocab_ids_are_ignored(tokenizers):
    for name in ("demo", "demo-text"):
        deltas, flushed = stream(tokenizers[name], [104, 5000, 105, -1])
        assert "".join(deltas) + flushed == "hi"


# ------------------------------------------------------------------------------ stop strings
def oracle(text: str, stops: list[str], include: bool) -> tuple[str, str | None]:
    """Earliest-ending match in the whole text (ties: the first listed, as vLLM)."""
    best = None
    for s in dict.fromkeys(stops):
        i = text.find(s) if s else -1
        if i >= 0 and (best is None or i + len(s) < best[0] + len(best[1])):
            best = (i, s)
    if best is None:
        return text, None
    i, s = best
    return text[:i + len(s)] if include else text[:i], s


def feed_all(pieces: list[str], stops: list[str], include: bool):
    chk = StopStringChecker(stops, include)
    out, matched, emitted_so_far = [], None, []
    for p in pieces:
        emit, m = chk.feed(p)
        out.append(emit)
        emitted_so_far.append("".join(out))
        if m is not None:
            matched = m
            break
    if matched is None:
        out.append(chk.flush())
    return "".join(out), matched, emitted_so_far


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet="abc d", max_size=30),
       st.lists(st.text(alphabet="abcd", min_size=1, max_size=4), min_size=1, max_size=3),
       st.booleans(), st.randoms(use_true_random=False))
def test_stop_checker_matches_oracle_for_any_chunking(text, stops, include, rnd):
    cuts = sorted(rnd.sample(range(1, len(text)), min(len(text) - 1, rnd.randint(0, 8)))) \
        if len(text) > 1 else []
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    final, matched, so_far = feed_all(pieces, stops, include)
    want, want_stop = oracle(text, stops, include)
    assert (final, matched) == (want, want_stop)
    # never streams anything that is not part of the final output (no stop-string fragment)
    assert all(want.startswith(s) for s in so_far)


def test_stop_string_spanning_three_tokens(tokenizers):
    tok = tokenizers["kimi"]
    stop = "END_OF_ANSWER"
    text = "The answer is 42. END_OF_ANSWER and more text"
    ids = tok.encode(text)
    assert len(tok.encode(stop)) >= 3
    det = IncrementalDetokenizer(tok)
    chk = StopStringChecker([stop, "zzz"])
    emitted, matched = [], None
    for t in ids:
        emit, matched = chk.feed(det.push([t]))
        emitted.append(emit)
        assert "The answer is 42. ".startswith("".join(emitted))  # no stop fragment, ever
        if matched:
            break
    assert matched == stop
    assert "".join(emitted) == "The answer is 42. "
    assert chk.feed("more") == ("", None)


def test_stop_hold_back_is_minimal_and_include():
    chk = StopStringChecker(["world!"])
    assert chk.feed("hello wor") == ("hello ", None)
    assert chk.feed("k") == ("work", None)
    assert chk.feed(" w") == (" ", None)
    assert chk.flush() == "w" and chk.flush() == ""
    chk = StopStringChecker(["</s>", "STOP"], include_stop_str_in_output=True)
    assert chk.feed("a</") == ("a", None)
    assert chk.feed("s>tail") == ("</s>", "</s>")
    chk = StopStringChecker(["abcd", "bc"])
    assert chk.feed("xab") == ("x", None)
    assert chk.feed("cd") == ("a", "bc")  # "bc" completes first
    assert StopStringChecker([]).feed("anything") == ("anything", None)
    assert StopStringChecker([""]).feed("x") == ("x", None)


def test_engine_like_flow_random_stream(tokenizers):
    """Detokenize + stop-check token by token, as the engine does, against the oracle."""
    rnd = random.Random()
    tok = tokenizers["kimi"]
    for _ in range(50):
        words = ["hello", " world", "你好", "😀", " ", "\n", "END", "E", "N", "D", "é"]
        text = "".join(rnd.choice(words) for _ in range(rnd.randint(1, 30)))
        stops = rnd.sample(["END", "好😀", "\n\n", "d E"], rnd.randint(1, 2))
        det, chk = IncrementalDetokenizer(tok), StopStringChecker(stops)
        out, matched = [], None
        ids = tok.encode(text)
        for k, t in enumerate(ids):
            piece = det.push([t])
            if k == len(ids) - 1:
                piece += det.flush()
            emit, matched = chk.feed(piece)
            out.append(emit)
            assert FFFD not in emit
            if matched:
                break
        if not matched:
            out.append(chk.flush())
        assert ("".join(out), matched) == oracle(text, stops, False), (text, stops)


def test_stops_ending_together_the_first_listed_wins():
    # vLLM checks stops in request order: "b" (listed first) beats "ab" ending at the same char
    assert feed_all(["c", "a", "b"], ["b", "ab"], False)[:2] == ("ca", "b")
    assert feed_all(["c", "a", "b"], ["b", "ab"], True)[:2] == ("cab", "b")
    assert feed_all(["cab"], ["ab", "b"], False)[:2] == ("c", "ab")


# ------------------------------------------------- vLLM at the end of the stream and at its start
def byte_ids(tokenizers, name, data: bytes) -> list[int]:
    """One token per byte (every byte-level vocabulary here has the 256 one-byte tokens)."""
    table = tokenizers[name.removesuffix("-text")].byte_table(True)
    one = {b: i for i, b in enumerate(table) if len(b) == 1}
    return [one[bytes([x])] for x in data]


def vllm_text(prompt: bytes, out: bytes) -> str:
    """The text vLLM has emitted for byte tokens `out` after byte tokens `prompt` when the
    stream ends. vLLM (DecodeStream.step, detokenize_incrementally) emits nothing while the
    decoded text ends in U+FFFD and flushes nothing at the end, so the text stops at the last
    token after which the decode did not end in U+FFFD. The prompt primes the decoder: its
    unfinished last character is completed by the output (or, broken, stays the prompt's)."""
    whole = prompt.decode("utf-8", "replace")
    clean = codecs.getincrementaldecoder("utf-8")("replace").decode(prompt)  # without the tail
    last = None
    for k in range(len(out) + 1):
        s = (prompt + out[:k]).decode("utf-8", "replace")
        if not s.endswith(FFFD):
            last = s
    if last is None or len(last) <= len(clean):
        return ""
    return last[len(whole):] if last.startswith(whole) else last[len(clean):]


@pytest.mark.parametrize("name", ["demo", "kimi", "hf", "demo-text", "kimi-text", "hf-text"])
@pytest.mark.parametrize("data,want", [
    (b"ab\xe4\xbd", "ab"),  # stops after 2 of the 3 bytes of a character
    (b"ab\xe4", "ab"),
    (b"ab\xf0\x9f\x98", "ab"),
    (b"ab\xff", "ab"),  # a byte that is invalid anywhere: U+FFFD, still at the end
    (b"a\xffb\xe4\xbd", "a\ufffdb"),  # invalid in the middle: comes out with the next text
    (b"ab\xe4\xbd\xa0", "ab你"),
])
def test_unfinished_text_at_the_end_is_dropped_as_vllm(tokenizers, name, data, want):
    ids = byte_ids(tokenizers, name, data)
    deltas, flushed = stream(tokenizers[name], ids)
    assert "".join(deltas) + flushed == want == vllm_text(b"", data)
    assert flushed == ""
    assert all(not d.endswith(FFFD) for d in deltas)  # never a chunk ending in U+FFFD


@pytest.mark.parametrize("name", ["demo", "kimi", "hf", "demo-text", "kimi-text", "hf-text"])
@pytest.mark.parametrize("prompt,out,want", [
    (b"ab\xe4\xbd", b"\xa0c", ["\u4f60", "c"]),  # the completion starts with the last byte
    (b"ab\xe4", b"\xbd\xa0c", ["", "\u4f60", "c"]),
    (b"ab\xf0\x9f", b"\x98\x80", ["", "\U0001f600"]),
    (b"ab\xe4\xbd", b"Ac", ["A", "c"]),  # broken: its U+FFFD belongs to the prompt's text
    (b"ab\xff", b"c", ["c"]),
    (b"ab", b"\xe4\xbd\xa0", ["", "", "\u4f60"]),
])
def test_character_split_between_prompt_and_output_is_joined(tokenizers, name, prompt, out,
                                                             want):
    tok = tokenizers[name]
    deltas, flushed = stream(tok, byte_ids(tokenizers, name, out),
                             prompt=byte_ids(tokenizers, name, b"xyz" + prompt))
    assert (deltas, flushed) == (want, "")
    assert "".join(want) == vllm_text(b"xyz" + prompt, out)


@FAST
@given(st.binary(max_size=12), st.binary(max_size=24), st.sampled_from(["demo", "demo-text"]))
# found by hypothesis: the prompt's held tail breaks into TWO U+FFFDs (a surrogate lead), both
# the prompt's text in vLLM
@example(prompt=b"\xed\xa0", out=b"\x00", name="demo")
@example(prompt=b"a\xed\xa0", out=b"\x80b", name="demo")
def test_random_bytes_after_random_prompt_match_vllm(tokenizers, prompt, out, name):
    tok = tokenizers[name]
    deltas, flushed = stream(tok, list(out), prompt=list(prompt))
    assert "".join(deltas) + flushed == vllm_text(prompt, out)
    assert flushed == "" and all(not d.endswith(FFFD) for d in deltas)


# ------------------------------------------------ stop strings around the min_tokens boundary
def vllm_stop(pieces: list[str], first_checked: int, stops: list[str], include: bool):
    """vLLM's BaseIncrementalDetokenizer.update + check_stop_strings, one piece per step:
    pieces before `first_checked` (output tokens up to min_tokens) are not checked; a checked
    step matches a stop that ends in its new text (it may begin up to len(stop) - 1 chars
    before), the earliest-ending one, ties by list order."""
    text = ""
    for j, p in enumerate(pieces):
        text += p
        if j < first_checked or not p:
            continue
        best = None
        for s in stops:
            i = text.find(s, max(len(text) + 1 - len(p) - len(s), 0))
            if i >= 0 and (best is None or i + len(s) < best[0] + len(best[1])):
                best = (i, s)
        if best is not None:
            i, s = best
            return text[:i + len(s)] if include else text[:i], s
    return text, None


def feed_checked(pieces: list[str], first_checked: int, stops: list[str], include: bool):
    chk = StopStringChecker(stops, include)
    out, matched, so_far = [], None, []
    for j, p in enumerate(pieces):
        emit, matched = chk.feed(p, j >= first_checked)
        out.append(emit)
        so_far.append("".join(out))
        if matched is not None:
            break
    if matched is None:
        out.append(chk.flush())
    return "".join(out), matched, so_far


def test_stop_string_beginning_before_min_tokens_matches():
    # vLLM: with min_tokens 1, "a" (output token 1) is not checked, but "b" (token 2) is, and
    # its window reaches back len("ab") - 1 chars: "ab" matches and is cut
    assert feed_checked(["x", "a", "b", "c"], 2, ["ab"], False)[:2] == ("x", "ab")
    assert feed_checked(["xa", "b"], 1, ["ab"], True)[:2] == ("xab", "ab")
    # a stop that ends before the boundary never matches, not even later
    assert feed_checked(["ab", "c"], 1, ["ab"], False)[:2] == ("abc", None)
    assert feed_checked(["xab", "c", "ab"], 1, ["ab"], False)[:2] == ("xabc", "ab")
    # nothing of a possible stop streams before the boundary either
    chk = StopStringChecker(["abc"])
    assert chk.feed("xab", False) == ("x", None)
    assert chk.feed("c") == ("", "abc")


@settings(max_examples=500, deadline=None)
@given(st.lists(st.text(alphabet="abc d", max_size=4), max_size=10),
       st.lists(st.text(alphabet="abcd", min_size=1, max_size=4), min_size=1, max_size=3),
       st.integers(0, 6), st.booleans())
def test_stop_checker_matches_vllm_window_with_min_tokens(pieces, stops, first_checked,
                                                          include):
    final, matched, so_far = feed_checked(pieces, first_checked, stops, include)
    want, want_stop = vllm_stop(pieces, first_checked, stops, include)
    assert (final, matched) == (want, want_stop)
    assert all(want.startswith(s) for s in so_far)  # never streams a stop-string fragment


# ----------------------------------------------------------- the same through the engine core
def script_run(script: list[int], params, prompt=(1, 2, 3)):
    """LLMEngine with a scripted runner (then EOS): (merged text, deltas, final output)."""
    eng = LLMEngine(EngineConfig(model="demo"), runner=ScriptedRunner({"x": script}),
                    tokenizer=load_tokenizer(None))
    eng.add_request("x", list(prompt), params)
    deltas = []
    while eng.has_unfinished_requests():
        deltas += [o for o in eng.step() if o.request_id == "x"]
    return "".join(d.text for d in deltas), deltas, deltas[-1]


def test_engine_end_of_stream_prompt_split_and_min_tokens_window():
    # 1. ends after 2 of 3 bytes: by length, by EOS, by a stop token (its text hidden): the
    # bytes are dropped (a shown stop token's text breaks the character: U+FFFD, then it)
    for script, p, want in (
            ([97, 98, 0xE4, 0xBD], SamplingParams(max_tokens=4), "ab"),
            ([97, 98, 0xE4, 0xBD, EOS], SamplingParams(max_tokens=9), "ab"),
            ([97, 98, 0xE4, 0xBD, 99], SamplingParams(stop_token_ids=[99]), "ab"),
            ([97, 98, 0xE4, 0xBD, 99], SamplingParams(stop_token_ids=[99],
                                                      include_stop_str_in_output=True), "ab�c"),
            ([97, 98, 0xFF], SamplingParams(max_tokens=3), "ab")):
        text, _, last = script_run(script, p)
        assert text == want and last.finish_reason in ("stop", "length")
    # 2. the prompt ends with 2 of the 3 bytes of 你: the first output text is the character
    text, deltas, _ = script_run([0xA0, 99], SamplingParams(max_tokens=2),
                                 prompt=[120, 0xE4, 0xBD])
    assert [d.text for d in deltas] == ["\u4f60", "c"]
    # 3. min_tokens 2: "ab" begins in output token 2 (unchecked) and ends in token 3 (checked)
    text, deltas, last = script_run(list(b"xab tail"), SamplingParams(
        max_tokens=20, stop=["ab"], min_tokens=2))
    assert (text, last.finish_reason, last.stop_reason) == ("x", "stop", "ab")
    assert len(last.token_ids) == 1 and sum(len(d.token_ids) for d in deltas) == 3
    # ... one that ends at token 2 (unchecked) does not stop it; a later one does
    text, _, last = script_run(list(b"abcab"), SamplingParams(max_tokens=20, stop=["ab"],
                                                               min_tokens=2))
    assert (text, last.stop_reason) == ("abc", "ab")
