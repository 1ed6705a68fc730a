"""The SDK's constructor forms, options, properties and modeled telemetry."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import memryx as mx
from memryx import ClientOptions, SchedulerOptions

from ..conftest import reference, settle


def _device_name(accl: Any) -> str:
    return str(accl.statistics()["device"]["device"])


# -- constructor forms ----------------------------------------------------------------------

def test_device_ids_forms(mobilenet_dfp: mx.Dfp) -> None:
    x = np.zeros(mobilenet_dfp.input_shapes[0], np.float32)
    with mx.SyncAccl(mobilenet_dfp, [0]) as accl:  # positional, as 2.x code writes it
        assert accl.device_ids == [0] and accl.group_id == 0
        assert accl.run(x).shape == (1, 10)
    with mx.SyncAccl(mobilenet_dfp, device_ids=2) as accl:  # an int; a simulated device id 2
        assert accl.device_ids == [2]
        assert accl.run(x).shape == (1, 10)
    with mx.AsyncAccl(mobilenet_dfp, 0, local_mode=True) as accl:  # 1.x positional group
        assert accl.group_id == 0


@pytest.mark.parametrize(("ids", "exc", "match"), [
    ("0", TypeError, "device_ids must be an int or a list of ints, got str"),
    ([0.5], TypeError, "device_ids must hold ints, got float"),
    ([], ValueError, "at least one device"),
    ([-1], ValueError, "device ids must be >= 0, got -1"),
    ([0, 0], ValueError, "repeats"),
    (list(range(65)), ValueError, "names 65 devices, at most 64"),
])
def test_device_ids_bad(identity_dfp: mx.Dfp, ids: Any, exc: type[Exception], match: str
                        ) -> None:
    with pytest.raises(exc, match=match):
        mx.SyncAccl(identity_dfp, device_ids=ids)


def test_group_id_and_device_ids_disagree(identity_dfp: mx.Dfp) -> None:
    with pytest.raises(mx.UsageError, match="disagree"):
        mx.SyncAccl(identity_dfp, device_ids=[0], group_id=1)


def test_unknown_keyword_warns_and_runs(identity_dfp: mx.Dfp) -> None:
    with pytest.warns(UserWarning, match="ignoring unknown keyword argument.*'chip_gen_x'"):
        accl = mx.SyncAccl(identity_dfp, chip_gen_x=3, group_id=0)
    with accl:
        assert accl.run(np.ones((1, 4), np.float32)).tolist() == [[1, 1, 1, 1]]


def test_stream_workers_auto(identity_dfp: mx.Dfp) -> None:
    got: list[int] = []
    accl = mx.MultiStreamAsyncAccl(identity_dfp, stream_workers=-1)
    sent = [0, 0]

    def src(i: int) -> Any:
        sent[i] += 1
        return np.ones((1, 4), np.float32) if sent[i] <= 5 else None

    accl.connect_streams(src, lambda i, y: got.append(i), 2)
    accl.wait()
    assert sorted(got) == [0] * 5 + [1] * 5
    with pytest.raises(ValueError, match="stream_workers must be a positive int or None"):
        mx.MultiStreamAsyncAccl(identity_dfp, stream_workers=-2)


def test_stream_count_type(identity_dfp: mx.Dfp) -> None:
    with mx.MultiStreamAsyncAccl(identity_dfp) as accl, \
            pytest.raises(TypeError, match="stream_count must be an int, got str"):
        accl.connect_streams(lambda i: None, lambda i, y: None, stream_count="2")  # type: ignore[arg-type]


def test_local_mode_ignores_a_server_in_the_environment(identity_dfp: mx.Dfp, server: Any,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMRYX_DEVICE", server.address)
    with mx.SyncAccl(identity_dfp) as accl:
        assert _device_name(accl) != "sim"
    for kw in ({"local_mode": True}, {"ignore_manager": True}):
        with mx.SyncAccl(identity_dfp, **kw) as accl:
            assert _device_name(accl) == "sim"
    with pytest.raises(mx.UsageError, match="local_mode"):
        mx.SyncAccl(identity_dfp, local_mode=True, device=server.address)


def test_manager_addr_selects_the_server(identity_dfp: mx.Dfp, server: Any) -> None:
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    for addr in (str(server.path), str(Path(server.path).parent) + "/"):
        with mx.SyncAccl(identity_dfp, manager_addr=addr) as accl:
            assert _device_name(accl) != "sim"
            np.testing.assert_array_equal(accl.run(x), x)
    with pytest.raises(mx.UsageError, match="one or the other"):
        mx.SyncAccl(identity_dfp, local_mode=True, manager_addr=str(server.path))


def test_manager_addr_missing_server_is_a_device_error(identity_dfp: mx.Dfp, tmp_path: Path
                                                       ) -> None:
    with pytest.raises(mx.DeviceError, match="cannot reach the device server"):
        mx.SyncAccl(identity_dfp, manager_addr=str(tmp_path / "none.sock"))


# -- options ------------------------------------------------------------------------------------

def test_options_defaults_and_positional() -> None:
    s = SchedulerOptions()
    assert (s.frame_limit, s.time_limit, s.stop_on_empty, s.ifmap_queue_size,
            s.ofmap_queue_size) == (20, 250, False, 16, 21)
    c = ClientOptions(True, 30.0)
    assert c.smoothing is True and c.fps_target == 30.0


@pytest.mark.parametrize(("make", "exc", "match"), [
    (lambda: SchedulerOptions(frame_limit=0), ValueError, "frame_limit must be >= 1"),
    (lambda: SchedulerOptions(time_limit="250"), TypeError, "time_limit must be a number"),
    (lambda: SchedulerOptions(time_limit=-1), ValueError, "time_limit must be >= 0"),
    (lambda: SchedulerOptions(stop_on_empty=1), TypeError, "stop_on_empty must be a bool"),
    (lambda: SchedulerOptions(ifmap_queue_size=2.5), TypeError, "ifmap_queue_size must be"),
    (lambda: ClientOptions(smoothing="yes"), TypeError, "smoothing must be a bool"),
    (lambda: ClientOptions(fps_target=float("nan")), ValueError, "fps_target must be >= 0"),
    (lambda: ClientOptions(fps_target=-1), ValueError, "fps_target must be >= 0"),
])
def test_options_validated(make: Any, exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        make()


def test_options_must_be_the_option_types(identity_dfp: mx.Dfp) -> None:
    with pytest.raises(TypeError, match="scheduler_options must be a memryx.SchedulerOptions"):
        mx.AsyncAccl(identity_dfp, scheduler_options={"frame_limit": 3})
    with pytest.raises(TypeError, match="client_options must be a memryx.ClientOptions"):
        mx.AsyncAccl(identity_dfp, client_options=(True, 30.0))
    with pytest.raises(TypeError, match="use_model_shape must be a bool or a pair"):
        mx.AsyncAccl(identity_dfp, use_model_shape=(True,))


def test_scheduler_queue_size_reaches_the_simulated_device(identity_dfp: mx.Dfp) -> None:
    opts = SchedulerOptions(ifmap_queue_size=3)
    with mx.SyncAccl(identity_dfp, scheduler_options=opts) as accl:
        assert accl.scheduler_options is opts
        assert accl._engine.device.queue_depth == 3  # type: ignore[attr-defined]


def _input_times(dfp: mx.Dfp, n: int, options: ClientOptions) -> list[float]:
    times: list[float] = []
    accl = mx.AsyncAccl(dfp, device="sim:fast", client_options=options)
    x = np.ones((1, 4), np.float32)

    def src() -> Any:
        times.append(time.monotonic())
        return x if len(times) <= n else None

    accl.connect_input(src)
    accl.connect_output(lambda y: None)
    accl.wait()
    return times[:n]


def test_fps_target_paces_input_callbacks(identity_dfp: mx.Dfp) -> None:
    paced = np.diff(_input_times(identity_dfp, 21, ClientOptions(fps_target=50.0)))
    free = np.diff(_input_times(identity_dfp, 21, ClientOptions()))
    assert np.median(paced) >= 0.015, paced  # 20 ms apart (50 fps); not faster
    assert float(np.sum(paced)) >= 0.3
    assert np.median(free) < np.median(paced) / 4


def test_fps_target_paces_each_stream(identity_dfp: mx.Dfp) -> None:
    times: dict[int, list[float]] = {0: [], 1: []}
    accl = mx.MultiStreamAsyncAccl(identity_dfp, client_options=ClientOptions(fps_target=40.0))
    x = np.ones((1, 4), np.float32)

    def src(i: int) -> Any:
        times[i].append(time.monotonic())
        return x if len(times[i]) <= 12 else None

    accl.connect_streams(src, lambda i, y: None, 2)
    accl.wait()
    for t in times.values():
        assert np.median(np.diff(t[:12])) >= 0.012, t


def test_fps_target_does_not_delay_stop(identity_dfp: mx.Dfp) -> None:
    accl = mx.AsyncAccl(identity_dfp, client_options=ClientOptions(fps_target=0.05))  # 20 s
    accl.connect_input(lambda: np.ones((1, 4), np.float32))
    accl.connect_output(lambda y: None)
    # the first frame went in: the next waits for its 20 s slot when stop() comes
    assert settle(lambda: accl.statistics()["models"][0]["frames_in"] >= 1)
    t0 = time.monotonic()
    accl.stop()
    assert time.monotonic() - t0 < 2.0


def _output_gaps(dfp: mx.Dfp, smoothing: bool, n: int = 120) -> np.ndarray:
    """Output delivery intervals when the device computes frames in bursts."""
    arrivals: list[float] = []
    done = threading.Event()
    accl = mx.AsyncAccl(dfp, device="sim:fast", concurrency=1,
                        client_options=ClientOptions(smoothing=smoothing))
    x = np.ones(dfp.input_shapes[0], np.float32)
    sent = [0]

    def src() -> Any:
        sent[0] += 1
        if sent[0] % 8 == 0:
            time.sleep(0.04)  # the source delivers in bursts of 8, as a batching camera
        return x if sent[0] <= n else None

    def sink(*o: Any) -> None:
        arrivals.append(time.monotonic())
        if len(arrivals) == n:
            done.set()

    accl.connect_input(src)
    accl.connect_output(sink)
    accl.wait()
    return np.diff(arrivals[16:])


def test_smoothing_evens_out_delivery(identity_dfp: mx.Dfp) -> None:
    rough = _output_gaps(identity_dfp, False)
    smooth = _output_gaps(identity_dfp, True)
    cv = lambda g: float(np.std(g) / np.mean(g))  # noqa: E731
    assert cv(smooth) < 0.75 * cv(rough), (cv(smooth), cv(rough))
    # the same frames, over about the same time: smoothing spreads, it does not slow down
    # (generous: the 2-core test machine oversleeps under load)
    assert np.sum(smooth) < np.sum(rough) * 2.5 + 0.2


# -- properties ---------------------------------------------------------------------------------

def test_properties(three_model_dfp: mx.Dfp) -> None:
    with mx.AsyncAccl(three_model_dfp) as accl:
        assert accl.input_port_ids == [p.port for p in three_model_dfp.input_ports]
        assert accl.output_port_ids == [p.port for p in three_model_dfp.output_ports]
        assert len(accl.input_port_ids) == 4 and len(accl.output_port_ids) == 4
        assert accl.mpu_count == three_model_dfp.num_chips
        assert accl.chip_gen == 3.1
        assert accl.models == [m.name for m in three_model_dfp.models]
        assert accl.device_ids == [0] and accl.group_id == 0
        assert accl.use_model_shape == (True, True)


def test_shutdown(identity_dfp: mx.Dfp) -> None:
    accl = mx.SyncAccl(identity_dfp)
    accl.run(np.ones((1, 4), np.float32))
    accl.shutdown()
    accl.shutdown()  # idempotent, like close()
    with pytest.raises(mx.ClosedError):
        accl.run(np.ones((1, 4), np.float32))


def test_modeled_telemetry(mobilenet_dfp: mx.Dfp) -> None:
    with mx.SyncAccl(mobilenet_dfp) as accl:
        idle_t, idle_p = accl.get_temperature(0), accl.get_avg_power(0)
        assert 30.0 < idle_t < 60.0 and 0.0 < idle_p < 3.0
        assert 0.0 <= accl.get_pressure(0) <= 1.0
        x = np.zeros(mobilenet_dfp.input_shapes[0], np.float32)
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            accl.run([x] * 32)
        assert accl.get_temperature(0) > idle_t
        assert accl._telemetry[0].utilisation > 0
        assert accl._telemetry[0].power_w > accl._telemetry[0].chips * accl._telemetry[0].IDLE_W
        assert accl.get_avg_power(0) > idle_p
        with pytest.raises(mx.ModelIndexError, match="device_id 3 is not one of"):
            accl.get_temperature(3)
        with pytest.raises(TypeError, match="device_id must be an int"):
            accl.get_avg_power("0")  # type: ignore[arg-type]


# -- chip layout ---------------------------------------------------------------------------------

def test_chip_layout_in_by_default(mobilenet: Any, mobilenet_dfp: mx.Dfp) -> None:
    rng = np.random.default_rng(1)
    hwc = rng.standard_normal((64, 64, 3)).astype(np.float32)
    nchw = np.transpose(hwc, (2, 0, 1))[None]
    want = reference(mobilenet, nchw)[0]
    with mx.SyncAccl(mobilenet_dfp) as accl:
        np.testing.assert_allclose(accl.run(np.expand_dims(hwc, 2)), want, rtol=1e-5,
                                   atol=1e-5)
        np.testing.assert_allclose(accl.run(nchw), want, rtol=1e-5, atol=1e-5)
        # an HWC frame without the z axis is not the chip layout: refused, not guessed
        with pytest.raises(mx.ShapeError):
            accl.run(hwc)


def test_chip_layout_in_callbacks(mobilenet: Any, mobilenet_dfp: mx.Dfp) -> None:
    rng = np.random.default_rng(2)
    imgs = [rng.standard_normal((64, 64, 3)).astype(np.float32) for _ in range(5)]
    want = [reference(mobilenet, np.transpose(i, (2, 0, 1))[None])[0] for i in imgs]
    got: list[np.ndarray] = []
    it = iter(imgs)
    accl = mx.AsyncAccl(mobilenet_dfp)
    accl.connect_input(lambda: next((np.expand_dims(i, 2) for i in it), None))
    accl.connect_output(lambda y: got.append(y))
    accl.wait()
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_use_model_shape_false(mobilenet: Any, mobilenet_dfp: mx.Dfp) -> None:
    rng = np.random.default_rng(3)
    hwc = rng.standard_normal((64, 64, 3)).astype(np.float32)
    want = reference(mobilenet, np.transpose(hwc, (2, 0, 1))[None])[0]
    with mx.SyncAccl(mobilenet_dfp, use_model_shape=(False, False)) as accl:
        out = accl.run(np.expand_dims(hwc, 2))
        assert out.shape == (1, 1, 1, 10)  # a vector of C in the chip layout
        np.testing.assert_allclose(out.reshape(1, 10), want, rtol=1e-5, atol=1e-5)
        with pytest.raises(mx.ShapeError, match=r"chip layout \(64, 64, 1, 3\)"):
            accl.run(np.transpose(hwc, (2, 0, 1))[None])
    with mx.SyncAccl(mobilenet_dfp, use_model_shape=(True, False)) as accl:
        assert accl.run(np.transpose(hwc, (2, 0, 1))[None]).shape == (1, 1, 1, 10)


def test_chip_layout_out_in_callbacks(split_dfp: mx.Dfp) -> None:
    got: list[tuple[int, ...]] = []
    sent = [0]

    def src() -> Any:
        sent[0] += 1
        return np.ones((1, 8), np.float32) if sent[0] <= 2 else None

    accl = mx.AsyncAccl(split_dfp, use_model_shape=(True, False))
    accl.connect_input(src)
    accl.connect_output(lambda a, b: got.append(a.shape + b.shape))
    accl.wait()
    assert len(got) == 2 and all(len(g) == 8 and g[2] == 1 for g in got), got


def test_connect_streams_again_adds_streams(identity_dfp: mx.Dfp) -> None:
    """Streams of a second call are numbered after the first call's, with their own callbacks."""
    first: dict[int, list[float]] = {}
    second: dict[int, list[float]] = {}
    gate = threading.Event()

    def source(n: int, wait: bool) -> Any:
        sent: dict[int, int] = {}

        def src(i: int) -> Any:
            if wait:
                gate.wait(10)  # the first streams stay alive until the second call is made
            sent[i] = sent.get(i, 0) + 1
            return np.full((1, 4), i * 100 + sent[i], np.float32) if sent[i] <= n else None
        return src

    accl = mx.MultiStreamAsyncAccl(identity_dfp)
    accl.connect_streams(source(4, True), lambda i, y: first.setdefault(i, []).append(
        float(y[0, 0])), 2)
    accl.connect_streams(source(3, False), lambda i, y: second.setdefault(i, []).append(
        float(y[0, 0])), 3)
    gate.set()
    accl.wait()
    assert first == {0: [1, 2, 3, 4], 1: [101, 102, 103, 104]}
    assert second == {2: [201, 202, 203], 3: [301, 302, 303], 4: [401, 402, 403]}
    assert sorted(accl.statistics()["models"][0]["streams"]) == [0, 1, 2, 3, 4]


def test_connect_streams_after_all_ended(identity_dfp: mx.Dfp) -> None:
    accl = mx.MultiStreamAsyncAccl(identity_dfp)
    accl.connect_streams(lambda i: None, lambda i, y: None, 1)
    refusals: list[mx.UsageError] = []

    def refused() -> bool:  # (the end of a stream has no public signal to wait on)
        try:
            accl.connect_streams(lambda i: None, lambda i, y: None, 1)
        except mx.UsageError as exc:
            refusals.append(exc)
            return True
        return False  # not ended yet: the stream added ends at once too

    assert settle(refused), "connect_streams was never refused"
    assert "every stream of model 0 has ended" in str(refusals[0])
    accl.close()


def test_fps_target_paces_generator_callbacks(identity_dfp: mx.Dfp) -> None:
    times: list[float] = []

    def frames() -> Any:
        for _ in range(10):
            times.append(time.monotonic())
            yield np.ones((1, 4), np.float32)

    accl = mx.AsyncAccl(identity_dfp, client_options=ClientOptions(fps_target=50.0))
    accl.connect_input(frames)
    got: list[Any] = []
    accl.connect_output(lambda y: got.append(y))
    accl.wait()
    assert len(got) == 10
    assert times[-1] - times[0] >= 0.12  # 9 intervals of 20 ms, generously


@pytest.mark.asyncio
async def test_fps_target_and_smoothing_with_async_callbacks(identity_dfp: mx.Dfp) -> None:
    times: list[float] = []
    got: list[float] = []

    async def src() -> Any:
        times.append(time.monotonic())
        return np.ones((1, 4), np.float32) if len(times) <= 8 else None

    async def sink(y: Any) -> None:
        got.append(time.monotonic())

    opts = ClientOptions(smoothing=True, fps_target=40.0)
    async with mx.AsyncAccl(identity_dfp, client_options=opts) as accl:
        accl.connect_input(src)
        accl.connect_output(sink)
        await accl.await_done()
    assert len(got) == 8
    assert times[7] - times[0] >= 0.1  # 7 intervals of 25 ms, generously


def test_chip_layout_multi_input(add_dfp: mx.Dfp) -> None:
    a = np.arange(8, dtype=np.float32).reshape(1, 1, 1, 8)
    b = np.ones((1, 1, 1, 8), np.float32)
    with mx.SyncAccl(add_dfp, use_model_shape=(False, True)) as accl:
        out = accl.run([a, b])
        np.testing.assert_array_equal(out, (a + b).reshape(1, 8))
        with pytest.raises(mx.ShapeError, match="chip layout"):
            accl.run([a.reshape(1, 8), b.reshape(1, 8)])
    with mx.SyncAccl(add_dfp) as accl:  # default: chip-layout frames are recognised too
        np.testing.assert_array_equal(accl.run([a, b]), (a + b).reshape(1, 8))


def test_manager_host_and_port_name_a_tcp_server(identity_dfp: mx.Dfp) -> None:
    """A host name selects the TCP form of the device server; nothing listens there, so
    opening fails at once with an error naming the address (never a hang)."""
    import socket

    with socket.socket() as s:  # a free port on loopback
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises((mx.DeviceError, ValueError), match=f"127.0.0.1:{port}"):
        mx.SyncAccl(identity_dfp, manager_addr="127.0.0.1", manager_port=port)
    assert time.monotonic() - t0 < 30
    with pytest.raises(ValueError, match="manager_port must be <= 65535"):
        mx.SyncAccl(identity_dfp, manager_addr="example.org", manager_port=70000)
