"""Review 26 sweep of the in-process contracts (DESIGN.md "Interfaces"), written as black-box
checks: `await engine.abort(id)` / `abort_all()` return with the request's KV blocks free even
when they land while a step runs; `LLM(model=<checkpoint dir without tokenizer files>)` serves
token-id prompts (greedy tokens equal transformers' greedy generate) instead of failing to load
a tokenizer; engine keywords are validated naming the field and have their effect (seed, small
KV pool -> preemption with unchanged output, max_model_len, kv_cache_dtype fp8); the usage
guide's command lines parse with both flag spellings."""

from __future__ import annotations

import asyncio
import shlex

import pytest
import torch
from hf_checkpoints import write_hf_checkpoint
from test_review25_engine import fake_engine, greedy

from atom_stream import LLM, AsyncEngine, EngineConfig, SamplingParams
from atom_stream.cli import engine_config_from_args, serve_parser
from atom_stream.config import ConfigError
from atom_stream.errors import PromptTooLongError

# ---------------------------------------------------------------- abort frees blocks at once


async def _until_in_step(engine, timeout: float = 5.0) -> None:
    """Return while a step runs in the step thread (polled: a loaded host may be slow to
    start the next one); the caller then acts before yielding to the loop again."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not engine._in_step:
        assert loop.time() < deadline, "no step started"
        await asyncio.sleep(0.005)


async def test_abort_mid_step_returns_with_the_blocks_free():
    async with fake_engine(num_kv_blocks=32, delay=0.08) as engine:
        bm = engine.core.block_manager
        idle = bm.num_free_blocks
        stream = engine.generate(list(range(40, 63)), greedy(64), "mid-step")
        await stream.__anext__()
        await _until_in_step(engine)  # the next step is running in the step thread now
        assert bm.num_used > 0
        await engine.abort("mid-step")
        assert bm.num_used == 0 and bm.num_free_blocks == idle  # DESIGN: abort frees them
        rest = [o async for o in stream]
        assert rest[-1].finish_reason == "abort"


async def test_abort_all_mid_step_returns_with_the_blocks_free():
    async with fake_engine(num_kv_blocks=32, delay=0.08) as engine:
        bm = engine.core.block_manager
        streams = [engine.generate([7 + i] * 20, greedy(64), f"all-{i}") for i in range(2)]
        for s in streams:
            await s.__anext__()
        await _until_in_step(engine)
        assert await engine.abort_all() == 2
        assert bm.num_used == 0
        for s in streams:
            assert [o async for o in s][-1].finish_reason == "abort"


async def test_abort_mid_step_returns_when_the_loop_dies_in_that_step():
    async with fake_engine(num_kv_blocks=32, delay=0.08) as engine:
        stream = engine.generate(list(range(10, 30)), greedy(64), "dies")
        await stream.__anext__()
        await _until_in_step(engine)

        def broken(*_a, **_kw):
            raise RuntimeError("postprocess broke")

        engine.core.postprocess = broken  # the loop itself dies when this step returns
        await asyncio.wait_for(engine.abort("dies"), 5)  # released, not left waiting
        assert engine.is_dead
        await asyncio.wait_for(engine.abort("dies"), 1)  # a later abort returns too


async def test_break_frees_blocks_and_engine_keeps_serving():
    async with AsyncEngine(EngineConfig(model="demo", num_kv_blocks=24, block_size=4,
                                        enable_prefix_caching=False)) as engine:
        bm = engine.core.block_manager
        idle = bm.num_free_blocks
        got = 0
        async for out in engine.generate("break out of this stream", greedy(80)):
            got += len(out.token_ids)
            if got >= 2:
                break
        for _ in range(200):
            if bm.num_used == 0:
                break
            await asyncio.sleep(0.01)
        assert bm.num_free_blocks == idle and engine.stats()["num_streams"] == 0
        outs = [o async for o in engine.generate([5, 6, 7], greedy(3), None)]
        assert outs[-1].finish_reason == "length" and outs[-1].usage.total_tokens == 6


# ---------------------------------------------------------------- a real tiny checkpoint


@pytest.fixture(scope="module")
def kimi_ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("sweep26-ckpt"))
    hf = write_hf_checkpoint(path, "kimi", seed=26)
    return path, hf


def _hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_checkpoint_without_tokenizer_files_serves_token_ids(kimi_ckpt):
    path, hf = kimi_ckpt
    prompts = [[11, 250, 3, 97, 140], [301, 8, 8, 64]]
    with LLM(model=path, dtype="float32", num_kv_blocks=32, block_size=4) as llm:
        outs = llm.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(
            temperature=0, max_tokens=6, ignore_eos=True))
        assert [o.token_ids for o in outs] == [_hf_greedy(hf, p, 6) for p in prompts]
        assert all(o.finish_reason == "length" for o in outs)
        with pytest.raises(ValueError, match="tokenizer"):  # text needs one: a clear error
            llm.generate("hello", SamplingParams(max_tokens=2))


async def test_async_engine_on_a_checkpoint_without_tokenizer_files(kimi_ckpt):
    """AsyncEngine (and the server built on it) takes such a checkpoint as LLM does."""
    from atom_stream import AsyncEngine
    from atom_stream.config import EngineConfig
    from atom_stream.errors import InvalidRequestError
    path, hf = kimi_ckpt
    prompt = [17, 240, 5, 99]
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    cfg = EngineConfig(model=path, dtype="float32", num_kv_blocks=32, block_size=4)
    async with AsyncEngine(cfg) as engine:
        got = [t async for o in engine.generate(prompt, params) for t in o.token_ids]
        assert got == _hf_greedy(hf, prompt, 5)
        with pytest.raises(InvalidRequestError, match="tokenizer"):
            async for _ in engine.generate("hello", params):
                pass


def test_checkpoint_tokenizer_errors_still_raise_when_files_exist(kimi_ckpt, tmp_path):
    import shutil

    path, _ = kimi_ckpt
    broken = str(tmp_path / "broken")
    shutil.copytree(path, broken)
    with open(f"{broken}/tokenizer.json", "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match="tokenizer"):
        LLM(model=broken, dtype="float32", num_kv_blocks=16, block_size=4)


# ---------------------------------------------------------------- engine keywords


@pytest.mark.parametrize("field,value", [
    ("tensor_parallel_size", 0), ("kv_cache_dtype", "int4"), ("dtype", "float64"),
    ("device", "tpu"), ("block_size", 12), ("max_num_seqs", 0), ("max_num_batched_tokens", -1),
    ("max_model_len", 0), ("gpu_memory_utilization", 1.5), ("num_kv_blocks", 0),
    ("enforce_eager", "sometimes"), ("cudagraph_capture_sizes", [0, 2]),
    ("load_format", "pt-bin"), ("trust_remote_code", "x"), ("enable_prefix_caching", "x"),
    ("seed", "abc"),
])
def test_bad_engine_keyword_is_a_value_error_naming_it(field, value):
    with pytest.raises(ValueError, match=field):
        LLM(model="demo", **{field: value})


def test_seed_small_pool_and_max_model_len_have_their_effect():
    params = SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True)
    prompts = ["one two three four", "five six seven", "eight nine ten eleven!"]
    runs = []
    for seed in (3, 3, 4):
        with LLM(model="demo", seed=seed, num_kv_blocks=64) as llm:
            runs.append([o.token_ids for o in llm.generate(prompts, params)])
    assert runs[0] == runs[1] and runs[0] != runs[2]
    g = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)
    with LLM(model="demo", num_kv_blocks=64) as llm:
        want = [o.token_ids for o in llm.generate(prompts, g)]
    with LLM(model="demo", num_kv_blocks=9, block_size=4) as llm:  # 36 slots, 3 x ~34 needed
        assert [o.token_ids for o in llm.generate(prompts, g)] == want
        assert llm.llm_engine.stats()["num_preemptions"] > 0
        assert llm.llm_engine.block_manager.num_used == 0
    with LLM(model="demo", max_model_len=12, kv_cache_dtype="fp8") as llm:
        out = llm.generate(prompt_token_ids=[[1, 2, 3, 4, 5]], sampling_params=g)[0]
        assert len(out.token_ids) == 7 and out.finish_reason == "length"
        with pytest.raises(PromptTooLongError):
            llm.generate(prompt_token_ids=[list(range(1, 14))], sampling_params=g)


# ---------------------------------------------------------------- CLI command lines

GUIDE = "--model /ckpt/Kimi-K2.5-MXFP4 --trust-remote-code -tp 8 --kv_cache_dtype fp8"


@pytest.mark.parametrize("line,want", [
    (GUIDE, {"tensor_parallel_size": 8, "kv_cache_dtype": "fp8", "trust_remote_code": True}),
    ("--model m --kv-cache-dtype fp8 --tensor-parallel-size 4 --max-model-len 512",
     {"tensor_parallel_size": 4, "kv_cache_dtype": "fp8", "max_model_len": 512}),
    (("--model m --num_kv_blocks 40 --block_size 32 --enforce_eager --load_format dummy"
      " --cudagraph-capture-sizes [1,2,4] --no-enable_prefix_caching --seed 9 --dtype bf16"),
     {"num_kv_blocks": 40, "block_size": 32, "enforce_eager": True, "load_format": "dummy",
      "cudagraph_capture_sizes": [1, 2, 4], "enable_prefix_caching": False, "seed": 9,
      "dtype": "bfloat16"}),
])
def test_cli_lines_parse_to_the_engine_keywords(line, want):
    cfg = engine_config_from_args(serve_parser(atom_ports=True).parse_args(shlex.split(line)))
    assert {k: getattr(cfg, k) for k in want} == want
    assert isinstance(cfg, EngineConfig)


def test_cli_bad_value_names_the_flag(capsys):
    args = serve_parser().parse_args(["--model", "m", "--block-size", "12"])
    with pytest.raises(ConfigError, match="block_size"):
        engine_config_from_args(args)


# ---------------------------------------------------------------- vLLM engine keywords


def test_vllm_engine_keywords_without_effect_here_are_accepted(caplog):
    caplog.set_level("INFO", logger="atom_stream.config")
    cfg = EngineConfig.from_kwargs(model="demo", disable_log_stats=True, swap_space=4,
                                   enable_chunked_prefill=True, tokenizer_mode="auto",
                                   quantization=None, revision=None, max_logprobs=20,
                                   distributed_executor_backend="mp", pipeline_parallel_size=1,
                                   disable_custom_all_reduce=True, cpu_offload_gb=0)
    assert cfg.model == "demo" and "swap_space" in caplog.text
    with LLM(model="demo", disable_log_stats=True, enable_chunked_prefill=True) as llm:
        assert llm.generate("hi", greedy(2))[0].finish_reason == "length"


@pytest.mark.parametrize("field,value", [
    ("pipeline_parallel_size", 2), ("revision", "main"),
    ("distributed_executor_backend", "ray"), ("cpu_offload_gb", 8), ("max_logprobs", 50),
    ("tokenizer_mode", "mistral"), ("no_such_argument", 1),
])
def test_vllm_engine_keywords_asking_for_more_are_refused_by_name(field, value):
    with pytest.raises(ConfigError, match=f"^{field}"):
        EngineConfig.from_kwargs(**{field: value})
