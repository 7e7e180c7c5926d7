"""`atom-stream serve | generate | bench` and the ATOM-compatible server entry point.

    atom-stream serve --model <path> --trust-remote-code -tp 8 --kv_cache_dtype fp8
    python -m atom_stream.entrypoints.openai_server --model <path> -tp 4 --kv_cache_dtype fp8
    atom-stream generate --prompt "Hello" --max-tokens 32
    atom-stream bench <benchmark_serving flags>
    atom-stream serve --model <path> -tp 16 --nnodes 2 --node-rank 1 --dist-init-addr A:P --headless

Engine flags are EngineConfig's field names (`--max-num-seqs` == `max_num_seqs`). As ATOM's
FlexibleArgumentParser does, every long flag is accepted in kebab-case and snake_case
(`--kv_cache_dtype` == `--kv-cache-dtype`, also in `--flag=value` form). Server flags: `--host`
(127.0.0.1; 0.0.0.0 under the ATOM entry point, as ATOM), `--port`/`--server-port` (8000; under
the ATOM entry point `--port` is ATOM's internal engine port, unused, and HTTP is
`--server-port`), `--served-model-name`, `--api-key`,
`--chat-template`, `--default-chat-template-kwargs` (JSON), `--max-waiting-requests`,
`--max-body-bytes`, `--max-header-bytes`, `--shutdown-timeout`, `--log-level`,
`--uvicorn-log-level` (uvicorn's own; default `--log-level`), vLLM's no-op `--disable-log-stats`,
`--[disable|enable]-log-requests`, `--[no-]enable-server-load-tracking` (/load always tracks),
`--timeout-keep-alive`, `--disable-uvicorn-access-log`, WebSocket limits, vLLM's CORS flags
(`--allowed-origins`, `--allowed-methods`, `--allowed-headers`: JSON lists, default '["*"]';
`--[no-]allow-credentials`), `--[no-]enable-prompt-tokens-details`,
`--[no-]enable-request-id-headers` and vLLM's `--enable-auto-tool-choice`,
`--tool-call-parser {kimi_k2,deepseek_v3,deepseek_v31}`,
`--reasoning-parser {kimi_k2,deepseek_r1,deepseek_v3}` (an unknown name is a start-up error
listing the known ones). `atom-stream -v | --version` prints
the version (as `vllm --version`). ATOM flags that select features this engine always has or
does not offer (atom_flags.ATOM_FLAGS: `--level`, `--[no-]enable_chunked_prefill`, `-pcp`/`-dcp` 1,
`--dcp-config`, `--dp-load-balance`, `--all2all-backend`, `--moe-backend`, `--enable-tbo`,
`--index-cache-dtype`, `--long-prefill-token-threshold`, `--attn-prefill-chunk-size`,
`--state-checkpoint-*`, `--scheduler-delay-factor`, log-stats knobs, `--enable-rapidserve`,
`--disagg-*`, `--eplb-enable`, `--eplb-config`, `--torch-profiler-dir`, `--mark-trace`, and
`--num-speculative-tokens`, `--spec-decode-acceptance-*`, `--dspark-config` without `--method`;
also `--cudagraph-mode` and `--request-log`) are accepted and logged (`--cudagraph-mode NONE`
means `--enforce-eager`). A value that asks for what this engine does not implement is a
start-up error naming the flag: `-pcp`/`-dcp` other than 1, `--enable-dp-attention`,
`--method` (speculative decoding, unless `--num-speculative-tokens 0`), `--draft-model`,
`--fake-eplb`, and a non-empty `--kv-transfer-config` (`{}` is accepted).
ATOM's `--online_quant_config JSON` quantizes the checkpoint's unquantized Linear layers at load
(ptpc_fp8 / per_block_fp8; layers/quant/online.py; mxfp4 / mxfp8 targets are a start-up
error). `--load_dummy` means `--load-format dummy`.
vLLM's `--hf-overrides JSON` overrides config.json fields (config.apply_hf_overrides), and
`--scheduling-policy fcfs` is accepted (`priority` is a start-up error: not implemented).
`--cudagraph-capture-sizes` takes ATOM's one list argument or vLLM's several.
No `--model`: the demo model.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from atom_stream import envs
from atom_stream.atom_flags import add_atom_flags, check_atom_flags, json_dict
from atom_stream.config import _DTYPE_ALIASES, _DTYPES, ConfigError, EngineConfig

logger = logging.getLogger("atom_stream.cli")


class FlexibleArgumentParser(argparse.ArgumentParser):
    """argparse that reads `--foo_bar` as `--foo-bar` (flag names only, never values)."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    @staticmethod
    def normalize(args: Sequence[str]) -> list[str]:
        out = []
        for a in args:
            if a.startswith("--") and len(a) > 2:
                name, eq, value = a.partition("=")
                a = name.replace("_", "-") + eq + value
            out.append(a)
        return out

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None):
        if args is None:
            args = sys.argv[1:]
        return super().parse_known_args(self.normalize(args), namespace)


class _IntListAction(argparse.Action):
    """`--cudagraph-capture-sizes` in every form users type: ATOM's one JSON-ish argument
    (`"[1,2,4]"`, `1,2,4`, `"1 2 4"`) and vLLM's several (`1 2 4`, nargs="+"; also an unquoted
    `[1, 2, 4]` that the shell split): the arguments are joined with spaces and read by
    `_int_list`."""

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            setattr(namespace, self.dest, _int_list(" ".join(values)))
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentError(self, str(e)) from None


def _int_list(text: str) -> list[int]:
    """`[1,2,4]`, `1,2,4` or `1 2 4` -> [1, 2, 4] (ATOM passes a JSON-ish list)."""
    text = text.strip()
    try:
        value = json.loads(text) if text.startswith("[") else [
            int(x) for x in text.replace(",", " ").split()]
    except (ValueError, json.JSONDecodeError):
        raise argparse.ArgumentTypeError(f"expected a list of integers, got {text!r}") from None
    if not isinstance(value, list) or not all(isinstance(v, int) for v in value):
        raise argparse.ArgumentTypeError(f"expected a list of integers, got {text!r}")
    return value


def _json_str_list(text: str) -> list[str]:
    """vLLM's `type=json.loads` for --allowed-origins/methods/headers, kept to lists of strings
    (a bare string would reach CORSMiddleware and be read character by character)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON list such as '[\"*\"]': {e}"
                                         ) from None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise argparse.ArgumentTypeError(f"expected a JSON list of strings, got {text!r}")
    return value


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _env_port() -> int | None:
    """MASTER_PORT (torch.distributed's variable) as the --master-port default."""
    value = envs.text("MASTER_PORT")
    return int(value) if value and value.isdigit() else None


def add_engine_args(p: argparse.ArgumentParser) -> None:
    d = EngineConfig.__dataclass_fields__
    g = p.add_argument_group("engine")
    g.add_argument("--model", default=None,
                   help="checkpoint directory or HF-style path; omitted: the embedded demo model")
    g.add_argument("--tokenizer", default=None)
    g.add_argument("--trust-remote-code", action="store_true")
    g.add_argument("-tp", "--tensor-parallel-size", type=int,
                   default=d["tensor_parallel_size"].default)
    g.add_argument("-dp", "--data-parallel-size", type=int,
                   default=d["data_parallel_size"].default)
    g.add_argument("-pp", "--pipeline-parallel-size", type=int, default=1,
                   help="accepted for ATOM compatibility; only 1 is supported")
    g.add_argument("--enable-expert-parallel", action="store_true")
    # multi-node (engine/multinode.py, docs/MULTINODE.md); vLLM's and SGLang's spellings
    g.add_argument("--nnodes", type=int, default=d["nnodes"].default)
    g.add_argument("--node-rank", type=int, default=d["node_rank"].default)
    g.add_argument("--master-addr", default=envs.text("MASTER_ADDR"),
                   help="node 0's address (default: $MASTER_ADDR)")
    g.add_argument("--master-port", type=int, default=_env_port(),
                   help="rendezvous port on node 0 (default: $MASTER_PORT)")
    g.add_argument("--dist-init-addr", type=_host_port, default=None,
                   help="HOST:PORT, the same as --master-addr HOST --master-port PORT")
    g.add_argument("--headless", action="store_true",
                   help="nodes 1..nnodes-1: run this node's TP ranks only, no server")
    g.add_argument("--kv-cache-dtype", default=d["kv_cache_dtype"].default,
                   choices=["auto", "bf16", "fp8", "fp8_e4m3"])
    g.add_argument("--dtype", default=d["dtype"].default,
                   choices=[*_DTYPES, *_DTYPE_ALIASES])
    g.add_argument("--device", default=d["device"].default, help="auto | cpu | cuda | cuda:N")
    g.add_argument("--block-size", type=int, default=d["block_size"].default)
    g.add_argument("--max-num-seqs", type=int, default=d["max_num_seqs"].default,
                   help=f"running sequences (default: {EngineConfig.DEFAULT_MAX_NUM_SEQS}, or "
                   "--max-num-batched-tokens when smaller; above it: a start-up error)")
    g.add_argument("--max-num-batched-tokens", type=int,
                   default=d["max_num_batched_tokens"].default)
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--gpu-memory-utilization", type=float,
                   default=d["gpu_memory_utilization"].default)
    g.add_argument("--num-kv-blocks", type=int, default=None)
    g.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    g.add_argument("--enforce-eager", action="store_true")
    g.add_argument("--cudagraph-capture-sizes", nargs="+", action=_IntListAction, default=None,
                   metavar="SIZE", help='decode graph batch sizes: "[1,2,4]", 1,2,4 or 1 2 4')
    g.add_argument("--load-format", default=d["load_format"].default,
                   choices=["auto", "dummy", "safetensors"])
    g.add_argument("--load-dummy", nargs="?", const="empty", default=None,
                   choices=["empty", "zero", "xavier"],
                   help="ATOM spelling of --load-format dummy (weights are random either way)")
    g.add_argument("--enable-prefix-caching", dest="enable_prefix_caching",
                   action="store_true", default=d["enable_prefix_caching"].default)
    g.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching",
                   action="store_false")
    g.add_argument("--async-scheduling", dest="async_scheduling", action="store_true",
                   default=None, help="schedule step N+1 before step N's tokens reach the host "
                   "(default: on for a single rank)")
    g.add_argument("--no-async-scheduling", dest="async_scheduling", action="store_false")
    g.add_argument("--watchdog-timeout", type=float, default=d["watchdog_timeout"].default,
                   help="TP: seconds a step may take before a rank counts as hung and the "
                   "engine is marked dead")
    g.add_argument("--seed", type=int, default=d["seed"].default)
    g.add_argument("--hf-overrides", type=json_dict, default=None, metavar="JSON",
                   help="config.json fields to override, a JSON object (vLLM's): "
                   '\'{"num_hidden_layers": 1}\'; a text-model key reaches Kimi-K2.5\'s '
                   "text_config too")
    g.add_argument("-q", "--quantization", default=None,
                   help="vLLM's flag: unset (the checkpoint's quantization_config decides) or "
                   "the checkpoint's own method, e.g. compressed-tensors; others are refused")
    g.add_argument("--scheduling-policy", default=d["scheduling_policy"].default,
                   choices=["fcfs", "priority"],
                   help="request order (vLLM's flag): fcfs, the only policy implemented")
    g.add_argument("--max-waiting-requests", type=int,
                   default=d["max_waiting_requests"].default,
                   help="waiting-queue bound; beyond it requests get 503 + Retry-After")
    g.add_argument("--chat-template", default=None, help="a Jinja template file or string")
    # ATOM flags for features that are fixed here; accepted so ATOM command lines run
    g.add_argument("--cudagraph-mode", default=None, help=argparse.SUPPRESS)
    add_atom_flags(g)


def add_server_args(p: argparse.ArgumentParser, atom_ports: bool = False) -> None:
    """`atom_ports`: ATOM's meaning (its openai_server): the HTTP port is `--server-port`,
    `--port` is ATOM's internal engine port (accepted, unused here) and `--host` defaults to
    ATOM's 0.0.0.0; otherwise (`atom-stream serve`, as `vllm serve`) `--port` and
    `--server-port` both name the HTTP port and `--host` defaults to 127.0.0.1."""
    g = p.add_argument_group("server")
    host = "0.0.0.0" if atom_ports else "127.0.0.1"  # ATOM's api_server binds all interfaces
    g.add_argument("--host", default=host, help=f"bind address (default: {host})")
    if atom_ports:
        g.add_argument("--server-port", dest="port", type=int, default=8000)
        g.add_argument("--port", dest="atom_engine_port", type=int, default=None,
                       help="ATOM's internal engine port: accepted, unused (HTTP: --server-port)")
    else:
        g.add_argument("--port", "--server-port", dest="port", type=int, default=8000)
    g.add_argument("--served-model-name", nargs="+", default=None)
    g.add_argument("--api-key", action="extend", nargs="+", default=[],
                   help="require this key (Authorization: Bearer); several keys as vLLM's "
                        "--api-key K1 K2 or by repeating the flag")
    g.add_argument("--default-chat-template-kwargs", type=json_dict, default=None)
    g.add_argument("--max-body-bytes", type=int, default=8 << 20)
    g.add_argument("--max-header-bytes", type=int, default=64 << 10,
                   help="request line + headers of one HTTP request (431 beyond)")
    g.add_argument("--ws-max-frame-bytes", type=int, default=None)
    g.add_argument("--ws-max-requests", type=int, default=1024,
                   help="live requests per WebSocket connection")
    g.add_argument("--ws-ping-interval", type=float, default=20.0)
    g.add_argument("--ws-ping-timeout", type=float, default=20.0)
    g.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds to let in-flight requests finish on SIGTERM")
    g.add_argument("--timeout-keep-alive", type=int, default=5)
    g.add_argument("--disable-uvicorn-access-log", action="store_true")
    # ATOM's request logging switch (optionally a path): accepted and logged, the access log
    # (--disable-uvicorn-access-log) and --log-level debug are this server's request logs
    g.add_argument("--request-log", nargs="?", const="", default=None, help=argparse.SUPPRESS)
    g.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"])
    g.add_argument("--uvicorn-log-level", default=None,
                   choices=["critical", "error", "warning", "info", "debug", "trace"],
                   help="uvicorn's own log level (vLLM's flag; default: --log-level)")
    # vLLM launch flags with nothing to switch here: /load always tracks, statistics are on
    # /metrics, requests are in the access log (accepted so vLLM command lines run as written)
    for flag in ("--disable-log-stats", "--disable-log-requests", "--enable-log-requests"):
        g.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    g.add_argument("--enable-server-load-tracking", action=argparse.BooleanOptionalAction,
                   default=True, help=argparse.SUPPRESS)
    # vLLM's FrontendArgs (cli_args.py): CORS lists are JSON (type=json.loads there), bools are
    # BooleanOptionalAction (its get_kwargs), so --no-allow-credentials exists too
    g.add_argument("--ssl-keyfile", default=None, help="HTTPS / WSS: the private key file")
    g.add_argument("--ssl-certfile", default=None, help="HTTPS / WSS: the certificate file")
    g.add_argument("--ssl-ca-certs", default=None,
                   help="CA certificates for verifying client certificates")
    g.add_argument("--ssl-cert-reqs", type=int, default=0,
                   help="client certificates: 0 none, 1 optional, 2 required (ssl module)")
    g.add_argument("--chat-template-content-format", default="auto",
                   choices=["auto", "string", "openai"],
                   help="message content as the chat template reads it (auto: detected)")
    g.add_argument("--root-path", default="",
                   help="the path prefix a reverse proxy serves the app under")
    g.add_argument("--allowed-origins", type=_json_str_list, default=["*"],
                   help='CORS allowed origins, a JSON list (default: \'["*"]\')')
    g.add_argument("--allowed-methods", type=_json_str_list, default=["*"],
                   help='CORS allowed methods, a JSON list (default: \'["*"]\')')
    g.add_argument("--allowed-headers", type=_json_str_list, default=["*"],
                   help='CORS allowed headers, a JSON list (default: \'["*"]\')')
    g.add_argument("--allow-credentials", action=argparse.BooleanOptionalAction, default=False,
                   help="CORS: allow credentials")
    g.add_argument("--enable-request-id-headers", action=argparse.BooleanOptionalAction,
                   default=False, help="add X-Request-Id to every HTTP response (vLLM's flag)")
    g.add_argument("--enable-prompt-tokens-details", action=argparse.BooleanOptionalAction,
                   default=False, help="report usage.prompt_tokens_details (cached tokens)")
    # vLLM's tool calling and reasoning flags (server/chat_parsing.py)
    g.add_argument("--enable-auto-tool-choice", action="store_true",
                   help='parse tool calls for tool_choice "auto" (needs --tool-call-parser)')
    g.add_argument("--tool-call-parser", default=None,
                   help="tool-call format of the model: kimi_k2 | deepseek_v3 | deepseek_v31")
    g.add_argument("--reasoning-parser", default=None,
                   help="split <think> reasoning into reasoning_content: kimi_k2 | deepseek_r1 | "
                        "deepseek_v3")


_CUDAGRAPH_MODES = ("NONE", "PIECEWISE", "FULL", "FULL_AND_PIECEWISE", "AF_PIECEWISE")


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    if args.pipeline_parallel_size != 1:
        raise ConfigError("pipeline_parallel_size: only 1 is supported (use -tp)")
    mode = (args.cudagraph_mode or "").upper()
    if mode and mode not in _CUDAGRAPH_MODES:
        raise ConfigError(f"cudagraph_mode: {args.cudagraph_mode!r} is not one of "
                          f"{', '.join(_CUDAGRAPH_MODES)}")
    enforce_eager = args.enforce_eager or mode == "NONE"  # ATOM: NONE = no graphs
    check_atom_flags(args)
    if mode and mode != "NONE":
        logger.info("--cudagraph-mode %s accepted for ATOM compatibility; no effect here: this "
                    "engine captures its own decode graphs", mode)
    if args.load_dummy in ("zero", "xavier"):
        logger.info("--load_dummy %s: dummy weights here are always random (seeded)",
                    args.load_dummy)
    served = getattr(args, "served_model_name", None)
    return EngineConfig(
        model=args.model or "demo", tokenizer=args.tokenizer,
        tensor_parallel_size=args.tensor_parallel_size,
        data_parallel_size=args.data_parallel_size,
        enable_expert_parallel=args.enable_expert_parallel,
        kv_cache_dtype=args.kv_cache_dtype, dtype=args.dtype, device=args.device,
        block_size=args.block_size, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization, num_kv_blocks=args.num_kv_blocks,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes, enforce_eager=enforce_eager,
        cudagraph_capture_sizes=args.cudagraph_capture_sizes,
        load_format="dummy" if args.load_dummy else args.load_format,
        trust_remote_code=args.trust_remote_code,
        enable_prefix_caching=args.enable_prefix_caching, seed=args.seed,
        async_scheduling=args.async_scheduling, watchdog_timeout=args.watchdog_timeout,
        hf_overrides=args.hf_overrides or None, scheduling_policy=args.scheduling_policy,
        online_quant_config=args.online_quant_config or None, quantization=args.quantization,
        nnodes=args.nnodes, node_rank=args.node_rank,
        master_addr=args.dist_init_addr[0] if args.dist_init_addr else args.master_addr,
        master_port=args.dist_init_addr[1] if args.dist_init_addr else args.master_port,
        headless=args.headless,
        max_waiting_requests=args.max_waiting_requests,
        served_model_name=served[0] if served else None, chat_template=args.chat_template,
    )


def server_config_from_args(args: argparse.Namespace) -> Any:
    from atom_stream.server.app import ServerConfig

    return ServerConfig(
        host=args.host, port=args.port, api_keys=list(args.api_key),
        served_model_name=args.served_model_name, max_body_bytes=args.max_body_bytes,
        max_header_bytes=args.max_header_bytes,
        ws_max_frame_bytes=args.ws_max_frame_bytes, ws_max_requests=args.ws_max_requests,
        ws_ping_interval=args.ws_ping_interval or None,
        ws_ping_timeout=args.ws_ping_timeout or None, shutdown_timeout=args.shutdown_timeout,
        log_level=args.uvicorn_log_level or args.log_level,
        access_log=not args.disable_uvicorn_access_log,
        timeout_keep_alive=args.timeout_keep_alive,
        default_chat_template_kwargs=args.default_chat_template_kwargs or {},
        allowed_origins=args.allowed_origins, allowed_methods=args.allowed_methods,
        allowed_headers=args.allowed_headers, allow_credentials=args.allow_credentials,
        enable_prompt_tokens_details=args.enable_prompt_tokens_details,
        enable_request_id_headers=args.enable_request_id_headers,
        enable_auto_tool_choice=args.enable_auto_tool_choice,
        tool_call_parser=args.tool_call_parser, reasoning_parser=args.reasoning_parser,
        ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile,
        ssl_ca_certs=args.ssl_ca_certs, ssl_cert_reqs=args.ssl_cert_reqs,
        root_path=args.root_path,
        chat_template_content_format=args.chat_template_content_format,
    )


def serve_parser(prog: str = "atom-stream serve", atom_ports: bool = False
                 ) -> FlexibleArgumentParser:
    p = FlexibleArgumentParser(prog=prog, description="OpenAI-compatible SSE + WebSocket server")
    add_engine_args(p)
    add_server_args(p, atom_ports)
    return p


def setup_logging(level: str) -> None:
    lvl = logging.DEBUG if level in ("debug", "trace") else getattr(logging, level.upper())
    logging.basicConfig(level=lvl, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def serve(argv: Sequence[str] | None = None, prog: str = "atom-stream serve",
          atom_ports: bool = False) -> int:
    p = serve_parser(prog, atom_ports)
    args = p.parse_args(argv)
    if getattr(args, "atom_engine_port", None) is not None:
        logger.info("--port %d is ATOM's internal engine port: unused here; the HTTP port is "
                    "--server-port (%d)", args.atom_engine_port, args.port)
    setup_logging(args.log_level)
    if args.request_log is not None:
        logger.info("--request-log accepted for ATOM compatibility; requests are logged by the "
                    "access log (and at --log-level debug)")
    try:
        engine_config = engine_config_from_args(args)
        server_config = server_config_from_args(args)
    except (ConfigError, ValueError) as e:
        p.error(str(e))
    if engine_config.headless:  # a multi-node worker node: TP ranks only, no server
        from atom_stream.engine.multinode import run_node

        return run_node(engine_config)
    from atom_stream.entrypoints import limits
    from atom_stream.server.app import run_server

    limits.raise_fd_limit()  # a socket per in-flight request (vLLM's set_ulimit in `serve`)

    try:
        run_server(engine_config, server_config)
    except KeyboardInterrupt:  # Ctrl-C: uvicorn has shut down already; no traceback
        return 130
    return 0


def bench(argv: Sequence[str]) -> int:
    try:
        from atom_stream.benchmarks.benchmark_serving import main as bench_main
    except ImportError:
        print("atom-stream bench: atom_stream.benchmarks.benchmark_serving is not available",
              file=sys.stderr)
        return 2
    # the benchmark's parser takes its prog from sys.argv[0] (argparse's default): make its usage
    # line read `atom-stream bench` as `serve` and `generate` read theirs
    saved = sys.argv[0] if sys.argv else None
    if sys.argv:
        sys.argv[0] = "atom-stream bench"
    else:
        sys.argv.append("atom-stream bench")
    try:
        result = bench_main(list(argv))
    finally:
        if saved is None:
            sys.argv.clear()
        else:
            sys.argv[0] = saved
    return result if isinstance(result, int) else 0


def package_version() -> str:
    """The installed distribution's version (vLLM's `importlib.metadata.version("vllm")`), or
    the source tree's `atom_stream.__version__` when it is not installed."""
    try:
        from importlib.metadata import version

        return version("atom-stream")
    except Exception:  # noqa: BLE001 - running from a source tree
        import atom_stream

        return atom_stream.__version__


USAGE = """usage: atom-stream [-v] {serve,generate,bench} [flags]

  serve      OpenAI-compatible SSE + WebSocket server (atom-stream serve --help)
  generate   stream one completion in-process
  bench      the serving benchmark (python -m atom_stream.benchmarks.benchmark_serving)
"""


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd in ("-v", "--version"):  # vLLM's main.py: action="version", the bare version string
        print(package_version())
        return 0
    if cmd == "serve":
        if rest and not rest[0].startswith("-"):  # `atom-stream serve <model>` (vLLM style)
            rest = ["--model", rest[0], *rest[1:]]
        return serve(rest)
    if cmd == "generate":
        from atom_stream.cli_generate import generate
        return generate(rest)
    if cmd == "bench":
        return bench(rest)
    print(f"atom-stream: unknown command {cmd!r}\n\n{USAGE}", end="", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
