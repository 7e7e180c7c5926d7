"""LLM.chat takes vLLM's LLM.chat arguments (text models): tools rendered by the chat template,
add_generation_prompt / continue_final_message (the HTTP routes' ChatOptionsError when both are
set), chat_template refused as the HTTP server refuses a request's, content formats checked,
one conversation or a list with one or a list of sampling params. The prompt ids are the
engine's own `tokenize_prompt` ids for the same messages and options. Content formats as vLLM:
"string" flattens list-of-parts content before rendering, "openai" hands parts (a custom
template that reads one form only shows which form it got)."""

from __future__ import annotations

import asyncio
import inspect

import pytest

from atom_stream import LLM, SamplingParams
from atom_stream.engine.prompts import (
    BOTH_CHAT_OPTIONS,
    UNTRUSTED_TEMPLATE,
    ChatOptionsError,
    apply_content_format,
    tokenize_prompt,
)
from atom_stream.errors import InvalidRequestError

KW = {"device": "cpu", "dtype": "float32", "num_kv_blocks": 64}
MSGS = [{"role": "user", "content": "hi"}]
CONT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hel"}]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def sp(**kw) -> SamplingParams:
    return SamplingParams(**{"max_tokens": 2, "temperature": 0, "ignore_eos": True, **kw})


def engine_ids(llm, messages, template_kwargs=None, **opts) -> list[int]:
    return asyncio.run(tokenize_prompt(llm.tokenizer, messages, template_kwargs, **opts))


def test_signature_is_vllms_order():
    names = list(inspect.signature(LLM.chat).parameters)[1:]
    assert names == ["messages", "sampling_params", "use_tqdm", "lora_request", "chat_template",
                     "chat_template_content_format", "add_generation_prompt",
                     "continue_final_message", "tools", "chat_template_kwargs",
                     "mm_processor_kwargs"]


def test_tools_are_rendered_by_the_template(llm):
    (out,) = llm.chat(MSGS, sp(), tools=TOOLS)
    want = engine_ids(llm, MSGS, {"tools": TOOLS})
    assert out.prompt_token_ids == want
    assert want != engine_ids(llm, MSGS)
    assert "get_weather" in llm.tokenizer.decode(want, skip_special_tokens=False)
    # as tools= or as a template kwarg: one prompt; no tools is the old prompt
    (kw,) = llm.chat(MSGS, sp(), chat_template_kwargs={"tools": TOOLS})
    assert kw.prompt_token_ids == want
    (plain,) = llm.chat(MSGS, sp(), tools=[])
    assert plain.prompt_token_ids == llm.tokenizer.encode_chat(MSGS, add_generation_prompt=True)


def test_generation_prompt_options_match_the_engine(llm):
    (no_gen,) = llm.chat(MSGS, sp(), add_generation_prompt=False)
    assert no_gen.prompt_token_ids == engine_ids(llm, MSGS, add_generation_prompt=False)
    (cont,) = llm.chat(CONT, sp(), add_generation_prompt=False, continue_final_message=True)
    want = engine_ids(llm, CONT, add_generation_prompt=False, continue_final_message=True)
    assert cont.prompt_token_ids == want
    assert llm.tokenizer.decode(want, skip_special_tokens=False).endswith("Hel")
    # template kwargs override the arguments (as vLLM and the HTTP routes)
    (over,) = llm.chat(CONT, sp(), chat_template_kwargs={"add_generation_prompt": False,
                                                         "continue_final_message": True})
    assert over.prompt_token_ids == want


@pytest.mark.parametrize("kw", [
    {"continue_final_message": True},
    {"chat_template_kwargs": {"continue_final_message": True}},
])
def test_both_options_is_the_http_error(llm, kw):
    with pytest.raises(ChatOptionsError) as e:
        llm.chat(CONT, sp(), **kw)
    assert str(e.value) == BOTH_CHAT_OPTIONS and e.value.type == "Bad Request"
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("kw", [
    {"chat_template": "{{ messages }}"},
    {"chat_template_kwargs": {"chat_template": "{{ messages }}"}},
])
def test_a_chat_template_is_refused(llm, kw):
    with pytest.raises(InvalidRequestError) as e:
        llm.chat(MSGS, sp(), **kw)
    assert str(e.value) == UNTRUSTED_TEMPLATE


def test_content_formats(llm):
    want = llm.tokenizer.encode_chat(MSGS, add_generation_prompt=True)
    for fmt in ("auto", "string", "openai"):
        (out,) = llm.chat(MSGS, sp(), chat_template_content_format=fmt)
        assert out.prompt_token_ids == want
    with pytest.raises(InvalidRequestError) as e:
        llm.chat(MSGS, sp(), chat_template_content_format="xml")
    assert e.value.param == "chat_template_content_format"
    for kw in ({"lora_request": object()}, {"mm_processor_kwargs": {}}):
        with pytest.raises(InvalidRequestError):
            llm.chat(MSGS, sp(), **kw)


def test_conversations_with_a_list_of_params(llm):
    convs = [MSGS, [{"role": "user", "content": "bye"}]]
    outs = llm.chat(convs, [sp(max_tokens=1), sp(max_tokens=3)], tools=TOOLS)
    assert [len(o.token_ids) for o in outs] == [1, 3]
    for o, c in zip(outs, convs):
        assert o.prompt_token_ids == engine_ids(llm, c, {"tools": TOOLS})
    with pytest.raises(InvalidRequestError, match="sampling_params"):
        llm.chat(convs, [sp()])
    with pytest.raises(InvalidRequestError) as e:
        llm.chat([[{"role": "user", "content": 3.5}]], sp())
    assert e.value.param == "messages"


# templates that read one content form only (vLLM's chat_template_content_format)
STRING_ONLY = ("{% for m in messages %}{% if m['content'] is not string %}"
               "{{ raise_exception('string content only') }}{% endif %}"
               "<|im_user|>{{ m['content'] }}<|im_end|>{% endfor %}"
               "{% if add_generation_prompt %}<|im_assistant|>{% endif %}")
PARTS_ONLY = ("{% for m in messages %}{% if m['content'] is string %}"
              "{{ raise_exception('content parts only') }}{% endif %}"
              "<|im_user|>{% for p in m['content'] %}[{{ p['text'] }}]{% endfor %}<|im_end|>"
              "{% endfor %}{% if add_generation_prompt %}<|im_assistant|>{% endif %}")
PARTS = [{"role": "user", "content": [{"type": "text", "text": "a"},
                                      {"type": "input_text", "text": "b"}]}]


def prompt_of(llm, messages, fmt) -> str:
    (out,) = llm.chat(messages, sp(max_tokens=1), chat_template_content_format=fmt)
    return llm.tokenizer.decode(out.prompt_token_ids, skip_special_tokens=False)


def test_string_format_flattens_parts_for_a_string_template():
    """"string": list-of-parts content reaches the template as one string (text parts joined
    by a newline, as vLLM); "auto" picks it for a template that does not loop over the content
    (vLLM's detection); "openai" makes even string content parts, which this template refuses."""
    with LLM("demo", chat_template=STRING_ONLY, **KW) as llm:
        assert prompt_of(llm, PARTS, "string") == prompt_of(llm, PARTS, "auto") == (
            "<|im_user|>a\nb<|im_end|><|im_assistant|>")
        assert prompt_of(llm, MSGS, "string") == prompt_of(llm, MSGS, "auto") == (
            "<|im_user|>hi<|im_end|><|im_assistant|>")
        with pytest.raises(InvalidRequestError, match="string content only"):
            llm.chat(MSGS, sp(), chat_template_content_format="openai")
        assert not llm.engine.has_unfinished_requests()


def test_openai_format_keeps_parts_for_a_parts_template():
    """"openai": content reaches the template as text parts (a string becomes one part);
    "auto" picks it for a template that loops over the content (vLLM's detection); "string"
    flattens them, which this template refuses."""
    with LLM("demo", chat_template=PARTS_ONLY, **KW) as llm:
        assert prompt_of(llm, MSGS, "openai") == prompt_of(llm, MSGS, "auto") == (
            "<|im_user|>[hi]<|im_end|><|im_assistant|>")
        assert prompt_of(llm, PARTS, "openai") == prompt_of(llm, PARTS, "auto") == (
            "<|im_user|>[a][b]<|im_end|><|im_assistant|>")
        with pytest.raises(InvalidRequestError, match="content parts only"):
            llm.chat(PARTS, sp(), chat_template_content_format="string")


def test_content_format_conversion_rules():
    msgs = [{"role": "system", "content": None},
            {"role": "user", "content": ["x", {"type": "refusal", "refusal": "no"},
                                         {"type": "thinking", "thinking": "hm"},
                                         {"type": "text", "text": None}]}]
    copy = [dict(m) for m in msgs]
    assert [m["content"] for m in apply_content_format(msgs, "string")] == ["", "x\nno\nhm"]
    assert [m["content"] for m in apply_content_format(msgs, "openai")] == [
        [], [{"type": "text", "text": t} for t in ("x", "no", "hm")]]
    assert apply_content_format(msgs, "auto") is msgs and msgs == copy  # never changed
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]
    for bad in (image, [{"role": "user", "content": [{"text": "t"}]}]):
        with pytest.raises(InvalidRequestError) as e:
            apply_content_format(bad, "string")
        assert e.value.param == "messages"


def test_malformed_messages_are_request_errors_and_nothing_leaks(llm):
    """A message dict instead of a list, a string, None: InvalidRequestError naming messages
    (not a KeyError / IndexError); an empty list is no conversation (vLLM returns [])."""
    for bad in ({"role": "user", "content": "hi"}, "hi", None, 5):
        with pytest.raises(InvalidRequestError) as e:
            llm.chat(bad, sp())
        assert e.value.param == "messages", bad
    assert llm.chat([], sp()) == []
    assert llm.llm_engine.block_manager.num_used == 0
    assert len(llm.chat(MSGS, sp())[0].outputs[0].token_ids) == 2  # still serves
