"""Process limits the server and the benchmark client raise at start-up (vLLM's `set_ulimit`).

Every in-flight HTTP request is a socket, i.e. a file descriptor. The usual soft limit on
open files (1024) is below the concurrencies the usage guide benchmarks (up to 1024 clients),
and hitting it fails requests with `OSError: [Errno 24] Too many open files` (the client
cannot open a socket; the server drops accepted connections). ATOM and vLLM therefore raise
the soft limit in both processes; so do we.
"""

from __future__ import annotations

import logging
import sys

logger = logging.getLogger("atom_stream.limits")

DEFAULT_FD_TARGET = 65535


def raise_fd_limit(target: int = DEFAULT_FD_TARGET) -> int | None:
    """Raise RLIMIT_NOFILE's soft limit to `target`, capped at the hard limit; never lowers it.

    Returns the soft limit in force afterwards (None where the platform has no such limit).
    A refusal by the OS is logged as a warning, never raised."""
    if sys.platform.startswith("win"):
        return None
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = target if hard == resource.RLIM_INFINITY else min(target, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError) as e:
            logger.warning("open-file limit is %d and could not be raised to %d (%s): high "
                           "concurrency may fail with 'Too many open files'; raise it with "
                           "`ulimit -n`", soft, want, e)
    return soft
