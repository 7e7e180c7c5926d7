"""`atom-stream generate`: stream one completion in-process (no server), the engine flags as
`atom-stream serve` takes them.

    atom-stream generate --prompt "Hello" --max-tokens 32 [--chat] [engine flags]

Text goes to stdout as it streams; the finish reason and token counts to stderr. Exit 0, 2 on a
bad flag, 3 when the engine fails (one line, as `serve`), 130 on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence
from typing import Any

from atom_stream.cli import (
    FlexibleArgumentParser,
    add_engine_args,
    engine_config_from_args,
    setup_logging,
)
from atom_stream.config import ConfigError


def generate(argv: Sequence[str] | None = None) -> int:
    p = FlexibleArgumentParser(prog="atom-stream generate",
                               description="stream one completion in-process (no server)")
    add_engine_args(p)
    p.add_argument("prompt_pos", nargs="?", metavar="PROMPT")
    p.add_argument("--prompt", default=None)
    p.add_argument("--chat", action="store_true", help="send the prompt as a user message")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--log-level", default="warning")
    args = p.parse_args(argv)
    setup_logging(args.log_level)
    if args.prompt is not None and args.prompt_pos is not None:
        p.error("give the prompt once: PROMPT or --prompt TEXT, not both")
    text = args.prompt if args.prompt is not None else args.prompt_pos
    if not text:
        p.error("give a prompt (--prompt TEXT)")
    try:
        config = engine_config_from_args(args)
        from atom_stream.sampling_params import SamplingParams

        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                                top_p=args.top_p, top_k=args.top_k, ignore_eos=args.ignore_eos,
                                seed=args.seed)
    except (ConfigError, ValueError) as e:
        p.error(str(e))
    prompt: Any = [{"role": "user", "content": text}] if args.chat else text

    async def run() -> None:
        from atom_stream.engine.dp import make_async_engine

        async with make_async_engine(config) as engine:
            async for out in engine.generate(prompt, params):
                sys.stdout.write(out.text)
                sys.stdout.flush()
                if out.finish_reason is not None:
                    u = out.usage
                    sys.stdout.write("\n")
                    sys.stderr.write(f"[finish_reason={out.finish_reason} prompt_tokens="
                                     f"{u.prompt_tokens} completion_tokens="
                                     f"{u.completion_tokens}]\n")

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # one line for the user, as `serve` (exit code 3)
        logging.getLogger(__name__).debug("generate failed", exc_info=True)
        sys.stderr.write(f"atom-stream generate: {type(e).__name__}: {e}\n")
        return 3
    return 0
