"""vLLM compatibility (review 25): `hf_overrides`, the `priority` request field and
`--scheduling-policy`, and the status of a request cut off by a server shutdown.

- `hf_overrides` (vLLM's LLM / EngineArgs / `--hf-overrides` JSON): applied to config.json
  before it is validated; the CLI refused any non-empty value and LLM / EngineConfig had no
  such argument.
- `priority` (vLLM's chat / completions field, LLM.generate's list): ignored over HTTP and a
  TypeError in LLM.generate; vLLM (FCFS, its default) refuses a non-zero priority with "Got
  priority N but Priority scheduling is not enabled." `--scheduling-policy` was unknown.
- An SSE stream (or a non-streaming request) still running when the server aborts it at
  shutdown ended with a 500 InternalServerError; the WebSocket twin gets 503: now 503
  ServiceUnavailableError over HTTP too.
"""

from __future__ import annotations

import concurrent.futures
import json
import shlex
import shutil
import time

import pytest
from hf_checkpoints import write_hf_checkpoint

from atom_stream import LLM, SamplingParams
from atom_stream.config import ConfigError, EngineConfig, ModelConfig

PROMPT = [11, 42, 7, 99, 3, 250, 18, 64]


# ------------------------------------------------------------------ hf_overrides
@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A 3-layer tiny checkpoint and the same weights with config.json saying 1 layer."""
    full = tmp_path_factory.mktemp("full")
    write_hf_checkpoint(str(full), "kimi", seed=7)
    one = tmp_path_factory.mktemp("one")
    shutil.copytree(full, one, dirs_exist_ok=True)
    cfg = one / "config.json"
    cfg.write_text(json.dumps(dict(json.loads(cfg.read_text()), num_hidden_layers=1)))
    return str(full), str(one)


def _llm(path: str, **kw) -> LLM:
    return LLM(model=path, device="cpu", dtype="float32", skip_tokenizer_init=True,
               max_model_len=64, num_kv_blocks=32, block_size=4, **kw)


def _greedy(llm: LLM) -> list[int]:
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    return list(llm.generate(prompt_token_ids=[PROMPT], sampling_params=params)[0].token_ids)


def test_hf_overrides_llm_runs_the_overridden_layer_count(ckpts):
    full, one = ckpts
    with _llm(one) as ref:
        expected = _greedy(ref)
    with _llm(full, hf_overrides={"num_hidden_layers": 1}) as llm:
        assert llm.engine.model_config.num_hidden_layers == 1
        assert len(llm.engine.runner.model.model.layers) == 1
        assert _greedy(llm) == expected


def test_hf_overrides_cli_flag_reaches_the_engine_config(ckpts):
    from atom_stream import cli
    from atom_stream.engine.model_runner import load_model_config

    full, _ = ckpts
    p = cli.serve_parser()
    args = p.parse_args(shlex.split(f"--model {full} --hf-overrides "
                                    "'{\"num_hidden_layers\": 1}'"))
    config = cli.engine_config_from_args(args)
    assert config.hf_overrides == {"num_hidden_layers": 1}
    assert load_model_config(config).num_hidden_layers == 1
    # snake case too (FlexibleArgumentParser), and `{}` overrides nothing
    args = p.parse_args(shlex.split(f"--model {full} --hf_overrides '{{}}'"))
    assert load_model_config(cli.engine_config_from_args(args)).num_hidden_layers == 3
    with pytest.raises(SystemExit):
        p.parse_args(["--hf-overrides", "[1, 2]"])  # a JSON object only


K25_TEXT = {"vocab_size": 320, "hidden_size": 64, "intermediate_size": 96,
            "moe_intermediate_size": 24, "num_hidden_layers": 3, "num_attention_heads": 4,
            "q_lora_rank": 32, "kv_lora_rank": 16, "qk_nope_head_dim": 16,
            "qk_rope_head_dim": 8, "v_head_dim": 16, "n_routed_experts": 8,
            "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1, "model_type": "kimi_k2",
            "rope_scaling": {"type": "yarn", "factor": 8.0, "mscale": 1.0,
                             "mscale_all_dim": 1.0, "original_max_position_embeddings": 64}}


def _k25() -> dict:
    return {"architectures": ["KimiK25ForConditionalGeneration"], "model_type": "kimi_k25",
            "text_config": json.loads(json.dumps(K25_TEXT)),
            "vision_config": {"hidden_size": 8}}


def test_hf_overrides_reach_the_nested_text_config():
    # vLLM's nested form: merged into text_config, its other keys kept
    cfg = ModelConfig.from_dict(_k25(), hf_overrides={"text_config": {"num_hidden_layers": 2}})
    assert (cfg.num_hidden_layers, cfg.hidden_size) == (2, 64)
    # a flat key of the text model reaches it too (the text model is what is served)
    cfg = ModelConfig.from_dict(_k25(), hf_overrides={"num_hidden_layers": 1,
                                                      "rms_norm_eps": 1e-3})
    assert (cfg.num_hidden_layers, cfg.rms_norm_eps) == (1, 1e-3)
    # vLLM: dicts inside a nested config merge; a top-level dict-valued field is replaced
    rope = {"type": "yarn", "factor": 2.0}
    cfg = ModelConfig.from_dict(_k25(), hf_overrides={"text_config": {"rope_scaling": rope}})
    assert (cfg.rope_scaling.factor, cfg.rope_scaling.mscale_all_dim) == (2.0, 1.0)
    cfg = ModelConfig.from_dict(_k25(), hf_overrides={"rope_scaling": rope})
    assert (cfg.rope_scaling.factor, cfg.rope_scaling.mscale_all_dim) == (2.0, 0.0)
    # a flat checkpoint: the text_config form is its top level
    flat = dict(K25_TEXT, model_type="deepseek_v3")
    assert ModelConfig.from_dict(flat, hf_overrides={"text_config": {
        "num_hidden_layers": 2}}).num_hidden_layers == 2
    raw = _k25()
    ModelConfig.from_dict(raw, hf_overrides={"num_hidden_layers": 1})
    assert raw == _k25()  # the caller's dict is not modified


def test_hf_overrides_are_validated():
    with pytest.raises(ConfigError, match="hf_overrides: must be a dict"):
        EngineConfig(hf_overrides='{"num_hidden_layers": 1}')
    with pytest.raises(ConfigError, match="hf_overrides: must be a dict"):
        EngineConfig(hf_overrides=lambda cfg: cfg)
    assert EngineConfig(hf_overrides=None).hf_overrides is None
    # applied before validation: an override producing an unsupported config is that error
    with pytest.raises(ConfigError, match="hidden_act 'gelu' is not supported"):
        ModelConfig.from_dict(_k25(), hf_overrides={"hidden_act": "gelu"})
    with pytest.raises(ConfigError, match="unsupported architecture 'LlamaForCausalLM'"):
        ModelConfig.from_dict(_k25(), hf_overrides={"architectures": ["LlamaForCausalLM"]})
    with pytest.raises(ConfigError, match=r"hf_overrides.*num_hidden_layers.*malformed"):
        ModelConfig.from_dict(_k25(), hf_overrides={"num_hidden_layers": "many"})
    with pytest.raises(ConfigError, match=r"hf_overrides: text_config must be a dict"):
        ModelConfig.from_dict(_k25(), hf_overrides={"text_config": 3})


def test_hf_overrides_reach_async_engine_and_tp_ranks():
    """AsyncEngine(EngineConfig(hf_overrides=...)) with 2 TP ranks (the workers get the
    EngineConfig, engine/distributed.py): the demo model with 1 layer, rank 1 included (its
    tokens are the single-rank ones)."""
    import asyncio

    from atom_stream import AsyncEngine

    kw = {"model": "demo", "device": "cpu", "dtype": "float32", "num_kv_blocks": 32,
          "block_size": 4, "max_model_len": 64, "hf_overrides": {"num_hidden_layers": 1}}
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    with LLM(**kw) as one:
        expected = _greedy(one)

    async def run() -> tuple[int, list[int]]:
        async with AsyncEngine(EngineConfig(tensor_parallel_size=2, **kw)) as engine:
            ids: list[int] = []
            async for out in engine.generate(PROMPT, params):
                ids += out.token_ids
            return engine.model_config.num_hidden_layers, ids

    assert asyncio.run(run()) == (1, expected)


# ------------------------------------------------------------------ priority / scheduling policy
@pytest.mark.parametrize("route,body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/completions", {"prompt": "hi"}),
])
def test_request_priority_zero_accepted_nonzero_refused(http, route, body):
    body = dict(body, max_tokens=2)
    for ok in (0, None):
        assert http.post(route, json=dict(body, priority=ok)).status_code == 200
    r = http.post(route, json=dict(body, priority=3))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "priority" and err["code"] == 400
    assert "Got priority 3 but Priority scheduling is not enabled" in err["message"]
    assert http.post(route, json=dict(body, priority="high")).status_code == 400


def test_llm_generate_priority(llm):
    params = SamplingParams(temperature=0, max_tokens=2)
    outs = llm.generate(["a", "b"], params, priority=[0, 0])
    assert len(outs) == 2
    with pytest.raises(ValueError, match="Got priority 1 but Priority scheduling is not enabled"):
        llm.generate(["a", "b"], params, priority=[0, 1])
    with pytest.raises(ValueError, match="priority"):
        llm.generate(["a", "b"], params, priority=[0])
    assert not llm.engine.has_unfinished_requests()


async def test_async_engine_generate_priority():
    """AsyncEngine.generate(priority=) as vLLM's AsyncLLM: 0 runs, anything else is refused
    with vLLM's message before any work."""
    from atom_stream import AsyncEngine, EngineConfig
    from atom_stream.errors import InvalidRequestError

    params = SamplingParams(temperature=0, max_tokens=2)
    async with AsyncEngine(EngineConfig(device="cpu", num_kv_blocks=32)) as engine:
        outs = [o async for o in engine.generate([1, 2, 3], params, priority=0)]
        assert outs[-1].finish_reason == "length"
        with pytest.raises(InvalidRequestError, match="Got priority 2 but Priority"):
            async for _ in engine.generate([1, 2, 3], params, priority=2):
                pass
        # vLLM's lora_request keyword: None runs, an adapter is refused (none are served)
        outs = [o async for o in engine.generate([1, 2], params, lora_request=None)]
        assert outs[-1].finish_reason == "length"
        with pytest.raises(InvalidRequestError, match="lora_request"):
            async for _ in engine.generate([1, 2], params, lora_request=object()):
                pass
        assert engine.stats()["num_running"] == 0


def test_scheduling_policy_flag():
    from atom_stream import cli

    p = cli.serve_parser()
    cfg = cli.engine_config_from_args(p.parse_args(["--scheduling-policy", "fcfs"]))
    assert cfg.scheduling_policy == "fcfs"
    assert cli.engine_config_from_args(p.parse_args([])).scheduling_policy == "fcfs"
    with pytest.raises(ConfigError, match="--scheduling-policy priority"):
        cli.engine_config_from_args(p.parse_args(["--scheduling_policy", "priority"]))
    with pytest.raises(SystemExit):
        p.parse_args(["--scheduling-policy", "lifo"])
    with pytest.raises(ConfigError, match="scheduling_policy"):
        EngineConfig(scheduling_policy="priority")


# ------------------------------------------------------------------ shutdown aborts: 503
def _wait_running(srv, n: int) -> None:
    deadline = time.monotonic() + 30
    while srv.stats()["num_running"] < n:
        assert time.monotonic() < deadline
        time.sleep(0.02)


def _error_event(text: str) -> dict:
    assert text.endswith("data: [DONE]\n\n"), text[-300:]
    return json.loads(text.rsplit("data: ", 2)[-2])["error"]


def test_request_aborted_at_shutdown_is_503(srv, http):
    """The deadline abort of a shutdown (server/app.py _abort_before_deadline: abort_all) ends
    an SSE stream (chat and completions) with a 503 error event, then [DONE], and a
    non-streaming request with a 503 response."""
    long = {"max_tokens": 3000, "ignore_eos": True}
    chat = dict(long, messages=[{"role": "user", "content": "hi"}], stream=True)
    comp = dict(long, prompt="go", stream=True)
    with concurrent.futures.ThreadPoolExecutor(1) as pool, \
            http.stream("POST", "/v1/chat/completions", json=chat) as r1, \
            http.stream("POST", "/v1/completions", json=comp) as r2:
        plain = pool.submit(http.post, "/v1/completions", json=dict(long, prompt="go"))
        it1, it2 = r1.iter_text(), r2.iter_text()
        texts = [next(it1), next(it2)]
        _wait_running(srv, 3)
        srv.call(srv.engine.abort_all())
        texts = [texts[0] + "".join(it1), texts[1] + "".join(it2)]
        resp = plain.result(60)
    for text in texts:
        assert _error_event(text) == {
            "message": "the request was aborted (server shutting down)",
            "type": "ServiceUnavailableError", "param": None, "code": 503}
    assert resp.status_code == 503, resp.text
    assert resp.json()["error"]["type"] == "ServiceUnavailableError"
