"""engine/compile_watch: after `watch()`, every Triton compile is logged and counted, hooks
installed before keep being called; on a GPU a real new specialization is seen."""

from __future__ import annotations

import logging

import pytest
import torch

from atom_stream.engine import compile_watch

# triton is imported inside the tests, never at collection: importing it before the kernel test
# modules set TRITON_INTERPRET (tests/kernel_interp.py) breaks their interpreted kernels


@pytest.fixture
def fresh(monkeypatch):
    """A clean watch state; the knobs' hooks restored afterwards."""
    knobs = pytest.importorskip("triton.knobs")
    rt = knobs.runtime
    # no hooks: an engine (or test) earlier in this process may have installed the watch,
    # whose hooks would count into the fresh stats below
    monkeypatch.setattr(rt, "jit_cache_hook", None)
    monkeypatch.setattr(rt, "jit_post_compile_hook", None)
    monkeypatch.setattr(compile_watch, "_installed", False)
    monkeypatch.setattr(compile_watch, "stats", compile_watch.CompileStats())
    return rt


class caplogger:
    """The compile_watch WARNING records logged inside the block (a GPU test without caplog)."""

    def __enter__(self) -> list:
        self.records: list = []
        self.handler = logging.Handler()
        self.handler.emit = self.records.append
        compile_watch.logger.addHandler(self.handler)
        return self.records

    def __exit__(self, *exc) -> None:
        compile_watch.logger.removeHandler(self.handler)


class _Info:  # the shape of triton.runtime.jit.JitFunctionInfo
    name = "my_kernel"


def _compile_event(rt, repr_: str, warmup: bool = False):
    """What JITFunction._do_compile does around one compile: both hooks, keyword arguments."""
    kw = {"key": ("k",), "repr": repr_, "fn": _Info(), "compile": {},
          "is_manual_warmup": warmup, "already_compiled": False}
    rt.jit_cache_hook(**kw)
    rt.jit_post_compile_hook(**kw)


def test_compiles_after_watch_are_logged_counted_and_chain_earlier_hooks(fresh, caplog):
    rt = fresh
    seen = []
    rt.jit_cache_hook = lambda **kw: seen.append(("before", kw["repr"]))
    rt.jit_post_compile_hook = lambda **kw: seen.append(("after", kw["repr"]))
    assert compile_watch.watch() and compile_watch.watch()  # idempotent: hooks wrapped once
    with caplog.at_level(logging.WARNING, logger="atom_stream.engine.compile_watch"):
        _compile_event(rt, "my_kernel[num_warps=4](M: i32)")
        _compile_event(rt, "my_kernel[num_warps=4](M: i32)", warmup=True)  # explicit warmup
    assert seen == [("before", "my_kernel[num_warps=4](M: i32)"),
                    ("after", "my_kernel[num_warps=4](M: i32)")] * 2
    st = compile_watch.stats
    assert st.count == 1 and [n for n, _ in st.recent] == ["my_kernel"] and st.seconds >= 0
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "my_kernel" in msgs[0] and "M: i32" in msgs[0]


def test_the_warning_names_the_specialization_by_argument(fresh, caplog):
    # the compile kwargs Triton 3.6+ passes: signature by name, constexprs and the attributes
    # keyed by argument index (its own repr names none of them)
    rt = fresh
    assert compile_watch.watch()
    kw = {"key": ("k",), "repr": "my_kernel[num_warps=4](x_ptr: ())", "fn": _Info(),
          "is_manual_warmup": False, "already_compiled": False,
          "compile": {"signature": {"x_ptr": "*fp32", "n": "i32", "F": "constexpr",
                                    "BLOCK": "constexpr"},
                      "constants": {(2,): 3, (3,): 128},
                      "configs": [{(0,): [["tt.divisibility", 16]],
                                   (1,): [["tt.divisibility", 16]]}]}}
    with caplog.at_level(logging.WARNING, logger="atom_stream.engine.compile_watch"):
        rt.jit_cache_hook(**kw)
        rt.jit_post_compile_hook(**kw)
    (msg,) = [r.getMessage() for r in caplog.records]
    assert msg.endswith("F=3, BLOCK=128, x_ptr:divisibility=16, n:divisibility=16"), msg


def test_stats_keep_the_most_recent():
    st = compile_watch.CompileStats()
    for i in range(st.KEEP + 5):
        st.add(f"k{i}", 0.5)
    assert st.count == st.KEEP + 5 and st.seconds == pytest.approx(0.5 * (st.KEEP + 5))
    assert len(st.recent) == st.KEEP and st.recent[-1][0] == f"k{st.KEEP + 4}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_real_new_specialization_is_seen_on_the_gpu(fresh):
    import triton
    import triton.language as tl

    @triton.jit
    def _scale(x_ptr, n, F: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=m) * F, mask=m)

    x = torch.randn(100, device="cuda")
    want = x * 3
    _scale[(1,)](x, 100, F=1, BLOCK=128)  # compiled before the watch: not counted
    x.copy_(want / 3)
    assert compile_watch.watch()
    _scale[(1,)](x, 100, F=1, BLOCK=128)  # cached: no compile
    assert compile_watch.stats.count == 0
    x.copy_(want / 3)
    with caplogger() as records:
        _scale[(1,)](x, 100, F=3, BLOCK=128)  # a new constexpr: one compile
    torch.testing.assert_close(x, want)
    assert compile_watch.stats.count == 1
    assert any("F=3" in r.getMessage() for r in records), [r.getMessage() for r in records]
    assert compile_watch.stats.recent[0][0].rsplit(".", 1)[-1] == "_scale"  # a qualname


def test_metrics_expose_the_compile_counts(fresh):
    from prometheus_client import generate_latest

    from atom_stream.engine.metrics import EngineMetrics

    m = EngineMetrics("demo")
    compile_watch.stats.add("k", 1.25)
    compile_watch.stats.add("k", 0.5)
    text = generate_latest(m.registry).decode()
    assert 'atom_stream:triton_compiles_total{engine="0",model_name="demo"} 2.0' in text
    assert 'atom_stream:triton_compile_seconds_total{engine="0",model_name="demo"} 1.75' in text


def test_compiles_on_a_thread_in_startup_are_not_counted(fresh):
    """A data-parallel replica still starting on its own thread compiles after another replica
    called watch(): those are start-up compiles; the same compile on another thread counts."""
    import threading

    assert compile_watch.watch()
    inside = threading.Event()
    go = threading.Event()

    def replica_starting():
        with compile_watch.startup(), compile_watch.startup():  # nests
            inside.set()
            go.wait(5)
            _compile_event(fresh, "startup_kernel[num_warps=4]()")
        _compile_event(fresh, "after_startup_kernel[num_warps=4]()")  # ready: counted

    t = threading.Thread(target=replica_starting)
    t.start()
    assert inside.wait(5)
    _compile_event(fresh, "request_kernel[num_warps=4]()")  # another thread: a request's path
    go.set()
    t.join(5)
    assert compile_watch.stats.count == 2


def test_dp_metrics_count_process_wide_compiles_once(fresh):
    """Every replica's registry reports the same process-wide counts: the merged registry
    keeps replica 0's, so a sum over engine="i" is the process's compile count."""
    from prometheus_client import generate_latest

    from atom_stream.engine.dp import DPMetrics
    from atom_stream.engine.metrics import EngineMetrics

    dp = DPMetrics([EngineMetrics("demo"), EngineMetrics("demo")])
    compile_watch.stats.add("k", 2.0)
    text = generate_latest(dp.registry).decode()
    lines = [ln for ln in text.splitlines() if ln.startswith("atom_stream:triton_compiles_total")]
    assert lines == ['atom_stream:triton_compiles_total{engine="0",model_name="demo"} 1.0'], lines
    # per-replica series are still there for both engines
    assert 'atom_stream:num_requests_running{engine="1",model_name="demo"}' in text
