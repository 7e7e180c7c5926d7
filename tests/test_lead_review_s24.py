"""Session 24's lead fixes from the review reports: Hugging Face tokenizer attributes vLLM users
read, a broken --chat-template failing the start, an unsupported config.json named before the
tokenizer loads, and vLLM's `--api-key K1 K2` form."""

import json

import pytest

from atom_stream.cli import serve_parser, server_config_from_args
from atom_stream.config import ConfigError
from atom_stream.tokenizer import DemoTokenizer, resolve_chat_template


def test_tokenizer_eos_token_id_and_tokenized_chat_template():
    tok = DemoTokenizer()
    assert tok.eos_token_id == tok.eos_token_ids[0]
    msgs = [{"role": "user", "content": "hi there"}]
    ids = tok.apply_chat_template(msgs, tokenize=True)
    assert isinstance(ids, list) and ids == tok.encode_chat(msgs)
    assert isinstance(tok.apply_chat_template(msgs), str)


@pytest.mark.parametrize("bad", ["{{ messages", "{% for m in messages %}{{ m }}"])
def test_broken_chat_template_is_refused_at_load(bad, tmp_path):
    with pytest.raises(ValueError, match="not a valid jinja template"):
        resolve_chat_template(bad)
    path = tmp_path / "t.jinja"
    path.write_text(bad)
    with pytest.raises(ValueError, match="not a valid jinja template"):
        resolve_chat_template(str(path))
    good = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert resolve_chat_template(good) == good


def test_unsupported_architecture_is_named_before_the_tokenizer(tmp_path):
    from atom_stream import LLM
    (tmp_path / "config.json").write_text(json.dumps(
        {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64}))
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="LlamaForCausalLM|llama"):
        LLM(model=str(tmp_path))


def test_api_key_takes_several_values_and_repeats():
    p = serve_parser()
    args = p.parse_args(["--api-key", "k1", "k2", "--api-key", "k3"])
    assert server_config_from_args(args).api_keys == ["k1", "k2", "k3"]


def test_max_header_bytes_flag_reaches_the_server_config():
    args = serve_parser().parse_args(["--max-header-bytes", "12345"])
    assert server_config_from_args(args).max_header_bytes == 12345
    assert server_config_from_args(serve_parser().parse_args([])).max_header_bytes == 64 << 10


def test_kimi_content_format_follows_the_checkpoint_template(tmp_path):
    """"auto" reads the checkpoint's jinja even where the built-in renderer renders (no
    trust_remote_code): K2-Instruct's template loops over the parts ("openai", parts joined
    with nothing), a template that reads the content as a string gives "string"."""
    from tokenizer_fixtures import write_kimi_tokenizer

    from atom_stream.engine.prompts import resolve_content_format
    from atom_stream.tokenizer import load_tokenizer
    loops = ("{% for m in messages %}{% if m['content'] is string %}{{ m['content'] }}"
             "{% else %}{% for p in m['content'] %}{{ p['text'] }}{% endfor %}{% endif %}"
             "{% endfor %}")
    for name, template, want in (("a", loops, "openai"),
                                 ("b", "{% for m in messages %}{{ m.content }}{% endfor %}",
                                  "string"), ("c", None, "string")):
        d = tmp_path / name
        d.mkdir()
        write_kimi_tokenizer(str(d))
        if template is not None:
            (d / "chat_template.jinja").write_text(template)
        assert resolve_content_format(load_tokenizer(str(d))) == want, name


def test_history_reasoning_field_reaches_the_template(tmp_path):
    """A history message's `reasoning` (newer vLLM's name for reasoning_content) survives the
    request decoding and renders as reasoning_content does (Kimi-K2.5's interleaved thinking
    keeps the reasoning of tool-call turns after the last user message)."""
    from tokenizer_fixtures import write_kimi_tokenizer

    from atom_stream.protocol import ChatCompletionRequest
    from atom_stream.server.openai import decode_request, messages_to_dicts
    from atom_stream.tokenizer import load_tokenizer
    tok = load_tokenizer(write_kimi_tokenizer(str(tmp_path / "k"), think=True))

    def rendered(field: str) -> str:
        body = {"model": "m", "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "", field: "because",
             "tool_calls": [{"id": "functions.f:0", "type": "function",
                             "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "functions.f:0", "content": "r"}]}
        req = decode_request(ChatCompletionRequest, json.dumps(body).encode())
        return tok.apply_chat_template(messages_to_dicts(req.messages))
    assert "because" in rendered("reasoning_content")
    assert rendered("reasoning") == rendered("reasoning_content")


def test_detokenize_false_returns_ids_only():
    """vLLM's SamplingParams.detokenize=False: the same token ids, no text; stop strings are
    refused (they need the text), as vLLM refuses them."""
    from atom_stream import LLM, SamplingParams
    from atom_stream.errors import InvalidRequestError
    with LLM("demo", max_model_len=64, num_kv_blocks=16) as llm:
        base = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
        full, ids_only = llm.generate(["hello", "hello"], [base, SamplingParams(
            max_tokens=6, temperature=0, ignore_eos=True, detokenize=False)])
        assert ids_only.outputs[0].token_ids == full.outputs[0].token_ids
        assert full.outputs[0].text and ids_only.outputs[0].text == ""
        with pytest.raises(InvalidRequestError, match="detokenize"):
            llm.generate("hello", SamplingParams(max_tokens=2, stop=["x"], detokenize=False))
        with pytest.raises(Exception, match="detokenize"):
            SamplingParams(detokenize="no")
