"""Counters of one model or one stream of a lane (frames, latencies, callback time)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["LATENCY_SAMPLES", "Meter"]

#: Latency samples kept per model and per stream for percentiles.
LATENCY_SAMPLES = 4096


@dataclass
class Meter:
    """Counters of one model or one stream."""

    frames_in: int = 0
    frames_out: int = 0
    first_out: float = 0.0
    last_out: float = 0.0
    input_s: float = 0.0
    """Time spent getting frames from the input callback."""
    output_s: float = 0.0
    """Time spent handing outputs over (output callback, post-processing)."""
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))

    def delivered(self, t0: float, ready: float) -> None:
        self.frames_out += 1
        self.latencies.append(ready - t0)
        self.first_out = self.first_out or ready
        self.last_out = ready

    def summary(self) -> dict[str, Any]:
        span = self.last_out - self.first_out
        lat = np.asarray(self.latencies) * 1000.0
        return {
            "frames_in": self.frames_in, "frames_out": self.frames_out,
            "fps": (self.frames_out - 1) / span if span > 0 else 0.0,
            "latency_ms": {
                "p50": float(np.percentile(lat, 50)) if lat.size else None,
                "p99": float(np.percentile(lat, 99)) if lat.size else None,
                "mean": float(lat.mean()) if lat.size else None,
            },
            "input_callback_s": self.input_s, "output_callback_s": self.output_s,
        }
