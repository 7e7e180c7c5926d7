"""Session 23 API review: EngineConfig / CLI / benchmark flag forms and vLLM's LLM surface.

- EngineConfig refuses a non-positive `kv_cache_memory_bytes` (0 used to mean the default
  silently, -1 failed later blaming gpu_memory_utilization) and non-string text fields; a
  pathlib.Path model is read as its string.
- `--cudagraph-capture-sizes` takes vLLM's space-separated form (`1 2 4`) besides ATOM's one
  JSON-ish argument.
- the serving benchmark accepts snake_case flags, as vLLM's (FlexibleArgumentParser).
- `LLM.generate` takes vLLM's `lora_request` (None only) and its outputs carry vLLM's `prompt`
  (`output.prompt`, as vLLM's quickstart reads it), outside the struct's encoded fields.
"""

from __future__ import annotations

import pathlib
import shlex

import msgspec
import pytest

from atom_stream import LLM, EngineConfig, SamplingParams
from atom_stream.benchmarks.benchmark_serving import parse_args as bench_args
from atom_stream.cli import engine_config_from_args, serve_parser
from atom_stream.config import ConfigError
from atom_stream.engine.outputs import RequestOutput
from atom_stream.errors import InvalidRequestError


@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_kv_cache_memory_bytes_must_be_positive(value):
    with pytest.raises(ConfigError, match="kv_cache_memory_bytes"):
        EngineConfig(kv_cache_memory_bytes=value)
    args = serve_parser().parse_args(["--kv-cache-memory-bytes", "-1"])
    with pytest.raises(ConfigError, match="kv_cache_memory_bytes"):
        engine_config_from_args(args)
    assert EngineConfig(kv_cache_memory_bytes=1 << 20).kv_cache_memory_bytes == 1 << 20


@pytest.mark.parametrize("name", ["model", "tokenizer", "served_model_name", "chat_template"])
def test_text_fields_must_be_strings(name):
    with pytest.raises(ConfigError, match=name):
        EngineConfig(**{name: 5})


def test_path_model_is_read_as_its_string(tmp_path):
    cfg = EngineConfig(model=pathlib.Path(tmp_path), tokenizer=pathlib.Path(tmp_path))
    assert cfg.model == str(tmp_path) and cfg.tokenizer == str(tmp_path)


@pytest.mark.parametrize("argv", [
    "--cudagraph-capture-sizes 1 2 4",       # vLLM: nargs="+"
    "--cudagraph_capture_sizes [1, 2, 4]",   # an unquoted list, split by the shell
    "--cudagraph-capture-sizes [1,2,4]",     # ATOM's form
    "--cudagraph-capture-sizes=1,2,4",
])
def test_cudagraph_capture_sizes_forms(argv):
    args = serve_parser(atom_ports=True).parse_args(["--model", "/m", *shlex.split(argv)])
    assert engine_config_from_args(args).cudagraph_capture_sizes == [1, 2, 4]


def test_cudagraph_capture_sizes_bad_values_exit():
    with pytest.raises(SystemExit):
        serve_parser().parse_args(["--cudagraph-capture-sizes", "1", "x"])


def test_bench_accepts_snake_case_flags():
    a = bench_args(["--model=/m", "--random_input_len=5", "--num_prompts", "3",
                    "--percentile_metrics=ttft,e2el", "--ignore_eos"])
    assert (a.random_input_len, a.num_prompts, a.ignore_eos) == (5, 3, True)
    assert a.percentile_metrics_list == ["ttft", "e2el"]


@pytest.fixture(scope="module")
def llm():
    with LLM(num_kv_blocks=32, max_model_len=256) as llm:
        yield llm


def test_generate_takes_vllm_lora_request(llm):
    g = SamplingParams(max_tokens=2, temperature=0)
    assert llm.generate("Hi", g, lora_request=None)[0].finish_reason == "length"
    with pytest.raises(InvalidRequestError) as e:
        llm.generate("Hi", g, lora_request=object())
    assert e.value.param == "lora_request"


def test_outputs_carry_vllm_prompt(llm):
    g = SamplingParams(max_tokens=2, temperature=0)
    outs = llm.generate(["Hello", {"prompt": "Hi"}, [65, 66], {"prompt_token_ids": [67]}], g)
    assert [o.prompt for o in outs] == ["Hello", "Hi", None, None]
    assert llm.generate(prompt_token_ids=[65], sampling_params=g)[0].prompt is None
    (multi,) = llm.generate("Hey", SamplingParams(n=2, max_tokens=2))
    assert multi.prompt == "Hey" and len(multi.outputs) == 2
    (chat,) = llm.chat([{"role": "user", "content": "hi"}], g)
    assert chat.prompt == llm.tokenizer.decode(chat.prompt_token_ids, skip_special_tokens=False)
    assert "hi" in chat.prompt
    # not an encoded field: stream deltas and their wire form are unchanged
    wire = msgspec.json.decode(msgspec.json.encode(outs[0]))
    assert "prompt" not in wire and "_prompt" not in wire
    assert RequestOutput("r").prompt is None


@pytest.mark.parametrize("name", ["ws_ping_interval", "ws_ping_timeout", "ws_auth_timeout_s",
                                  "shutdown_timeout", "timeout_keep_alive"])
def test_server_config_refuses_negative_times(name):
    from atom_stream.server.app import ServerConfig
    with pytest.raises(ValueError, match=name):
        ServerConfig(**{name: -1})
    assert getattr(ServerConfig(**{name: 0}), name) == 0


@pytest.mark.parametrize("device,given,want", [("cuda", None, 10), ("cuda", 4096, 4),
                                               ("cpu", 4096, 4)])
def test_kv_cache_memory_bytes_sizes_the_pool_on_gpus_too(device, given, want):
    """vLLM's --kv-cache-memory-bytes overrides gpu_memory_utilization's sizing: the pool's
    block count follows it on a GPU as on the CPU (the profile still runs: its forwards
    compile the kernels). Driven through ModelRunner._num_kv_blocks with a stand-in runner."""
    import types

    import torch

    from atom_stream.engine.model_runner import ModelRunner
    profiled = []
    runner = types.SimpleNamespace(
        config=EngineConfig(kv_cache_memory_bytes=given, max_num_seqs=64),
        model_config=types.SimpleNamespace(kv_cache_dim=8, num_hidden_layers=4),
        block_size=16, kv_dtype=torch.bfloat16, device=torch.device(device),
        max_model_len=1024, tp_info=types.SimpleNamespace(size=1),
        _profile_kv_budget=lambda: profiled.append(1) or 10 * 16 * 8 * 4 * 2)
    # bytes per block: 16 tokens x 8 x 4 layers x 2 bytes = 1024
    assert ModelRunner._num_kv_blocks(runner) == want
    assert profiled == ([1] if device == "cuda" else [])


async def test_abort_while_the_prompt_is_tokenized_never_starts_it():
    """AsyncEngine.abort(id) while that request's prompt is still being tokenized (off the loop
    for long prompts) used to find no live request: the request then ran in full. Now its
    stream ends with one "abort" delta, nothing reaches the core, and the id is free again."""
    import asyncio

    from atom_stream import AsyncEngine, SamplingParams
    gate = asyncio.Event()
    async with AsyncEngine(model="demo", device="cpu", num_kv_blocks=64) as engine:
        real = engine.tokenize_prompt

        async def slow(*a, **k):
            await gate.wait()
            return await real(*a, **k)

        engine.tokenize_prompt = slow
        outs = []

        async def consume():
            async for o in engine.generate("hello there", SamplingParams(max_tokens=8),
                                           request_id="r1"):
                outs.append(o)

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.05)
        await engine.abort("r1")
        gate.set()
        await asyncio.wait_for(task, 30)
        assert [o.finish_reason for o in outs] == ["abort"] and outs[0].token_ids == []
        assert outs[0].usage.completion_tokens == 0 and outs[0].usage.prompt_tokens > 0
        assert not engine.core.requests and engine.core.scheduler.bm.usage == 0
        engine.tokenize_prompt = real
        final = [o async for o in engine.generate("hello", SamplingParams(
            max_tokens=3, ignore_eos=True), request_id="r1")][-1]
        assert final.finish_reason == "length"


def test_generate_cli_errors_are_one_line(tmp_path, capsys):
    """`atom-stream generate` with a model that cannot load prints one line and exits 3 (as
    serve does), and refuses a prompt given twice."""
    from atom_stream import cli
    assert cli.main(["generate", "--model", str(tmp_path / "nowhere"), "Hi"]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ConfigError" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        cli.main(["generate", "a", "--prompt", "b"])
    assert "not both" in capsys.readouterr().err
