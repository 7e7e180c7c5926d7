"""/tokenize, /detokenize, /version and the chat template options as vLLM (v0.10
serving_tokenization.py, protocol.py TokenizeChatRequest/TokenizeCompletionRequest, serving_chat.py).

- /tokenize: `prompt` (add_special_tokens default true) or `messages` (add_special_tokens default
  false, add_generation_prompt, continue_final_message, chat_template_kwargs, tools); the body is
  {count, max_model_len, tokens, token_strs} with token_strs null unless asked for; both
  continue_final_message and add_generation_prompt -> 400; neither prompt nor messages -> 400.
- /detokenize: tokenizer.decode(ids) with HF's default, so special tokens are kept.
- AsyncEngine.generate(messages, add_generation_prompt=..., continue_final_message=...).
- Chat route options that need the openai.py change described in the session report are
  marked xfail(strict=True): they turn into failures once it lands (remove the marks then).
"""

from __future__ import annotations

import pytest

from atom_stream.sampling_params import SamplingParams

CONT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "The answer is"}]
PREFIX = "<|im_user|>user<|im_middle|>hi<|im_end|><|im_assistant|>assistant<|im_middle|>"


def ids_of(srv, text: str) -> list[int]:
    return srv.engine.tokenizer.encode(text)


def test_tokenize_prompt_body_as_vllm(http, srv):
    r = http.post("/tokenize", json={"prompt": "hi"})
    assert r.json() == {"count": 2, "max_model_len": srv.engine.max_model_len,
                        "tokens": [104, 105], "token_strs": None}
    r = http.post("/tokenize", json={"prompt": "a b", "return_token_strs": True}).json()
    assert r["token_strs"] == ["a", "Ġ", "b"]  # convert_ids_to_tokens: the vocabulary's strings


def test_tokenize_chat_options(http, srv):
    tok = srv.engine.tokenizer
    base = {"messages": CONT}
    agp = http.post("/tokenize", json=base).json()["tokens"]
    assert agp == tok.encode(tok.apply_chat_template(CONT, True))
    no_gp = http.post("/tokenize", json={**base, "add_generation_prompt": False}).json()
    assert no_gp["tokens"] == ids_of(srv, PREFIX + "The answer is<|im_end|>")
    cont = http.post("/tokenize", json={**base, "add_generation_prompt": False,
                                        "continue_final_message": True}).json()
    assert cont["tokens"] == ids_of(srv, PREFIX + "The answer is")
    assert cont["count"] == len(cont["tokens"])
    both = http.post("/tokenize", json={**base, "continue_final_message": True,
                                        "add_generation_prompt": True})
    assert both.status_code == 400
    assert "Cannot set both `continue_final_message`" in both.json()["error"]["message"]
    # tools and chat_template_kwargs reach the template (the demo renders Kimi's format)
    tools = [{"type": "function", "function": {"name": "f"}}]
    with_tools = http.post("/tokenize", json={**base, "tools": tools}).json()["tokens"]
    assert tok.decode(with_tools, skip_special_tokens=False).startswith(
        '<|im_system|>tool_declare<|im_middle|>[{"function":{"name":"f"}')
    kw = http.post("/tokenize", json={**base, "chat_template_kwargs": {
        "add_generation_prompt": False}}).json()["tokens"]
    assert kw == no_gp["tokens"]  # vLLM: the request's kwargs update the template kwargs last


def test_tokenize_errors_are_400s(http):
    for body in ({}, {"messages": []}, {"prompt": 5}, {"messages": [{"content": "x"}]},
                 {"messages": [{"role": 3, "content": "x"}]},
                 {"messages": [{"role": "user", "content": "x"}], "continue_final_message": True}):
        r = http.post("/tokenize", json=body)
        assert r.status_code == 400, (body, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert http.post("/tokenize", json={"prompt": "x", "model": "nope"}).status_code == 404
    # a request chat template is refused as on the chat route (vLLM: untrusted template)
    msgs = [{"role": "user", "content": "x"}]
    for extra in ({"chat_template": "{{ 1 }}"}, {"chat_template_kwargs": {"chat_template": "t"}}):
        r = http.post("/tokenize", json={"messages": msgs, **extra})
        assert r.status_code == 400 and "untrusted chat template" in r.json()["error"]["message"]


def test_detokenize_keeps_special_tokens_as_vllm(http):
    assert http.post("/detokenize", json={"tokens": [258, 104, 105, 262]}).json() == {
        "prompt": "<|im_user|>hi<|im_end|>"}
    assert http.post("/detokenize", json={"tokens": [999]}).status_code == 400
    assert http.post("/detokenize", json={"tokens": "x"}).status_code == 400


def test_version_body(http):
    body = http.get("/version").json()
    assert list(body) == ["version"] and isinstance(body["version"], str) and body["version"]


def test_engine_generate_chat_options(srv):
    async def prompt_ids(**kw) -> list[int]:
        params = SamplingParams(max_tokens=1, temperature=0)
        async for out in srv.engine.generate(CONT, params, **kw):
            if out.prompt_token_ids is not None:
                return out.prompt_token_ids
        raise AssertionError("no prompt ids")

    assert srv.call(prompt_ids(add_generation_prompt=False, continue_final_message=True)) == \
        ids_of(srv, PREFIX + "The answer is")
    assert srv.call(prompt_ids(add_generation_prompt=False)) == \
        ids_of(srv, PREFIX + "The answer is<|im_end|>")
    with pytest.raises(Exception, match="Cannot set both"):
        srv.call(prompt_ids(continue_final_message=True))


# ---------------------------------------------------------------- chat route (openai.py)
def test_chat_continue_final_message(http):
    r = http.post("/v1/chat/completions", json={
        "messages": CONT, "add_generation_prompt": False, "continue_final_message": True,
        "max_tokens": 2, "temperature": 0, "echo": True})
    assert r.status_code == 200, r.text
    msg = r.json()["choices"][0]["message"]
    assert msg["role"] == "assistant" and msg["content"].startswith("The answer is")
    both = http.post("/v1/chat/completions", json={
        "messages": CONT, "add_generation_prompt": True, "continue_final_message": True})
    assert both.status_code == 400
    assert "Cannot set both" in both.json()["error"]["message"]


def test_chat_echo_without_generation_prompt_uses_the_last_role(http):
    """vLLM's get_chat_request_role: without a generation prompt the answer's role is the last
    message's role, so echo prepends a user message's content too."""
    r = http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Say"}], "add_generation_prompt": False,
        "echo": True, "max_tokens": 2, "temperature": 0}).json()
    msg = r["choices"][0]["message"]
    assert msg["role"] == "user" and msg["content"].startswith("Say")
    # streamed: the role chunk carries the same role
    with http.stream("POST", "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Say"}], "add_generation_prompt": False,
            "max_tokens": 2, "temperature": 0, "stream": True}) as s:
        first = next(ln for ln in s.iter_lines() if ln.startswith("data: "))
    assert '"role":"user"' in first, first


def test_chat_text_parts_join_with_newlines(http, srv):
    """vLLM's _parse_chat_message_content_parts ("string" content format): "\\n".join."""
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    r = http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": parts}], "max_tokens": 1}).json()
    want = len(srv.engine.tokenizer.encode_chat([{"role": "user", "content": "a\nb"}]))
    assert r["usage"]["prompt_tokens"] == want


def test_invocations_dispatches_by_body(http):
    """SageMaker's POST /invocations (vLLM serves it beside /ping): a chat, completion or
    responses body answers as its own route does; another body, bad JSON or a wrong content
    type is a 400; streaming works through it."""
    chat = http.post("/invocations", json={"messages": [{"role": "user", "content": "hi"}],
                                           "max_tokens": 3})
    assert chat.status_code == 200 and chat.json()["object"] == "chat.completion"
    done = http.post("/invocations", json={"prompt": "hi", "max_tokens": 3})
    assert done.status_code == 200 and done.json()["object"] == "text_completion"
    resp = http.post("/invocations", json={"input": "hi", "max_output_tokens": 3})
    assert resp.status_code == 200 and resp.json()["object"] == "response"
    with http.stream("POST", "/invocations", json={"prompt": "hi", "max_tokens": 3,
                                                   "stream": True}) as r:
        assert r.status_code == 200 and r.read().endswith(b"data: [DONE]\n\n")
    for kwargs in ({"json": {"nothing": 1}}, {"json": [1, 2]},
                   {"content": b"{", "headers": {"content-type": "application/json"}},
                   {"content": b'{"prompt": "x"}', "headers": {"content-type": "text/plain"}}):
        r = http.post("/invocations", **kwargs)
        assert r.status_code == 400 and r.json()["error"]["code"] == 400
    bad = http.post("/invocations", json={"prompt": "hi", "max_tokens": -1})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"
