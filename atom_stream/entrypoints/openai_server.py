"""`python -m atom_stream.entrypoints.openai_server`: ATOM's server command line, unchanged.

    python -m atom_stream.entrypoints.openai_server --model <path> --trust-remote-code \
        -tp 8 --kv_cache_dtype fp8

The same flags as `atom-stream serve` (cli.py): ATOM's engine flags in kebab or snake case
(those this engine does not act on are logged, or refused at start-up when their value asks for
a feature it lacks: atom_flags.ATOM_FLAGS), plus `--api-key` and friends; as in ATOM, `--host`
defaults to 0.0.0.0, the HTTP port is `--server-port` (8000) and `--port` is ATOM's internal
engine port (accepted, unused).
As ATOM's server, it first raises the open-file soft limit (entrypoints/limits.py) so that high
client concurrency does not run out of sockets.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from atom_stream.cli import serve
from atom_stream.entrypoints.limits import raise_fd_limit


def main(argv: Sequence[str] | None = None) -> int:
    raise_fd_limit()
    return serve(argv, prog="python -m atom_stream.entrypoints.openai_server", atom_ports=True)


if __name__ == "__main__":
    sys.exit(main())
