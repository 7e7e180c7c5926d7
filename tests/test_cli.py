"""The command line: the Kimi-K2.5 usage guide's server commands parse as written (kebab and snake
spellings), server flags map to ServerConfig, `bench` delegates, and for real: the ATOM entry
point serves the demo model in a subprocess, every README quick-start snippet runs against it,
SIGTERM shuts it down cleanly, and `atom-stream generate` streams in-process.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import types
from collections.abc import Iterator

import httpx
import pytest
from serving_helpers import free_port

from atom_stream import cli
from atom_stream.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUIDE_COMMANDS = [  # kimi-k25-usage-guide.md, verbatim apart from the line continuations
    "--model <path-to-Kimi-K2.5-MXFP4> --trust-remote-code -tp 8 --kv_cache_dtype fp8",
    "--model <path-to-Kimi-K2.5-W4A8> --trust-remote-code -tp 4 --kv_cache_dtype fp8",
    "--model moonshotai/Kimi-K2.5 --trust-remote-code -tp 4 --kv_cache_dtype fp8",
]


def parse(argv: str):
    args = cli.serve_parser().parse_args(shlex.split(argv))
    return cli.engine_config_from_args(args), cli.server_config_from_args(args)


@pytest.mark.parametrize("line", GUIDE_COMMANDS)
def test_usage_guide_command_lines(line):
    engine, server = parse(line)
    model = shlex.split(line)[1]
    assert engine.model == model and engine.trust_remote_code
    assert engine.tensor_parallel_size == int(line.split("-tp ")[1].split()[0])
    assert engine.kv_cache_dtype == "fp8"
    assert (server.host, server.port) == ("127.0.0.1", 8000)


def test_flag_spellings_and_server_flags():
    a, _ = parse("--kv-cache-dtype fp8 --max_num_seqs=8 --max-model-len 2048 --block_size 32 "
                 "--enforce_eager --gpu-memory-utilization 0.5 --cudagraph_capture_sizes "
                 "[1,2,4] --no-enable-prefix-caching --load_dummy --max_waiting_requests 7 "
                 "--tensor_parallel_size 2 --chat_template /tmp/t.jinja --seed 3")
    assert (a.kv_cache_dtype, a.max_num_seqs, a.max_model_len, a.block_size) == ("fp8", 8, 2048,
                                                                                 32)
    assert a.enforce_eager and a.gpu_memory_utilization == 0.5
    assert a.cudagraph_capture_sizes == [1, 2, 4] and not a.enable_prefix_caching
    assert a.load_format == "dummy" and a.max_waiting_requests == 7
    assert a.tensor_parallel_size == 2 and a.chat_template == "/tmp/t.jinja" and a.seed == 3
    b, s = parse("--server-port 9001 --host 0.0.0.0 --api-key k1 --api_key k2 "
                 "--served-model-name kimi --max-body-bytes 1000 --shutdown_timeout 5 "
                 "--log-level debug --default-chat-template-kwargs '{\"thinking\":false}' "
                 "--level 3 --cudagraph-mode FULL --no-enable_chunked_prefill")
    assert b.model == "demo" and b.served_model_name == "kimi"  # no --model: the demo model
    assert (s.host, s.port, s.api_keys) == ("0.0.0.0", 9001, ["k1", "k2"])
    assert s.served_model_name == ["kimi"] and s.max_body_bytes == 1000
    assert s.shutdown_timeout == 5 and s.log_level == "debug"
    assert s.default_chat_template_kwargs == {"thinking": False}
    assert parse("--port 1234")[1].port == 1234
    with pytest.raises(ConfigError):
        parse("-pp 2")
    with pytest.raises(SystemExit):
        parse("--kv_cache_dtype int3")
    with pytest.raises(SystemExit):
        parse("--max-num-seq 4")  # no abbreviations: a typo is an error, not a guess


def test_vllm_cors_and_prompt_tokens_details_flags():
    """vLLM's FrontendArgs: CORS lists are JSON (json.loads), default ["*"]; the bools are
    BooleanOptionalAction (--no-... too), default off."""
    _, s = parse("")
    assert (s.allowed_origins, s.allowed_methods, s.allowed_headers) == (["*"], ["*"], ["*"])
    assert not s.allow_credentials and not s.enable_prompt_tokens_details
    _, s = parse("--allowed-origins '[\"http://a.example\",\"http://b.example\"]' "
                 "--allowed_methods '[\"GET\",\"POST\"]' --allowed-headers '[\"content-type\"]' "
                 "--allow-credentials --enable_prompt_tokens_details")
    assert s.allowed_origins == ["http://a.example", "http://b.example"]
    assert s.allowed_methods == ["GET", "POST"] and s.allowed_headers == ["content-type"]
    assert s.allow_credentials and s.enable_prompt_tokens_details
    _, s = parse("--allow-credentials --no-allow-credentials --no-enable-prompt-tokens-details")
    assert not s.allow_credentials and not s.enable_prompt_tokens_details
    _, s = parse("--allowed-origins='[\"*\"]'")
    assert s.allowed_origins == ["*"]
    for bad in ("--allowed-origins http://a.example", "--allowed-origins '\"*\"'",
                "--allowed-headers '[1]'", "--enable-prompt-tokens-details=yes"):
        with pytest.raises(SystemExit):
            parse(bad)
    # the ATOM entry point's parser has them too
    args = cli.serve_parser(atom_ports=True).parse_args(["--enable-prompt-tokens-details"])
    assert cli.server_config_from_args(args).enable_prompt_tokens_details


@pytest.mark.parametrize("flag", ["--version", "-v"])
def test_version_flag(flag, capsys):
    """vLLM's main.py: `-v/--version` (action="version") prints the bare version, exit 0."""
    from atom_stream.server.app import package_version

    assert cli.main([flag]) == 0
    out = capsys.readouterr().out.strip()
    assert out == package_version() and re.fullmatch(r"\d+\.\d+\S*", out)


def test_bench_help_names_the_subcommand(monkeypatch, capsys):
    """`atom-stream bench --help` shows `usage: atom-stream bench ...` (as serve / generate do);
    the real benchmark parser, and sys.argv[0] is restored after."""
    monkeypatch.setattr(sys, "argv", ["/venv/bin/atom-stream", "bench", "--help"])
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("usage: atom-stream bench ")
    assert sys.argv[0] == "/venv/bin/atom-stream"


def test_bench_delegates(monkeypatch, capsys):
    seen = []
    fake = types.ModuleType("atom_stream.benchmarks.benchmark_serving")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "atom_stream.benchmarks.benchmark_serving", fake)
    assert cli.main(["bench", "--backend", "vllm", "--num-prompts", "3"]) == 0
    assert seen == [["--backend", "vllm", "--num-prompts", "3"]]
    assert cli.main(["frobnicate"]) == 2
    assert cli.main([]) == 2 and "serve" in capsys.readouterr().out


def _snippets(lang: str) -> list[str]:
    with open(os.path.join(ROOT, "README.md")) as f:  # the quick start as the README gives it
        text = f.read()
    text = text[text.index("## Quick start"):text.index("## Module map")]
    return re.findall(rf"```{lang}\n(.*?)```", text, re.DOTALL)


@contextlib.contextmanager
def served(argv: list[str], port: int, log_path) -> Iterator[str]:
    """Run a server command line in a subprocess until the block ends; then SIGTERM it and check
    it shut down gracefully."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        yield base
        proc.send_signal(signal.SIGTERM)
        # a graceful shutdown, then exit status 0 (vLLM's), not uvicorn's re-raised SIGTERM
        assert proc.wait(timeout=60) == 0
        text = log_path.read_text()
        assert "Application shutdown complete" in text and "Traceback" not in text, text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_quickstart_snippets_run(tmp_path):
    """The README quick start as written: its serve command (on a free port), then every snippet
    (and the SDK README's)."""
    port = free_port()
    fix = lambda s: s.replace("127.0.0.1:8000", f"127.0.0.1:{port}").replace(
        "--port 8000", f"--port {port}")
    bash = _snippets("bash")
    serve_cmd, kimi_cmd, curl, shell = bash
    assert serve_cmd.startswith("atom-stream serve") and curl.startswith("curl -N")
    # the Kimi-K2.5 launch (needs the checkpoint): parses to the usage guide's settings
    kimi = shlex.split(kimi_cmd.replace("\\\n", " "))
    assert kimi[:3] == ["python", "-m", "atom_stream.entrypoints.openai_server"]
    engine, _ = parse(shlex.join(kimi[3:]))
    assert (engine.tensor_parallel_size, engine.kv_cache_dtype) == (8, "fp8")
    assert engine.trust_remote_code
    argv = shlex.split(fix(serve_cmd))
    argv = [os.path.join(os.path.dirname(sys.executable), argv[0]), *argv[1:]]
    with served(argv, port, tmp_path / "server.log"):
        out = subprocess.run(["bash", "-c", fix(curl)], capture_output=True, timeout=120,
                             check=True).stdout
        assert out.startswith(b"data: {") and out.endswith(b"data: [DONE]\n\n")
        assert b'"usage":{"prompt_tokens"' in out
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [os.path.join(ROOT, "clients", "python"), ROOT])}
        for line in fix(shell).strip().splitlines():  # generate, then bench against it
            r = subprocess.run(["bash", "-c", line], capture_output=True, timeout=300,
                               text=True, check=False, env={**os.environ, "PATH": os.pathsep.join(
                                   [os.path.dirname(sys.executable), os.environ["PATH"]])})
            assert r.returncode == 0 and r.stdout.strip(), (line, r.stderr[-2000:])
        python = _snippets("python")
        assert len(python) == 6
        outs = []
        for snippet in python:
            r = subprocess.run([sys.executable, "-c", fix(snippet)], capture_output=True,
                               timeout=300, env=env, text=True, check=False)
            assert r.returncode == 0, r.stderr
            outs.append(r.stdout)
        assert re.search(r"\n\[\d+ tokens\]\n$", outs[0]), outs[0]  # openai: usage chunk
        assert re.search(r"\n\[(end_turn|max_tokens)\]\n$", outs[1]), outs[1]  # anthropic
        assert re.search(r"(completed|incomplete) \d+\n$", outs[2]), outs[2]  # responses
        assert re.search(r"\n\[8, 8, 8, 8, 8, 8, 8, 8\]\n$", outs[3]), outs[3]  # WS SDK
        assert re.search(r"\n\[(stop|length), \d+ tokens\]\n$", outs[4]), outs[4]  # in-process
        assert outs[5].rstrip().endswith(("stop", "length")), outs[5]  # the LLM snippet
        with open(os.path.join(ROOT, "clients", "python", "README.md")) as f:
            sdk_readme = re.findall(r"```python\n(.*?)```", f.read(), re.DOTALL)
        assert len(sdk_readme) == 2  # the WebSocket SDK, then the SSE helper
        for snippet in sdk_readme:
            r = subprocess.run([sys.executable, "-c", fix(snippet)], capture_output=True,
                               timeout=120, env=env, text=True, check=False)
            assert r.returncode == 0 and r.stdout.strip(), r.stderr


def test_atom_entrypoint_serves(tmp_path):
    """python -m atom_stream.entrypoints.openai_server with the usage guide's flags (demo model,
    one rank, a small KV pool)."""
    port = free_port()
    argv = [sys.executable, "-m", "atom_stream.entrypoints.openai_server", "--trust-remote-code",
            "-tp", "1", "--kv_cache_dtype", "fp8", "--server-port", str(port),
            "--num_kv_blocks", "512", "--log-level", "info", "--device", "cpu",
            "--disable-uvicorn-access-log"]
    with served(argv, port, tmp_path / "server.log") as base:
        r = httpx.post(base + "/v1/completions", json={"model": "demo", "prompt": "Hi",
                                                       "max_tokens": 3, "ignore_eos": True},
                       timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_generate_command():
    r = subprocess.run([sys.executable, "-m", "atom_stream", "generate", "--prompt", "Hi",
                        "--max_tokens", "4", "--device", "cpu", "--num-kv-blocks", "64"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert r.returncode == 0, r.stderr
    assert "finish_reason=length" in r.stderr and "completion_tokens=4" in r.stderr


def test_atom_port_meanings_cudagraph_none_and_load_dummy_values():
    """ATOM's entry point: HTTP on --server-port, --port is ATOM's internal engine port (unused);
    `atom-stream serve`: --port is HTTP (as `vllm serve`). --cudagraph-mode NONE means eager;
    --load_dummy takes ATOM's three values only."""
    atom = cli.serve_parser("openai_server", atom_ports=True)
    a = atom.parse_args(shlex.split("--server-port 8000 --port 8006"))
    assert cli.server_config_from_args(a).port == 8000 and a.atom_engine_port == 8006
    assert cli.server_config_from_args(atom.parse_args([])).port == 8000
    _, s = parse("--port 8006")
    assert s.port == 8006
    e, _ = parse("--cudagraph-mode NONE")
    assert e.enforce_eager
    e, _ = parse("--cudagraph_mode FULL")
    assert not e.enforce_eager
    with pytest.raises(ConfigError, match="cudagraph_mode"):
        parse("--cudagraph-mode SOMETIMES")
    e, _ = parse("--load_dummy xavier")
    assert e.load_format == "dummy"
    with pytest.raises(SystemExit):
        parse("--load_dummy banana")


def test_step_budget_flags_as_vllm():
    """--max-num-seqs above --max-num-batched-tokens is a start-up error naming both flags;
    --max-num-batched-tokens alone caps the default --max-num-seqs (vLLM's EngineArgs); with
    prefills always chunked, a budget below --max-model-len starts, chunking flag or not."""
    with pytest.raises(ConfigError, match=r"--max-num-batched-tokens or lower --max-num-seqs"):
        parse("--max-num-seqs 128 --max-num-batched-tokens 96")
    e, _ = parse("--max_num_batched_tokens=96")
    assert (e.max_num_seqs, e.max_num_batched_tokens) == (96, 96)
    e, _ = parse("")
    assert (e.max_num_seqs, e.max_num_batched_tokens) == (256, 8192)
    e, _ = parse("--no-enable-chunked-prefill --max-model-len 8192 --max-num-batched-tokens 2048")
    assert (e.max_model_len, e.max_num_batched_tokens, e.max_num_seqs) == (8192, 2048, 256)


def test_start_up_failure_is_one_line_not_a_traceback():
    """A bad --model fails start-up with one error line naming the problem, no traceback."""
    r = subprocess.run([sys.executable, "-m", "atom_stream.entrypoints.openai_server",
                        "--model", "/nonexistent/model", "--device", "cpu",
                        "--server-port", str(free_port())],
                       capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert "atom-stream could not start: ConfigError: model:" in out, out
    assert "Traceback" not in out, out


def test_hub_id_resolves_from_the_hugging_face_cache(tmp_path):
    """--model org/name (the usage guide's BF16 command form) loads the cached snapshot, offline;
    an id neither local nor cached is a ConfigError naming it."""
    import quant_writers as qw

    snap = tmp_path / "models--acme--tiny-ds" / "snapshots" / ("a" * 40)
    qw.make_tiny_hf(str(snap), "deepseek", seed=5)
    (tmp_path / "models--acme--tiny-ds" / "refs").mkdir()
    (tmp_path / "models--acme--tiny-ds" / "refs" / "main").write_text("a" * 40)
    code = ("from atom_stream import LLM, SamplingParams\n"
            "llm = LLM('acme/tiny-ds', device='cpu', dtype='float32', num_kv_blocks=32,"
            " skip_tokenizer_init=True)\n"
            "print(llm.engine.config.model)\n"
            "out = llm.generate(prompt_token_ids=[[1, 2, 3]], sampling_params=SamplingParams("
            "max_tokens=3, temperature=0, ignore_eos=True))\n"
            "print(len(out[0].token_ids))\n"
            "from atom_stream.config import ConfigError\n"
            "try:\n    LLM('acme/not-there', device='cpu')\n"
            "except ConfigError as e:\n    print('ERR', e)\n")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300, cwd=ROOT, env=env, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert lines[0] == str(snap) and lines[1] == "3", r.stdout
    assert lines[2].startswith("ERR model: 'acme/not-there' is not a local directory"), r.stdout
