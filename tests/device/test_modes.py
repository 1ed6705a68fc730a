"""The chip-paced modes that cost the host little (reuse, sampled, shapes), the compute
backends (onnxruntime, OpenVINO) and their bad options."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import sys
import time

import numpy as np
import pytest

import memryx as mx
from memryx import testing
from memryx.device import BackendError, SimulatedDevice, open_device
from memryx.device._compute import ReuseCache, Sampler
from tests.conftest import in_memryx_call, settle

HAS_OPENVINO = importlib.util.find_spec("openvino") is not None
needs_openvino = pytest.mark.skipif(not HAS_OPENVINO, reason="openvino is not installed")


@pytest.fixture(scope="module", autouse=True)
def _openvino_imported() -> None:
    """Importing openvino starts a thread of its own (its telemetry sender), once per
    process: let it happen before the per-test thread-leak checks."""
    if HAS_OPENVINO:
        import openvino  # noqa: F401


def identity(fps: float, latency_ms: float) -> mx.Dfp:
    return mx.NeuralCompiler(models=testing.identity_model((1, 4)), fps=fps,
                             latency_ms=latency_ms).run()


@pytest.fixture(scope="module")
def cnn() -> mx.Dfp:
    """A small CNN (a fraction of a millisecond per frame on the host) whose modeled chip
    is far faster than the host: 5,000 frames/s."""
    return mx.NeuralCompiler(models=testing.mobilenet_like(), fps=5000, latency_ms=1).run()


def frames(n: int, distinct: int) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    pool = [rng.standard_normal((1, 3, 64, 64)).astype(np.float32) for _ in range(distinct)]
    return [pool[i % distinct] for i in range(n)]


def exact(dfp: mx.Dfp, xs: list[np.ndarray]) -> list[np.ndarray]:
    with mx.SyncAccl(dfp, mode="fast") as accl:
        return list(accl.run(xs))


# -- reuse -----------------------------------------------------------------------------------
def test_reuse_computes_each_distinct_frame_once_and_gives_exact_outputs(cnn):
    xs = frames(200, distinct=5)
    want = exact(cnn, xs)
    with mx.SyncAccl(cnn, mode="reuse") as accl:
        got = accl.run(xs)
        stats = accl.statistics()["device"]
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    reuse = stats["models"][0]["reuse"]
    assert reuse["misses"] == 5 and reuse["hits"] == 195 and reuse["entries"] == 5
    assert stats["mode"] == "reuse" and stats["paced"]


def test_reused_outputs_belong_to_the_receiver(cnn):
    x = frames(1, 1)[0]
    with mx.SyncAccl(cnn, mode="reuse") as accl:
        first = accl.run(x)
        first[...] = 7.0  # the receiver scribbles on its outputs ...
        second = accl.run(x)
    assert not np.allclose(second, 7.0)  # ... the cache's copy is not affected
    np.testing.assert_allclose(second, exact(cnn, [x])[0], rtol=1e-5, atol=1e-6)


def test_reuse_is_paced_at_the_modeled_rate():
    dfp = identity(fps=200, latency_ms=20)
    with mx.SyncAccl(dfp, mode="reuse") as accl:
        t0 = time.monotonic()
        outs = accl.run([np.full((1, 4), i % 3, np.float32) for i in range(30)])
        elapsed = time.monotonic() - t0
    assert [int(o[0, 0]) for o in outs] == [i % 3 for i in range(30)]
    assert elapsed >= 29 / 200 + 0.020 - 0.002  # never faster than the chip


def test_reuse_cache_evicts_the_least_recently_used(cnn):
    xs = frames(30, distinct=3)  # cycling through 3 frames with room for 2: always a miss
    with mx.SyncAccl(cnn, mode="reuse", cache_size=2) as accl:
        for x in xs:  # one at a time: none is in flight when the next one comes
            accl.run(x)
        reuse = accl.statistics()["device"]["models"][0]["reuse"]
    assert reuse["size"] == 2 and reuse["entries"] == 2
    assert reuse["misses"] == 30 and reuse["hits"] == 0 and reuse["evictions"] == 28


def test_identical_frames_in_flight_at_once_are_computed_once(cnn):
    # 8 streams send the same frame at the same time on 2 compute workers
    x = frames(1, 1)[0]
    want = exact(cnn, [x])[0]
    outs: dict[int, list[np.ndarray]] = {s: [] for s in range(8)}
    sent = [0] * 8

    def source(s: int) -> np.ndarray | None:
        sent[s] += 1
        return x if sent[s] <= 20 else None

    accl = mx.MultiStreamAsyncAccl(cnn, mode="reuse", concurrency=2)
    try:
        accl.connect_streams(source, lambda s, o: outs[s].append(o), 8)
        accl.wait()
        reuse = accl.statistics()["device"]["models"][0]["reuse"]
    finally:
        accl.close()
    assert all(len(v) == 20 for v in outs.values())
    for v in outs.values():
        for o in v:
            np.testing.assert_allclose(o, want, rtol=1e-5, atol=1e-6)
    assert reuse["misses"] == 1 and reuse["hits"] == 159


def test_reuse_cache_unit_concurrent_misses_share_one_computation():
    import threading

    calls: list[int] = []
    gate = threading.Event()

    def run(frame: list[np.ndarray]) -> list[np.ndarray]:
        calls.append(1)
        gate.wait(5)
        return [frame[0] * 2]

    cache = ReuseCache(4)
    x = [np.ones(3, np.float32)]
    results: list[list[np.ndarray]] = []
    threads = [threading.Thread(target=lambda: results.extend(cache.compute(run, [x])))
               for _ in range(4)]
    for t in threads:
        t.start()
    # one computes (held at the gate), the other three wait inside compute() for its result
    assert settle(lambda: len(calls) == 1 and all(in_memryx_call("compute", t)
                                                  for t in threads)), "callers never met"
    gate.set()
    for t in threads:
        t.join(5)
    assert len(calls) == 1 and len(results) == 4
    assert all(r[0].tolist() == [2, 2, 2] for r in results)
    assert len({id(r[0]) for r in results}) == 4  # each caller its own arrays


def test_a_failing_computation_does_not_poison_the_cache():
    cache = ReuseCache(4)
    x = [np.ones(3, np.float32)]

    def broken(frame: list[np.ndarray]) -> list[np.ndarray]:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        cache.compute(broken, [x])
    assert cache.compute(lambda f: [f[0] + 1], [x])[0][0].tolist() == [2, 2, 2]


# -- sampled ---------------------------------------------------------------------------------
def _source_index(out: np.ndarray, want: list[np.ndarray]) -> int:
    """Which frame's exact outputs ``out`` is."""
    matches = [j for j, w in enumerate(want) if np.allclose(out, w, rtol=1e-5, atol=1e-6)]
    assert matches, "a sampled output is no frame's real output"
    return matches[-1]


def test_sampled_outputs_are_recent_real_outputs_with_counted_staleness(cnn):
    xs = frames(300, distinct=300)
    want = exact(cnn, xs)
    with mx.SyncAccl(cnn, mode="sampled") as accl:
        got = accl.run(xs)
        stats = accl.statistics()["device"]["models"][0]
    sampled = stats["sampled"]
    assert sampled["fresh"] + sampled["stale"] == 300
    assert sampled["slots"] == 1 and sampled["computed"] >= sampled["fresh"]
    assert sampled["stale"] > 0  # 5,000 modeled frames/s outrun one host core
    staleness = [i - _source_index(o, want[: i + 1]) for i, o in enumerate(got)]
    assert min(staleness) >= 0  # never the outputs of a later frame
    assert max(staleness) == sampled["staleness_max"]
    assert sum(staleness) / 300 == pytest.approx(sampled["staleness_mean"])
    assert sum(1 for s in staleness if s == 0) == sampled["fresh"]


def test_sampled_keeps_the_modeled_rate_where_timed_cannot():
    # ResNet50 at 64x64 costs the host milliseconds per frame; the chip does 1,000/s
    dfp = mx.NeuralCompiler(models=testing.resnet50(input_size=64), fps=1000,
                            latency_ms=2).run()
    xs = frames(400, distinct=400)
    with mx.SyncAccl(dfp, mode="sampled") as accl:
        t0 = time.monotonic()
        accl.run(xs)
        elapsed = time.monotonic() - t0
        stats = accl.statistics()["device"]
    ideal = 399 / 1000 + 0.002
    assert elapsed >= ideal - 0.002
    assert elapsed < ideal * 3 + 0.5, elapsed  # timed mode would take several seconds
    assert not stats["host_slower"]
    assert stats["models"][0]["sampled"]["stale"] > 200


def test_sampled_with_many_streams_answers_every_frame_in_order(cnn):
    n_streams, per_stream = 16, 25
    received: dict[int, int] = {s: 0 for s in range(n_streams)}
    sent = [0] * n_streams
    pool = frames(4, distinct=4)

    def source(s: int) -> np.ndarray | None:
        sent[s] += 1
        return pool[s % 4] if sent[s] <= per_stream else None

    def sink(s: int, out: np.ndarray) -> None:
        assert out.shape == (1, 10)
        received[s] += 1

    accl = mx.MultiStreamAsyncAccl(cnn, mode="sampled")
    try:
        accl.connect_streams(source, sink, n_streams)
        accl.wait()
        sampled = accl.statistics()["device"]["models"][0]["sampled"]
    finally:
        accl.close()
    assert all(v == per_stream for v in received.values())
    assert sampled["fresh"] + sampled["stale"] == n_streams * per_stream


def test_sampler_unit_staleness_and_waiting_for_the_first_computed_frame():
    s = Sampler(slots=1)
    assert s.admit() == (0, True)
    assert s.admit() == (1, False)  # the slot is busy
    assert not s.can_answer(0, 0) and not s.can_answer(0, 1)  # nothing computed yet: wait
    s.computed_one(0, 0, [np.zeros(2)])
    assert s.outputs_for(0, 0)[0].tolist() == [0, 0]  # its own: fresh
    assert s.outputs_for(0, 1)[0].tolist() == [0, 0]  # frame 0's: 1 stale
    assert s.admit() == (2, True)
    assert s.admit() == (3, False)
    assert s.outputs_for(0, 2)[0].tolist() == [0, 0]  # its computation not done when due
    assert s.outputs_for(0, 3)[0].tolist() == [0, 0]
    s.computed_one(0, 2, None)  # a failed computation frees its slot
    assert s.admit() == (4, True)
    s.computed_one(0, 4, [np.ones(2)])
    assert s.outputs_for(0, 4)[0].tolist() == [1, 1]
    stats = s.statistics()
    assert stats["fresh"] == 2 and stats["stale"] == 3 and stats["staleness_max"] == 3
    assert stats["staleness_mean"] == pytest.approx((0 + 1 + 2 + 3 + 0) / 5)
    assert stats["computed"] == 2 and stats["failed"] == 1
    assert stats["staleness_histogram"]["<=0"] == 2 and stats["staleness_histogram"]["<=1"] == 1
    assert stats["staleness_histogram"]["<=3"] == 2
    assert stats["streams"][0]["frames"] == 5 and stats["staleness_per"] == "stream"


def test_sampler_unit_each_stream_gets_its_own_outputs_and_its_own_staleness():
    s = Sampler(slots=1)
    assert s.admit(7) == (0, True)  # stream 7 takes the slot
    # stream 9 has nothing computed and nothing running: its first frame is computed anyway
    assert s.admit(9) == (0, True)
    assert s.admit(7) == (1, False) and s.admit(9) == (1, False)  # both busy now
    s.computed_one(9, 0, [np.full(2, 9.0)])
    assert not s.can_answer(7, 1)  # stream 9's outputs never answer stream 7
    assert s.can_answer(9, 1)
    assert s.outputs_for(9, 1)[0].tolist() == [9, 9]
    s.computed_one(7, 0, [np.full(2, 7.0)])
    assert s.outputs_for(7, 0)[0].tolist() == [7, 7]
    assert s.outputs_for(7, 1)[0].tolist() == [7, 7]
    for _ in range(5):  # stream 7 runs ahead; its staleness counts its own frames only
        seq, _c = s.admit(7)
    assert seq == 6
    assert s.outputs_for(7, 6)[0].tolist() == [7, 7]
    stats = s.statistics()
    assert stats["streams"][7]["staleness_max"] == 6 and stats["streams"][9]["staleness_max"] == 1
    assert stats["streams"][9]["frames"] == 1 and stats["streams"][7]["frames"] == 3


@pytest.mark.parametrize("seed", range(3))
def test_sampler_batch_calls_number_answer_and_count_as_the_frame_by_frame_ones(seed):
    # admit_many / answer (one call per job, the device's hot path) against admit /
    # can_answer / outputs_for frame by frame, over random jobs of several streams
    import random

    rng = random.Random(seed)
    one, many = Sampler(slots=1), Sampler(slots=1)
    pending: list[tuple[int, int, bool]] = []  # admitted, not answered: (stream, seq, computed)
    for _ in range(300):
        streams = [rng.choice([0, 0, 0, 5, 9]) for _ in range(rng.randint(1, 6))]
        plan = many.admit_many(streams)
        assert plan == [(t, *one.admit(t)) for t in streams]
        pending.extend(plan)
        for t, q, computed in list(pending):  # some computations finish
            if computed and rng.random() < 0.5:
                out = None if rng.random() < 0.05 else [np.full(2, 100 * t + q, np.float32)]
                one.computed_one(t, q, out)
                many.computed_one(t, q, out)
                pending[pending.index((t, q, True))] = (t, q, False)
        job = [(t, q) for t, q, _ in pending[:rng.randint(1, 4)]]
        got = many.answer(job)
        if all(one.can_answer(t, q) for t, q in job):
            want = [one.outputs_for(t, q) for t, q in job]
            assert got is not None
            assert [g[0].tolist() for g in got] == [w[0].tolist() for w in want]
            assert all(g[0].flags.writeable for g in got)  # the receiver's own copies
            done = set(job)
            pending = [p for p in pending if (p[0], p[1]) not in done]
        else:
            assert got is None  # nothing counted
        assert many.statistics() == one.statistics()

def test_sampler_unit_forgets_idle_streams_beyond_its_bound(monkeypatch):
    monkeypatch.setattr(Sampler, "MAX_STREAMS", 4)
    s = Sampler(slots=1)
    for stream in range(10):
        seq, _ = s.admit(stream)
        s.computed_one(stream, seq, [np.zeros(1)])
        s.outputs_for(stream, seq)
    assert len(s._streams) <= 5
    assert s.admit(0) == (0, True)  # forgotten: starts afresh, computed


# -- shapes ----------------------------------------------------------------------------------
def test_shapes_is_paced_and_shapes_unpaced_is_not():
    dfp = identity(fps=100, latency_ms=10)
    xs = [np.ones((1, 4), np.float32)] * 20
    with mx.SyncAccl(dfp, mode="shapes") as accl:
        t0 = time.monotonic()
        outs = accl.run(xs)
        paced = time.monotonic() - t0
    assert paced >= 19 / 100 + 0.010 - 0.002
    assert not any(o.any() for o in outs)
    with mx.SyncAccl(dfp, mode="shapes-unpaced") as accl:
        t0 = time.monotonic()
        outs = accl.run(xs)
        assert time.monotonic() - t0 < 0.15  # the paced run needs 0.2 s
        assert not accl.statistics()["device"]["paced"]
    assert not any(o.any() for o in outs)


# -- slow host -------------------------------------------------------------------------------
def test_reuse_with_looped_frames_keeps_chip_timing_where_timed_reports_a_slow_host(caplog):
    dfp = mx.NeuralCompiler(models=testing.resnet50(input_size=64), fps=1000,
                            latency_ms=2).run()
    caplog.set_level(logging.INFO, logger="memryx")
    xs = frames(300, distinct=3)
    with mx.SyncAccl(dfp, mode="reuse") as accl:
        accl.run(xs)
        stats = accl.statistics()["device"]
    assert not stats["host_slower"] and stats["suggested_mode"] is None
    assert not [r for r in caplog.records if "slower than the modeled" in r.message]
    with mx.SyncAccl(dfp, mode="reuse") as accl:  # distinct frames: reuse cannot help
        accl.run(frames(100, distinct=100))
        stats = accl.statistics()["device"]
    assert stats["host_slower"] and stats["suggested_mode"] == "sampled"
    reports = [r for r in caplog.records if "slower than the modeled" in r.message]
    assert len(reports) == 1 and "mode='sampled'" in reports[0].message


# -- backends --------------------------------------------------------------------------------
@needs_openvino
def test_openvino_runners_first_used_from_several_threads_at_once(cnn):
    """Fresh OpenVINO runners called from several threads at the same moment all answer:
    their first inference initialises state in the binding that once deadlocked every
    worker of a `memryx bench`-style run (reuse mode, two compute threads)."""
    import threading

    from memryx.device._compute import load_runner

    x = frames(1, distinct=1)[0]
    for _ in range(3):
        runner = load_runner(cnn.model(0), "openvino")
        go, results = threading.Barrier(4), []

        def call(runner=runner, go=go, results=results) -> None:
            go.wait(timeout=30)
            results.append(runner([x]))

        threads = [threading.Thread(target=call, daemon=True) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads), "an OpenVINO inference never returned"
        assert len(results) == 4


@needs_openvino
@pytest.mark.timeout(180)
def test_ctrl_c_after_an_openvino_runner_was_released_on_another_thread(tmp_path):
    """OpenVINO's CPU plugin gives the thread that loads it an alternate signal stack and
    unmaps it when the plugin unloads; released on another thread, the loading thread was
    left with a registration into unmapped memory and the next Ctrl-C it handled was a
    segfault (rc -11; seen as a whole test run dying in a Ctrl-C test). One Core kept for
    the process keeps the plugin loaded: the interrupt comes out as KeyboardInterrupt."""
    import subprocess

    script = tmp_path / "script.py"
    script.write_text(
        "import gc, os, signal, threading, time\n"
        "import memryx as mx\n"
        "from memryx import testing\n"
        "from memryx.device._compute import load_runner\n"
        "dfp = mx.NeuralCompiler(models=testing.identity_model((1, 4))).run()\n"
        "box = [load_runner(dfp.model(0), 'openvino')]  # loaded on the main thread\n"
        "def drop():\n"
        "    box.clear()\n"
        "    gc.collect()\n"
        "t = threading.Thread(target=drop)\n"
        "t.start()\n"
        "t.join()\n"
        "try:\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(30)\n"
        "except KeyboardInterrupt:\n"
        "    print('KeyboardInterrupt')\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=150)
    assert (done.returncode, done.stdout.strip()) == (0, "KeyboardInterrupt"), done.stderr


@needs_openvino
@pytest.mark.parametrize("model", ["cnn", "split", "add"])
def test_openvino_gives_the_outputs_of_onnxruntime(model, cnn, split_dfp):
    if model == "cnn":
        dfp, xs = cnn, [[x] for x in frames(5, distinct=5)]
    elif model == "split":
        dfp, xs = split_dfp, [[np.full((1, 8), i, np.float32)] for i in range(5)]
    else:
        dfp = mx.NeuralCompiler(models=testing.add_model()).run()
        shapes = [p.shape for p in dfp.model(0).inputs]
        rng = np.random.default_rng(0)
        xs = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(5)]
    results = {}
    for backend in ("onnxruntime", "openvino"):
        with mx.SyncAccl(dfp, mode="fast", backend=backend) as accl:
            results[backend] = accl.run([x if len(x) > 1 else x[0] for x in xs])
            assert accl.statistics()["device"]["backend"] == backend
    for a, b in zip(results["onnxruntime"], results["openvino"], strict=True):
        for x, y in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b],
                        strict=True):
            assert x.dtype == y.dtype and x.shape == y.shape
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


@needs_openvino
def test_backend_from_device_string_and_environment(monkeypatch, identity_dfp):
    assert open_device("sim:reuse:openvino").backend == "openvino"  # type: ignore[attr-defined]
    monkeypatch.setenv("MEMRYX_SIM_BACKEND", "openvino")
    with mx.SyncAccl(identity_dfp, mode="sampled") as accl:
        assert accl.run(np.ones((1, 4), np.float32)).tolist() == [[1, 1, 1, 1]]
        assert accl.statistics()["device"]["backend"] == "openvino"


# -- bad options -----------------------------------------------------------------------------
def test_bad_modes_cache_sizes_and_backends_are_refused_naming_the_choices(monkeypatch):
    with pytest.raises(ValueError, match="unknown simulated device mode 'turbo'.*'reuse'.*"
                                         "'sampled'.*'shapes-unpaced'"):
        SimulatedDevice(mode="turbo")
    with pytest.raises(ValueError, match="unknown simulated device mode 'chip'"):
        open_device("sim:chip")
    for bad in (0, -1, True, 2.5, "8"):
        with pytest.raises(ValueError, match="cache_size must be an int >= 1"):
            SimulatedDevice(mode="reuse", cache_size=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cache_size is an option of mode 'reuse'"):
        SimulatedDevice(mode="timed", cache_size=8)
    with pytest.raises(BackendError, match="unknown compute backend 'tensorrt'.*'onnxruntime'"
                                           ".*'openvino'"):
        SimulatedDevice(backend="tensorrt")
    with pytest.raises(BackendError, match="unknown compute backend 'cuda'"):
        open_device("sim:timed:cuda")
    monkeypatch.setenv("MEMRYX_SIM_BACKEND", "nonsense")
    with pytest.raises(BackendError, match="'nonsense'"):
        SimulatedDevice()
    monkeypatch.delenv("MEMRYX_SIM_BACKEND")
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if not installed
    with pytest.raises(BackendError, match="'openvino' is not installed: pip install openvino"):
        SimulatedDevice(backend="openvino")
    assert issubclass(BackendError, mx.MemryxError) and issubclass(BackendError, ValueError)


def test_bad_options_reach_the_user_through_the_accelerator(identity_dfp):
    with pytest.raises(ValueError, match="cache_size must be an int >= 1, got 0"):
        mx.SyncAccl(identity_dfp, mode="reuse", cache_size=0)
    with pytest.raises(BackendError, match="unknown compute backend"):
        mx.SyncAccl(identity_dfp, backend="gpu")


# -- attacks ---------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_a_failing_sampled_computation_reaches_the_frames_waiting_for_it(identity_dfp):
    dev = SimulatedDevice(mode="sampled")
    await dev.open(identity_dfp, 0)

    def broken(frame: list[np.ndarray]) -> list[np.ndarray]:
        raise RuntimeError("the graph blew up")

    dev._models[0].run = broken
    futs = [dev.submit(0, [[np.full((1, 4), i, np.float32)]]) for i in range(5)]
    for fut in futs:  # the computed frame, and the ones that had nothing to copy from
        with pytest.raises(mx.DeviceError, match="the graph blew up"):
            await asyncio.wait_for(fut, 5)
    await dev.aclose()


@pytest.mark.asyncio
async def test_closing_with_sampled_frames_waiting_for_a_computation_cancels_them(cnn):
    dev = SimulatedDevice(mode="sampled")
    await dev.open(cnn, 0)
    x = frames(1, 1)[0]
    futs = [dev.submit(0, [[x]]) for _ in range(6)]
    # the clock passes the frames' due time (1 ms latency: pacing is by the clock), whether
    # or not the first computation has ended: close must resolve every future either way
    await asyncio.sleep(0.01)
    await asyncio.wait_for(dev.aclose(), 10)
    assert all(f.done() for f in futs)


def test_reuse_keys_tell_dtypes_shapes_and_port_boundaries_apart():
    from memryx.device._compute import frame_key

    a = np.arange(8, dtype=np.uint8)
    keys = {frame_key([a]), frame_key([a.view(np.int8)]), frame_key([a.reshape(2, 4)]),
            frame_key([a[:3], a[3:]]), frame_key([a[:4], a[4:]]),
            frame_key([np.asfortranarray(a.reshape(2, 4))])}
    assert len(keys) == 5  # the Fortran-ordered copy holds the same frame: same key
    assert frame_key([a.copy()]) == frame_key([a])


def test_reuse_through_the_device_string_and_many_streams(cnn):
    pool = frames(3, distinct=3)
    got: dict[int, int] = {s: 0 for s in range(6)}
    sent = [0] * 6

    def source(s: int) -> np.ndarray | None:
        sent[s] += 1
        return pool[sent[s] % 3] if sent[s] <= 30 else None

    def sink(s: int, out: np.ndarray) -> None:
        got[s] += 1

    accl = mx.MultiStreamAsyncAccl(cnn, device="sim:reuse", cache_size=2)
    try:
        accl.connect_streams(source, sink, 6)
        accl.wait()
        reuse = accl.statistics()["device"]["models"][0]["reuse"]
    finally:
        accl.close()
    assert all(v == 30 for v in got.values())
    assert reuse["hits"] + reuse["misses"] == 180 and reuse["entries"] <= 2


SCRIPT = """
import sys
import numpy as np, memryx as mx
from memryx import testing
dfp = mx.NeuralCompiler(models=testing.resnet50(input_size=64), fps=2000, latency_ms=2).run()
xs = [np.random.rand(1, 3, 64, 64).astype(np.float32) for _ in range(4)]
def post(y):  # the first output: graphs are running on the worker threads
    post.n = getattr(post, "n", 0) + 1
    if post.n == 1:
        print("running", flush=True)
    return y
with mx.SyncAccl(dfp, mode=sys.argv[1]) as accl:
    accl.set_postprocessing_model(post)
    accl.run(xs * 100000)
"""


@pytest.mark.parametrize("mode", ["timed", "sampled"])
def test_ctrl_c_while_the_host_computes_a_graph_is_a_keyboardinterrupt_not_an_abort(
        mode, tmp_path):
    # a graph still running on a worker thread when the interpreter exits made
    # onnxruntime abort the process ("terminate called without an active exception")
    import signal
    import subprocess

    script = tmp_path / "app.py"
    script.write_text(SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), mode], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "running"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert "terminate called" not in err
    assert proc.returncode == -signal.SIGINT or "KeyboardInterrupt" in err, (proc.returncode,
                                                                             err[-500:])
