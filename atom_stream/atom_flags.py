"""ATOM's engine flags (its arg_utils.py, as reference/atom.md lists them) that this engine
parses but does not act on (besides --online_quant_config, which a non-empty value passes on
to EngineConfig.online_quant_config): one table (ATOM_FLAGS), registered on the CLI's parser by
`add_atom_flags` and checked by `check_atom_flags` (a value asking for behaviour this engine
does not implement is a start-up error naming the flag; any other given flag is logged as
accepted with no effect)."""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from typing import Any, NamedTuple

from atom_stream.config import ConfigError

logger = logging.getLogger("atom_stream.cli")


def json_dict(text: str) -> dict:
    """argparse type: a JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


class AtomFlag(NamedTuple):
    """An ATOM engine flag (ATOM's arg_utils.py) that this engine parses but does not act on.

    `flags`: its spellings (long ones in kebab case; FlexibleArgumentParser adds snake case);
    `kwargs`: ATOM's add_argument type/nargs/choices/action (the default is always None, so a
    flag left out is never logged); `note`: why it has no effect here (logged when given);
    `refuse(value, args)`: why the given value asks for behaviour this engine does not
    implement (a start-up error), or None when the value is a no-op here; `acts(value)`: the
    engine acts on this value (passed on to EngineConfig, so it is not logged as a no-op)."""

    flags: tuple[str, ...]
    kwargs: dict[str, Any]
    note: str
    refuse: Callable[[Any, argparse.Namespace], str | None] | None = None
    acts: Callable[[Any], bool] | None = None  # True: this value is acted on (not logged)


def _unless(ok: Callable[[Any], bool], why: str) -> Callable[[Any, Any], str | None]:
    """A `refuse` that allows the values `ok` accepts (the defaults, the no-ops)."""
    return lambda value, _args: None if ok(value) else why


def _speculative(value: Any, args: argparse.Namespace) -> str | None:
    """ATOM runs speculative decoding when --method is set and --num-speculative-tokens
    (default 1) is above 0 (EngineArgs._get_engine_kwargs)."""
    tokens = 1 if args.num_speculative_tokens is None else args.num_speculative_tokens
    return "speculative decoding is not implemented" if tokens > 0 else None


def _online_quant_refusal(value: Any) -> str | None:
    """Why an --online_quant_config cannot run here (EngineConfig.online_quant_config, parsed
    by layers/quant/online.py: mxfp4 / mxfp8 targets, malformed fields), or None."""
    from atom_stream.layers.quant.online import parse_online_quant_config

    try:
        parse_online_quant_config(value)
    except ConfigError as e:
        return str(e)
    return None


def _online_quant_acts(value: Any) -> bool:
    """A config that quantizes some layer is acted on (`{}` / no target: a logged no-op)."""
    from atom_stream.layers.quant.online import parse_online_quant_config

    return parse_online_quant_config(value) is not None


_INT, _FLOAT, _JSON = {"type": int}, {"type": float}, {"type": json_dict}
_SWITCH, _BOOL = {"action": "store_true"}, {"action": argparse.BooleanOptionalAction}
_ONLY_1 = "is not implemented (only 1; use -tp / -dp)"
_NO_SPEC = "speculative decoding is off without --method (as in ATOM)"
_NO_DISAGG = "there is no intra-GPU prefill/decode split (RapidServe) here"
_NO_EPLB = "expert placement is static here (EPLB only moves load)"
_NO_STATE = "the served models keep no per-request recurrent state"
_NO_STATS = "engine statistics are served on /metrics"
# One table: every ATOM engine flag of atom.md / the Kimi-K2.5 usage guide that this engine
# accepts without acting on it (`--cudagraph-mode`, which can mean --enforce-eager, is apart)
ATOM_FLAGS: tuple[AtomFlag, ...] = (
    AtomFlag(("--level",), _INT, "this engine compiles and captures its own decode graphs"),
    AtomFlag(("--enable-chunked-prefill",), {**_BOOL, "dest": "chunked_prefill"},
             "prefill is always chunked here"),
    AtomFlag(("-pcp", "--prefill-context-parallel-size"), _INT, "1 is the only size here",
             _unless(lambda v: v == 1, f"prefill context parallelism {_ONLY_1}")),
    AtomFlag(("-dcp", "--decode-context-parallel-size"), _INT, "1 is the only size here",
             _unless(lambda v: v == 1, f"decode context parallelism {_ONLY_1}")),
    AtomFlag(("--dcp-config",), _JSON, "decode context parallelism is off (-dcp 1)"),
    AtomFlag(("--enable-dp-attention",), _SWITCH, "DP attention is off",
             _unless(lambda v: not v, "DP attention is not implemented (-dp N runs N "
                     "replicas)")),
    AtomFlag(("--dp-load-balance",),
             {"choices": ["round_robin", "least_requests", "least_tokens"]},
             "-dp replicas take requests least-outstanding first, ties round robin"),
    AtomFlag(("--all2all-backend",), {"nargs": "?", "const": "high-throughput", "choices": [
        "high-throughput", "low-latency", "rccl", "none"]}, "the MoE transport is fixed here"),
    AtomFlag(("--moe-backend",), {"choices": ["standard", "mega"]},
             "there is one MoE implementation here"),
    AtomFlag(("--enable-tbo",), {"nargs": "?", "const": "prefill", "choices": [
        "prefill", "all"]}, "there is no two-batch overlap here"),
    AtomFlag(("--index-cache-dtype",), {"choices": ["bf16", "fp8", "fp4"]},
             "the served models have no sparse-attention index cache"),
    AtomFlag(("--long-prefill-token-threshold",), _INT,
             "prefill chunks are bounded by --max-num-batched-tokens"),
    AtomFlag(("--attn-prefill-chunk-size",), _INT,
             "MLA prefill runs on the scheduled chunk (--max-num-batched-tokens)"),
    AtomFlag(("--state-checkpoint-interval-tokens",), _INT, _NO_STATE),
    AtomFlag(("--state-checkpoint-demand",), _BOOL, _NO_STATE),
    AtomFlag(("--scheduler-delay-factor",), _FLOAT, "the scheduler never delays prompts"),
    AtomFlag(("--enable-log-stats",), _BOOL, _NO_STATS),
    AtomFlag(("--throughput-log-interval",), _FLOAT, _NO_STATS),
    AtomFlag(("--cache-hit-rate-window",), _INT, _NO_STATS),
    AtomFlag(("--method",), {"choices": ["mtp", "eagle3", "dspark"]},
             "--num-speculative-tokens 0 turns speculative decoding off (as in ATOM)",
             _speculative),
    AtomFlag(("--num-speculative-tokens",), _INT, _NO_SPEC),
    AtomFlag(("--draft-model",), {}, "an empty value names no draft model",
             _unless(lambda v: not v, "speculative decoding (a draft model) is not "
                     "implemented")),
    AtomFlag(("--spec-decode-acceptance-length",), _FLOAT, _NO_SPEC),
    AtomFlag(("--spec-decode-acceptance-rate",), _FLOAT, _NO_SPEC),
    AtomFlag(("--dspark-config",), _JSON, _NO_SPEC),
    AtomFlag(("--online-quant-config",), _JSON, "an empty config quantizes nothing",
             lambda v, _args: _online_quant_refusal(v), _online_quant_acts),
    AtomFlag(("--kv-transfer-config",), _JSON, "an empty config transfers nothing",
             _unless(lambda v: not v, "KV transfer (prefill/decode disaggregation) is not "
                     "implemented")),
    AtomFlag(("--enable-rapidserve",), _SWITCH, _NO_DISAGG),
    AtomFlag(("--disagg-prefill-max-num-seqs",), _INT, _NO_DISAGG),
    AtomFlag(("--disagg-constrained",), _SWITCH, _NO_DISAGG),
    AtomFlag(("--eplb-enable", "--enable-eplb"), _SWITCH, _NO_EPLB),
    AtomFlag(("--eplb-config",), _JSON, _NO_EPLB),
    AtomFlag(("--fake-eplb",), _SWITCH, "routing follows the model's gate",
             _unless(lambda v: not v, "synthetic uniform expert routing is not implemented "
                     "(experts are routed by the model's gate)")),
    AtomFlag(("--torch-profiler-dir",), {}, "there is no torch profiler hook here"),
    AtomFlag(("--mark-trace",), _SWITCH, "there are no graph trace markers here"),
)


def _flag_dest(spec: AtomFlag) -> str:
    """The argparse dest of `spec` (its `dest`, else its first long flag in snake case)."""
    if "dest" in spec.kwargs:
        return spec.kwargs["dest"]
    long = next(f for f in spec.flags if f.startswith("--"))
    return long[2:].replace("-", "_")


def check_atom_flags(args: argparse.Namespace) -> None:
    """Log each given ATOM_FLAGS flag as accepted with no effect; a value that asks for
    behaviour this engine does not implement is a ConfigError naming the flag (the first one,
    before anything is logged)."""
    given = [(spec, getattr(args, _flag_dest(spec), None)) for spec in ATOM_FLAGS]
    given = [(spec, value) for spec, value in given if value is not None]
    for spec, value in given:
        why = spec.refuse(value, args) if spec.refuse else None
        if why:
            shown = "" if value is True else " " + (
                json.dumps(value) if isinstance(value, dict) else str(value))
            raise ConfigError(f"{'/'.join(spec.flags)}{shown}: unsupported: {why}")
    for spec, value in given:
        if spec.acts is not None and spec.acts(value):
            continue
        logger.info("%s accepted for ATOM compatibility; no effect here: %s",
                    "/".join(spec.flags), spec.note)


def add_atom_flags(g) -> None:
    """Register every ATOM_FLAGS flag on argparse group `g` (hidden from --help; default None,
    so a flag left out is never logged)."""
    for spec in ATOM_FLAGS:
        g.add_argument(*spec.flags, default=None, help=argparse.SUPPRESS, **spec.kwargs)
