"""Log every Triton kernel compiled after start-up (a request that pays a compile waits ~1-5 s).

Start-up compiles what it can (the profiling forward, the warm-up prefills, graph capture), but a
kernel meeting new integer specializations or constexprs (an eager mixed decode + prefill step
at a batch size no graph covers, a new block-size class) compiles on the request's path: a TTFT
or inter-token outlier that serving benchmarks show only as a P99. `watch()` (called once the
runner is ready) makes each such compile a WARNING naming the kernel, its specialization and
the seconds it took, and counts it in `stats`; tools (bench/, tests) read `stats`.

Compiles on a thread inside `startup()` are not counted: a runner's own start-up (profiling,
warm-ups, graph capture) wraps itself in it, so the replicas of a data-parallel engine, which
start concurrently on their own threads in one process, do not count each other's start-up
compiles once the first of them has called `watch()`. `stats` is process-wide: every engine in
the process reads the same counts.

Uses triton.knobs.runtime's jit_cache_hook (called before a kernel is compiled for a key not in
its in-memory cache) and jit_post_compile_hook (after); any hook already installed keeps being
called. Where the installed Triton lacks those knobs, `watch()` returns False and does nothing.
"""

from __future__ import annotations

import logging
import threading
import time

logger = logging.getLogger(__name__)


class CompileStats:
    """Compiles seen since `watch()`: count, total seconds and (kernel name, seconds) per
    compile, most recent last (at most KEEP entries)."""

    KEEP = 64

    def __init__(self):
        self.count = 0
        self.seconds = 0.0
        self.recent: list[tuple[str, float]] = []

    def add(self, name: str, seconds: float) -> None:
        self.count += 1
        self.seconds += seconds
        self.recent = (self.recent + [(name, seconds)])[-self.KEEP:]


stats = CompileStats()
_lock = threading.Lock()
_started: dict[tuple[int, str], float] = {}  # (thread, kernel repr) -> start time
_installed = False
_local = threading.local()  # .startups: start-ups in progress on this thread


class startup:  # lower case: used as a context manager, like contextlib's
    """`with compile_watch.startup():` compiles on this thread inside the block are start-up
    compiles (not counted, not logged). Nests."""

    def __enter__(self):
        _local.startups = getattr(_local, "startups", 0) + 1
        return self

    def __exit__(self, *exc):
        _local.startups -= 1
        return False


def _name(kw: dict) -> str:
    fn = kw.get("fn")  # triton.runtime.jit.JitFunctionInfo (module, name, jit_function)
    return getattr(fn, "name", None) or str(kw.get("repr", "?")).split("[", 1)[0]


def _describe(kw: dict) -> str:
    """The compile's specialization by argument name: constexpr values and the integer / pointer
    attributes (tt.divisibility=16, ...) Triton keyed it on. Triton's own `repr` does not name
    them (3.6: "(QN: ()"); falls back to it where the structures differ."""
    try:
        comp = kw.get("compile") or {}
        sig = comp.get("signature") or {}
        names = list(sig) if isinstance(sig, dict) else []

        def name(k) -> str:
            i = k[0] if isinstance(k, tuple) and k else k
            return names[i] if isinstance(i, int) and 0 <= i < len(names) else str(k)

        parts = [f"{name(k)}={v}" for k, v in (comp.get("constants") or {}).items()]
        for k, attrs in ((comp.get("configs") or [{}])[0] or {}).items():
            tags = ",".join(f"{str(a[0]).rsplit('.', 1)[-1]}={a[1]}" for a in attrs)
            parts.append(f"{name(k)}:{tags}")
        if parts:
            return ", ".join(parts)[:2000]
    except Exception:  # noqa: BLE001 - a description must never break a compile
        pass
    return str(kw.get("repr"))


def _before(prev):
    def hook(**kw):
        if not kw.get("is_manual_warmup") and not getattr(_local, "startups", 0):
            with _lock:
                _started[(threading.get_ident(), str(kw.get("repr")))] = time.perf_counter()
        return prev(**kw) if prev is not None else None
    return hook


def _after(prev):
    def hook(**kw):
        with _lock:
            t0 = _started.pop((threading.get_ident(), str(kw.get("repr"))), None)
        if t0 is not None:
            dt = time.perf_counter() - t0
            name = _name(kw)
            stats.add(name, dt)
            logger.warning("Triton compiled %s after start-up (%.2f s on a request's path): %s",
                           name, dt, _describe(kw))
        return prev(**kw) if prev is not None else None
    return hook


def watch() -> bool:
    """Install the hooks (idempotent). True when they are installed."""
    global _installed
    with _lock:
        if _installed:
            return True
        try:
            from triton import knobs
            rt = knobs.runtime
            rt.jit_cache_hook = _before(rt.jit_cache_hook)
            rt.jit_post_compile_hook = _after(rt.jit_post_compile_hook)
        except (ImportError, AttributeError) as e:  # older Triton: nothing to hook
            logger.debug("compile watch unavailable: %s", e)
            return False
        _installed = True
        return True
