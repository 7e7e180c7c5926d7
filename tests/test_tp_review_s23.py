"""TP review (session 23), CPU/gloo: a rank that fails or dies while the engine starts makes the
engine's constructor raise that rank's error at once (no hang in the rendezvous, no engine that
comes up with a dead rank), and leaves no process or shared-memory segment behind."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from atom_stream.errors import EngineDeadError

# The spawned rank re-imports the script as __mp_main__: the failure is injected there only.
SCRIPT = textwrap.dedent('''
    import os, sys, time
    MODE = sys.argv[1] if len(sys.argv) > 1 else os.environ["TP_FAIL_MODE"]
    if __name__ == "__mp_main__":
        import atom_stream.engine.tp_workers as d
        from atom_stream.loader import CheckpointError
        if MODE == "die_before_rendezvous":
            def fail(*a, **k):
                os._exit(3)
            d._init_group = fail
        elif MODE == "bad_checkpoint_on_rank1":
            def fail(*a, **k):
                raise CheckpointError("model.safetensors: missing tensor (rank 1 only)")
            d.ModelRunner = fail
    if __name__ == "__main__":
        import multiprocessing
        import atom_stream.engine.tp_workers as d
        names = []
        class Ring(d.ShmRing):
            def __init__(self, *a, **k):
                super().__init__(*a, **k)
                names.append(self.name)
        d.ShmRing = Ring
        from atom_stream.llm import LLM
        t = time.monotonic()
        try:
            llm = LLM("demo", tensor_parallel_size=2, device="cpu", dtype="float32",
                      num_kv_blocks=16, block_size=4, max_model_len=32)
            llm.engine.shutdown()
            print("STARTED")
        except Exception as e:
            print("RAISED", type(e).__name__, e)
        print("SECONDS", time.monotonic() - t)
        print("CHILDREN", len(multiprocessing.active_children()))
        print("LEFT", [n for n in names if os.path.exists("/dev/shm/" + n.lstrip("/"))])
''')


def _run(tmp_path, mode: str) -> dict[str, str]:
    path = tmp_path / "start_fail.py"
    path.write_text(SCRIPT)
    env = dict(os.environ, TP_FAIL_MODE=mode)
    try:
        r = subprocess.run([sys.executable, str(path), mode], capture_output=True, text=True,
                           timeout=60, env=env, check=False)
    except subprocess.TimeoutExpired as e:  # the rank-0 process hung (killed by run)
        pytest.fail(f"engine start hung with {mode}: {e.stdout!r}")
    lines = dict(line.split(" ", 1) for line in r.stdout.splitlines() if " " in line)
    assert "STARTED" not in r.stdout, r.stdout + r.stderr
    return lines


def test_rank_dying_before_the_rendezvous_fails_start_at_once(tmp_path):
    """Rank 1 exits before it joins torch.distributed: rank 0 used to wait in
    init_process_group for torch's 30-minute timeout. Now the constructor raises naming the
    rank and its exit code within seconds."""
    got = _run(tmp_path, "die_before_rendezvous")
    assert got["RAISED"].startswith("RuntimeError TP rank 1 could not start: died"), got
    assert "exit code 3" in got["RAISED"], got
    assert float(got["SECONDS"]) < 20, got
    assert got["CHILDREN"] == "0" and got["LEFT"] == "[]", got


def test_bad_checkpoint_on_one_rank_fails_start_with_its_error(tmp_path):
    """Only rank 1 cannot load its shard (rank 0 loads fine): the engine used to start anyway
    with a dead rank. Now the constructor raises rank 1's CheckpointError, naming the rank."""
    got = _run(tmp_path, "bad_checkpoint_on_rank1")
    assert got["RAISED"].startswith("CheckpointError TP rank 1 could not start: "
                                    "CheckpointError: model.safetensors: missing tensor"), got
    assert float(got["SECONDS"]) < 20, got
    assert got["CHILDREN"] == "0" and got["LEFT"] == "[]", got


def _llm(**kw):
    from atom_stream.llm import LLM

    return LLM("demo", tensor_parallel_size=2, device="cpu", dtype="float32", num_kv_blocks=40,
               block_size=4, max_model_len=128, **kw)


def test_rank0_step_failure_after_broadcast_is_fail_stop():
    """Rank 0's forward raises part-way (after the step's inputs reached rank 1, which runs the
    whole step): the ranks' collectives are out of step, so the executor must report dead at
    once. It used to go on: the next 1-token request hung in mismatched collectives until the
    watchdog (a longer one aborted rank 1 in gloo; equal sizes could pair silently)."""
    import time

    from atom_stream.sampling_params import SamplingParams

    llm = _llm(watchdog_timeout=60.0)
    ex = llm.engine.runner
    try:
        layer = ex.runner.model.model.layers[1]
        real, calls = layer.forward, []

        def flaky(*a, **k):
            calls.append(1)
            if len(calls) == 3:  # the second decode step
                raise RuntimeError("injected fault on rank 0")
            return real(*a, **k)

        layer.forward = flaky
        params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        # the dead runner makes LLM.generate raise, as vLLM's (it returned "error" outputs)
        with pytest.raises(EngineDeadError, match="failed on rank 0"):
            llm.generate(prompt_token_ids=[[1, 2, 3, 4, 5]], sampling_params=params)
        assert ex.dead and "failed on rank 0" in ex.dead and "injected fault" in ex.dead
        t0 = time.monotonic()
        with pytest.raises(EngineDeadError):
            llm.generate(prompt_token_ids=[[42]], sampling_params=params)
        assert time.monotonic() - t0 < 10
    finally:
        llm.engine.shutdown()
    assert all(not p.is_alive() for p in ex.procs)


def test_collective_failure_names_the_dead_rank():
    """A worker dies and rank 0's next step fails in a gloo collective before the watchdog's
    poll: the step's error names the dead worker (it used to be gloo's 'Connection closed by
    peer' text, which reached every client's error event)."""
    import os
    import signal

    from test_tp_executor import _batch

    llm = _llm()
    ex = llm.engine.runner
    try:
        ex._stop.set()  # no watchdog poll: the collective is what fails first
        ex._watchdog.join(2)
        os.kill(ex.procs[0].pid, signal.SIGKILL)
        ex.procs[0].join(5)
        with pytest.raises(RuntimeError, match=r"TP worker atom-stream-tp1 died"):
            ex.execute(_batch(4, 0))
    finally:
        llm.engine.shutdown()
