"""The trace writer: valid Chrome/Perfetto trace-event JSON, bounded, ordered, cheap when off."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import os
import subprocess
import sys
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import memryx as mx
from memryx import _trace
from memryx._exceptions import ClosedError, UsageError
from memryx._trace import DEVICE_PID, EVENTS_PER_FRAME, Tracer


def check_trace_format(doc: Any) -> list[dict[str, Any]]:
    """Check ``doc`` against the trace-event format's JSON object form; return its events.

    The object form: ``{"traceEvents": [...], ...}``; every event has a string
    ``name``, a phase ``ph``, integer ``pid``/``tid``; a complete event ("X") a
    ``ts`` and a ``dur`` in microseconds (numbers >= 0); a metadata event ("M")
    names a process or thread (``args.name``) or sorts one (``args.sort_index``).
    """
    assert isinstance(doc, dict) and isinstance(doc["traceEvents"], list)
    assert doc.get("displayTimeUnit", "ms") in ("ms", "ns")
    for ev in doc["traceEvents"]:
        assert isinstance(ev["name"], str) and ev["name"]
        assert isinstance(ev["pid"], int) and isinstance(ev["tid"], int)
        if ev["ph"] == "X":
            for key in ("ts", "dur"):
                assert isinstance(ev[key], (int, float)) and math.isfinite(ev[key])
                assert ev[key] >= 0
            assert isinstance(ev.get("args", {}), dict)
        else:
            assert ev["ph"] == "M", ev
            assert ev["name"] in ("process_name", "thread_name", "process_sort_index",
                                  "thread_sort_index")
            key = "sort_index" if ev["name"].endswith("sort_index") else "name"
            assert set(ev["args"]) == {key}
    return list(doc["traceEvents"])


def complete(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["ph"] == "X"]


def test_writes_valid_trace_json_with_a_track_per_model_and_stream(tmp_path: Path):
    tr = Tracer(frames=100)
    tr.name_model(0, "mobilenet")
    t = 1000.0
    for k in range(5):
        for stream in (0, 1):
            for i, stage in enumerate(_trace.STAGES):
                tr.frame(stream, 0, stage, t + k * 0.01 + i * 0.001, t + k * 0.01 + (i + 1) * 0.001,
                         k)
        tr.busy(0, t + k * 0.01 + 0.003, t + k * 0.01 + 0.004)
    tr.frame(0, 1, "device", t, t + 0.5)  # another model, no frame number
    path = tr.write(tmp_path / "trace.json")
    assert path == tmp_path / "trace.json"
    assert list(tmp_path.iterdir()) == [path]  # no temp file left
    events = check_trace_format(json.loads(path.read_text()))
    names = {(e["pid"], e["tid"], e["args"]["name"]) for e in events
             if e["ph"] == "M" and e["name"].endswith("_name")}
    assert (1, 0, "model 0 (mobilenet)") in names and (2, 0, "model 1") in names
    assert (1, 1, "stream 0") in names and (1, 2, "stream 1") in names
    assert (DEVICE_PID, 0, "device") in names and (DEVICE_PID, 1, "model 0 busy") in names
    spans = complete(events)
    assert len(spans) == 5 * 2 * len(_trace.STAGES) + 5 + 1
    first = [e for e in spans if e.get("args", {}).get("frame") == 0 and e["tid"] == 1
             and e["pid"] == 1]
    assert [e["name"] for e in first] == list(_trace.STAGES)
    assert first[0]["ts"] == 0  # the file starts at the earliest event
    assert first[1]["ts"] == pytest.approx(1000.0) and first[1]["dur"] == pytest.approx(1000.0)
    busy = [e for e in spans if e["pid"] == DEVICE_PID]
    assert len(busy) == 5 and all(e["dur"] == pytest.approx(1000.0) for e in busy)
    # metadata first, then events in time order
    kinds = [e["ph"] for e in events]
    assert kinds == sorted(kinds, key=lambda p: p != "M")
    ts = [e["ts"] for e in spans]
    assert ts == sorted(ts)


def test_ring_keeps_only_the_last_frames():
    tr = Tracer(frames=10)
    for k in range(1000):
        for stage in ("input callback", "device", "output callback"):
            tr.frame(0, 0, stage, k, k + 0.5, k)
        tr.busy(0, k, k + 0.25)
    # the ring: events of ~10 frames, 10 device intervals, plus each model's current one
    assert len(tr) <= 10 * EVENTS_PER_FRAME + 10 + 1
    spans = complete(tr.events())
    kept = {e["args"]["frame"] for e in spans if "args" in e}
    assert max(kept) == 999 and min(kept) >= 1000 - 10 * EVENTS_PER_FRAME // 3 - 1
    assert len([e for e in spans if e["pid"] == DEVICE_PID]) == 10 + 1


def test_back_to_back_busy_intervals_merge():
    tr = Tracer(frames=4)
    for k in range(100):  # a chip streaming frames, 1 ms each, back to back
        tr.busy(0, k * 0.001, (k + 1) * 0.001)
    tr.busy(1, 0.0, 0.01)
    tr.busy(0, 0.5, 0.6)  # after a gap: a new interval
    busy = [e for e in complete(tr.events()) if e["pid"] == DEVICE_PID]
    assert [(e["tid"], e["ts"], e["dur"]) for e in busy] == [
        (1, 0, pytest.approx(100_000)), (2, 0, pytest.approx(10_000)),
        (1, pytest.approx(500_000), pytest.approx(100_000))]


def test_out_of_order_records_are_written_in_time_order():
    tr = Tracer()
    tr.frame(1, 0, "output callback", 5.0, 6.0, 1)
    tr.frame(0, 0, "input callback", 1.0, 2.0, 0)
    tr.busy(0, 3.0, 4.0)
    spans = complete(tr.events())
    assert [e["name"] for e in spans] == ["input callback", "model 0", "output callback"]
    assert [e["ts"] for e in spans] == [0, 2e6, 4e6]


def test_an_off_tracer_records_nothing():
    tr = Tracer.off()
    assert tr.on is False
    tr.frame(0, 0, "device", 0.0, 1.0)
    tr.busy(0, 0.0, 1.0)
    assert len(tr) == 0 and complete(tr.events()) == []


def test_memryx_trace_environment_variable(monkeypatch, tmp_path: Path):
    monkeypatch.delenv(_trace.ENV_VAR, raising=False)
    assert Tracer.from_env().on is False
    monkeypatch.setenv(_trace.ENV_VAR, str(tmp_path / "run.json"))
    monkeypatch.setattr(_trace, "_env_counter", iter(range(10)))
    first, second = Tracer.from_env(), Tracer.from_env()
    assert first.on and first.path == tmp_path / "run.json"
    assert second.path == tmp_path / "run.1.json"  # two accelerators never share a file
    first.frame(0, 0, "device", 0.0, 1.0)
    check_trace_format(json.loads(first.write().read_text()))


@pytest.mark.parametrize("frames", [0, -1, 1.5, True])
def test_bad_ring_size_is_refused(frames):
    with pytest.raises(ValueError, match="frames"):
        Tracer(frames=frames)


def test_write_failure_leaves_no_temp_file(tmp_path: Path):
    tr = Tracer()
    tr.frame(0, 0, "device", 0.0, 1.0)
    (tmp_path / "dir").mkdir()
    with pytest.raises(IsADirectoryError):
        tr.write(tmp_path / "dir")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir"]
    with pytest.raises(ValueError, match="no path"):
        tr.write()


# -- the runtime records: accl.trace(...) and MEMRYX_TRACE ------------------------------------

CALLBACK_STAGES = list(_trace.STAGES)
REQUEST_STAGES = ["pre-processing", "queued", "device"]


def frames_of(path: Path) -> dict[tuple[int, int, int], list[dict[str, Any]]]:
    """The trace at ``path`` checked for format; its stage events by (pid, tid, frame)."""
    events = check_trace_format(json.loads(path.read_text()))
    by_frame: dict[tuple[int, int, int], list[dict[str, Any]]] = defaultdict(list)
    for e in complete(events):
        if e["pid"] != DEVICE_PID:
            by_frame[(e["pid"], e["tid"], e["args"]["frame"])].append(e)
    return by_frame


def check_stages(by_frame: dict[tuple[int, int, int], list[dict[str, Any]]],
                 stages: list[str]) -> None:
    """Every frame has exactly ``stages``, each starting after the one before it ended."""
    assert by_frame
    for key, evs in by_frame.items():
        evs = sorted(evs, key=lambda e: stages.index(e["name"]))
        assert [e["name"] for e in evs] == stages, key
        for before, after in itertools.pairwise(evs):
            # microsecond rounding of ts and dur: 2 us of slack
            assert after["ts"] >= before["ts"] + before["dur"] - 2.0, (key, before, after)


def busy_of(path: Path) -> list[dict[str, Any]]:
    doc = json.loads(path.read_text())
    return [e for e in doc["traceEvents"] if e["ph"] == "X" and e["pid"] == DEVICE_PID]


def source(n: int, shape: tuple[int, ...] = (1, 4)) -> Any:
    sent = [0]

    def src() -> Any:
        if sent[0] >= n:
            return None
        sent[0] += 1
        return np.full(shape, sent[0], np.float32)

    return src


def test_async_accl_writes_every_stage_of_every_frame_at_close(identity_dfp, tmp_path):
    path = tmp_path / "t.json"
    got: list[Any] = []
    accl = mx.AsyncAccl(identity_dfp)
    tracer = accl.trace(path)
    assert tracer.on and tracer.path == path
    accl.connect_input(source(40))
    assert not path.exists()  # written when the accelerator closes
    accl.connect_output(lambda out: got.append(out))
    accl.wait()  # which releases the accelerator: the trace is written
    accl.close()
    assert len(got) == 40 and not tracer.on
    by_frame = frames_of(path)
    assert set(by_frame) == {(1, 1, k) for k in range(40)}
    check_stages(by_frame, CALLBACK_STAGES)
    busy = busy_of(path)
    assert busy and {e["tid"] for e in busy} == {1}
    devices = [e for evs in by_frame.values() for e in evs if e["name"] == "device"]
    first = min(e["ts"] for e in devices)
    last = max(e["ts"] + e["dur"] for e in devices)
    # the busy intervals cover the frames' device stages, and nothing outside them
    assert min(e["ts"] for e in busy) == pytest.approx(first, abs=2.0)
    assert max(e["ts"] + e["dur"] for e in busy) <= last + 2.0


def test_multistream_tracks_streams_and_keeps_only_the_last_frames(identity_dfp, tmp_path):
    path = tmp_path / "ms.json"
    with mx.MultiStreamAsyncAccl(identity_dfp) as accl:
        accl.trace(path, frames=10)
        srcs = [source(30) for _ in range(3)]
        accl.connect_streams(lambda s: srcs[s](), lambda s, out: None, 3)
        accl.wait()
    by_frame = frames_of(path)
    assert {tid for _, tid, _ in by_frame} <= {1, 2, 3}
    # the ring: about the last 10 frames (a frame's early stages may outlive its late ones)
    assert len(by_frame) <= 10 * EVENTS_PER_FRAME
    events = sum(len(v) for v in by_frame.values())
    assert events <= 10 * EVENTS_PER_FRAME
    complete_frames = {k: v for k, v in by_frame.items() if len(v) == len(CALLBACK_STAGES)}
    assert complete_frames and all(k >= 30 - 10 * EVENTS_PER_FRAME // 3 for _, _, k in
                                   complete_frames)
    check_stages(complete_frames, CALLBACK_STAGES)
    # numbered per stream: the last frame of each stream that is present is its 30th
    last = {tid: max(k for _, t, k in by_frame if t == tid) for _, tid, _ in by_frame}
    assert set(last.values()) == {29}


def test_sync_accl_run_and_trace_none_writes_at_once(mlp_dfp, tmp_path):
    path = tmp_path / "sync.json"
    x = np.random.default_rng(0).standard_normal(mlp_dfp.model(0).inputs[0].shape)
    x = x.astype(np.float32)
    with mx.SyncAccl(mlp_dfp) as accl:
        accl.trace(path)
        accl.run([x] * 7)
        tracer = accl.trace(None)  # written now; recording stops
        assert not tracer.on
        written = path.read_bytes()
        accl.run([x] * 3)  # not recorded
    assert path.read_bytes() == written  # the close did not write again
    by_frame = frames_of(path)
    assert set(by_frame) == {(1, 1, k) for k in range(7)}
    check_stages(by_frame, REQUEST_STAGES)
    assert busy_of(path)


def test_trace_started_mid_run_pairs_frames_right(identity_dfp, tmp_path):
    path = tmp_path / "mid.json"
    accl = mx.AsyncAccl(identity_dfp)
    try:
        accl.connect_input(source(200))  # frames flow from here on
        accl.connect_output(lambda out: None)
        accl.trace(path, frames=1000)
        accl.wait()
    finally:
        accl.close()
    by_frame = frames_of(path)
    assert by_frame
    for key, evs in by_frame.items():  # a frame in flight when it started: its later stages
        names = [e["name"] for e in sorted(evs, key=lambda e: CALLBACK_STAGES.index(e["name"]))]
        assert names == CALLBACK_STAGES[len(CALLBACK_STAGES) - len(names):], key
    check_stages({k: v for k, v in by_frame.items() if len(v) == 6}, CALLBACK_STAGES)


def test_bad_trace_arguments_are_refused(identity_dfp, tmp_path):
    with mx.SyncAccl(identity_dfp) as accl:
        with pytest.raises(UsageError, match="does not exist"):
            accl.trace(tmp_path / "missing" / "t.json")
        with pytest.raises(UsageError, match="directory"):
            accl.trace(tmp_path)
        with pytest.raises(UsageError, match="frames"):
            accl.trace(tmp_path / "t.json", frames=0)
        assert accl.trace(None).on is False  # not tracing: nothing to write, no error
    with pytest.raises(ClosedError):
        accl.trace(tmp_path / "t.json")
    assert not list(tmp_path.iterdir())


def test_a_trace_that_cannot_be_written_does_not_fail_the_close(identity_dfp, tmp_path):
    target = tmp_path / "gone"
    target.mkdir()
    accl = mx.SyncAccl(identity_dfp)
    accl.trace(target / "t.json")
    accl.run([np.zeros((1, 4), np.float32)])
    target.rmdir()
    accl.close()  # logs a warning through `logging`; raises nothing
    assert not tmp_path.joinpath("gone").exists()


@pytest.mark.asyncio
async def test_async_callbacks_on_the_loop_are_traced(identity_dfp, tmp_path):
    path = tmp_path / "a.json"
    sent = [0]

    async def src() -> Any:
        await asyncio.sleep(0)
        if sent[0] >= 25:
            return None
        sent[0] += 1
        return np.zeros((1, 4), np.float32)

    async def sink(out: Any) -> None:
        await asyncio.sleep(0)

    async with mx.AsyncAccl(identity_dfp) as accl:
        accl.trace(path)
        accl.connect_input(src)
        accl.connect_output(sink)
        await accl.await_done()
    by_frame = frames_of(path)
    assert set(by_frame) == {(1, 1, k) for k in range(25)}
    check_stages(by_frame, CALLBACK_STAGES)


@pytest.mark.asyncio
async def test_arun_is_traced_and_written_by_aclose(mlp_dfp, tmp_path):
    path = tmp_path / "arun.json"
    x = np.zeros(mlp_dfp.model(0).inputs[0].shape, np.float32)
    accl = mx.SyncAccl(mlp_dfp)
    accl.trace(path)
    await accl.arun([x] * 4)
    await accl.aclose()
    check_stages(frames_of(path), REQUEST_STAGES)


SCRIPT = """
import numpy as np, memryx as mx
from memryx import testing
dfp = mx.NeuralCompiler(models=testing.identity_model((1, 4))).run()
kept = []
for _ in range(2):
    accl = mx.SyncAccl(dfp)        # never closed
    accl.run([np.zeros((1, 4), np.float32)] * 5)
    kept.append(accl)
print("ran", flush=True)
"""


def test_memryx_trace_writes_at_exit_without_a_close(tmp_path):
    env = {**os.environ, "MEMRYX_TRACE": str(tmp_path / "run.json")}
    env.pop("MEMRYX_DEVICE", None)
    done = subprocess.run([sys.executable, "-W", "error", "-c", SCRIPT], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "ran\n" and done.stderr == ""  # quiet
    for name in ("run.json", "run.1.json"):
        check_stages(frames_of(tmp_path / name), REQUEST_STAGES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.1.json", "run.json"]


def test_over_the_fd_device_too(identity_dfp, tmp_path, shared_server, monkeypatch):
    """The device stage and busy row come from the lane, so any device gives them."""
    monkeypatch.setenv("MEMRYX_DEVICE", shared_server.address)
    path = tmp_path / "fd.json"
    with mx.MultiStreamAsyncAccl(identity_dfp) as accl:
        accl.trace(path)
        srcs = [source(20) for _ in range(2)]
        accl.connect_streams(lambda s: srcs[s](), lambda s, out: None, 2)
        accl.wait()
    by_frame = frames_of(path)
    assert set(by_frame) == {(1, t, k) for t in (1, 2) for k in range(20)}
    check_stages(by_frame, CALLBACK_STAGES)
    assert busy_of(path)


@pytest.mark.asyncio
async def test_send_receive_and_astream_frames_are_traced(identity_dfp, tmp_path):
    x = np.zeros((1, 4), np.float32)
    path = tmp_path / "sr.json"
    accl = mx.SyncAccl(identity_dfp)
    accl.trace(path)
    for _ in range(6):
        await accl.asend(x)
    for _ in range(6):
        await accl.areceive()
    await accl.aclose()
    by_frame = frames_of(path)
    assert set(by_frame) == {(1, 1, k) for k in range(6)}
    check_stages(by_frame, REQUEST_STAGES)

    path = tmp_path / "st.json"
    async with mx.AsyncAccl(identity_dfp) as accl2:
        accl2.trace(path)
        outs = [o async for o in accl2.astream([x] * 9, window=3)]
    assert len(outs) == 9
    by_frame = frames_of(path)
    assert set(by_frame) == {(1, 1, k) for k in range(9)}
    check_stages(by_frame, REQUEST_STAGES)


def test_off_records_nothing_in_a_real_run(identity_dfp, monkeypatch):
    monkeypatch.delenv("MEMRYX_TRACE", raising=False)
    accl = mx.AsyncAccl(identity_dfp)
    tracer = accl._tracer
    accl.connect_input(source(30))
    accl.connect_output(lambda out: None)
    accl.wait()
    assert not tracer.on and len(tracer) == 0
    assert all(not lane._traced and not lane._traced_flight for lane in accl._engine.lanes)


def test_memryx_trace_in_a_missing_directory_is_refused_at_creation(identity_dfp, tmp_path,
                                                                    monkeypatch):
    monkeypatch.setenv("MEMRYX_TRACE", str(tmp_path / "nowhere" / "t.json"))
    monkeypatch.setattr(_trace, "_env_counter", _trace.itertools.count())
    with pytest.raises(UsageError, match="MEMRYX_TRACE=.*nowhere.*does not exist"):
        mx.SyncAccl(identity_dfp)


def test_trace_none_and_restart_while_frames_flow(identity_dfp, tmp_path):
    first, second = tmp_path / "1.json", tmp_path / "2.json"
    halfway = threading.Event()
    n = [0]

    def src() -> Any:
        if n[0] >= 400:
            return None
        n[0] += 1
        if n[0] == 150:
            halfway.set()
        return np.zeros((1, 4), np.float32)

    accl = mx.AsyncAccl(identity_dfp)
    try:
        accl.trace(first)
        accl.connect_input(src)
        accl.connect_output(lambda out: None)
        assert halfway.wait(30)
        accl.trace(None)            # written while frames flow
        accl.trace(second, frames=50)  # a new recording
        accl.wait()
    finally:
        accl.close()
    for path in (first, second):
        by_frame = frames_of(path)
        assert by_frame
        done = {k: v for k, v in by_frame.items() if len(v) == len(CALLBACK_STAGES)}
        check_stages(done, CALLBACK_STAGES)
    assert max(k for _, _, k in frames_of(second)) == 399


FOREVER = """
import numpy as np, memryx as mx
from memryx import testing
dfp = mx.NeuralCompiler(models=testing.identity_model((1, 4))).run()
accl = mx.AsyncAccl(dfp)
n = [0]
def src():
    n[0] += 1
    if n[0] == 100:
        print("flowing", flush=True)
    return np.zeros((1, 4), np.float32)
accl.connect_input(src)
accl.connect_output(lambda out: None)
accl.wait()
"""


def test_memryx_trace_is_written_when_ctrl_c_ends_the_program(tmp_path):
    import signal

    env = {**os.environ, "MEMRYX_TRACE": str(tmp_path / "int.json")}
    env.pop("MEMRYX_DEVICE", None)
    proc = subprocess.Popen([sys.executable, "-c", FOREVER], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "flowing\n"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:  # pragma: no cover - a hang: the assertion below says so
            proc.kill()
            proc.communicate()
    assert "KeyboardInterrupt" in err
    by_frame = frames_of(tmp_path / "int.json")
    done = {k: v for k, v in by_frame.items() if len(v) == len(CALLBACK_STAGES)}
    assert len(done) >= 50
    check_stages(done, CALLBACK_STAGES)
