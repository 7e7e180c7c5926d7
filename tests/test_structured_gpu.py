"""Structured outputs on the GPU (`pytest -m gpu` on the device): the grammar masks reach the
sampler with graph replay, every guided text obeys its constraint, and unguided rows in the
same batches give the tokens they give alone. (Async scheduling with grammars on the GPU:
tests/test_async_scheduling.py's test_gpu_graphs_pipelined_grammars_equal_sync.)"""

from __future__ import annotations

import json
import re

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a GPU", allow_module_level=True)

PRICE = r"-?[1-9][0-9]{0,3}\.[0-9]{2}"
CHOICES = ["red apple", "green", "blue (x)"]
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 6},
    "age": {"type": "integer", "minimum": 0, "maximum": 120}}, "required": ["name", "age"]}


@pytest.mark.parametrize("eager", [False, True])
def test_guided_batches_on_gpu(eager):
    from atom_stream import LLM, SamplingParams
    llm = LLM(model="demo", device="cuda", dtype="bfloat16", num_kv_blocks=256,
              max_model_len=512, max_num_seqs=16, enforce_eager=eager)
    plain = SamplingParams(temperature=1.0, seed=5, max_tokens=16, ignore_eos=True)
    alone = llm.generate([[4, 5, 6]], plain)[0].outputs[0].token_ids
    prompts, params = [[4, 5, 6]], [plain]
    for s in range(9):
        so = ({"regex": PRICE}, {"choice": CHOICES}, {"json": PERSON})[s % 3]
        prompts.append([7 + s, 8])
        params.append(SamplingParams(temperature=1.0, seed=s, max_tokens=120,
                                     structured_outputs=so))
    outs = llm.generate(prompts, params)
    assert outs[0].outputs[0].token_ids == alone
    for s, o in enumerate(outs[1:]):
        c = o.outputs[0]
        assert c.finish_reason == "stop", (s, c.text)
        if s % 3 == 0:
            assert re.fullmatch(PRICE, c.text), c.text
        elif s % 3 == 1:
            assert c.text in CHOICES
        else:
            v = json.loads(c.text)
            assert set(v) == {"name", "age"} and 0 <= v["age"] <= 120 and len(v["name"]) <= 6
