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
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import ray.exceptions

from memryx import ClosedError, DeviceError, Dfp, LoopBlockingError, UsageError

from ._replica import Replica

__all__ = ["AcceleratorPool"]

log = logging.getLogger("memryx.ray")

#: The custom resource one replica needs by default: one MX3 module of a node.
DEFAULT_RESOURCES: Mapping[str, float] = {"MX3": 1}
#: Frames ``imap`` keeps in flight per replica by default.
WINDOW_PER_REPLICA = 8
#: Seconds between two probes of a down replica.
PROBE_INTERVAL = 0.05
#: Seconds ``close`` waits for the replicas to close their accelerators.
CLOSE_TIMEOUT = 5.0

_RemoteReplica: Any = ray.remote(Replica)


@dataclass(eq=False)
class _Slot:
    """The pool's view of one replica."""

    index: int
    handle: Any
    state: str = "starting"          # starting | live | down | dead
    in_flight: int = 0
    frames: int = 0
    faults: int = 0
    probe: Any = None                # the ready() call of a down replica
    probe_after: float = 0.0
    epoch: int = 0                   # +1 each time it goes down: failures of calls
                                     # sent before that are old news
    where: dict[str, Any] = field(default_factory=dict)


@dataclass(eq=False)
class _Job:
    """One frame and the one call currently computing it."""

    frame: Any
    model_idx: int
    stream: Hashable | None
    slot: _Slot | None = None
    epoch: int = 0
    ref: Any = None
    attempts: int = 0


def _on_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class AcceleratorPool:
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
        futures = [asyncio.wrap_future(ref.future()) for ref in refs]
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
        refs, self._starting = self._starting, None
        assert refs is not None
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
        batch (a list of frames), like ``SyncAccl.run``. Blocks the calling thread."""
        self._check_blocking("run", "arun")
        if self._is_batch(inputs, model_idx):
            return list(self.imap(inputs, model_idx, stream=stream))
        self._finish_start_sync()
        job = _Job(inputs, model_idx, stream)
        self._submit_sync(job)
        return self._result_sync(job, None)

    async def arun(self, inputs: Any, model_idx: int = 0, *,
                   stream: Hashable | None = None) -> Any:
        """The async twin of :meth:`run`; never blocks the event loop."""
        if self._is_batch(inputs, model_idx):
            return [out async for out in self.aimap(inputs, model_idx, stream=stream)]
        await self._finish_start_async()
        job = _Job(inputs, model_idx, stream)
        await self._submit_async(job)
        return await self._result_async(job, None)

    def imap(self, frames: Iterable[Any], model_idx: int = 0, *, window: int | None = None,
             stream: Hashable | None = None) -> Iterator[Any]:
        """Yield the outputs of each frame of ``frames``, in order, keeping at most
        ``window`` frames in flight (spread over the replicas, or on the stream's
        replica). ``frames`` is read only as fast as results are consumed."""
        window = self._window_arg(window)
        self._check_blocking("imap", "aimap")
        return self._imap(iter(frames), model_idx, window, stream)

    def _imap(self, frames: Iterator[Any], model_idx: int, window: int,
              stream: Hashable | None) -> Iterator[Any]:
        self._finish_start_sync()
        pending: collections.deque[_Job] = collections.deque()
        exhausted = False
        try:
            while True:
                while not exhausted and len(pending) < window:
                    try:
                        frame = next(frames)
                    except StopIteration:
                        exhausted = True
                        break
                    job = _Job(frame, model_idx, stream)
                    self._submit_sync(job)
                    pending.append(job)
                if not pending:
                    return
                job = pending[0]
                value = self._result_sync(job, pending)
                pending.popleft()
                yield value
        finally:
            self._abandon(pending)

    async def aimap(self, frames: Iterable[Any], model_idx: int = 0, *,
                    window: int | None = None,
                    stream: Hashable | None = None) -> AsyncIterator[Any]:
        """The async twin of :meth:`imap` (``frames`` is a plain iterable)."""
        window = self._window_arg(window)
        await self._finish_start_async()
        it = iter(frames)
        pending: collections.deque[_Job] = collections.deque()
        exhausted = False
        try:
            while True:
                while not exhausted and len(pending) < window:
                    try:
                        frame = next(it)
                    except StopIteration:
                        exhausted = True
                        break
                    job = _Job(frame, model_idx, stream)
                    await self._submit_async(job)
                    pending.append(job)
                if not pending:
                    return
                job = pending[0]
                value = await self._result_async(job, pending)
                pending.popleft()
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
        futures = [asyncio.wrap_future(s.handle.close.remote().future())
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
    def _window_arg(self, window: int | None) -> int:
        if window is None:
            return self._window
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive int or None, not {window!r}")
        return window

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

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("the AcceleratorPool is closed")

    def _pick(self, stream: Hashable | None) -> _Slot | None:
        """The replica for the next frame, or None when none is live right now.
        Raises DeviceError when every replica is dead for good."""
        self._probe()
        with self._lock:
            self._check_open()
            if stream is not None:
                slot = self._affinity.get(stream)
                if slot is not None and slot.state == "live":
                    return slot
            live = [s for s in self._slots if s.state == "live"]
            if not live:
                if all(s.state == "dead" for s in self._slots):
                    raise DeviceError("every replica of the pool is dead "
                                      "(Ray will not restart them any more)")
                return None
            # least loaded; ties go round-robin so idle replicas share the work
            self._rr += 1
            n = len(live)
            slot = min((live[(self._rr + k) % n] for k in range(n)),
                       key=lambda s: s.in_flight)
            if stream is not None:
                self._affinity[stream] = slot
            return slot

    def _probe(self) -> None:
        """Advance the probes of down replicas (non-blocking)."""
        with self._lock:
            down = [s for s in self._slots if s.state == "down"]
        if not down:
            return
        now = time.monotonic()
        for slot in down:
            if slot.probe is None and now >= slot.probe_after:
                slot.probe = slot.handle.ready.remote()
        probes = [s.probe for s in down if s.probe is not None]
        if not probes:
            return
        ready, _ = ray.wait(probes, num_returns=len(probes), timeout=0)
        for slot in down:
            if slot.probe is None or slot.probe not in ready:
                continue
            probe, slot.probe = slot.probe, None
            try:
                where = ray.get(probe)
            except ray.exceptions.ActorDiedError:
                with self._lock:
                    slot.state = "dead"
                log.warning("replica %d is dead for good", slot.index)
            except (ray.exceptions.RayError, DeviceError):
                slot.probe_after = time.monotonic() + PROBE_INTERVAL
            else:
                with self._lock:
                    slot.where = where
                    if slot.state == "down":
                        slot.state = "live"
                log.info("replica %d is back: %s", slot.index, where)

    def _mark_down(self, slot: _Slot, epoch: int, exc: BaseException) -> None:
        with self._lock:
            if slot.state != "live" or slot.epoch != epoch:
                return   # already known (a call sent to an earlier incarnation)
            slot.epoch += 1
            slot.state = "down"
            slot.faults += 1
            slot.probe = None
            slot.probe_after = 0.0
            for key in [k for k, s in self._affinity.items() if s is slot]:
                del self._affinity[key]
        log.warning("replica %d failed (%s); resubmitting its frames elsewhere",
                    slot.index, type(exc).__name__)

    def _dispatch(self, job: _Job, slot: _Slot) -> None:
        with self._lock:
            self._check_open()
            job.attempts += 1
            if job.attempts > self._max_attempts:
                raise DeviceError(f"a frame failed on {job.attempts - 1} replicas in a row; "
                                  "giving up", lost_frames=1)
            if job.attempts > 1:
                self._resubmitted += 1
            slot.in_flight += 1
            job.epoch = slot.epoch
        job.slot = slot
        job.ref = slot.handle.infer.remote(job.frame, job.model_idx)

    def _release(self, job: _Job, done: bool) -> None:
        slot, ref, job.slot, job.ref = job.slot, job.ref, None, None
        if not done:
            _forget(ref)
        if slot is not None:
            with self._lock:
                slot.in_flight -= 1
                if done:
                    slot.frames += 1

    def _abandon(self, pending: Iterable[_Job]) -> None:
        for job in pending:
            self._release(job, False)

    def _no_replica_error(self) -> DeviceError:
        return DeviceError(f"no live replica in the pool for {self._unavailable_timeout:g} s "
                           f"(states: {[s.state for s in self._slots]})", lost_frames=1)

    def _submit_sync(self, job: _Job) -> None:
        deadline = time.monotonic() + self._unavailable_timeout
        while (slot := self._pick(job.stream)) is None:
            if time.monotonic() > deadline:
                raise self._no_replica_error()
            probes = [s.probe for s in self._slots if s.probe is not None]
            if probes:
                ray.wait(probes, num_returns=1, timeout=PROBE_INTERVAL)
            else:
                time.sleep(PROBE_INTERVAL)
        self._dispatch(job, slot)

    async def _submit_async(self, job: _Job) -> None:
        deadline = time.monotonic() + self._unavailable_timeout
        while (slot := self._pick(job.stream)) is None:
            if time.monotonic() > deadline:
                raise self._no_replica_error()
            await asyncio.sleep(PROBE_INTERVAL)
        self._dispatch(job, slot)

    def _failed(self, job: _Job, exc: BaseException,
                pending: collections.deque[_Job] | None) -> list[_Job]:
        """Classify the failure of ``job``'s call: raise a content error (or
        ClosedError), or mark the replica down and return the jobs to resubmit
        (``job`` and the unfinished jobs of ``pending`` on the same replica)."""
        slot, epoch = job.slot, job.epoch
        assert slot is not None
        if isinstance(exc, ray.exceptions.RayTaskError):
            cause = _cause(exc)
            if not isinstance(cause, DeviceError | ClosedError):
                self._release(job, False)
                raise cause from None   # the frame's own fault: not retried
            exc = cause
        self._release(job, False)
        self._check_open()
        self._mark_down(slot, epoch, exc)
        again = [job]
        if pending is not None:
            others = [j for j in pending
                      if j is not job and j.slot is slot and j.epoch == epoch]
            if others:
                done, _ = ray.wait([j.ref for j in others], num_returns=len(others), timeout=0)
                for other in others:
                    if other.ref not in done:
                        self._release(other, False)
                        again.append(other)
        return again

    def _result_sync(self, job: _Job, pending: collections.deque[_Job] | None) -> Any:
        while True:
            try:
                value = ray.get(job.ref)
            except ray.exceptions.RayError as exc:
                for again in self._failed(job, exc, pending):
                    self._submit_sync(again)
                continue
            except BaseException:
                self._release(job, False)
                raise
            self._release(job, True)
            return value

    async def _result_async(self, job: _Job, pending: collections.deque[_Job] | None) -> Any:
        while True:
            try:
                value = await asyncio.wrap_future(job.ref.future())
            except ray.exceptions.RayError as exc:
                for again in self._failed(job, exc, pending):
                    await self._submit_async(again)
                continue
            except BaseException:
                self._release(job, False)
                raise
            self._release(job, True)
            return value

    def _kill_all(self) -> None:
        for ref in self.__dict__.get("_starting") or []:
            _forget(ref)
        for slot in getattr(self, "_slots", []):
            slot.state = "dead"
            slot.probe, probe = None, slot.probe
            _forget(probe)
            try:
                ray.kill(slot.handle, no_restart=True)
            except Exception:  # pragma: no cover - Ray already shut down
                log.debug("could not kill replica %d", slot.index, exc_info=True)


def _forget(ref: Any) -> None:
    """Drop a call's result without Ray logging an "Unhandled error" for it later
    (a resubmitted frame's first call, a call abandoned at close)."""
    if ref is not None:
        ref.future()


def _cause(exc: ray.exceptions.RayTaskError) -> BaseException:
    """The exception a replica raised, as itself (not Ray's wrapper)."""
    cause = exc.cause
    if isinstance(cause, BaseException):
        cause.add_note("(raised by a memryx.ray replica)")
        return cause
    return DeviceError(str(exc))  # pragma: no cover - an unpicklable error
