"""The checkpoint's generation_config.json sampling defaults (vLLM's get_diff_sampling_param,
reference/serving_api.md "Defaults"): read once, used for the fields an OpenAI request leaves out
(max_tokens as a cap) and by LLM.generate without params; bad values dropped with a warning."""

from __future__ import annotations

import json
import os

import msgspec
import pytest
from hf_checkpoints import write_hf_checkpoint

from atom_stream.config import generation_sampling_defaults
from atom_stream.protocol import ChatCompletionRequest, CompletionRequest
from atom_stream.sampling_params import model_sampling_defaults
from atom_stream.server.openai_params import build_sampling_params


def _gen(tmp_path, **cfg) -> str:
    with open(os.path.join(tmp_path, "generation_config.json"), "w") as f:
        json.dump(cfg, f)
    return str(tmp_path)


def test_only_set_values_that_differ_from_transformers_defaults(tmp_path):
    d = _gen(tmp_path, temperature=0.6, top_p=0.95, top_k=50, repetition_penalty=1.0,
             min_p=None, max_new_tokens=5, do_sample=True, eos_token_id=2)
    # top_k 50 / repetition_penalty 1.0 are GenerationConfig's own defaults: to_diff_dict
    # leaves them out, so vLLM does not apply them
    assert generation_sampling_defaults(d) == {"temperature": 0.6, "top_p": 0.95,
                                               "max_tokens": 5}
    assert generation_sampling_defaults(str(tmp_path / "nowhere")) == {}
    assert generation_sampling_defaults("demo") == {} and generation_sampling_defaults(None) == {}


def test_bad_values_are_dropped_with_a_warning(tmp_path, caplog):
    d = _gen(tmp_path, temperature=0.7, top_p=7.0)
    with caplog.at_level("WARNING"):
        assert model_sampling_defaults(d) == {"temperature": 0.7}
    assert "top_p=7.0 ignored" in caplog.text


def _req(cls, body: dict):
    return msgspec.json.decode(msgspec.json.encode(body), type=cls)


def test_requests_take_the_defaults_for_fields_they_leave_out():
    defaults = {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "max_tokens": 7}
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    p = build_sampling_params(_req(ChatCompletionRequest, chat), True, defaults)
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens) == (0.6, 0.9, 20, 7)
    # the request's own values win; max_tokens is capped (vLLM's get_max_tokens: the minimum)
    p = build_sampling_params(_req(ChatCompletionRequest, dict(
        chat, temperature=0.0, top_k=5, max_tokens=100)), True, defaults)
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens) == (0.0, 0.9, 5, 7)
    p = build_sampling_params(_req(CompletionRequest, {"prompt": "x", "max_tokens": 3}), False,
                              defaults)
    assert p.max_tokens == 3 and p.temperature == 0.6
    # no defaults: as before
    p = build_sampling_params(_req(ChatCompletionRequest, chat), True)
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens) == (1.0, 1.0, 0, None)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("gen")
    write_hf_checkpoint(str(d), "kimi", seed=3)
    return _gen(d, temperature=0.0, max_new_tokens=3)


def test_llm_generate_without_params_uses_the_checkpoint_defaults(ckpt):
    from atom_stream import LLM, SamplingParams
    llm = LLM(model=ckpt, device="cpu", dtype="float32", skip_tokenizer_init=True,
              max_model_len=64, num_kv_blocks=32, block_size=4)
    try:
        assert llm.get_default_sampling_params().max_tokens == 3
        out = llm.generate(prompt_token_ids=[[5, 6, 7, 8]])[0]
        assert len(out.token_ids) == 3 and out.finish_reason == "length"
        greedy = llm.generate(prompt_token_ids=[[5, 6, 7, 8]], sampling_params=SamplingParams(
            temperature=0, max_tokens=3, ignore_eos=True))[0]
        assert out.token_ids == greedy.token_ids  # temperature 0 came from the file too
        # explicit params are used as given
        assert len(llm.generate(prompt_token_ids=[[5, 6, 7, 8]], sampling_params=SamplingParams(
            temperature=0, max_tokens=5, ignore_eos=True))[0].token_ids) == 5
    finally:
        llm.shutdown()
