"""AcceleratorPool: many accelerators on many hosts, as Ray actors.

Data path of one frame (``run`` / ``arun``): pick the least-loaded live
replica (or the stream's replica) -> one actor call carrying the frame ->
the replica's ``AsyncAccl.arun`` -> the outputs come back as the call's
result. ``imap`` keeps up to ``window`` such calls in flight and yields their
results in input order.

Faults: a call that fails because its replica died (or its device failed)
marks the replica *down* and is resubmitted to another one; its result is
taken from exactly one call, so every frame is delivered once. A down replica
is probed (``ready``) until Ray has restarted it, then takes frames again; a
replica Ray will not restart any more is *dead*. A frame whose own content is
wrong (``ShapeError``, ``DtypeError``, ...) raises at the caller and is not
retried.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
import warnings
from collections.abc import AsyncIterator, Hashable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import ray
import ray.exceptions

from memryx import ClosedError, DeviceError, Dfp, LoopBlockingError, UsageError
from memryx._core.threads import loop_future

from ._replica import Replica
from ._router import _cause, _forget, _Job, _Router, _Slot

__all__ = ["AcceleratorPool"]

log = logging.getLogger("memryx.ray")

#: The custom resource one replica needs by default: one MX3 module of a node.
DEFAULT_RESOURCES: Mapping[str, float] = {"MX3": 1}
#: Frames ``imap`` keeps in flight per replica by default.
WINDOW_PER_REPLICA = 8
#: Frames per call at most when ``run`` / ``arun`` spread a batch.
MAX_BATCH_CHUNK = 8
#: Seconds ``close`` waits for the replicas to close their accelerators.
CLOSE_TIMEOUT = 5.0

_RemoteReplica: Any = ray.remote(Replica)


def _on_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class AcceleratorPool(_Router):
    """A pool of accelerator replicas on a Ray cluster.

    ``AcceleratorPool(dfp, replicas=2, device=None, resources={"MX3": 1})``
    starts ``replicas`` Ray actors, each owning one accelerator on its node
    (the simulated MX3 by default; ``device="unix:/run/memryx.sock"`` for the
    node's ``memryx serve``), placed with ``resources`` so that a node with N
    modules (``ray start --resources='{"MX3": N}'``) gets at most N replicas.
    The DFP is put into Ray's object store once; each node fetches it once.

    Needs a connected Ray runtime (``ray.init(...)``). See docs/scale-out.md.
    """

    def __init__(self, dfp: Any, replicas: int = 1, *, device: str | None = None,
                 resources: Mapping[str, float] | None = None, group_id: int = 0,
                 max_restarts: int = 3, window: int | None = None,
                 start_timeout: float = 60.0, unavailable_timeout: float = 30.0,
                 actor_options: Mapping[str, Any] | None = None,
                 **device_options: Any) -> None:
        self._closed = True   # until started: __del__ and close() must not trip
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
            raise ValueError(f"replicas must be a positive int, not {replicas!r}")
        if isinstance(max_restarts, bool) or not isinstance(max_restarts, int) \
                or max_restarts < -1:
            raise ValueError(f"max_restarts must be an int >= -1, not {max_restarts!r}")
        if window is not None and (isinstance(window, bool) or not isinstance(window, int)
                                   or window < 1):
            raise ValueError(f"window must be a positive int or None, not {window!r}")
        for name, value in (("start_timeout", start_timeout),
                            ("unavailable_timeout", unavailable_timeout)):
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")
        if device is not None and not isinstance(device, str):
            raise TypeError("device must be a device name such as 'sim' or "
                            f"'unix:/run/memryx.sock' (resolved on each node), not {device!r}")
        self._dfp = dfp if isinstance(dfp, Dfp) else Dfp(dfp)
        if isinstance(group_id, bool) or not isinstance(group_id, int):
            raise TypeError(f"group_id must be an int, not {group_id!r}")
        need = dict(DEFAULT_RESOURCES if resources is None else resources)
        if not ray.is_initialized():
            raise UsageError(
                "AcceleratorPool needs a Ray runtime: call ray.init(address=...) to join a "
                "cluster, or ray.init(resources={'MX3': N}) for a local one")
        self._check_resources(need, replicas)

        self._window = window or WINDOW_PER_REPLICA * replicas
        self._unavailable_timeout = float(unavailable_timeout)
        self._max_attempts = replicas * (max(max_restarts, 0) + 1) + 1
        self._lock = threading.Lock()
        self._affinity: dict[Hashable, _Slot] = {}
        self._rr = 0
        self._resubmitted = 0
        # The DFP travels once: one object in the store, fetched once per node.
        self._dfp_ref = ray.put(np.frombuffer(self._dfp.to_bytes(), dtype=np.uint8))
        options: dict[str, Any] = {"num_cpus": 0, "max_restarts": max_restarts,
                                   "max_task_retries": 0, "resources": need}
        options.update(actor_options or {})
        remote = _RemoteReplica.options(**options)
        self._slots = [
            _Slot(i, remote.remote(self._dfp_ref, group_id, device, dict(device_options)))
            for i in range(replicas)]
        self._closed = False
        self._start_deadline = time.monotonic() + float(start_timeout)
        self._starting: list[Any] | None = [s.handle.ready.remote() for s in self._slots]
        if not _on_loop():
            self._finish_start_sync()

    # -- creation -------------------------------------------------------------------------
    @staticmethod
    def _check_resources(need: Mapping[str, float], replicas: int) -> None:
        total = ray.cluster_resources()
        for name, amount in need.items():
            if amount > 0 and total.get(name, 0) < amount * replicas:
                raise UsageError(
                    f"replicas={replicas} need {amount * replicas:g} {name!r} but the Ray "
                    f"cluster has {total.get(name, 0):g}: start each node with "
                    f"ray start --resources='{{\"{name}\": <modules on that host>}}' "
                    f"(or ray.init(resources=...) locally), or ask for fewer replicas")

    def _finish_start_sync(self) -> None:
        refs = self._starting
        if refs is None:
            return
        timeout = max(0.0, self._start_deadline - time.monotonic())
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        self._finish_start([ref in done for ref in refs], lambda ref: ray.get(ref))

    async def _finish_start_async(self) -> None:
        refs = self._starting
        if refs is None:
            return
        timeout = max(0.0, self._start_deadline - time.monotonic())
        futures = [loop_future(ref.future()) for ref in refs]
        _done, pending = await asyncio.wait(futures, timeout=timeout)
        for fut in pending:
            fut.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if self._starting is None:
            return   # another task finished it meanwhile
        results = {id(r): f for r, f in zip(refs, futures, strict=True)}
        self._finish_start([f.done() for f in futures],
                           lambda ref: results[id(ref)].result())

    def _finish_start(self, ready: list[bool], result: Any) -> None:
        with self._lock:
            refs, self._starting = self._starting, None
        if refs is None:
            return   # another thread finished the start meanwhile
        error: BaseException | None = None
        for slot, ref, ok in zip(self._slots, refs, ready, strict=True):
            if not ok:
                _forget(ref)
                continue
            try:
                slot.where = result(ref)
                slot.state = "live"
            except ray.exceptions.RayTaskError as exc:
                error = error or _cause(exc)
            except ray.exceptions.RayError as exc:
                error = error or DeviceError(f"replica {slot.index} did not start: {exc}")
        if error is None and not all(ready):
            started = sum(ready)
            error = DeviceError(
                f"only {started} of {len(self._slots)} replicas started within the "
                f"start_timeout: the cluster may not have the free resources they need "
                f"(available now: {ray.available_resources()})")
        if error is not None:
            self._closed = True
            self._kill_all()
            raise error
        log.info("pool of %d replicas started: %s", len(self._slots),
                 [s.where for s in self._slots])

    # -- public surface ----------------------------------------------------------------------
    @property
    def actors(self) -> list[Any]:
        """The Ray actor handles of the replicas, in replica order."""
        return [s.handle for s in self._slots]

    @property
    def dfp(self) -> Dfp:
        return self._dfp

    @property
    def closed(self) -> bool:
        return self._closed

    def statistics(self) -> dict[str, Any]:
        """Per-replica state and counters, and the frames resubmitted after faults."""
        with self._lock:
            return {
                "replicas": [{"index": s.index, "state": s.state, "in_flight": s.in_flight,
                              "frames": s.frames, "faults": s.faults, **s.where}
                             for s in self._slots],
                "resubmitted": self._resubmitted,
                "frames": sum(s.frames for s in self._slots),
            }

    def run(self, inputs: Any, model_idx: int = 0, *, stream: Hashable | None = None) -> Any:
        """The outputs of one frame, or a list with the outputs of each frame of a
        batch (a list of frames), like ``SyncAccl.run``. Blocks the calling thread.
        A batch is spread over the replicas in chunks of several frames per call."""
        self._check_blocking("run", "arun")
        if self._is_batch(inputs, model_idx):
            return list(self.imap(inputs, model_idx, stream=stream,
                                  chunk=self._batch_chunk(len(inputs))))
        self._finish_start_sync()
        job = _Job(inputs, model_idx, stream)
        self._submit_sync(job)
        return self._result_sync(job, None)

    async def arun(self, inputs: Any, model_idx: int = 0, *,
                   stream: Hashable | None = None) -> Any:
        """The async twin of :meth:`run`; never blocks the event loop."""
        if self._is_batch(inputs, model_idx):
            return [out async for out in self.aimap(inputs, model_idx, stream=stream,
                                                    chunk=self._batch_chunk(len(inputs)))]
        await self._finish_start_async()
        job = _Job(inputs, model_idx, stream)
        await self._submit_async(job)
        return await self._result_async(job, None)

    def imap(self, frames: Iterable[Any], model_idx: int = 0, *, window: int | None = None,
             stream: Hashable | None = None, chunk: int = 1) -> Iterator[Any]:
        """Yield the outputs of each frame of ``frames``, in order, keeping at most
        ``window`` frames in flight (spread over the replicas, or on the stream's
        replica). ``frames`` is read only as fast as results are consumed.

        ``chunk`` > 1 sends that many consecutive frames in one call to a replica,
        which divides Ray's cost per frame; it waits for ``chunk`` frames (or the
        end of ``frames``) before sending, so leave it at 1 for a live source."""
        chunk = self._chunk_arg(chunk)
        window = self._window_arg(window, chunk)
        self._check_blocking("imap", "aimap")
        return self._imap(iter(frames), model_idx, window, stream, chunk)

    def _imap(self, frames: Iterator[Any], model_idx: int, window: int,
              stream: Hashable | None, chunk: int) -> Iterator[Any]:
        self._finish_start_sync()
        pending: collections.deque[_Job] = collections.deque()
        exhausted = False
        try:
            while True:
                while not exhausted and _frames_in(pending) < window:
                    job, exhausted = _next_job(frames, model_idx, stream,
                                               min(chunk, window - _frames_in(pending)))
                    if job is not None:
                        self._submit_sync(job)
                        pending.append(job)
                if not pending:
                    return
                job = pending[0]
                try:
                    value = self._result_sync(job, pending)
                except Exception as exc:
                    if not _split(pending, exc):
                        raise
                    for single in list(pending)[:job.size]:
                        self._submit_sync(single)
                    continue
                pending.popleft()
                if job.size:
                    yield from value
                else:
                    yield value
        finally:
            self._abandon(pending)

    async def aimap(self, frames: Iterable[Any], model_idx: int = 0, *,
                    window: int | None = None, stream: Hashable | None = None,
                    chunk: int = 1) -> AsyncIterator[Any]:
        """The async twin of :meth:`imap` (``frames`` is a plain iterable)."""
        chunk = self._chunk_arg(chunk)
        window = self._window_arg(window, chunk)
        await self._finish_start_async()
        it = iter(frames)
        pending: collections.deque[_Job] = collections.deque()
        exhausted = False
        try:
            while True:
                while not exhausted and _frames_in(pending) < window:
                    job, exhausted = _next_job(it, model_idx, stream,
                                               min(chunk, window - _frames_in(pending)))
                    if job is not None:
                        await self._submit_async(job)
                        pending.append(job)
                if not pending:
                    return
                job = pending[0]
                try:
                    value = await self._result_async(job, pending)
                except Exception as exc:
                    if not _split(pending, exc):
                        raise
                    for single in list(pending)[:job.size]:
                        await self._submit_async(single)
                    continue
                pending.popleft()
                if job.size:
                    for out in value:
                        yield out
                else:
                    yield value
        finally:
            self._abandon(pending)

    def close(self) -> None:
        """Close every replica's accelerator and end the actors. Idempotent.
        Calls still waiting for a result raise ``ClosedError``."""
        if self._closed:
            return
        self._closed = True
        # a replica that is down (restarting) has no accelerator to close: kill it
        refs = [s.handle.close.remote() for s in self._slots if s.state == "live"]
        if not _on_loop():
            ray.wait(refs, num_returns=len(refs), timeout=CLOSE_TIMEOUT)
        for ref in refs:
            _forget(ref)
        self._kill_all()

    async def aclose(self) -> None:
        """The async twin of :meth:`close`."""
        if self._closed:
            return
        self._closed = True
        futures = [loop_future(s.handle.close.remote().future())
                   for s in self._slots if s.state == "live"]
        if futures:
            _done, pending = await asyncio.wait(futures, timeout=CLOSE_TIMEOUT)
            for fut in pending:
                fut.cancel()
            await asyncio.gather(*futures, return_exceptions=True)
        self._kill_all()

    def __enter__(self) -> AcceleratorPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> AcceleratorPool:
        try:
            await self._finish_start_async()
        except BaseException:
            self._closed = True
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=1)
            self._closed = True
            self._kill_all()

    def __repr__(self) -> str:
        slots = getattr(self, "_slots", [])
        state = "closed" if getattr(self, "_closed", True) else "open"
        return f"<AcceleratorPool {state} replicas={len(slots)}>"

    # -- routing -------------------------------------------------------------------------------
    def _window_arg(self, window: int | None, chunk: int) -> int:
        if window is None:
            # the pool's window, or two chunks per replica (so that a replica
            # has the next chunk already when it finishes one)
            return max(self._window, 2 * chunk * len(self._slots))
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive int or None, not {window!r}")
        return window

    @staticmethod
    def _chunk_arg(chunk: int) -> int:
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk must be a positive int, not {chunk!r}")
        return chunk

    def _batch_chunk(self, frames: int) -> int:
        """Frames per call for a batch: about two calls per replica, at most 8 frames."""
        return max(1, min(MAX_BATCH_CHUNK, frames // (2 * len(self._slots))))

    def _check_blocking(self, name: str, twin: str) -> None:
        if _on_loop():
            raise LoopBlockingError(
                f"pool.{name}() blocks; on an event loop use pool.{twin}()")

    def _is_batch(self, inputs: Any, model_idx: int) -> bool:
        if not isinstance(inputs, list | tuple):
            return False
        ports = len(self._dfp.model(model_idx).inputs)
        if ports == 1:
            return True
        return bool(inputs) and all(isinstance(x, list | tuple) for x in inputs)


def _frames_in(pending: Iterable[_Job]) -> int:
    return sum(max(job.size, 1) for job in pending)


def _next_job(frames: Iterator[Any], model_idx: int, stream: Hashable | None,
              chunk: int) -> tuple[_Job | None, bool]:
    """The next job: one frame (``chunk`` 1) or up to ``chunk`` frames; and
    whether ``frames`` is exhausted."""
    if chunk == 1:
        try:
            return _Job(next(frames), model_idx, stream), False
        except StopIteration:
            return None, True
    batch: list[Any] = []
    exhausted = False
    while len(batch) < chunk:
        try:
            batch.append(next(frames))
        except StopIteration:
            exhausted = True
            break
    if not batch:
        return None, True
    return _Job(batch, model_idx, stream, size=len(batch)), exhausted


def _split(pending: collections.deque[_Job], exc: Exception) -> bool:
    """After the chunk at the head of ``pending`` failed for a frame's content,
    replace it by one job per frame (sent again by the caller) so that the
    frames before the bad one are delivered and the bad one raises alone."""
    job = pending[0]
    if job.size < 2 or isinstance(exc, DeviceError | ClosedError):
        return False
    pending.popleft()
    for frame in reversed(job.frame):
        pending.appendleft(_Job(frame, job.model_idx, job.stream))
    return True
