"""What the simulated device computes, and with what.

*Backends* run one model's graph on the host: ``"onnxruntime"`` (the default)
or ``"openvino"`` (when the ``openvino`` package is installed; often faster on
x86 CPUs). Both give the same outputs within float tolerance.

*Strategies* decide which frames the backend runs:

* :class:`ReuseCache` (mode ``"reuse"``): each distinct input frame is computed
  once; a frame identical to one computed before (same bytes, shapes and
  dtypes; keyed by a 128-bit xxh3 hash) gets a copy of its outputs. The cache is a
  bounded LRU of ``cache_size`` entries; identical frames in flight at once are
  computed once (the later ones wait for the first).
* :class:`Sampler` (mode ``"sampled"``): the device starts computing a frame
  only when a compute slot is free (or when its stream has nothing computed
  yet), in the background; when a frame is due it gets a copy of the outputs of
  the newest frame *of the same stream*, at or before it, whose computation has
  finished. Its *staleness* is how many frames of that stream lie between the
  two (0: its own outputs).

Outputs either strategy keeps are read-only, and each receiver gets a writeable
copy of its own: one copy per frame answered from kept outputs, the price of
outputs a receiver may keep and modify as it can on the chip (handing out shared
read-only arrays would save it, and break code that writes into its outputs).

This module knows nothing of pacing, futures or the event loop: the device
(:mod:`.simulated`) calls it from its loop and its worker threads.
"""

from __future__ import annotations

import bisect
import hashlib
import importlib
import importlib.util
import os
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from .._exceptions import DfpError, UsageError
from ._taking import Answered, Keyed

if TYPE_CHECKING:
    from ..dfp import ModelInfo

__all__ = ["BACKENDS", "BACKEND_ENV", "DEFAULT_CACHE_SIZE", "BackendError", "ReuseCache",
           "Sampler", "check_int", "frame_key", "load_runner", "modeled_perf",
           "resolve_backend"]

Array = NDArray[Any]
Frame = list[Array]
Runner = Callable[[Frame], Frame]

BACKENDS = ("onnxruntime", "openvino")
#: Environment variable naming the simulated device's compute backend (default onnxruntime).
BACKEND_ENV = "MEMRYX_SIM_BACKEND"
#: Distinct frames whose outputs mode ``"reuse"`` keeps, by default.
DEFAULT_CACHE_SIZE = 1024


class BackendError(UsageError, ValueError):
    """The compute backend asked for is unknown or not installed."""


def resolve_backend(backend: str | None) -> str:
    """The backend to use: ``backend``, else ``$MEMRYX_SIM_BACKEND``, else onnxruntime;
    :class:`BackendError` (a ValueError) when it is unknown or not installed."""
    name = backend if backend is not None else os.environ.get(BACKEND_ENV) or "onnxruntime"
    if not isinstance(name, str) or name not in BACKENDS:
        raise BackendError(f"unknown compute backend {name!r}: expected one of {BACKENDS}")
    if name == "openvino":
        try:  # found, not imported: importing it starts threads of its own
            found = importlib.util.find_spec("openvino") is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise BackendError("compute backend 'openvino' is not installed: pip install "
                               "openvino (or 'memryx[bench]'), or use backend='onnxruntime'"
                               )
    return name


_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16",
              "tensor(double)": "float64", "tensor(uint8)": "uint8", "tensor(int8)": "int8",
              "tensor(uint16)": "uint16", "tensor(int16)": "int16", "tensor(int32)": "int32",
              "tensor(int64)": "int64", "tensor(bool)": "bool"}


def _check_ports(info: ModelInfo, metas: tuple[list[tuple[str, tuple[Any, ...], str]], ...]
                 ) -> None:
    """The DFP's port table must describe its own graph (a crafted DFP may lie).

    ``metas``: (inputs, outputs) of the graph, each ``(name, shape, dtype name)``.
    """
    for kind, ports, graph in (("input", info.inputs, metas[0]),
                               ("output", info.outputs, metas[1])):
        if [p.layer for p in ports] != [name for name, _, _ in graph]:
            raise DfpError(
                f"model {info.index} ({info.name!r}): the DFP's {kind} ports "
                f"{[p.layer for p in ports]} are not its graph's {[n for n, _, _ in graph]}")
        for port, (_, shape, dtype) in zip(ports, graph, strict=True):
            dims = tuple(d if isinstance(d, int) else -1 for d in shape)
            fits = len(dims) == len(port.shape) and all(
                d in (-1, s) for d, s in zip(dims, port.shape, strict=True))
            if not fits or dtype != port.dtype.name:
                raise DfpError(
                    f"model {info.index} ({info.name!r}): {kind} port {port.port} "
                    f"({port.layer!r}) says {port.shape} {port.dtype}, but the graph has "
                    f"{tuple(shape)} {dtype}")


def _ort_runner(info: ModelInfo) -> Runner:
    from .._core.processing import new_session

    session = new_session(info.graph)
    _check_ports(info, tuple([(m.name, tuple(m.shape), _ORT_TYPES.get(m.type, m.type))
                              for m in metas]
                             for metas in (session.get_inputs(), session.get_outputs())))
    run, names = session.run, [p.layer for p in info.inputs]

    def runner(frame: Frame) -> Frame:
        return list(run(None, dict(zip(names, frame, strict=True))))
    return runner


def _onnx_ports(graph: bytes) -> tuple[list[tuple[str, tuple[Any, ...], str]], ...]:
    import onnx

    model = onnx.load_model_from_string(graph)
    inits = {i.name for i in model.graph.initializer}

    def ports(values: Any) -> list[tuple[str, tuple[Any, ...], str]]:
        out = []
        for v in values:
            t = v.type.tensor_type
            shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)).name
            out.append((v.name, shape, dtype))
        return out
    return ports([v for v in model.graph.input if v.name not in inits]), \
        ports(model.graph.output)


_OPENVINO_FIRST_INFER = threading.Lock()
_OPENVINO_CORE: list[Any] = []  # the process's one OpenVINO Core, once made


def _openvino_core() -> Any:
    """The process's one OpenVINO ``Core``, made on first use and never released.

    When OpenVINO's CPU plugin loads it gives the thread loading it an alternate signal
    stack of its own, and when it unloads (the last ``Core`` released) it unmaps that
    stack, restoring the registration only if that happens on the same thread. Released
    on another thread (a garbage collection, a device closed elsewhere), the loading
    thread kept a registration into unmapped memory, and the next signal it handled
    (Ctrl-C: Python's handlers run on the alternate stack) crashed the process with a
    segfault. Loaded once and kept, the plugin never unmaps it.
    """
    with _OPENVINO_FIRST_INFER:
        if not _OPENVINO_CORE:
            import openvino as ov

            _OPENVINO_CORE.append(ov.Core())
        return _OPENVINO_CORE[0]


def _openvino_runner(info: ModelInfo) -> Runner:
    _check_ports(info, _onnx_ports(info.graph))
    core = _openvino_core()
    model = core.read_model(info.graph, b"")
    # f32 everywhere: a CPU that prefers bf16 would otherwise change the outputs
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                 "PERFORMANCE_HINT": "LATENCY"})
    outputs = list(compiled.outputs)
    dtypes = [p.dtype for p in info.outputs]
    names = [p.layer for p in info.inputs]
    idle: queue.SimpleQueue[Any] = queue.SimpleQueue()  # one request per concurrent caller
    # OpenVINO's Python binding initialises shared state on a request's first infer(); two
    # threads doing that at once can deadlock in it (seen: every worker parked in a C++
    # static-init guard). One inference here, under a process-wide lock, does it first.
    first = compiled.create_infer_request()
    with _OPENVINO_FIRST_INFER:
        first.infer({n: np.zeros(p.shape, p.dtype) for n, p in zip(names, info.inputs,
                                                                     strict=True)})
    idle.put(first)

    def runner(frame: Frame) -> Frame:
        try:
            request = idle.get_nowait()
        except queue.Empty:
            request = compiled.create_infer_request()
        try:
            result = request.infer(dict(zip(names, frame, strict=True)))
            return [np.array(result[o], dtype=d, copy=True)
                    for o, d in zip(outputs, dtypes, strict=True)]
        finally:
            idle.put(request)
    return runner


def load_runner(info: ModelInfo, backend: str) -> Runner:
    """A callable computing one frame of model ``info`` with ``backend`` (thread-safe);
    DfpError when the graph cannot be loaded or does not match the DFP's ports."""
    try:
        return _openvino_runner(info) if backend == "openvino" else _ort_runner(info)
    except DfpError:
        raise
    except Exception as exc:
        raise DfpError(f"the DFP's graphs cannot be loaded by {backend} ({exc})") from exc


def _pick_hash() -> tuple[str, Callable[[], Any]]:
    try:  # xxh3 hashes a 224x224 frame in tens of microseconds, hashlib in milliseconds
        xxhash = importlib.import_module("xxhash")
        return "xxh3_128", xxhash.xxh3_128
    except ImportError:  # a dependency, but the device still works without it
        return "sha256", hashlib.sha256


HASH, _hasher = _pick_hash()


#: (dtype, shape) -> the bytes that stand for them in a frame's hash (few distinct ones).
_HEADERS: dict[tuple[np.dtype[Any], tuple[int, ...]], bytes] = {}


def frame_key(frame: Frame) -> bytes:
    """A 128-bit hash of a frame's dtypes, shapes and bytes (for every frame of mode
    ``"reuse"``, on the thread that produced it: the hash itself, not the Python around
    it, should be the cost)."""
    h = _hasher()
    for a in frame:
        head = _HEADERS.get((a.dtype, a.shape))
        if head is None:
            head = f"{a.dtype.str}{a.shape}".encode()
            if len(_HEADERS) < 1024:
                _HEADERS[(a.dtype, a.shape)] = head
        h.update(head)
        h.update(a if a.flags.c_contiguous else np.ascontiguousarray(a))
    return bytes(h.digest())


def _copy(outputs: Frame) -> Frame:
    """The receiver's own (writeable) copy of kept outputs."""
    return [a.copy() for a in outputs]


def _keep(outputs: Frame) -> Frame:
    """``outputs`` made read-only, to be kept and handed out only as copies: a path that
    handed out the kept arrays themselves would fail loudly at the receiver's first write,
    never corrupt what later frames get."""
    for a in outputs:
        a.flags.writeable = False
    return outputs


class ReuseCache:
    """Outputs of distinct frames, computed once each (thread-safe, bounded LRU)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[bytes, Frame] = OrderedDict()
        self._pending: dict[bytes, threading.Event] = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def compute(self, run: Runner, frames: list[Frame]) -> list[Frame]:
        """Outputs of ``frames``; each distinct frame computed once while it is cached.
        The arrays returned are the caller's (copies of the cached ones). Frames the
        device took (:mod:`._taking`) come with their outputs or their hash."""
        out = []
        for f in frames:
            if type(f) is Answered:
                with self._lock:
                    self.hits += 1
                out.append(f.outputs)
            else:
                out.append(self._one(run, f.key if type(f) is Keyed else frame_key(f), f))
        return out

    def lookup(self, key: bytes) -> Frame | None:
        """A copy of the outputs cached for ``key``, or None. Not counted: a frame taken
        may never reach the device (refused, or dropped by a stop); the device counts the
        hit when the frame reaches it (:meth:`compute`, :meth:`cached`)."""
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                return None
            self._entries.move_to_end(key)
        return _copy(found)

    def cached(self, frames: list[Frame]) -> list[Frame] | None:
        """Outputs of ``frames`` when every one of them is cached or was answered when it
        was taken (counted as hits), else None (nothing counted): a lookup cheap enough
        for the event loop."""
        if all(type(f) is Answered for f in frames):  # the common case: nothing to look up
            with self._lock:
                self.hits += len(frames)
            return [f.outputs for f in frames]  # type: ignore[attr-defined]
        keys = [None if type(f) is Answered else f.key if type(f) is Keyed else frame_key(f)
                for f in frames]
        with self._lock:
            found = [None if k is None else self._entries.get(k) for k in keys]
            if any(e is None and k is not None for e, k in zip(found, keys, strict=True)):
                return None
            for k in keys:
                if k is not None:
                    self._entries.move_to_end(k)
            self.hits += len(keys)
        return [f.outputs if e is None else _copy(e)  # type: ignore[attr-defined]
                for f, e in zip(frames, found, strict=True)]

    def _one(self, run: Runner, key: bytes, frame: Frame) -> Frame:
        while True:
            with self._lock:
                cached = self._entries.get(key)
                if cached is not None:
                    self._entries.move_to_end(key)
                    self.hits += 1
                    return _copy(cached)
                event = self._pending.get(key)
                if event is None:  # ours to compute
                    self._pending[key] = threading.Event()
                    self.misses += 1
                    break
            event.wait()  # the same frame is being computed by another worker: share it
        try:
            outputs = run(frame)
            with self._lock:
                self._entries[key] = _keep(_copy(outputs))
                while len(self._entries) > self.size:
                    self._entries.popitem(last=False)
                    self.evictions += 1
        finally:
            with self._lock:
                self._pending.pop(key).set()
        return outputs

    def statistics(self) -> dict[str, Any]:
        with self._lock:
            total = self.hits + self.misses
            return {"size": self.size, "entries": len(self._entries), "hits": self.hits,
                    "misses": self.misses, "evictions": self.evictions,
                    "hit_rate": self.hits / total if total else None, "hash": HASH}


@dataclass
class _Stream:
    """What :class:`Sampler` knows of one stream."""

    next_seq: int = 0
    running: int = 0
    """Computations of this stream's frames not finished yet."""
    pending: set[int] = field(default_factory=set)
    """Seqs of the frames numbered and not answered yet."""
    borrowed: int = 0
    """Frames taken without a copy (:meth:`Sampler.borrow`) and not numbered yet."""
    done: OrderedDict[int, Frame] = field(default_factory=OrderedDict)
    """seq -> outputs of finished computations that may still answer a frame, ascending."""
    fresh: int = 0
    stale: int = 0
    max_staleness: int = 0
    staleness_sum: int = 0


def _trim(st: _Stream) -> None:
    """Drop the computed outputs of ``st`` that can answer no frame any more: the oldest
    goes while the next one is at or before every frame still to be answered (later
    frames get the newest, which is always kept)."""
    done = st.done
    if len(done) < 2:
        return
    low = min(st.pending, default=st.next_seq)
    while len(done) > 1:
        keys = iter(done)
        next(keys)
        if next(keys) > low:
            return
        done.popitem(last=False)


#: Staleness histogram buckets: an output counts in the first bucket whose bound it does not
#: exceed (frames of its stream); the last one counts the rest.
STALENESS_BUCKETS = (0, 1, 3, 7, 15, 31, 63, 127, 255)


class Sampler:
    """Bookkeeping of mode ``"sampled"`` for one model (loop thread only).

    Frames are numbered in submission order *per stream*. A frame is *computed*
    (in the background) when fewer than ``slots`` computations are running, or
    when its stream has no computation running and none finished (so every
    stream gets real outputs of its own). Every frame, computed or not, is
    answered when it is due with the outputs of the newest frame *of its stream*,
    numbered at or before it, whose computation has finished: its own (staleness 0)
    or an earlier one (staleness = the difference of the numbers, in frames of the
    stream).

    The state of at most ``MAX_STREAMS`` streams is kept: the least recently used
    stream with no frame in flight is forgotten (its next frame starts afresh). A
    stream keeps its newest computed output, and besides it every one that is the
    newest at or before a frame still to be answered, so every frame numbered stays
    answerable once a frame at or before it was computed, and a stream with nothing in
    flight keeps one output.

    A frame may be *borrowed* (:meth:`borrow`, on the thread that produced it): the
    device keeps no copy of it, so it must never be computed. Only a frame of a stream
    with a computed output already, while every slot is busy, is borrowed; the stream
    is not forgotten while a borrowed frame of it is on its way, so that output still
    answers it when it is numbered.
    """

    MAX_STREAMS = 1024
    REPORTED_STREAMS = 64  # streams listed one by one in statistics()

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.running = 0
        self._streams: OrderedDict[int, _Stream] = OrderedDict()
        self.computed = 0
        self.failed = 0
        self.fresh = 0
        self.stale = 0
        self.max_staleness = 0
        self._staleness_sum = 0
        self._histogram = [0] * (len(STALENESS_BUCKETS) + 1)
        # guards ``_Stream.borrowed`` and the forgetting of streams (borrow() runs on the
        # threads that produce frames; everything else on the loop)
        self._borrow_lock = threading.Lock()

    def _stream(self, stream: int) -> _Stream:
        st = self._streams.get(stream)
        if st is None:
            st = self._streams[stream] = _Stream()
            if len(self._streams) > self.MAX_STREAMS:
                with self._borrow_lock:
                    idle = next((k for k, v in self._streams.items()
                                 if not v.running and not v.pending and not v.borrowed
                                 and k != stream), None)
                    if idle is not None:
                        del self._streams[idle]
        else:
            self._streams.move_to_end(stream)
        return st

    def admit(self, stream: int = 0) -> tuple[int, bool]:
        """Number the next frame of ``stream``; True when it is to be computed (a slot is
        free, or its stream has nothing else to answer it with)."""
        st = self._stream(stream)
        seq = st.next_seq
        st.next_seq += 1
        st.pending.add(seq)
        if self.running < self.slots or not (st.running or st.done):
            self.start(stream)
            return seq, True
        return seq, False

    def borrow(self, stream: int) -> bool:
        """On the thread that produced a frame of ``stream``: True when the device may
        keep no copy of it (its stream has a computed output, which will answer it, and
        every slot is busy); the frame is then counted as borrowed until
        :meth:`admit_many` numbers it, never computed. False: the device copies it. (The
        slots are read without a lock: a stale read borrows a frame a free slot could
        have computed, which only makes its output staler.)"""
        if self.running < self.slots:
            return False
        with self._borrow_lock:
            st = self._streams.get(stream)
            if st is None or not st.done:  # (never empty again: the newest is kept)
                return False
            st.borrowed += 1
            return True

    def admit_many(self, streams: Sequence[int], takeable: Sequence[bool] | None = None
                   ) -> list[tuple[int, int, bool]]:
        """``admit`` for the frames of one batch, in order: ``(stream, seq, computed)``
        each (one call per batch on the device's hot path). ``takeable[i]`` False: frame
        ``i`` was borrowed (:meth:`borrow`): never computed, its stream's computed output
        answers it."""
        out: list[tuple[int, int, bool]] = []
        slots = self.slots
        last, st = None, None
        for i, stream in enumerate(streams):
            if stream != last or st is None:
                st, last = self._stream(stream), stream
            seq = st.next_seq
            st.next_seq += 1
            st.pending.add(seq)
            if takeable is not None and not takeable[i]:
                with self._borrow_lock:
                    st.borrowed -= 1
                out.append((stream, seq, False))
            elif self.running < slots or not (st.running or st.done):
                self.running += 1
                st.running += 1
                out.append((stream, seq, True))
            else:
                out.append((stream, seq, False))
        return out

    def start(self, stream: int) -> None:
        """A computation of one of ``stream``'s frames starts (``computed_one`` ends it)."""
        self.running += 1
        self._stream(stream).running += 1

    def computed_one(self, stream: int, seq: int, outputs: Frame | None) -> None:
        """A computation finished (``outputs`` None: it failed); its slot is free. The
        outputs are kept as they are (their arrays are handed out only as copies)."""
        self.running -= 1
        st = self._streams.get(stream)
        if st is not None:
            st.running -= 1
        if outputs is None:
            self.failed += 1
            return
        self.computed += 1
        if st is None:  # pragma: no cover - a stream with a running frame is never dropped
            return
        newest = next(reversed(st.done), -1)
        done = st.done
        done[seq] = _keep(outputs)  # not handed out: no copy needed to keep them
        if seq < newest:  # finished out of order: keep them in seq order
            done = st.done = OrderedDict(sorted(done.items()))
        _trim(st)

    def running_for(self, stream: int) -> int:
        """Computations of ``stream``'s frames still running."""
        st = self._streams.get(stream)
        return st.running if st is not None else 0

    def _source(self, stream: int, seq: int) -> tuple[int, Frame] | None:
        st = self._streams.get(stream)
        if st is None:
            return None
        done = st.done
        if done:  # the newest finished one is at or before ``seq``: the common case
            newest = next(reversed(done))
            if newest <= seq:
                return newest, done[newest]
        for s in reversed(done):
            if s <= seq:
                return s, st.done[s]
        return None

    def can_answer(self, stream: int, seq: int) -> bool:
        """Whether a frame of ``stream`` numbered at or before ``seq`` has been computed."""
        return self._source(stream, seq) is not None

    def outputs_for(self, stream: int, seq: int) -> Frame:
        """A copy of the outputs of the newest computed frame of ``stream`` at or before
        ``seq`` (which :meth:`can_answer` must have confirmed), counting its staleness."""
        source = self._source(stream, seq)
        assert source is not None
        st = self._streams[stream]
        st.pending.discard(seq)
        if not st.pending:
            _trim(st)
        staleness = seq - source[0]
        if staleness:
            self.stale += 1
            st.stale += 1
        else:
            self.fresh += 1
            st.fresh += 1
        self.max_staleness = max(self.max_staleness, staleness)
        st.max_staleness = max(st.max_staleness, staleness)
        self._staleness_sum += staleness
        st.staleness_sum += staleness
        self._histogram[bisect.bisect_left(STALENESS_BUCKETS, staleness)] += 1
        return _copy(source[1])

    def answer(self, seqs: Sequence[tuple[int, int]]) -> list[Frame] | None:
        """``outputs_for`` each ``(stream, seq)`` of one job when every one of them can be
        answered (else None, nothing counted): one call per job on the device's hot path."""
        source = self._source
        sources = []
        for stream, seq in seqs:
            found = source(stream, seq)
            if found is None:
                return None
            sources.append(found)
        out: list[Frame] = []
        streams, histogram, buckets = self._streams, self._histogram, STALENESS_BUCKETS
        last, st = None, None
        for (stream, seq), (s, outputs) in zip(seqs, sources, strict=True):
            if stream != last or st is None:
                st, last = streams[stream], stream
            st.pending.discard(seq)
            staleness = seq - s
            if staleness:
                self.stale += 1
                st.stale += 1
                if staleness > self.max_staleness:
                    self.max_staleness = staleness
                if staleness > st.max_staleness:
                    st.max_staleness = staleness
                self._staleness_sum += staleness
                st.staleness_sum += staleness
                histogram[bisect.bisect_left(buckets, staleness)] += 1
            else:
                self.fresh += 1
                st.fresh += 1
                histogram[0] += 1
            out.append([a.copy() for a in outputs])
            if not st.pending:
                _trim(st)
        return out

    def forget(self, stream: int, seq: int) -> None:
        """Frame ``seq`` of ``stream`` will not be answered (failed or cancelled)."""
        st = self._streams.get(stream)
        if st is not None:
            st.pending.discard(seq)
            if not st.pending:
                _trim(st)

    def statistics(self) -> dict[str, Any]:
        answered = self.fresh + self.stale
        bounds = [f"<={b}" for b in STALENESS_BUCKETS] + [f">{STALENESS_BUCKETS[-1]}"]
        streams = {}
        for k, st in list(self._streams.items())[-self.REPORTED_STREAMS:]:
            n = st.fresh + st.stale
            streams[k] = {"frames": n, "fresh": st.fresh, "stale": st.stale,
                          "staleness_max": st.max_staleness,
                          "staleness_mean": st.staleness_sum / n if n else None}
        return {"computed": self.computed, "failed": self.failed, "slots": self.slots,
                "fresh": self.fresh, "stale": self.stale,
                "staleness_max": self.max_staleness,
                "staleness_mean": self._staleness_sum / answered if answered else None,
                "staleness_histogram": dict(zip(bounds, self._histogram, strict=True)),
                "staleness_per": "stream",
                "streams": streams}


# -- device set-up ----------------------------------------------------------------------
def modeled_perf(info: ModelInfo, num_chips: int) -> dict[str, Any]:
    """The model's performance figures: from the DFP, or estimated now if it has none."""
    if info.perf and "fps" in info.perf and "latency_ms" in info.perf:
        return dict(info.perf)
    import onnx

    from ..timing import estimate

    return estimate(onnx.load_model_from_string(info.graph), num_chips).to_json()


def check_int(name: str, value: Any, *, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
