"""vLLM's pass-through SamplingParams keywords (extra_args, skip_clone, flat_logprobs) are
accepted in-process; a bad structured_outputs / guided_decoding is refused by name; of them only
structured_outputs is a WebSocket frame parameter."""

import pytest

from atom_stream import LLM, SamplingParams
from atom_stream.sampling_params import SamplingParamsError
from atom_stream.server.ws_frames import PARAM_NAMES


def test_pass_through_keywords_are_accepted_and_kept():
    p = SamplingParams(max_tokens=3, extra_args={"plugin": [1, 2]}, skip_clone=True,
                       flat_logprobs=True)
    assert p.extra_args == {"plugin": [1, 2]} and p.skip_clone and p.flat_logprobs
    c = p.clone()
    c.extra_args["plugin"].append(3)
    assert p.extra_args == {"plugin": [1, 2]}  # clone is deep, as vLLM's
    assert "extra_args={'plugin': [1, 2]}" in repr(p)


@pytest.mark.parametrize("name,value", [("skip_clone", "yes"), ("flat_logprobs", 1),
                                        ("extra_args", [1]),
                                        ("structured_outputs", {"json": {}, "regex": "a"}),
                                        ("guided_decoding", {"choice": []})])
def test_bad_or_unsupported_values_name_the_field(name, value):
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(**{name: value})
    assert e.value.param == name


def test_llm_generates_with_them_as_without():
    llm = LLM(model="demo", device="cpu", dtype="float32", num_kv_blocks=16)
    base = {"temperature": 0.0, "max_tokens": 6, "ignore_eos": True, "logprobs": 2}
    plain, ported = (llm.generate(prompt_token_ids=[[5, 6, 7]], sampling_params=SamplingParams(
        **base, **kw))[0] for kw in ({}, {"extra_args": {"k": 1}, "skip_clone": True,
                                          "flat_logprobs": True}))
    assert ported.outputs[0].token_ids == plain.outputs[0].token_ids
    lp = ported.outputs[0].logprobs
    assert len(lp) == 6 and all(isinstance(d, dict) and d for d in lp)


def test_not_websocket_parameters():
    for name in ("extra_args", "skip_clone", "flat_logprobs", "guided_decoding",
                 "output_kind"):
        assert name not in PARAM_NAMES
    assert {"max_tokens", "temperature", "stop", "logprobs", "structured_outputs"} <= PARAM_NAMES
