"""Tokenizers: demo byte-level, native Kimi (tiktoken, a checkpoint written here), HF (a tiny
byte-level BPE written here). Round trips, special ids, run splitting, the regex, the Kimi chat
format (hand-written expected strings), template selection and loader errors."""

from __future__ import annotations

import itertools
import json
import os

import pytest
import tiktoken
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizer_fixtures import (
    HF_CHAT_TEMPLATE,
    KIMI_SPECIAL_OFFSETS,
    kimi_ranks,
    write_hf_tokenizer,
    write_kimi_tokenizer,
)

from atom_stream.tokenizer import DemoTokenizer, HFTokenizer, load_tokenizer
from atom_stream.tokenizers_kimi import (
    DEFAULT_SYSTEM_PROMPT,
    PAT_STR,
    PAT_STR_PORTABLE,
    KimiTokenizer,
    load_bpe_ranks,
    split_runs,
)

SYS = f"<|im_system|>system<|im_middle|>{DEFAULT_SYSTEM_PROMPT}<|im_end|>"
GEN = "<|im_assistant|>assistant<|im_middle|>"
FAST = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def kimi(tmp_path_factory) -> KimiTokenizer:
    tok = load_tokenizer(write_kimi_tokenizer(str(tmp_path_factory.mktemp("kimi"))))
    assert isinstance(tok, KimiTokenizer)
    return tok


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> HFTokenizer:
    tok = load_tokenizer(write_hf_tokenizer(str(tmp_path_factory.mktemp("hf")),
                                            generation_eos=[7]))
    assert isinstance(tok, HFTokenizer)
    return tok


# ------------------------------------------------------------------------------ demo
def test_demo_ids_and_specials():
    tok = load_tokenizer(None)
    assert isinstance(tok, DemoTokenizer) and isinstance(load_tokenizer("demo"), DemoTokenizer)
    assert (tok.vocab_size, tok.eos_token_ids, tok.bos_token_id) == (320, (257, 262), 256)
    assert tok.all_special_ids == frozenset(range(256, 320))
    assert tok.encode("é<|im_end|>a<|reserved_300|>") == [0xC3, 0xA9, 262, 97, 300]
    assert tok.encode("<|im_end") == list(b"<|im_end")  # not a complete special name
    assert tok.encode("x", add_special_tokens=True) == [120]  # Kimi-like: no BOS rule
    assert tok.decode([104, 262, 105]) == "hi"
    assert tok.decode([104, 262, 105], skip_special_tokens=False) == "h<|im_end|>i"
    assert tok.token_bytes(0xE4) == b"\xe4" and tok.token_bytes(262) is None
    assert tok.id_to_str(32) == "Ġ" and tok.id_to_str(260) == "<|im_system|>"
    assert tok.is_special(300) and not tok.is_special(255)
    with pytest.raises(ValueError, match="320"):
        tok.decode([320])


def test_demo_chat_format():
    tok = load_tokenizer(None)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(msgs)
    assert text == ("<|im_system|>system<|im_middle|>Be brief.<|im_end|>"
                    "<|im_user|>user<|im_middle|>Hi<|im_end|>" + GEN)
    ids = tok.encode_chat(msgs)
    assert ids[0] == 260 and ids[-1] == 261 and ids.count(262) == 2 and 256 not in ids
    # no default system message, no think tags for the demo
    assert tok.apply_chat_template([{"role": "user", "content": "x"}],
                                   add_generation_prompt=False) == (
        "<|im_user|>user<|im_middle|>x<|im_end|>")


@FAST
@given(st.text())
def test_demo_round_trip(text):
    tok = DemoTokenizer()
    ids = tok.encode(text)
    assert all(0 <= i < 320 for i in ids)
    assert tok.decode(ids, skip_special_tokens=False) == text


# ------------------------------------------------------------------------------ kimi
def test_kimi_special_slots_and_ids(kimi):
    n = len(kimi_ranks())
    assert kimi.num_base_tokens == n and kimi.vocab_size == n + 256
    for name, off in KIMI_SPECIAL_OFFSETS.items():
        assert kimi.encode(name) == [n + off], name
        assert kimi.id_to_str(n + off) == name
    assert kimi.encode(f"<|reserved_token_{n + 5}|>") == [n + 5]
    assert kimi.bos_token_id == n and kimi.eos_token_ids == (n + 1, n + 2)
    assert kimi.all_special_ids == frozenset(range(n, n + 256))
    assert kimi.encode("a<|im_end|>b") == [97, n + 2, 98]
    assert kimi.encode("x") == [120]  # no BOS
    # Kimi's TikTokenTokenizer has no BOS rule: vLLM's completions send none either
    assert kimi.encode("x", add_special_tokens=True) == [120]
    assert kimi.decode([97, n + 2, 98]) == "ab"
    assert kimi.decode([97, n + 2, 98], skip_special_tokens=False) == "a<|im_end|>b"
    assert kimi.token_bytes(n + 2) is None and kimi.token_bytes(0x41) == b"A"
    with pytest.raises(ValueError):
        kimi.decode([n + 256])


def test_kimi_merges_and_pretokenizer_splits(kimi):
    r = kimi_ranks()
    assert kimi.encode("hello world") == [r[b"hello"], r[b" world"]]
    assert kimi.id_to_str(r[b" world"]) == "Ġworld"
    assert kimi.encode("你好") == [r["你好".encode()]]
    # "你a" is a merge, but Han and Latin are separate pieces
    assert kimi.encode("你a") == [r["你".encode()], ord("a")]
    # digits in pieces of at most 3 ("1234" is a merge but never used)
    assert kimi.encode("1234") == [r[b"123"], ord("4")]
    # letters and digits are separate pieces ("b1" is a merge)
    assert kimi.encode("ab12") == [r[b"ab"], r[b"12"]]


def test_kimi_special_flag_controls_skipping(tmp_path):
    tok = load_tokenizer(write_kimi_tokenizer(str(tmp_path), special_flags={"<think>": False}))
    think = tok.encode("<think>")
    assert len(think) == 1 and not tok.is_special(think[0])  # still a control id when encoding
    assert tok.decode(tok.encode("<think>a</think>b")) == "<think>ab"


@FAST
@given(st.text())
def test_kimi_round_trip(kimi, text):
    ids = kimi.encode(text)
    assert all(0 <= i < kimi.vocab_size for i in ids)
    assert kimi.decode(ids, skip_special_tokens=False) == text


def test_kimi_long_runs_round_trip(kimi):
    text = "x" * 60_001 + " " * 30_000 + "你好" * 13_000 + "\r\n" * 3
    ids = kimi.encode(text)
    assert kimi.decode(ids) == text


def _kimi_reference_split(s: str, max_len: int):
    """tokenization_kimi's `_split_whitespaces_or_nonwhitespaces`, verbatim logic (the oracle)."""
    current_len, is_space, start = 0, s[0].isspace() if s else False, 0
    for i in range(len(s)):
        now = s[i].isspace()
        if is_space ^ now:
            current_len, is_space = 1, now
        else:
            current_len += 1
            if current_len > max_len:
                yield s[start:i]
                start, current_len = i, 1
    yield s[start:]


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(["a", "b", " ", "\n", "\u3000", "\x1c", "\xa0", "你"]),
               max_size=60),
       st.integers(1, 7), st.integers(1, 25))
def test_split_runs_matches_kimi_reference(text, max_run, window):
    window = max(window, max_run)  # Kimi's window (400k) is far above its run limit (25k)
    expected = [p for w0 in range(0, len(text), window)
                for p in _kimi_reference_split(text[w0:w0 + window], max_run)]
    got = list(split_runs(text, max_run=max_run, window=window))
    assert "".join(got) == text
    assert [p for p in got if p] == [p for p in expected if p]


# A rank table with every 2- and 3-char string over ALPHA: merges cross any piece boundary, so
# two patterns that split differently produce different ids.
ALPHA = ["a", "B", "你", "好", "1", "2", " ", "\n", "\r", "'", "s", "é", "\u0301", "ǅ", "ʰ",
         "ア", "😀", "&", ".", "Σ", "\t"]


@pytest.fixture(scope="module")
def dense_encodings():
    ranks = {bytes([i]): i for i in range(256)}
    for c in ALPHA:
        b = c.encode()
        for k in range(2, len(b) + 1):
            ranks.setdefault(b[:k], len(ranks))
    for n in (2, 3):
        for t in itertools.product(ALPHA, repeat=n):
            ranks.setdefault("".join(t).encode(), len(ranks))
    return [tiktoken.Encoding(f"p{i}", pat_str=p, mergeable_ranks=ranks, special_tokens={})
            for i, p in enumerate((PAT_STR, PAT_STR_PORTABLE))]


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.sampled_from(ALPHA), max_size=14))
def test_portable_pattern_splits_like_kimis(dense_encodings, text):
    native, portable = dense_encodings
    assert native.encode(text) == portable.encode(text)


def test_pattern_splits_han_latin_digits(dense_encodings):
    enc = dense_encodings[0]
    pieces = lambda s: [enc.decode([t]) for t in enc.encode(s)]
    assert pieces("a你好") == ["a", "你好"]
    assert pieces("你a") == ["你", "a"]
    assert pieces("ア你") == ["ア", "你"]  # non-Han Lo letters are not Han
    assert pieces("Ba") == ["Ba"] and pieces("aB") == ["a", "B"]
    assert pieces("a1") == ["a", "1"]
    assert pieces("a's") == ["a's"]


def test_load_bpe_ranks_matches_tiktoken(tmp_path, monkeypatch):
    path = write_kimi_tokenizer(str(tmp_path))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # no cache copy for the reference call
    from tiktoken.load import load_tiktoken_bpe
    model = os.path.join(path, "tiktoken.model")
    assert load_bpe_ranks(model) == load_tiktoken_bpe(model) == kimi_ranks()


# ------------------------------------------------------------------------ kimi chat format
def test_kimi_chat_system_and_user(kimi):
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}]
    assert kimi.apply_chat_template(msgs) == (
        "<|im_system|>system<|im_middle|>You are terse.<|im_end|>"
        "<|im_user|>user<|im_middle|>Hi<|im_end|>" + GEN + "<think>")


def test_kimi_chat_default_system_and_thinking_off(kimi):
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Hi "},
                                         {"type": "text", "text": "there"}]}]
    assert kimi.apply_chat_template(msgs, thinking=False) == (
        SYS + "<|im_user|>user<|im_middle|>Hi there<|im_end|>" + GEN + "<think></think>")
    assert kimi.apply_chat_template(msgs, add_generation_prompt=False) == (
        SYS + "<|im_user|>user<|im_middle|>Hi there<|im_end|>")


def test_kimi_chat_multi_turn_history_and_tools(kimi):
    msgs = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "easy"},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "reasoning_content": "call the tool",
         "tool_calls": [{"id": "functions.get_weather:0", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
                        {"type": "function",
                         "function": {"name": "get_time", "arguments": {"tz": "CET"}}}]},
        {"role": "tool", "name": "get_weather", "tool_call_id": "functions.get_weather:0",
         "content": "sunny"},
    ]
    assert kimi.apply_chat_template(msgs) == (
        SYS + "<|im_user|>user<|im_middle|>2+2?<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|><think></think>4<|im_end|>"
        "<|im_user|>user<|im_middle|>Weather in Paris?<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|><think>call the tool</think>"
        "<|tool_calls_section_begin|>"
        '<|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{"city":"Paris"}'
        "<|tool_call_end|>"
        '<|tool_call_begin|>functions.get_time:1<|tool_call_argument_begin|>{"tz": "CET"}'
        "<|tool_call_end|><|tool_calls_section_end|><|im_end|>"
        "<|im_system|>get_weather<|im_middle|>## Return of functions.get_weather:0\nsunny"
        "<|im_end|>" + GEN + "<think>")
    # thinking off drops the suffix reasoning too
    assert "<think>call the tool</think>" not in kimi.apply_chat_template(msgs, thinking=False)


def test_kimi_chat_tool_declaration_and_errors(kimi):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    text = kimi.apply_chat_template([{"role": "user", "content": "x"}], tools=tools)
    assert text.startswith('<|im_system|>tool_declare<|im_middle|>[{"function":{"name":"f",'
                           '"parameters":{}},"type":"function"}]<|im_end|>' + SYS)
    with pytest.raises(ValueError, match="image_url"):
        kimi.apply_chat_template([{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "x"}}]}])
    with pytest.raises(ValueError):
        kimi.apply_chat_template([{"content": "no role"}])


def test_kimi_encode_chat_uses_control_ids(kimi):
    n = kimi.num_base_tokens
    ids = kimi.encode_chat([{"role": "user", "content": "hello"}])
    assert ids[0] == n + 10  # <|im_system|>, no BOS
    assert ids.count(n + 2) == 2 and ids[-1] == n + 22  # two <|im_end|>, ends in <think>
    assert kimi.decode(ids, skip_special_tokens=False) == kimi.apply_chat_template(
        [{"role": "user", "content": "hello"}])


def test_kimi_without_think_token_omits_think_tags(tmp_path):
    tok = load_tokenizer(write_kimi_tokenizer(str(tmp_path), think=False))
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}]
    assert tok.apply_chat_template(msgs) == (
        SYS + "<|im_user|>user<|im_middle|>a<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|>b<|im_end|>"
        "<|im_user|>user<|im_middle|>c<|im_end|>" + GEN)


def test_kimi_template_selection(tmp_path):
    jinja = "{% for m in messages %}[{{ m['role'] }}:{{ m['content'] }}]{% endfor %}"
    path = write_kimi_tokenizer(str(tmp_path / "k"), chat_template=jinja, generation_eos=[3])
    msgs = [{"role": "user", "content": "hi"}]
    native = load_tokenizer(path)
    assert native.apply_chat_template(msgs).startswith(SYS)  # checkpoint jinja ignored
    assert native.eos_token_ids[-1] == 3
    assert load_tokenizer(path, trust_remote_code=True).apply_chat_template(msgs) == "[user:hi]"
    tpl_file = tmp_path / "t.jinja"
    tpl_file.write_text("{{ bos_token }}{{ messages[0]['content'] }}")
    assert load_tokenizer(path, chat_template=str(tpl_file)).apply_chat_template(msgs) == (
        "[BOS]hi")
    assert load_tokenizer(None, chat_template="<{{ messages|length }}>").apply_chat_template(
        msgs) == "<1>"


# ------------------------------------------------------------------------------ hf + loader
def test_hf_tokenizer_own_prefix_only_when_asked(tmp_path):
    # a DeepSeek-style tokenizer (BOS post-processor): add_special_tokens=True gives its BOS,
    # the default none; the fixture without the rule adds nothing either way
    bos = load_tokenizer(write_hf_tokenizer(str(tmp_path / "b"), add_bos=True))
    plain = load_tokenizer(write_hf_tokenizer(str(tmp_path / "p")))
    ids = plain.encode("hello world")
    assert bos.encode("hello world") == ids
    assert bos.encode("hello world", add_special_tokens=True) == [bos.bos_token_id, *ids]
    assert plain.encode("hello world", add_special_tokens=True) == ids


def test_hf_tokenizer(hf):
    assert hf.eos_token_ids == (hf.encode("</s>")[0], 7)
    assert hf.bos_token_id == hf.encode("<s>")[0]
    ids = hf.encode("hello world")
    assert len(ids) == 2 and [hf.id_to_str(i) for i in ids] == ["hello", "Ġworld"]
    assert hf.token_bytes(ids[1]) == b" world" and hf.byte_table(True) is not None
    assert hf.decode(hf.encode("a</s>b")) == "ab"
    assert hf.decode(hf.encode("a</s>b"), skip_special_tokens=False) == "a</s>b"
    msgs = [{"role": "user", "content": "hi"}]
    assert hf.apply_chat_template(msgs) == "<s><|start|>user\nhi<|end|>\n<|start|>assistant\n"
    ids = hf.encode_chat(msgs)
    assert ids[0] == hf.bos_token_id and ids.count(hf.encode("<|end|>")[0]) == 1


@FAST
@given(st.text(max_size=40))
def test_hf_round_trip(hf, text):
    assert hf.decode(hf.encode(text), skip_special_tokens=False) == text


def test_hf_chat_template_override(tmp_path):
    path = write_hf_tokenizer(str(tmp_path / "h"))
    tok = load_tokenizer(path, chat_template="{{ eos_token }}{{ messages[-1]['content'] }}")
    assert tok.apply_chat_template([{"role": "user", "content": "q"}]) == "</s>q"
    with open(os.path.join(path, "tokenizer_config.json")) as f:
        assert json.load(f).get("chat_template", HF_CHAT_TEMPLATE) == HF_CHAT_TEMPLATE


def test_loader_errors_name_the_path(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(ValueError, match="nope"):
        load_tokenizer(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty"):
        load_tokenizer(str(empty))
    with pytest.raises(ValueError, match="neither"):
        load_tokenizer(None, chat_template="no/such/template.jinja")
    bad = tmp_path / "bad"
    write_kimi_tokenizer(str(bad))
    (bad / "tiktoken.model").write_text("not base64 at all\n")
    with pytest.raises(ValueError, match="bad"):
        load_tokenizer(str(bad))


def test_preset_tokenizer_streams_every_id_of_a_preset_vocab():
    """Bench presets (k25-tp8-rank: 20,480 ids, no tokenizer files) get the demo tokenizer
    stretched to their vocab: every id decodes, incrementally too; encode stays the demo's."""
    import random

    from atom_stream.config import EngineConfig
    from atom_stream.detokenizer import IncrementalDetokenizer
    from atom_stream.engine.engine_setup import load_engine_tokenizer
    from atom_stream.tokenizer import PresetTokenizer

    tok = load_engine_tokenizer(EngineConfig(model="k25-tp8-rank", load_format="dummy"))
    assert isinstance(tok, PresetTokenizer) and tok.vocab_size == 20480
    rng = random.Random(7)
    ids = [rng.randrange(20480) for _ in range(200)] + [65, 0x4E2D >> 8]
    text = tok.decode(ids)
    assert tok.decode([12345]) == " t3039" and tok.decode([65, 1000]) == "A t3e8"
    detok = IncrementalDetokenizer(tok, prompt_token_ids=[72, 105])
    streamed = "".join(detok.push([t]) for t in ids) + detok.flush()
    assert streamed == text
    assert tok.decode(tok.encode("héllo <|im_end|>"), skip_special_tokens=False) == \
        "héllo <|im_end|>"
    words = [rng.randrange(320, 20480) for _ in range(300)]
    assert tok.encode(tok.decode(words)) == words  # benchmark prompts keep their lengths
    for s in (" t3039a", " t0ff t1", " t13f", " t5000", "x t3039", " t3039\u00e9"):
        assert tok.decode(tok.encode(s), skip_special_tokens=False) == s
    assert tok.encode(" t140") == [320] and tok.encode(" t13f") == list(b" t13f")
    assert tok.encode(" t5000") == list(b" t5000")  # 0x5000 = 20480: past the vocab
    with pytest.raises(ValueError):
        tok.decode([20480])
