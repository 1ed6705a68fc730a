"""Prometheus metrics of the device server (``memryx serve --metrics HOST:PORT``).

Needs the official ``prometheus-client``, the optional extra ``memryx[metrics]``.

The server calls a small recorder at a handful of points (``recorder()`` is a
no-op object until :func:`start_exporter` or :func:`enable` installs a real
one, so a server without ``--metrics`` pays one method call per event)::

    recorder().client_connected(session)       / client_disconnected(session)
    recorder().model_opened(session, dfp)      # modeled fps, for the chip's utilisation
    recorder().frame_in(model, session)        / frame_out(model, session)
    recorder().scheduler_switch()

``session`` is any object, one per connection; its ``peer`` attribute (or
``str()``) is the ``client`` label.

Exposed (``model`` is the model index in the client's DFP, ``client`` the
peer's name, e.g. ``"my_app pid 4242"``):

==========================================  =========  ================================
memryx_model_frames_{in,out,dropped}_total   counter    per model, all clients
memryx_client_frames_{in,out,dropped}_total  counter    per client and model; removed
                                                        when the client disconnects
memryx_frames_in_flight                      gauge      per client and model: received,
                                                        not yet answered (queue depth)
memryx_frame_latency_seconds                 histogram  per model: frame received ->
                                                        output written
memryx_clients_connected                     gauge
memryx_client_connections_total              counter
memryx_scheduler_switches_total              counter    the chip handed to another model
memryx_chip_busy_seconds_total               counter    modeled: frames out / modeled fps
memryx_chip_utilization                      gauge      modeled busy share, last 10 s
==========================================  =========  ================================

"Dropped" frames are those a client had in flight when it disconnected.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..dfp import Dfp

__all__ = ["EXTRA", "Exporter", "Metrics", "enable", "recorder", "start_exporter"]

EXTRA = "pip install 'memryx[metrics]'"
#: Seconds over which ``memryx_chip_utilization`` is averaged.
UTILIZATION_WINDOW_S = 10
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   float("inf"))


class _Null:
    """The recorder when metrics are off: every call does nothing."""

    def client_connected(self, client: object = None) -> None:
        pass

    def client_disconnected(self, client: object) -> None:
        pass

    def model_opened(self, client: object, dfp: Dfp) -> None:
        pass

    def frame_in(self, model: int, client: object) -> None:
        pass

    def frame_out(self, model: int, client: object) -> None:
        pass

    def scheduler_switch(self) -> None:
        pass


_active: Any = _Null()


def recorder() -> Metrics | _Null:
    """The process's recorder: a :class:`Metrics` once enabled, else a no-op."""
    return _active  # type: ignore[no-any-return]


def _prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError as exc:
        raise ImportError(f"metrics need prometheus-client: {EXTRA}") from exc
    return prometheus_client


class Metrics:
    """The server's metrics, in their own ``CollectorRegistry``."""

    def __init__(self) -> None:
        pc = _prometheus()
        self.registry = pc.CollectorRegistry(auto_describe=True)
        r = self.registry
        self._lock = threading.Lock()
        self.model_in = pc.Counter("memryx_model_frames_in", "Frames received, per model",
                                   ["model"], registry=r)
        self.model_out = pc.Counter("memryx_model_frames_out", "Outputs sent, per model",
                                    ["model"], registry=r)
        self.model_dropped = pc.Counter(
            "memryx_model_frames_dropped",
            "Frames in flight when their client disconnected, per model", ["model"], registry=r)
        self.client_in = pc.Counter("memryx_client_frames_in", "Frames received, per client",
                                    ["client", "model"], registry=r)
        self.client_out = pc.Counter("memryx_client_frames_out", "Outputs sent, per client",
                                     ["client", "model"], registry=r)
        self.client_dropped = pc.Counter(
            "memryx_client_frames_dropped", "Frames in flight when the client disconnected",
            ["client", "model"], registry=r)
        self.latency = pc.Histogram("memryx_frame_latency_seconds",
                                    "Frame received -> its output written, per model",
                                    ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.clients = pc.Gauge("memryx_clients_connected", "Clients connected now", registry=r)
        self.connections = pc.Counter("memryx_client_connections",
                                      "Client connections accepted", registry=r)
        self.switches = pc.Counter("memryx_scheduler_switches",
                                   "Times the chip was handed to another model", registry=r)
        self.busy = pc.Counter("memryx_chip_busy_seconds",
                               "Modeled chip time used: outputs / the model's modeled fps",
                               registry=r)
        # per (id(session), model): arrival times of the frames in flight (FIFO, as outputs are)
        self._flight: dict[tuple[int, int], deque[float]] = {}
        self._cost: dict[tuple[int, int], float] = {}
        self._labels: dict[int, str] = {}
        self._window = [0.0] * UTILIZATION_WINDOW_S
        self._window_sec = [0] * UTILIZATION_WINDOW_S
        self.registry.register(_ScrapeTime(self))

    # -- events --------------------------------------------------------------------------------
    def client_connected(self, client: object = None) -> None:
        self.clients.inc()
        self.connections.inc()

    def client_disconnected(self, client: object) -> None:
        self.clients.dec()
        sid, label = id(client), _label(client)
        with self._lock:
            gone = [key for key in self._flight if key[0] == sid]
            lost = {key[1]: len(self._flight.pop(key)) for key in gone}
            for key in [k for k in self._cost if k[0] == sid]:
                del self._cost[key]
            self._labels.pop(sid, None)
            shared = label in self._labels.values()  # another connection of the same peer
        for model, n in lost.items():
            if n:
                self.model_dropped.labels(str(model)).inc(n)
                self.client_dropped.labels(label, str(model)).inc(n)
            if shared:
                continue
            for family in (self.client_in, self.client_out, self.client_dropped):
                with contextlib.suppress(KeyError):
                    family.remove(label, str(model))

    def model_opened(self, client: object, dfp: Dfp) -> None:
        sid, label = id(client), _label(client)
        with self._lock:
            self._labels[sid] = label
            for m in dfp.models:
                fps = float((m.perf or {}).get("fps") or 0.0)
                self._cost[(sid, m.index)] = 1.0 / fps if fps > 0 else 0.0
                self._flight.setdefault((sid, m.index), deque())
        for m in dfp.models:  # every series exists from the start, at 0
            model = str(m.index)
            for family in (self.model_in, self.model_out, self.model_dropped, self.latency):
                family.labels(model)
            for family in (self.client_in, self.client_out, self.client_dropped):
                family.labels(label, model)

    def frame_in(self, model: int, client: object) -> None:
        now = time.monotonic()
        sid, label = id(client), _label(client)
        with self._lock:
            self._labels[sid] = label
            self._flight.setdefault((sid, model), deque()).append(now)
        self.model_in.labels(str(model)).inc()
        self.client_in.labels(label, str(model)).inc()

    def frame_out(self, model: int, client: object) -> None:
        now = time.monotonic()
        sid, label_c = id(client), _label(client)
        with self._lock:
            flight = self._flight.get((sid, model))
            t0 = flight.popleft() if flight else None
            cost = self._cost.get((sid, model), 0.0)
            if cost:
                sec = int(now)
                slot = sec % UTILIZATION_WINDOW_S
                if self._window_sec[slot] != sec:
                    self._window_sec[slot], self._window[slot] = sec, 0.0
                self._window[slot] += cost
        label = str(model)
        self.model_out.labels(label).inc()
        self.client_out.labels(label_c, label).inc()
        if t0 is not None:
            self.latency.labels(label).observe(now - t0)
        if cost:
            self.busy.inc(cost)

    def scheduler_switch(self) -> None:
        self.switches.inc()

    # -- scrape-time values --------------------------------------------------------------------
    def in_flight(self) -> dict[tuple[str, int], int]:
        """Frames in flight per (client label, model)."""
        out: dict[tuple[str, int], int] = {}
        with self._lock:
            for (sid, model), q in self._flight.items():
                key = (self._labels.get(sid, "?"), model)
                out[key] = out.get(key, 0) + len(q)
        return out

    def utilization(self) -> float:
        """Modeled chip busy share over the last full ``UTILIZATION_WINDOW_S`` seconds."""
        now = int(time.monotonic())
        with self._lock:
            busy = sum(v for v, s in zip(self._window, self._window_sec, strict=True)
                       if now - UTILIZATION_WINDOW_S <= s < now)
        return min(1.0, busy / UTILIZATION_WINDOW_S)

    def text(self) -> bytes:
        """The exposition text, as /metrics serves it."""
        return bytes(_prometheus().generate_latest(self.registry))


def _label(client: object) -> str:
    return client if isinstance(client, str) else str(getattr(client, "peer", client))


class _ScrapeTime:
    """Values computed when scraped: queue depths and the utilisation."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Any]:
        return []  # dynamic: not checked at registration

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        flight = GaugeMetricFamily("memryx_frames_in_flight",
                                   "Frames received and not yet answered, per client and model",
                                   labels=["client", "model"])
        for (client, model), n in sorted(self.metrics.in_flight().items()):
            flight.add_metric([client, str(model)], n)
        yield flight
        yield GaugeMetricFamily("memryx_chip_utilization",
                                f"Modeled chip busy share over the last "
                                f"{UTILIZATION_WINDOW_S} s (0..1)",
                                value=self.metrics.utilization())


@dataclass
class Exporter:
    """The HTTP server of /metrics (a daemon thread) and the recorder it serves."""

    metrics: Metrics
    host: str
    port: int
    _httpd: Any
    _thread: threading.Thread

    @property
    def host_for_url(self) -> str:
        return f"[{self.host}]" if ":" in self.host else self.host

    def close(self) -> None:
        global _active
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
        if _active is self.metrics:
            _active = _Null()


def enable(metrics: Metrics | None = None) -> Metrics:
    """Install ``metrics`` (a new :class:`Metrics` by default) as the process's recorder."""
    global _active
    _active = metrics if metrics is not None else Metrics()
    return _active  # type: ignore[no-any-return]


def start_exporter(host: str, port: int) -> Exporter:
    """Enable metrics and serve them at ``http://host:port/metrics`` (port 0: any free)."""
    pc = _prometheus()
    metrics = Metrics()
    httpd, thread = pc.start_http_server(port, addr=host, registry=metrics.registry)
    enable(metrics)
    return Exporter(metrics, host, int(httpd.server_address[1]), httpd, thread)
