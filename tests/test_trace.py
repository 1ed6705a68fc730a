"""The trace writer: valid Chrome/Perfetto trace-event JSON, bounded, ordered, cheap when off."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from memryx import _trace
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
