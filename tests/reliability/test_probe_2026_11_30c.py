"""Regressions found by the third adversarial probe of 2026-11-30 (the ``ready`` time of
the simulated device, the data path under hostile use), each as a careless or hostile
user hit it."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

import memryx as mx


# -- a Python post-processing callable that reuses its output buffer ------------------------------
def _reusing_post() -> Any:
    """A post-processing callable writing into one preallocated buffer (as fast numpy
    code does): the runtime hands its outputs out later, so it must own them."""
    buf = np.zeros((1, 4), np.float32)

    def post(y: np.ndarray) -> np.ndarray:
        buf[:] = y
        return buf

    return post


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["fast", "timed"])
def test_run_of_a_batch_gives_each_frame_its_own_post_processed_outputs(identity_dfp: Any,
                                                                        mode: str) -> None:
    # SyncAccl.run(list) post-processed every frame into the callable's one buffer and
    # returned that buffer for every frame: all outputs were the last frame's, silently.
    frames = [np.full((1, 4), k, np.float32) for k in range(12)]
    with mx.SyncAccl(identity_dfp, device=f"sim:{mode}") as accl:
        accl.set_postprocessing_model(_reusing_post())
        outs = accl.run(frames)
    assert [float(o.ravel()[0]) for o in outs] == [float(k) for k in range(12)]


@pytest.mark.timeout(60)
@pytest.mark.asyncio
async def test_concurrent_aruns_each_get_their_own_post_processed_outputs(identity_dfp: Any
                                                                          ) -> None:
    async with mx.AsyncAccl(identity_dfp, device="sim:fast") as accl:
        accl.set_postprocessing_model(_reusing_post())
        outs = await asyncio.gather(*[accl.arun(np.full((1, 4), k, np.float32))
                                      for k in range(10)])
    assert [float(o.ravel()[0]) for o in outs] == [float(k) for k in range(10)]


# -- several device ids: the stream of each frame and when it was ready ---------------------------
@pytest.mark.timeout(90)
def test_sampled_mode_over_several_device_ids_answers_each_stream_with_its_own_outputs() -> None:
    # MultiDevice (device_ids=[0, 1]) dropped submit's streams: the simulated devices'
    # "sampled" mode then took every frame for stream 0 and answered frames of one camera
    # with another camera's outputs (894 of 1200 here), silently.
    from memryx import testing

    dfp = mx.NeuralCompiler(models=testing.identity_model((1, 4)), fps=1000000,
                            latency_ms=0.01).run()  # faster than this host: frames are sampled
    streams, frames = 4, 150
    got, wrong = _tagged_streams(
        mx.MultiStreamAsyncAccl(dfp, device_ids=[0, 1], device="sim:sampled"), streams, frames)
    assert got == [frames] * streams
    assert wrong == []


def _tagged_streams(accl: Any, streams: int, frames: int
                    ) -> tuple[list[int], list[tuple[int, float]]]:
    """Run ``streams`` streams of ``frames`` frames through ``accl`` (closed after), stream
    s sending frames of value 100*s: outputs per stream, and each output of another
    stream's value (identity model: an output is the frame it was computed from)."""
    sent = [0] * streams
    got = [0] * streams
    wrong: list[tuple[int, float]] = []

    def source(s: int) -> Any:
        if sent[s] >= frames:
            return None
        sent[s] += 1
        return np.full((1, 4), 100.0 * s, np.float32)

    def sink(s: int, y: Any) -> None:
        got[s] += 1
        value = float(np.asarray(y).ravel()[0])
        if value != 100.0 * s:
            wrong.append((s, value))

    try:
        accl.connect_streams(source, sink, streams)
        accl.wait()
    finally:
        accl.close()
    return got, wrong


@pytest.mark.timeout(60)
@pytest.mark.asyncio
async def test_several_device_ids_count_the_modeled_latency_from_ready() -> None:
    # MultiDevice dropped submit's ready= too: over several ids the modeled latency
    # counted from the hand-over again, not from when the frame was ready.
    from memryx.clock import VirtualClock
    from memryx.device import SimulatedDevice
    from memryx.device.multi import MultiDevice

    dfp = mx.NeuralCompiler(models=mx.testing.identity_model((1, 4)), fps=100,
                            latency_ms=20).run()
    clock = VirtualClock()
    dev = MultiDevice([SimulatedDevice(mode="shapes", groups=2, clock=clock),
                       SimulatedDevice(mode="shapes", groups=2, clock=clock)], [0, 1])
    assert dev.takes_ready and dev.takes_streams
    await dev.open(dfp, 0)
    try:
        t0 = clock.now()
        await clock.sleep(0.005)  # the hand-over took 5 ms
        fut = dev.submit(0, [[np.zeros((1, 4), np.float32)]], streams=[3], ready=t0)
        await asyncio.wait_for(asyncio.shield(fut), 10)
        assert clock.now() - t0 == pytest.approx(0.020, abs=1e-9)
    finally:
        await dev.aclose()


@pytest.mark.timeout(90)
def test_sampled_mode_over_a_device_server_answers_each_stream_with_its_own_outputs(
        tmp_path: Any) -> None:
    from memryx import testing
    from memryx.pytest_plugin import ServerProcess

    dfp = mx.NeuralCompiler(models=testing.identity_model((1, 4)), fps=1000000,
                            latency_ms=0.01).run()
    srv = ServerProcess(tmp_path, "--mode", "sampled")
    try:
        _, wrong = _tagged_streams(mx.MultiStreamAsyncAccl(dfp, device=f"unix:{srv.path}"),
                                   4, 100)
    finally:
        srv.stop()
    assert wrong == []


# -- an output callback that is a generator function -------------------------------------------
def _gen_out(y: Any) -> Any:
    yield y  # a generator function: calling it runs none of its body


async def _agen_out(y: Any) -> Any:
    yield y


@pytest.mark.timeout(30)
@pytest.mark.parametrize("fn", [_gen_out, _agen_out], ids=["generator", "async-generator"])
@pytest.mark.parametrize("api", ["connect_output", "connect_streams"])
def test_an_output_callback_that_is_a_generator_function_is_refused_when_connected(
        identity_dfp: Any, fn: Any, api: str) -> None:
    # A plain generator function as output callback was "called" for every frame without
    # running a line of it: every output was silently dropped. An async generator function
    # failed later, inside the run, with a bare TypeError ("object async_generator can't
    # be used in 'await' expression").
    if api == "connect_output":
        accl: Any = mx.AsyncAccl(identity_dfp)
        try:
            with pytest.raises(mx.CallbackSignatureError, match="generator"):
                accl.connect_output(fn)
        finally:
            accl.close()
    else:
        accl = mx.MultiStreamAsyncAccl(identity_dfp)
        try:
            with pytest.raises(mx.CallbackSignatureError, match="generator"):
                accl.connect_streams(lambda s: None, _two(fn), 1)
        finally:
            accl.close()


def _two(fn: Any) -> Any:
    """``fn`` as a stream output callback (stream index first), still a generator function."""
    if fn is _gen_out:
        def gen(s: int, y: Any) -> Any:
            yield y
        return gen

    async def agen(s: int, y: Any) -> Any:
        yield y
    return agen


# -- pre-/post-processing that calls back into its own accelerator --------------------------------
@pytest.mark.timeout(30)
@pytest.mark.parametrize("where", ["pre", "post"])
@pytest.mark.parametrize("call", ["run", "receive"])
def test_processing_that_calls_its_own_accelerator_is_a_usage_error_not_a_hang(
        identity_dfp: Any, where: str, call: str) -> None:
    # A pre- or post-processing callable calling run()/receive() on its own SyncAccl waited
    # for itself for ever (the frame it processes can only finish after it returns), as
    # wait() from an own callback would, which is refused.
    x = np.zeros((1, 4), np.float32)
    with mx.SyncAccl(identity_dfp) as accl:
        def fn(y: np.ndarray) -> np.ndarray:
            if call == "run":
                return np.asarray(accl.run(y))
            accl.receive()
            return y

        if where == "pre":
            accl.set_preprocessing_model(fn)
        else:
            accl.set_postprocessing_model(fn)
        with pytest.raises(mx.UsageError, match="own pre- or post-processing"):
            accl.run(x)


@pytest.mark.timeout(30)
def test_processing_may_run_frames_on_another_accelerator(identity_dfp: Any) -> None:
    x = np.ones((1, 4), np.float32)
    with mx.SyncAccl(identity_dfp) as other, mx.SyncAccl(identity_dfp) as accl:
        accl.set_postprocessing_model(lambda y: np.asarray(other.run(y)) * 2)
        assert float(np.asarray(accl.run(x)).ravel()[0]) == 2.0
