"""vLLM launch flags that switch nothing here are accepted as written (vLLM's own
test_server_load launches with --enable-server-load-tracking); --uvicorn-log-level sets uvicorn's
level only."""

from __future__ import annotations

import shlex

import pytest

from atom_stream import cli


@pytest.mark.parametrize("atom_ports", [False, True])
def test_vllm_logging_and_load_flags_parse(atom_ports):
    line = ("--disable-log-stats --enable-server-load-tracking --disable-log-requests "
            "--enable-log-requests --uvicorn-log-level warning --log-level debug")
    args = cli.serve_parser(atom_ports=atom_ports).parse_args(shlex.split(line))
    assert cli.server_config_from_args(args).log_level == "warning"
    cli.engine_config_from_args(args)  # the engine config is unaffected by them


def test_uvicorn_log_level_defaults_to_log_level_and_is_checked():
    args = cli.serve_parser().parse_args(["--log-level", "error"])
    assert cli.server_config_from_args(args).log_level == "error"
    with pytest.raises(SystemExit):
        cli.serve_parser().parse_args(["--uvicorn-log-level", "loud"])
