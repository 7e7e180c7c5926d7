"""The engine loop task of AsyncEngine (a mixin): one asyncio task drives the synchronous core,
stepping it in the one-thread executor and delivering each step's outputs to the request
slots. The module docstring of engine/async_engine.py describes the iteration, with and
without async scheduling, and when aborts are applied.

AsyncEngine provides the state this uses: `_core` (LLMEngine), `_executor` (one thread),
`_slots` (request id -> OutputSlot), `_wakeup` / `_idle` (asyncio.Event), `_stopping`,
`_in_step` (aborts are deferred while true), `_pending_aborts` (ids), `_aborts_applied`
(a future that `await abort()` waits on), `_dead` and `_abort(request_id)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from atom_stream.engine.llm_engine import LLMEngine
from atom_stream.engine.outputs import RequestOutput
from atom_stream.errors import EngineDeadError

logger = logging.getLogger("atom_stream.engine.async_engine")


class EngineLoop:
    """The loop task (`_run`) and its step helpers; mixed into AsyncEngine."""

    async def _wait_aborts_applied(self) -> None:
        """Wait until the loop applies the deferred aborts (after the running step), or ends."""
        if self._task is None or self._task.done():
            return  # no loop to apply them (shutdown's abort_all frees what is left)
        if self._aborts_applied is None:
            self._aborts_applied = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._aborts_applied)  # a cancelled caller leaves it to others

    def _release_abort_waiters(self) -> None:
        fut, self._aborts_applied = self._aborts_applied, None
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _deliver(self, out: RequestOutput) -> None:
        slot = self._slots.get(out.request_id)
        if slot is not None:
            slot.put(out)

    def _check_idle(self) -> None:
        if not self._core.requests:
            self._idle.set()

    async def _runner_call(self, fn, *args):
        """fn(*args) on the runner's executor thread. With a TP executor (it has a step
        watchdog), a runner that turns dead while fn is stuck (a hung rank) raises
        EngineDeadError here instead of waiting for the thread."""
        fut = asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        core = self._core
        if getattr(core.runner, "watchdog_timeout", None) is None:
            return await fut
        while True:
            done, _ = await asyncio.wait({fut}, timeout=0.25)
            if done:
                return fut.result()
            if core.is_dead:
                # the thread ends when the killed workers fail its collective; nobody waits
                fut.add_done_callback(lambda f: f.cancelled() or f.exception())
                raise EngineDeadError(f"the model runner died: {core.runner.dead}")

    async def _step_sync(self, core: LLMEngine) -> None:
        batch = core.schedule()
        if not batch.seqs:  # nothing schedulable now; never spin the loop
            await asyncio.sleep(0.001)
            return
        self._in_step = True
        try:
            step_out = await self._runner_call(core.execute, batch)
        except Exception as e:  # noqa: BLE001 - fails this batch's requests only
            outputs = core.fail(batch, e)
        else:
            outputs = core.postprocess(batch, step_out)
        finally:
            self._in_step = False
        for out in outputs:
            self._deliver(out)

    async def _step_pipelined(self, core: LLMEngine) -> None:
        """Schedule and launch N+1, then collect and postprocess N (engine/pipeline.py)."""
        pipe = core.pipeline
        if pipe.must_drain():
            await self._collect(pipe.take())
        prev = pipe.take()
        batch = core.schedule()
        error: Exception | None = None
        if batch.seqs:
            self._in_step = True  # launch reads the sequences: defer aborts
            try:
                handle = await self._runner_call(
                    core.launch, batch, prev.handle if prev is not None else None)
            except Exception as e:  # noqa: BLE001 - fails this batch's requests only
                error = e
            else:
                pipe.launched(batch, handle)
            finally:
                self._in_step = False
        if prev is not None:
            await self._collect(prev)  # the device runs N+1 meanwhile
        if error is not None:
            for out in core.fail(batch, error):
                self._deliver(out)
        if not batch.seqs and prev is None:  # nothing schedulable now; never spin the loop
            await asyncio.sleep(0.001)

    async def _collect(self, inflight) -> None:
        """Collect a launched step in the executor (waits for its event off the loop), then
        postprocess it on the loop and deliver. Aborts may run meanwhile: `collect` reads only
        the handle, and a row of a request that ended is discarded."""
        if inflight is None:
            return
        core = self._core
        try:
            out = await self._runner_call(core.collect, inflight.handle)
        except Exception as e:  # noqa: BLE001 - fails that step's requests only
            out = e
        for o in core.pipeline.finish(inflight, out):
            self._deliver(o)

    async def _run(self) -> None:
        core = self._core
        wakeup = self._wakeup
        pipelined = core.async_scheduling
        try:
            while not self._stopping:
                if not core.requests and core.pipeline.inflight is None:
                    self._idle.set()
                    wakeup.clear()
                    await wakeup.wait()
                    continue
                if pipelined:
                    await self._step_pipelined(core)
                else:
                    await self._step_sync(core)
                if self._pending_aborts:
                    aborts, self._pending_aborts = self._pending_aborts, []
                    for rid in aborts:
                        self._abort(rid)
                self._release_abort_waiters()
                if core.is_dead:
                    raise EngineDeadError(f"the model runner died: {core.runner.dead}")
                self._check_idle()
                await asyncio.sleep(0)  # let consumers, new requests and aborts in
            await self._collect(core.pipeline.take())  # stopping: nothing left on the device
        except asyncio.CancelledError:
            raise
        except BaseException as e:
            logger.exception("engine loop died")
            self._dead = e
            self._in_step = False
            err = e if isinstance(e, EngineDeadError) else EngineDeadError(
                f"the engine loop died: {type(e).__name__}: {e}")
            with contextlib.suppress(Exception):
                core.pipeline.take()  # drop an in-flight step (its requests are aborted next)
                core.abort_all()
            for slot in self._slots.values():
                slot.fail(err)
            self._idle.set()
        finally:
            self._pending_aborts.clear()  # nothing will apply them now (shutdown's abort_all
            self._release_abort_waiters()  # frees what is left): do not hang callers
