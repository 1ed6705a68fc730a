"""The routing and fault handling of AcceleratorPool (split off to keep modules small).

A *slot* is the pool's view of one replica (its actor handle, state, frames in
flight); a *job* is one frame and the one call currently computing it.
``_Router`` picks the slot for a job (least-loaded, or the stream's), sends
the call, and classifies a failed call: the frame's own fault raises to the
caller; a replica fault marks the slot down (probed until Ray restarted it)
and returns the jobs to send again. Each slot counts *epochs* (one per fault),
so that the late failures of calls sent to an earlier incarnation of a
replica do not mark the restarted one down.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

import ray
import ray.exceptions

from memryx import ClosedError, DeviceError
from memryx._core.threads import loop_future

__all__: list[str] = []

log = logging.getLogger("memryx.ray")

#: Seconds between two probes of a down replica.
PROBE_INTERVAL = 0.05


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

    frame: Any                       # one frame, or a list of ``size`` frames
    model_idx: int
    stream: Hashable | None
    size: int = 0                    # 0: one frame; n >= 1: a chunk of n frames (one call)
    slot: _Slot | None = None
    epoch: int = 0
    ref: Any = None
    attempts: int = 0


class _Router:
    """Routing state and the per-frame protocol; AcceleratorPool sets the attributes."""

    _slots: list[_Slot]
    _lock: threading.Lock
    _affinity: dict[Hashable, _Slot]
    _rr: int
    _resubmitted: int
    _closed: bool
    _unavailable_timeout: float
    _max_attempts: int

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
            slot.in_flight += max(job.size, 1)
            job.epoch = slot.epoch
        job.slot = slot
        job.ref = slot.handle.infer.remote(job.frame, job.model_idx)

    def _release(self, job: _Job, done: bool) -> None:
        slot, ref, job.slot, job.ref = job.slot, job.ref, None, None
        if not done:
            _forget(ref)
        if slot is not None:
            with self._lock:
                slot.in_flight -= max(job.size, 1)
                if done:
                    slot.frames += max(job.size, 1)

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
                value = await loop_future(job.ref.future())
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
