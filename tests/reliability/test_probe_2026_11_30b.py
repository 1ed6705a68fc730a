"""Regressions found by the second adversarial probe of 2026-11-30 (the vendor-SDK user's
path, paced modes and ``memryx bench``, the shared device server, several device ids),
each as a careless or hostile user hit it."""

from __future__ import annotations

import asyncio
import gc
import json
from typing import Any

import numpy as np
import pytest

import memryx as mx
from memryx.device.fd import FdDevice
from memryx.pytest_plugin import ServerProcess
from tests.conftest import settle


# -- the fd device: failed futures nobody reads ---------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.asyncio
async def test_fd_device_failures_nobody_reads_are_not_loop_errors(identity_dfp: Any,
                                                                   server: ServerProcess
                                                                   ) -> None:
    # AsyncAccl(dfp, [0, 1], device="unix:...") on a server that died printed "Future
    # exception was never retrieved" at exit: the lane raises the first device's error and
    # drops the rest, but the fd device failed the other connection's batches (and every
    # batch submitted after its fault) unread, unlike the simulated device.
    loop = asyncio.get_running_loop()
    seen: list[dict[str, Any]] = []
    old = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, ctx: seen.append(ctx))
    frame = [np.ones(identity_dfp.model(0).inputs[0].shape, np.float32)]
    device = FdDevice(server.path, timeout=10)
    try:
        await device.open(identity_dfp, 0)
        await asyncio.wait_for(device.submit(0, [frame]), 20)
        server.kill()
        with pytest.raises(mx.DeviceError):
            for _ in range(200):  # until the device has seen the connection end
                await asyncio.wait_for(device.submit(0, [frame]), 20)
                await asyncio.sleep(0.05)
        device.submit(0, [frame])  # failed at once; the caller never reads it
        gc.collect()
        await asyncio.sleep(0)
    finally:
        await device.aclose()
        loop.set_exception_handler(old)
    assert not [c for c in seen if "never retrieved" in str(c.get("message"))], seen


# -- memryx bench: the device's mode, and more streams than frames --------------------------------
@pytest.fixture
def bench_dfp(tmp_path: Any, identity_dfp: mx.Dfp) -> str:
    path = tmp_path / "m.dfp"
    identity_dfp.write(str(path))
    return str(path)


@pytest.mark.timeout(120)
def test_bench_runs_the_mode_its_device_spec_names(bench_dfp: str, capsys: Any,
                                                   monkeypatch: Any) -> None:
    # "--device sim:reuse" (or MEMRYX_DEVICE=sim:reuse) ran and reported timed mode: the
    # bench's default mode overwrote the spec's; "--device sim:bogus" ran in timed mode too.
    from memryx.cli import main

    assert main(["bench", bench_dfp, "--frames", "20", "--device", "sim:reuse", "--json",
                 "-q"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["mode"] == "reuse" and result["reuse"]["hits"] + result["reuse"]["misses"] == 20
    monkeypatch.setenv("MEMRYX_DEVICE", "sim:shapes")
    assert main(["bench", bench_dfp, "--frames", "20", "--json", "-q"]) == 0
    assert json.loads(capsys.readouterr().out)["mode"] == "shapes"
    assert main(["bench", bench_dfp, "--frames", "20", "--mode", "fast", "--json", "-q"]) == 0
    assert json.loads(capsys.readouterr().out)["mode"] == "fast"  # the flag beats the env
    monkeypatch.delenv("MEMRYX_DEVICE")
    assert main(["bench", bench_dfp, "--frames", "20", "--device", "sim:bogus", "-q"]) == 1
    assert "unknown simulated device mode 'bogus'" in capsys.readouterr().err
    assert main(["bench", bench_dfp, "--frames", "20", "--device", "sim:reuse", "--mode",
                 "shapes", "-q"]) == 1
    err = capsys.readouterr().err
    assert "mode 'shapes' contradicts the device 'sim:reuse'" in err


@pytest.mark.timeout(120)
def test_bench_refuses_streams_that_would_get_no_rate(bench_dfp: str, capsys: Any) -> None:
    # --frames 3 --streams 5 ran, printed "0.0 fps" streams and then died on a format
    # error ("unsupported format string passed to NoneType.__format__"): two streams got
    # no frame at all (no latency), the others one (no rate).
    from memryx.cli import main

    assert main(["bench", bench_dfp, "--frames", "3", "--streams", "5", "-q"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "every stream needs at least 2 frames" in captured.err
    assert "NoneType" not in captured.err
    assert main(["bench", bench_dfp, "--frames", "10", "--streams", "5", "--json", "-q"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert all(fps > 0 for fps in result["per_stream_fps"].values())


# -- a post-processing model that does not fit the model's outputs ------------------------------
@pytest.mark.timeout(60)
def test_a_post_model_that_does_not_fit_the_outputs_is_refused_when_set(mobilenet_dfp: Any
                                                                        ) -> None:
    # It used to be taken, and the first output then raised onnxruntime's own untyped
    # InvalidArgument ("Got invalid dimensions for input: x ...") from run() / wait().
    from memryx import testing

    out = mobilenet_dfp.model(0).outputs[0]  # 'probs', (1, 10) float32
    with mx.SyncAccl(mobilenet_dfp, device="sim:fast") as accl:
        with pytest.raises(mx.ShapeError, match=r"gets output port 0 \('probs'\), of shape "
                           r"\(1, 10\), but takes shape \(1, 7\)"):
            accl.set_postprocessing_model(testing.identity_model((1, 7)))
        with pytest.raises(mx.DtypeError, match="of dtype float32, but takes float64"):
            accl.set_postprocessing_model(testing.identity_model(out.shape, np.float64))
        with pytest.raises(mx.InputCountError, match="takes 2 input"):
            accl.set_postprocessing_model(testing.add_model(out.shape))
        # a fitting one (an open batch dimension fits) is taken and runs
        post = testing.identity_model(out.shape)
        for value in (post.graph.input[0], post.graph.output[0]):
            value.type.tensor_type.shape.dim[0].dim_param = "N"
        accl.set_postprocessing_model(post)
        frame = np.zeros(mobilenet_dfp.model(0).inputs[0].shape, np.float32)
        assert accl.run(frame).shape == out.shape


# -- reference cycles that kept closed devices (and their onnxruntime sessions) alive -----------
def _live(cls: type) -> int:
    """Instances of ``cls`` the collector tracks, garbage not yet collected included."""
    return sum(type(o) is cls for o in gc.get_objects())


@pytest.mark.timeout(60)
@pytest.mark.asyncio
async def test_a_device_server_frees_a_clients_device_when_it_leaves(identity_dfp: Any,
                                                                      tmp_path: Any) -> None:
    # A `memryx serve` grew by ~150 MB per client that came and went with 48 MB frames
    # (1.1 GB after six clients, none connected): each client's simulated device, its
    # onnxruntime session and arenas, sat in reference cycles (device -> its task set ->
    # its own error handler; session <-> its slots) until the next full collection.
    from memryx.device.server import DeviceServer
    from memryx.device.simulated import SimulatedDevice

    frame = [np.ones(identity_dfp.model(0).inputs[0].shape, np.float32)]
    server = DeviceServer(tmp_path / "memryx.sock", mode="fast")
    await server.start()
    gc.collect()
    before = _live(SimulatedDevice)
    gc.disable()
    try:
        for _ in range(3):
            device = FdDevice(server.path, timeout=10)
            await device.open(identity_dfp, 0)
            await asyncio.wait_for(device.submit(0, [frame, frame]), 20)
            await device.aclose()
        for _ in range(200):  # the server cleans up after each client on its own time
            if _live(SimulatedDevice) == before:
                break
            await asyncio.sleep(0.02)
        assert _live(SimulatedDevice) == before
    finally:
        gc.enable()
        await server.aclose()


@pytest.mark.timeout(60)
def test_a_closed_sync_accelerator_frees_its_device_without_a_garbage_collection(
        identity_dfp: Any) -> None:
    # An app that opens and closes accelerators (a validation loop, a service per request)
    # kept every closed one's simulated device and onnxruntime session until the next full
    # collection: Engine -> its lanes -> Engine._on_fault -> Engine, and the device -> its
    # task set -> the device's own error handler.
    from memryx.device.simulated import SimulatedDevice

    frame = np.ones(identity_dfp.model(0).inputs[0].shape, np.float32)
    gc.collect()
    before = _live(SimulatedDevice)
    gc.disable()
    try:
        for _ in range(3):
            with mx.SyncAccl(identity_dfp, device="sim:fast") as accl:
                accl.run(frame)
        del accl
        assert _live(SimulatedDevice) == before
    finally:
        gc.enable()
        gc.collect()


@pytest.mark.timeout(60)
def test_a_closed_callback_accelerator_frees_its_device_without_a_garbage_collection(
        identity_dfp: Any) -> None:
    # (fixed) Engine._outputs and the lane's callback_sink held the CallbackOutput, which
    # held the engine (and its lane and its output thread's consumer): a cycle that kept a
    # closed accelerator's device until a full collection.
    from memryx.device.simulated import SimulatedDevice

    frame = np.ones(identity_dfp.model(0).inputs[0].shape, np.float32)
    gc.collect()
    before = _live(SimulatedDevice)
    gc.disable()
    try:
        for _ in range(3):
            frames = iter([frame] * 3)
            accl = mx.AsyncAccl(identity_dfp, device="sim:fast")
            accl.connect_input(lambda frames=frames: next(frames, None))
            accl.connect_output(lambda *outputs: None)
            accl.wait()
            accl.close()
        del accl
        assert _live(SimulatedDevice) == before
    finally:
        gc.enable()
        gc.collect()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["plain", "async"])
def test_a_closed_multistream_accelerator_frees_its_device_without_a_garbage_collection(
        identity_dfp: Any, kind: str) -> None:
    # (regression) the stream pool held the engine and the engine its pools; the CallbackOutput
    # cycle above, with async def callbacks on the loop.
    from memryx.device.simulated import SimulatedDevice

    frame = np.ones(identity_dfp.model(0).inputs[0].shape, np.float32)
    got: list[int] = []

    def on_output(stream: int, *outputs: Any) -> None:
        got.append(stream)

    async def on_output_async(stream: int, *outputs: Any) -> None:
        got.append(stream)

    gc.collect()
    before = _live(SimulatedDevice)
    gc.disable()
    try:
        for _ in range(3):
            sources = [iter([frame] * 3) for _ in range(4)]
            accl = mx.MultiStreamAsyncAccl(identity_dfp, device="sim:fast")
            accl.connect_streams(lambda s, sources=sources: next(sources[s], None),
                                 on_output if kind == "plain" else on_output_async, 4)
            accl.wait()
            accl.close()
            stats = accl.statistics()  # still readable after the close
            assert stats["models"][0]["frames_out"] == 12, stats
        del accl
        # a callback the loop has yet to run may hold a device a moment longer (a busy
        # machine); a cycle holds it for ever with the collector off
        assert settle(lambda: _live(SimulatedDevice) == before), _live(SimulatedDevice)
        assert len(got) == 36
    finally:
        gc.enable()
        gc.collect()


# -- compile-time overrides of the modeled figures -----------------------------------------------
@pytest.mark.timeout(60)
def test_modeled_overrides_out_of_the_dfp_range_name_the_option(tmp_path: Any, capsys: Any
                                                                ) -> None:
    # --fps 1e-9 / 1e12 and --latency-ms 1e7 were taken, then the DFP written from them was
    # refused as "corrupted DFP: model 0 modeled fps is 1e-09"; --fps 0.5 read "0 fps".
    import onnx

    from memryx import testing
    from memryx.cli import main

    for fps, latency, bad in ((1e-9, None, "fps: 1e-09"), (1e12, None, "fps: 1e+12"),
                              (None, 1e7, "latency_ms: 1e+07")):
        with pytest.raises(mx.CompilerError, match="is out of range") as info:
            mx.NeuralCompiler(models=testing.identity_model(), fps=fps, latency_ms=latency)
        assert "corrupted" not in str(info.value)
        assert bad.split(":")[0] in str(info.value)
    model = tmp_path / "m.onnx"
    onnx.save(testing.identity_model(), str(model))
    assert main(["compile", str(model), "-o", str(tmp_path / "m.dfp"), "--fps", "1e-9"]) == 1
    err = capsys.readouterr().err
    assert "fps: 1e-09 is out of range: it must be from 0.1 to 1e+09" in err
    assert "corrupted" not in err
    assert main(["compile", str(model), "-o", str(tmp_path / "m.dfp"), "--fps", "0.5"]) == 0
    assert "modeled MX3: 0.5 fps" in capsys.readouterr().out
