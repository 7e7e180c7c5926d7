"""ATOM's server command line (atom.md section 2, ATOM's arg_utils.py) through both entry points:
tuning/debug flags parse in kebab and snake case and are logged as accepted with no effect;
values asking for a feature this engine lacks (context parallelism above 1, DP attention,
speculative decoding, online quantization, KV transfer, fake EPLB) stop
start-up with an error naming the flag, while their default / no-op values are accepted;
`--host` defaults to ATOM's 0.0.0.0 under the ATOM entry point and 127.0.0.1 for `serve`.
"""

from __future__ import annotations

import logging
import shlex

import pytest

from atom_stream import cli
from atom_stream.config import ConfigError
from atom_stream.entrypoints import openai_server

# each: a command-line fragment, the flag the "accepted" log line names
ACCEPTED = [
    ("-pcp 1", "-pcp/--prefill-context-parallel-size"),
    ("--prefill_context_parallel_size 1", "-pcp/--prefill-context-parallel-size"),
    ("-dcp 1", "-dcp/--decode-context-parallel-size"),
    ("--dcp-config '{\"interleave_size\": 16}'", "--dcp-config"),
    ("--dp-load-balance least_tokens", "--dp-load-balance"),
    ("--dp_load_balance round_robin", "--dp-load-balance"),
    ("--all2all-backend", "--all2all-backend"),
    ("--all2all_backend low-latency", "--all2all-backend"),
    ("--moe-backend mega", "--moe-backend"),
    ("--enable-tbo", "--enable-tbo"),
    ("--enable-tbo prefill", "--enable-tbo"),
    ("--enable_tbo all", "--enable-tbo"),
    ("--index-cache-dtype fp8", "--index-cache-dtype"),
    ("--index_cache_dtype fp4", "--index-cache-dtype"),
    ("--long-prefill-token-threshold 2048", "--long-prefill-token-threshold"),
    ("--attn-prefill-chunk-size 16384", "--attn-prefill-chunk-size"),
    ("--state-checkpoint-interval-tokens -1", "--state-checkpoint-interval-tokens"),
    ("--no-state-checkpoint-demand", "--state-checkpoint-demand"),
    ("--scheduler-delay-factor 0.5", "--scheduler-delay-factor"),
    ("--scheduler_delay_factor=0.5", "--scheduler-delay-factor"),
    ("--no-enable-log-stats", "--enable-log-stats"),
    ("--method mtp --num-speculative-tokens 0", "--method"),
    ("--num-speculative-tokens 3", "--num-speculative-tokens"),
    ("--spec-decode-acceptance-length 2.5", "--spec-decode-acceptance-length"),
    ("--dspark-config '{\"ragged\": true}'", "--dspark-config"),
    ("--online_quant_config '{}'", "--online-quant-config"),
    ("--kv-transfer-config '{}'", "--kv-transfer-config"),
    ("--enable-rapidserve --disagg-constrained", "--enable-rapidserve"),
    ("--eplb-enable", "--eplb-enable/--enable-eplb"),
    ("--enable_eplb --eplb-config '{\"num_redundant_experts\": 8}'", "--eplb-config"),
    ("--torch-profiler-dir /tmp/traces", "--torch-profiler-dir"),
    ("--mark-trace", "--mark-trace"),
    ("--level 3 --no-enable_chunked_prefill", "--enable-chunked-prefill"),
]

# each: a command-line fragment, the flag the start-up error names
REFUSED = [
    ("-pcp 2", "-pcp/--prefill-context-parallel-size 2"),
    ("-dcp 8", "-dcp/--decode-context-parallel-size 8"),
    ("--enable-dp-attention", "--enable-dp-attention"),
    ("--method mtp", "--method mtp"),
    ("--method eagle3 --num-speculative-tokens 3", "--method eagle3"),
    ("--draft-model /models/draft", "--draft-model /models/draft"),
    ("--online_quant_config '{\"global_quant_config\": \"mxfp8\"}'",
     "--online-quant-config"),
    ("--kv-transfer-config '{\"kv_role\": \"kv_producer\"}'", "--kv-transfer-config"),
    ("--fake-eplb", "--fake-eplb"),
]


def _engine(line: str, atom_ports: bool):
    args = cli.serve_parser(atom_ports=atom_ports).parse_args(shlex.split(line))
    return cli.engine_config_from_args(args)


@pytest.mark.parametrize("atom_ports", [True, False], ids=["openai_server", "serve"])
@pytest.mark.parametrize("line,flag", ACCEPTED)
def test_atom_tuning_flags_are_accepted_and_logged(line, flag, atom_ports, caplog):
    caplog.set_level(logging.INFO, logger="atom_stream.cli")
    engine = _engine(line, atom_ports)
    assert engine.model == "demo"
    logged = [r.getMessage() for r in caplog.records]
    assert any(m.startswith(f"{flag} accepted") and "no effect here" in m for m in logged), logged


def test_atom_recipe_command_line_runs_unchanged(caplog):
    """An ATOM recipe's server line (tuning flags mixed with the ones acted on) parses as
    written and keeps the flags this engine does act on."""
    caplog.set_level(logging.INFO, logger="atom_stream.cli")
    line = ("--trust-remote-code --host 0.0.0.0 --server-port 8010 --tensor-parallel-size 2 "
            "--kv-cache-dtype fp8 --index-cache-dtype fp8 --enable-prefix-caching "
            "--block-size 16 --gpu-memory-utilization 0.65 --max-num-seqs 64 "
            "--max-num-batched-tokens 16384 --attn-prefill-chunk-size 16384 "
            "--state-checkpoint-interval-tokens 8192 --level 3 --cudagraph-mode FULL "
            "-dcp 1 --dp-load-balance least_requests --moe-backend standard "
            "--all2all-backend rccl --enable-tbo prefill --kv-transfer-config '{}'")
    engine = _engine(line, atom_ports=True)
    assert (engine.tensor_parallel_size, engine.kv_cache_dtype, engine.block_size) == (2, "fp8",
                                                                                       16)
    assert engine.max_num_seqs == 64 and engine.gpu_memory_utilization == 0.65
    assert sum("accepted for ATOM compatibility" in r.getMessage() for r in caplog.records) >= 9


@pytest.mark.parametrize("line,flag", REFUSED)
def test_unsupported_atom_feature_values_fail_start_up(line, flag):
    with pytest.raises(ConfigError) as e:
        _engine(line, atom_ports=True)
    assert str(e.value).startswith(f"{flag}") and "unsupported" in str(e.value)


@pytest.mark.parametrize("line,flag", REFUSED[:4])
def test_serve_exits_with_the_flag_named_before_starting(line, flag, monkeypatch, capsys):
    """serve() (both entry points) stops with a usage error naming the flag; no server runs."""
    from atom_stream.server import app

    monkeypatch.setattr(app, "run_server", lambda *a: pytest.fail("server started"))
    for entry in (openai_server.main, lambda argv: cli.main(["serve", *argv])):
        with pytest.raises(SystemExit) as e:
            entry(shlex.split(line))
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert f"error: {flag}" in err and "unsupported" in err, err


def test_invalid_json_and_unknown_choices_are_usage_errors(capsys):
    p = cli.serve_parser(atom_ports=True)
    for line in ("--hf-overrides not-json", "--enable-tbo decode", "--moe-backend turbo",
                 "--method medusa", "-dcp two"):
        with pytest.raises(SystemExit):
            p.parse_args(shlex.split(line))
    assert "--hf-overrides" in capsys.readouterr().err


def test_host_defaults_atom_entry_point_all_interfaces_serve_loopback(monkeypatch):
    """ATOM's api_server binds 0.0.0.0 by default; `atom-stream serve` keeps 127.0.0.1 (vLLM's
    flag, here loopback); an explicit --host wins in both."""
    from atom_stream.server import app

    seen = []
    monkeypatch.setattr(app, "run_server", lambda engine, server: seen.append(server.host))
    assert openai_server.main(["--server-port", "8123"]) == 0
    assert cli.main(["serve", "--port", "8123"]) == 0
    assert openai_server.main(["--host", "127.0.0.1"]) == 0
    assert cli.main(["serve", "--host", "0.0.0.0"]) == 0
    assert seen == ["0.0.0.0", "127.0.0.1", "127.0.0.1", "0.0.0.0"]
