"""The ten most common usage patterns of the vendor's example applications
(``sdk-surface.md``), each run unchanged as a user's script in its own process.

The scripts are written the way the vendor's examples write them: no `with`,
often no close, callbacks on objects, queues on the side. Each prints what it
checked; the test reads that and checks the process ended cleanly and promptly.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

import memryx as mx
from memryx import testing

from .scripts import EXIT_BOUND_S, run_script

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def models(compat_dir: Path) -> Path:
    """ONNX files as a user has them on disk, and a DFP compiled from one."""
    onnx.save(testing.mobilenet_like(), str(compat_dir / "mobilenet.onnx"))
    onnx.save(testing.mobilenet_like(preprocessing=True), str(compat_dir / "mobilenet_pp.onnx"))
    mx.NeuralCompiler(models=testing.mobilenet_like(), dfp_fname=str(compat_dir / "mn.dfp")
                      ).run()
    return compat_dir


def _ok(res, *expect: str) -> None:  # type: ignore[no-untyped-def]
    res.check_clean()
    assert res.rc == 0, (res.rc, res.err)
    for line in expect:
        assert line in res.out, (line, res.out, res.err)
    assert res.exit_s < EXIT_BOUND_S / 2, res.exit_s


# A reference each script computes on its own, with onnxruntime, for the ONNX model it uses.
REF = """
import onnxruntime as _ort
def reference(path, x):
    s = _ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]
"""


def test_1_async_callbacks_wait(tmp_path: Path, models: Path) -> None:
    """AsyncAccl(dfp) -> connect_input -> connect_output -> wait()."""
    res = run_script(tmp_path, REF + f"""
import time
import numpy as np
from memryx import AsyncAccl

frames = [np.random.rand(1, 3, 64, 64).astype(np.float32) for _ in range(20)]
it = iter(frames)
outs = []

def data_source():
    return next(it, None)

def output_processor(*outputs):
    outs.append(outputs[0])

accl = AsyncAccl({str(models / 'mn.dfp')!r})
accl.connect_input(data_source)
accl.connect_output(output_processor)
accl.wait()
ref = [reference({str(models / 'mobilenet.onnx')!r}, f) for f in frames]
print("outputs", len(outs), "match", all(np.allclose(o, r, atol=1e-5) for o, r in zip(outs, ref)))
print("END", time.time())
""")
    _ok(res, "outputs 20 match True")


def test_2_postprocessing_model_after_autocrop(tmp_path: Path, models: Path) -> None:
    """Compile with autocrop, then set the cropped post-processing model by its path."""
    res = run_script(tmp_path, REF + f"""
import glob, time
import numpy as np
from memryx import NeuralCompiler, AsyncAccl

dfp = NeuralCompiler(num_chips=4, models={str(models / 'mobilenet_pp.onnx')!r}, verbose=1,
                     dfp_fname="mobilenet_pp.dfp", autocrop=True).run()
post = sorted(glob.glob("*post*.onnx"))
pre = sorted(glob.glob("*pre*.onnx"))
print("cropped", len(pre), len(post))
frames = [np.random.randint(0, 255, (1, 64, 64, 3), dtype=np.uint8) for _ in range(6)]
it = iter(frames)
outs = []
accl = AsyncAccl("mobilenet_pp.dfp")
accl.set_preprocessing_model(pre[0], model_idx=0)
accl.set_postprocessing_model(post[0], model_idx=0)
accl.connect_input(lambda: next(it, None))
accl.connect_output(lambda *o: outs.append(o[0]))
accl.wait()
ref = [reference({str(models / 'mobilenet_pp.onnx')!r}, f) for f in frames]
print("outputs", len(outs), "match", all(np.allclose(o, r, atol=1e-4) for o, r in zip(outs, ref)))
print("END", time.time())
""")
    _ok(res, "cropped 1 1", "outputs 6 match True")


def test_3_side_queue_keeps_order(tmp_path: Path, models: Path) -> None:
    """The input callback puts each original frame on a side queue the output pops."""
    res = run_script(tmp_path, REF + f"""
import queue, time
import numpy as np
from memryx import AsyncAccl

class App:
    def __init__(self, n):
        self.cap = (np.full((64, 64, 3), i, np.uint8) for i in range(n))  # a "video"
        self.frames = queue.Queue()
        self.ok = 0
        self.seen = 0

    def capture(self):
        frame = next(self.cap, None)
        if frame is None:
            return None          # end of the video
        self.frames.put(frame)
        x = np.transpose(frame.astype(np.float32) / 255.0, (2, 0, 1))[None]
        return x

    def postprocess(self, *mxa_output):
        frame = self.frames.get()
        x = np.transpose(frame.astype(np.float32) / 255.0, (2, 0, 1))[None]
        want = reference({str(models / 'mobilenet.onnx')!r}, x)
        self.ok += bool(np.allclose(mxa_output[0], want, atol=1e-5))
        self.seen += 1

app = App(40)
accl = AsyncAccl({str(models / 'mn.dfp')!r})
accl.connect_input(app.capture)
accl.connect_output(app.postprocess)
accl.wait()
print("in order", app.ok, "of", app.seen)
print("END", time.time())
""")
    _ok(res, "in order 40 of 40")


def test_4_output_callback_method_with_varargs(tmp_path: Path, models: Path) -> None:
    """`def postprocess(self, *mxa_output)` on a class, several outputs."""
    mx.NeuralCompiler(models=testing.split_model(), dfp_fname=str(tmp_path / "split.dfp")).run()
    res = run_script(tmp_path, """
import time
import numpy as np
from memryx import AsyncAccl

class Demo:
    def __init__(self):
        self.n = 0
        self.counts = set()
        self.sent = 0

    def get_frame(self):
        self.sent += 1
        return np.ones((1, 8), np.float32) if self.sent <= 5 else None

    def postprocess(self, *mxa_output):
        self.n += 1
        self.counts.add(len(mxa_output))

d = Demo()
accl = AsyncAccl("split.dfp")
accl.connect_input(d.get_frame)
accl.connect_output(d.postprocess)
accl.wait()
print("calls", d.n, "arity", sorted(d.counts))
print("END", time.time())
""")
    _ok(res, "calls 5 arity [2]")


def test_5_compile_if_missing(tmp_path: Path, models: Path) -> None:
    code = f"""
import os, time
import numpy as np
from memryx import NeuralCompiler, SyncAccl
dfp_path = "model.dfp"
if not os.path.exists(dfp_path):
    print("compiling")
    NeuralCompiler(num_chips=4, models={str(models / 'mobilenet.onnx')!r}, verbose=1,
                   dfp_fname=dfp_path, autocrop=True).run()
accl = SyncAccl(dfp_path)
print("shape", accl.run(np.zeros((1, 3, 64, 64), np.float32)).shape)
print("END", time.time())
"""
    first = run_script(tmp_path, code)
    _ok(first, "compiling", "shape (1, 10)")
    again = run_script(tmp_path, code)
    _ok(again, "shape (1, 10)")
    assert "compiling" not in again.out


def test_6_sync_validation_loop_never_closed(tmp_path: Path, models: Path) -> None:
    res = run_script(tmp_path, REF + f"""
import time
import numpy as np
from memryx import SyncAccl
accl = SyncAccl({str(models / 'mn.dfp')!r})
correct = 0
for i in range(30):
    x = np.random.rand(1, 3, 64, 64).astype(np.float32)
    y = accl.run(x)
    correct += bool(np.allclose(y, reference({str(models / 'mobilenet.onnx')!r}, x), atol=1e-5))
print("correct", correct)
print("END", time.time())
""")
    _ok(res, "correct 30")


def test_7_multistream_capture_post(tmp_path: Path, models: Path) -> None:
    res = run_script(tmp_path, f"""
import time
import numpy as np
from memryx import MultiStreamAsyncAccl

class Cams:
    def __init__(self, n, frames):
        self.left = [frames] * n
        self.got = {{i: [] for i in range(n)}}

    def capture(self, stream_idx):
        if self.left[stream_idx] == 0:
            return None
        self.left[stream_idx] -= 1
        return np.full((1, 3, 64, 64), stream_idx, np.float32)

    def post(self, stream_idx, *out):
        self.got[stream_idx].append(out[0])

cams = Cams(4, 15)
accl = MultiStreamAsyncAccl(dfp={str(models / 'mn.dfp')!r})
accl.connect_streams(cams.capture, cams.post, 4)
accl.wait()
same = all(np.allclose(v[0], o) for v in cams.got.values() for o in v)
print("per stream", sorted(len(v) for v in cams.got.values()), "consistent", same)
print("END", time.time())
""")
    _ok(res, "per stream [15, 15, 15, 15] consistent True")


def test_8_chip_layout_expand_dims(tmp_path: Path, models: Path) -> None:
    res = run_script(tmp_path, REF + f"""
import time
import numpy as np
from memryx import AsyncAccl
imgs = [np.random.rand(64, 64, 3).astype(np.float32) for _ in range(8)]
it = iter(imgs)
outs = []
accl = AsyncAccl({str(models / 'mn.dfp')!r})
accl.connect_input(lambda: next((np.expand_dims(i, axis=2) for i in it), None))
accl.connect_output(lambda *o: outs.append(o[0]))
accl.wait()
ref = [reference({str(models / 'mobilenet.onnx')!r}, np.transpose(i, (2, 0, 1))[None])
       for i in imgs]
print("match", len(outs), all(np.allclose(o, r, atol=1e-5) for o, r in zip(outs, ref)))
print("END", time.time())
""")
    _ok(res, "match 8 True")


@pytest.mark.parametrize("teardown", ["wait_stop", "stop_from_flag", "shutdown"])
def test_9_teardown(tmp_path: Path, models: Path, teardown: str) -> None:
    res = run_script(tmp_path, f"""
import threading, time
import numpy as np
from memryx import AsyncAccl
x = np.zeros((1, 3, 64, 64), np.float32)
n = [0]
done = threading.Event()
def src():
    if {teardown!r} == "wait_stop" and n[0] >= 10:
        return None
    return x
def out(*o):
    n[0] += 1
    if n[0] == 10:
        done.set()
accl = AsyncAccl({str(models / 'mn.dfp')!r})
accl.connect_input(src)
accl.connect_output(out)
if {teardown!r} == "wait_stop":
    accl.wait()
    accl.stop()
elif {teardown!r} == "stop_from_flag":
    done.wait(30)
    t0 = time.monotonic()
    accl.stop()
    print("stop took", round(time.monotonic() - t0, 2))
else:
    done.wait(30)
    accl.shutdown()
print("outputs >= 10:", n[0] >= 10)
print("END", time.time())
""")
    _ok(res, "outputs >= 10: True")


def test_10_sdk2_options(tmp_path: Path, models: Path) -> None:
    res = run_script(tmp_path, f"""
import time
import numpy as np
from memryx import AsyncAccl, ClientOptions, SchedulerOptions
path = {str(models / 'mn.dfp')!r}
for i in [0]:
    accl = AsyncAccl(path, device_ids=[i], local_mode=True,
                     scheduler_options=SchedulerOptions(frame_limit=20, time_limit=250),
                     client_options=ClientOptions(True, 30.0))
    sent = [0]
    stamps = []
    def src():
        sent[0] += 1
        return np.zeros((1, 3, 64, 64), np.float32) if sent[0] <= 12 else None
    accl.connect_input(src)
    accl.connect_output(lambda *o: stamps.append(time.monotonic()))
    accl.wait()
    accl.shutdown()
    rate = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    print("outputs", len(stamps), "paced", rate < 40)
print("END", time.time())
""")
    _ok(res, "outputs 12 paced True")
