"""The simulated device: timed pacing, fast, shapes; late-frame reporting (more modes:
test_modes.py)."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest

import memryx as mx
from memryx import testing
from memryx.device import SimulatedDevice, open_device


def identity(fps: float, latency_ms: float) -> mx.Dfp:
    return mx.NeuralCompiler(models=testing.identity_model((1, 4)), fps=fps,
                             latency_ms=latency_ms).run()


def test_timed_mode_paces_outputs_to_the_modeled_rate():
    dfp = identity(fps=200, latency_ms=20)
    xs = [np.full((1, 4), i, np.float32) for i in range(30)]
    with mx.SyncAccl(dfp) as accl:
        t0 = time.monotonic()
        outs = accl.run(xs)
        elapsed = time.monotonic() - t0
        stats = accl.statistics()
    assert [int(o[0, 0]) for o in outs] == list(range(30))
    # never faster than the chip: 29 intervals of 5 ms plus the 20 ms latency (165 ms) ...
    ideal = 29 / 200 + 0.020
    assert elapsed >= ideal - 0.002
    # ... and not much slower either: a pacer that oversleeps by half shows here (the
    # identity model costs the host microseconds, so the slack is for a loaded machine)
    assert elapsed < ideal * 1.5 + 0.05, f"{elapsed * 1000:.0f} ms for an ideal {ideal * 1000:.0f}"
    assert stats["device"]["models"][0]["modeled_fps"] == 200
    p50 = stats["device"]["models"][0]["device_latency_ms"]["p50"]
    assert 20 - 0.5 <= p50 < 20 * 1.5, p50  # chip entry to output: the modeled 20 ms


def test_timed_single_frame_takes_the_modeled_latency():
    dfp = identity(fps=1000, latency_ms=30)
    with mx.SyncAccl(dfp) as accl:
        took = []
        for _ in range(5):
            t0 = time.monotonic()
            accl.run(np.zeros((1, 4), np.float32))
            took.append(time.monotonic() - t0)
    assert min(took) >= 0.030 - 0.001  # never before the modeled latency
    # the typical frame is not much later either (the median, so one hiccup of a loaded
    # machine does not fail it; a pacer that oversleeps does)
    assert sorted(took)[2] < 0.030 * 1.5 + 0.01, took


def test_fast_mode_is_not_paced():
    dfp = identity(fps=10, latency_ms=500)
    with mx.SyncAccl(dfp, mode="fast") as accl:
        t0 = time.monotonic()
        accl.run([np.zeros((1, 4), np.float32)] * 20)
        assert time.monotonic() - t0 < 1.0  # timed mode would need 2.4 s


def test_shapes_mode_returns_zeros_of_the_right_shapes(split_dfp):
    with mx.SyncAccl(split_dfp, mode="shapes") as accl:
        double, neg = accl.run(np.ones((1, 8), np.float32))
    assert double.shape == (1, 8) and double.dtype == np.float32
    assert not double.any() and not neg.any()


def test_a_host_slower_than_the_chip_is_reported_once_at_info(caplog):
    # ResNet50 takes the host milliseconds per frame; the "chip" 10 µs
    dfp = mx.NeuralCompiler(models=testing.resnet50(input_size=32), fps=1e5,
                            latency_ms=0.01).run()
    caplog.set_level(logging.DEBUG, logger="memryx")
    with mx.SyncAccl(dfp) as accl:
        accl.run([np.zeros((1, 3, 32, 32), np.float32)] * 60)
        accl.run([np.ones((1, 3, 32, 32), np.float32)] * 60)
        stats = accl.statistics()["device"]
    model = stats["models"][0]
    assert model["late_frames"] > 0 and model["max_late_ms"] > 0
    assert model["host_slower"] and stats["host_slower"]
    assert stats["suggested_mode"] == "reuse"
    reports = [r for r in caplog.records if "slower than the modeled MX3 rate" in r.message]
    assert len(reports) == 1  # once, not per frame
    assert reports[0].levelno == logging.INFO  # the library stays quiet by default
    assert "mode='reuse'" in reports[0].message and "mode='sampled'" in reports[0].message


def test_device_options_are_checked():
    with pytest.raises(ValueError, match="unknown simulated device mode 'turbo'"):
        SimulatedDevice(mode="turbo")
    with pytest.raises(ValueError, match="queue_depth"):
        SimulatedDevice(queue_depth=0)
    with pytest.raises(ValueError, match="concurrency"):
        SimulatedDevice(concurrency=0)
    with pytest.raises(ValueError, match="unknown device 'gpu:0'"):
        open_device("gpu:0")
    with pytest.raises(TypeError, match="device must be a string or a Device"):
        open_device(42)  # type: ignore[arg-type]


def test_device_from_environment(monkeypatch, identity_dfp):
    monkeypatch.setenv("MEMRYX_DEVICE", "sim:shapes")
    with mx.SyncAccl(identity_dfp) as accl:
        assert not accl.run(np.ones((1, 4), np.float32)).any()
        assert accl.statistics()["device"]["mode"] == "shapes"
    monkeypatch.setenv("MEMRYX_DEVICE", "nonsense")
    with pytest.raises(ValueError, match="unknown device 'nonsense'"):
        mx.SyncAccl(identity_dfp)


def test_a_device_instance_can_be_passed(identity_dfp):
    with mx.SyncAccl(identity_dfp, device=SimulatedDevice(mode="fast", concurrency=1)) as accl:
        assert accl.run(np.ones((1, 4), np.float32)).tolist() == [[1, 1, 1, 1]]
