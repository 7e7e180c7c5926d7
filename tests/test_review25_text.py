"""Session 25 review of text handling: chat templates, tool-call and reasoning parsers.

Found and fixed:
- Jinja chat templates (a Hugging Face checkpoint's, `--chat-template`, Kimi's own with
  trust_remote_code) got a tool call's `function.arguments` as the client's JSON text, so a
  template that writes `arguments | tojson` (vLLM's tool_chat_template_deepseekv3.jinja; Kimi's
  template for non-string arguments) quoted it again: `"{\\"city\\": ...}"`. vLLM parses the
  text into an object first (`_postprocess_messages`, which also drops an empty `tool_calls`
  list); now so do we (tokenizer.template_messages). A template that can only concatenate text
  (DeepSeek-V3's own, which fails under vLLM) is rendered again with the text.
- `--reasoning-parser deepseek_v3` and `--tool-call-parser deepseek_v31` (vLLM's parsers for
  DeepSeek-V3.1-style checkpoints) were start-up errors. deepseek_v3 reasons only when the
  request asks (`chat_template_kwargs: {"thinking": true}`); deepseek_v31 reads
  `<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{json}<｜tool▁call▁end｜>`.
- A continue_final_message request continues the final message's content, but with a reasoning
  parser whose template opens `<think>` the continuation was reported as reasoning_content
  (Kimi K2.5 writes `<think></think>` before that message). `ChatParsing.plan(...,
  continued=continued_text(messages, cfm))` now makes it content, unless the continued text
  leaves a `<think>` open (the route must pass it: see the session report).
"""

from __future__ import annotations

import pytest
from tokenizer_fixtures import write_hf_tokenizer

from atom_stream.server.chat_parsing import ChatParsing, check_parser_names, continued_text
from atom_stream.server.tool_parsers import TOOL_PARSERS, ToolCallStream, extract_tool_calls
from atom_stream.tokenizer import load_tokenizer

# ------------------------------------------------------------ tool-call arguments in templates
# vLLM's examples/tool_chat_template_deepseekv3.jinja writes `arguments | tojson`
TOJSON = ("{% for m in messages %}{% if m.tool_calls is defined and m.tool_calls is not none %}"
          "{% for t in m.tool_calls %}[{{ t['function']['name'] }} "
          "{{ t['function']['arguments'] | tojson }}]{% endfor %}"
          "{% else %}<{{ m.role }}:{{ m.content }}>{% endif %}{% endfor %}")
# DeepSeek-V3's own template joins the arguments to strings with `+`
CONCAT = TOJSON.replace(
    "[{{ t['function']['name'] }} {{ t['function']['arguments'] | tojson }}]",
    "{{ '[' + t['function']['name'] + ' ' + t['function']['arguments'] + ']' }}")
HISTORY = [
    {"role": "user", "content": "天气?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city":"北京","days":2}'}},
        {"id": "c2", "type": "function", "function": {"name": "now", "arguments": ""}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "晴"},
    {"role": "assistant", "content": "好", "tool_calls": []},
]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return write_hf_tokenizer(str(tmp_path_factory.mktemp("hf")))


def test_tojson_template_gets_the_arguments_object_once(hf_dir):
    tok = load_tokenizer(hf_dir, chat_template=TOJSON)
    assert tok.apply_chat_template(HISTORY, add_generation_prompt=False) == (
        '<user:天气?>[get_weather {"city": "北京", "days": 2}][now {}]<tool:晴><assistant:好>')
    assert HISTORY[1]["tool_calls"][0]["function"]["arguments"] == '{"city":"北京","days":2}'
    ids = tok.encode_chat(HISTORY, add_generation_prompt=False)  # /tokenize's path
    assert tok.decode(ids, skip_special_tokens=False).count('"city": "北京"') == 1


def test_concatenating_template_still_renders_the_text(hf_dir):
    tok = load_tokenizer(hf_dir, chat_template=CONCAT)
    assert tok.apply_chat_template(HISTORY, add_generation_prompt=False) == (
        '<user:天气?>[get_weather {"city":"北京","days":2}][now ]<tool:晴><assistant:好>')


# ------------------------------------------------------------------- DeepSeek-V3.1 parsers
def test_vllm_deepseek_v31_parser_names_start():
    check_parser_names("deepseek_v31", "deepseek_v3", True)
    with pytest.raises(ValueError, match="deepseek_v31"):
        check_parser_names("nope", None, True)  # the known names are listed


def test_deepseek_v3_reasoning_only_when_thinking_is_asked():
    parsing = ChatParsing(reasoning_parser="deepseek_v3")
    text = "清楚</think>答案"
    msg, _ = parsing.plan(False, None, None).message("assistant", "", "直接答案", "stop")
    assert (msg.reasoning_content, msg.content) == (None, "直接答案")
    # either key on turns it on, as vLLM's DeepSeekV3ReasoningParser (thinking or enable_thinking)
    for kw in ({"thinking": True}, {"enable_thinking": True},
               {"thinking": False, "enable_thinking": True},
               {"thinking": True, "enable_thinking": False}):
        msg, _ = parsing.plan(False, kw, None).message("assistant", "", text, "stop")
        assert (msg.reasoning_content, msg.content) == ("清楚", "答案")
    msg, _ = parsing.plan(False, {"thinking": False, "enable_thinking": False}, None).message(
        "assistant", "", "直接答案", "stop")
    assert (msg.reasoning_content, msg.content) == (None, "直接答案")


V31 = ("Sure.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>"
       '{"city": "北京"}<｜tool▁call▁end｜><｜tool▁call▁begin｜>now<｜tool▁sep｜>{}'
       "<｜tool▁call▁end｜><｜tool▁calls▁end｜>")


@pytest.mark.parametrize("step", [1, 4, 10_000])
def test_deepseek_v31_tool_calls_streamed_and_whole(step):
    fmt = TOOL_PARSERS["deepseek_v31"]
    content, calls = extract_tool_calls(fmt, V31)
    assert content == "Sure."
    assert [(c.function.name, c.function.arguments) for c in calls] == [
        ("get_weather", '{"city": "北京"}'), ("now", "{}")]
    assert all(c.id.startswith("chatcmpl-tool-") for c in calls)
    s = ToolCallStream(fmt)
    out, args = "", {}
    for k in range(0, len(V31), step):
        c, deltas = s.feed(V31[k:k + step])
        out += c
        for d in deltas:
            if isinstance(d.function.arguments, str):
                args[d.index] = args.get(d.index, "") + d.function.arguments
    out += s.finish()[0]
    assert (out, args) == ("Sure.", {0: '{"city": "北京"}', 1: "{}"})


# -------------------------------------------------------------- continue_final_message
@pytest.mark.parametrize("name", ["kimi_k2", "deepseek_r1"])
def test_continued_message_is_content_unless_it_opens_reasoning(name):
    parsing = ChatParsing(reasoning_parser=name)
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Par"}]
    plan = parsing.plan(False, None, None, continued=continued_text(msgs, True))
    msg, _ = plan.message("assistant", "", "tial answer", "stop")
    assert (msg.reasoning_content, msg.content) == (None, "tial answer")
    p = plan.parser()
    d1, d2 = p.feed("tial"), p.finish(" answer")
    assert (d1.content, d2.content) == ("tial", " answer")
    # a prefilled, unfinished reasoning goes on as reasoning
    parts = [{"type": "text", "text": "<think>Let"}]
    plan = parsing.plan(False, None, None, continued=continued_text(
        [{"role": "assistant", "content": parts}], True))
    msg, _ = plan.message("assistant", "", " me see</think>Yes", "stop")
    assert (msg.reasoning_content, msg.content) == (" me see", "Yes")
    assert continued_text(msgs, False) is None
