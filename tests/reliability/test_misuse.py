"""The misuse matrix: wrong uses of the public API, each answered with the exact
exception type and a message that names the problem, and each leaving the
process usable (a *new* accelerator runs frames correctly afterwards; the
autouse fixture of tests/conftest.py also checks that no thread or fd is left).

Table-driven: ``CASES`` (sync programs) and ``LOOP_CASES`` (inside a running
event loop, on asyncio and uvloop). Cases that need timing or cleanup of their
own (callbacks that block forever, KeyboardInterrupt, ...) are tests below the
tables. A case marked ``bug=`` is a library bug: it is xfail(strict) with the
behaviour the documentation promises.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import memryx as mx
from memryx import testing
from tests.conftest import in_memryx_call, settle, threads_ended

from .helpers import PROBE, assert_usable, assert_usable_async


@dataclass(frozen=True)
class Env:
    identity: mx.Dfp   # (1, 4) float32 -> same
    mlp: mx.Dfp        # (1, 16) float32 -> (1, 10)
    add: mx.Dfp        # two (1, 8) inputs -> their sum
    split: mx.Dfp      # (1, 8) -> (2x, -x): two outputs
    three: mx.Dfp      # mlp, add, split as models 0, 1, 2
    tmp: Path


@pytest.fixture
def env(identity_dfp, mlp_dfp, add_dfp, split_dfp, three_model_dfp, tmp_path) -> Env:
    return Env(identity_dfp, mlp_dfp, add_dfp, split_dfp, three_model_dfp, tmp_path)


X4 = np.zeros((1, 4), np.float32)
X8 = np.zeros((1, 8), np.float32)
X16 = np.zeros((1, 16), np.float32)


def case(id_: str, act: Callable[[Env], Any], exc: type[BaseException], match: str, *,
         note: str | None = None, bug: str | None = None) -> Any:
    """One row: ``act(env)`` raises exactly ``exc`` with ``match`` in its message (and
    ``note`` in one of its notes). ``bug``: a library bug, xfail(strict) until fixed; the
    expected type may then be a base class of what the fix raises."""
    marks = [pytest.mark.xfail(strict=True, reason=f"BUG: {bug}")] if bug else []
    return pytest.param(act, exc, match, note, bug is None, id=id_, marks=marks)


# -- small drivers ------------------------------------------------------------------------------
def sync(dfp: mx.Dfp, fn: Callable[[mx.SyncAccl], Any], **kw: Any) -> Any:
    with mx.SyncAccl(dfp, **kw) as accl:
        return fn(accl)


def source(n: int, frame: Any = X4) -> Callable[[], Any]:
    """An input callback returning ``frame`` ``n`` times, then None."""
    left = iter(range(n))
    return lambda: frame if next(left, None) is not None else None


def callbacks(dfp: mx.Dfp, inp: Callable[..., Any], out: Callable[..., Any] = lambda *a: None,
              ) -> None:
    with mx.AsyncAccl(dfp) as accl:
        accl.connect_input(inp)
        accl.connect_output(out)
        accl.wait()


def streams(dfp: mx.Dfp, inp: Callable[..., Any], out: Callable[..., Any], count: Any,
            model_idx: int = 0, **kw: Any) -> None:
    with mx.MultiStreamAsyncAccl(dfp, **kw) as accl:
        accl.connect_streams(inp, out, count, model_idx=model_idx)
        accl.wait()


def closed(cls: type, dfp: mx.Dfp) -> Any:
    accl = cls(dfp)
    accl.close()
    return accl


def raises(exc: BaseException, called: threading.Event | None = None) -> Callable[..., Any]:
    """A callback that raises ``exc`` (setting ``called`` first, for a test to wait on)."""
    def fn(*_args: Any) -> Any:
        if called is not None:
            called.set()
        raise exc
    return fn


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def stale_socket(tmp: Path) -> str:
    """A socket file nobody listens on (a server that died without cleaning up)."""
    path = tmp / "stale.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.close()
    return f"unix:{path}"


def fifo(tmp: Path) -> Path:
    path = tmp / "model.dfp"
    os.mkfifo(path)
    return path


def sparse(tmp: Path, size: int) -> Path:
    path = tmp / "huge.dfp"
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def wait_twice(dfp: mx.Dfp) -> None:
    accl = mx.AsyncAccl(dfp)
    accl.connect_input(source(3))
    accl.connect_output(lambda y: None)
    accl.wait()
    accl.wait()


def wait_after_stop(dfp: mx.Dfp) -> None:
    accl = mx.AsyncAccl(dfp)
    accl.connect_input(lambda: X4)
    accl.connect_output(lambda y: None)
    accl.stop()
    accl.wait()


def wait_partly_connected(dfp: mx.Dfp, *, connect_output: bool, connect_input: bool) -> None:
    with mx.AsyncAccl(dfp) as accl:
        if connect_input:
            accl.connect_input(source(2))
        if connect_output:
            accl.connect_output(lambda y: None)
        accl.wait()


def three_models_only_first_connected(dfp: mx.Dfp) -> None:
    with mx.AsyncAccl(dfp) as accl:
        accl.connect_input(source(2, X16))
        accl.connect_output(lambda y: None)
        accl.wait()


def connect_twice(dfp: mx.Dfp, which: str) -> None:
    with mx.AsyncAccl(dfp) as accl:
        getattr(accl, which)(lambda *a: None)
        getattr(accl, which)(lambda *a: None)


def connect_model(dfp: mx.Dfp, model_idx: int) -> None:
    with mx.AsyncAccl(dfp) as accl:
        accl.connect_input(lambda: None, model_idx=model_idx)


def reenter(dfp: mx.Dfp) -> None:
    accl = mx.SyncAccl(dfp)
    with accl:
        accl.run(X4)
    with accl:
        pass  # pragma: no cover - refused on entry


def ms_input_raises_on_stream_1(dfp: mx.Dfp) -> None:
    def inp(i: int) -> Any:
        if i == 1:
            raise OSError("camera 1 unplugged")
        return None

    streams(dfp, inp, lambda i, y: None, 3)


def junk_generator() -> Iterator[Any]:
    yield X4
    yield "not a frame"


async def async_source_raises() -> Any:
    raise ConnectionResetError("rtsp stream reset")


def pre(dfp: mx.Dfp, model: Any, data: Any = X4) -> Any:
    def go(accl: mx.SyncAccl) -> Any:
        accl.set_preprocessing_model(model)
        return accl.run(data)
    return sync(dfp, go)


def post(dfp: mx.Dfp, model: Any, data: Any = X4) -> Any:
    def go(accl: mx.SyncAccl) -> Any:
        accl.set_postprocessing_model(model)
        return accl.run(data)
    return sync(dfp, go)


def set_after(dfp: mx.Dfp, which: str) -> None:
    with mx.AsyncAccl(dfp) as accl:
        if which == "pre":
            accl.connect_input(lambda: X4)
            accl.set_preprocessing_model(lambda x: x)
        else:
            accl.connect_output(lambda y: None)
            accl.set_postprocessing_model(lambda y: y)


PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(64)
SHAPE_MSG = r"model 0, input port 0 \(layer 'x'\): expected shape \(1, 16\) or \(16,\)"
CLOSED = "is closed; create a new one"

CASES = [
    # -- frames: shapes, dtypes, number of inputs, wrong containers ----------------------------
    case("run-wrong-shape", lambda e: sync(e.mlp, lambda a: a.run(np.zeros((1, 15), np.float32))),
         mx.ShapeError, SHAPE_MSG + r", got \(1, 15\)"),
    case("run-0d-array", lambda e: sync(e.mlp, lambda a: a.run(np.array(1.0, np.float32))),
         mx.ShapeError, SHAPE_MSG + r", got \(\)"),
    case("run-stacked-batch", lambda e: sync(e.mlp, lambda a: a.run(np.zeros((4, 16), np.float32))),
         mx.ShapeError, r"stacked batch of 4 frames.*pass a list of frames"),
    case("run-wrong-dtype", lambda e: sync(e.mlp, lambda a: a.run(X16.astype(np.float64))),
         mx.DtypeError, "expected dtype float32, got float64.*does not cast"),
    case("run-big-endian", lambda e: sync(e.mlp, lambda a: a.run(X16.astype(">f4"))),
         mx.DtypeError, "expected dtype float32, got >f4"),
    case("run-object-array", lambda e: sync(e.mlp, lambda a: a.run(X16.astype(object))),
         mx.DtypeError, "expected dtype float32, got object"),
    case("run-one-input-for-two", lambda e: sync(e.add, lambda a: a.run(X8)),
         mx.InputCountError, r"frame has 1 array\(s\), the model has 2 input port\(s\)"),
    case("run-three-inputs-for-two", lambda e: sync(e.add, lambda a: a.run([[X8, X8, X8]])),
         mx.InputCountError, r"frame has 3 array\(s\), the model has 2 input port\(s\)"),
    case("run-list-of-floats", lambda e: sync(e.mlp, lambda a: a.run([0.0] * 16)),
         mx.DtypeError, "must be a numpy.ndarray or a sequence of them, got float"),
    case("send-nested-list", lambda e: sync(e.mlp, lambda a: a.send([[0.0] * 16])),
         mx.DtypeError, "numpy.ndarray.*got list"),
    case("send-list-of-floats", lambda e: sync(e.mlp, lambda a: a.send([0.0] * 16)),
         mx.DtypeError, "frame must be a numpy.ndarray.*got list"),
    case("run-str", lambda e: sync(e.mlp, lambda a: a.run("frame.jpg")),
         TypeError, "inputs must be a numpy.ndarray, a list of frames.*got str"),
    case("run-numpy-scalar", lambda e: sync(e.mlp, lambda a: a.run(np.float32(1))),
         TypeError, "inputs must be a numpy.ndarray.*got float32"),
    case("run-dict", lambda e: sync(e.mlp, lambda a: a.run({"x": X16})),
         TypeError, "inputs must be a numpy.ndarray.*got dict"),
    case("run-bad-frame-last-in-batch",
         lambda e: sync(e.mlp, lambda a: a.run([X16, X16, np.zeros((2, 2), np.float32)])),
         mx.ShapeError, r"got \(2, 2\)"),
    # -- model_idx / group_id / stream_count / stream_workers / timeout / window --------------
    case("run-model-idx-too-big", lambda e: sync(e.three, lambda a: a.run(X16, model_idx=3)),
         mx.ModelIndexError, r"model_idx 3 out of range: the DFP holds 3 model\(s\)"),
    case("run-model-idx-negative", lambda e: sync(e.mlp, lambda a: a.run(X16, model_idx=-1)),
         mx.ModelIndexError, "model_idx -1 out of range"),
    case("run-model-idx-str", lambda e: sync(e.mlp, lambda a: a.run(X16, model_idx="0")),
         TypeError, "model_idx must be an int, got str"),
    case("receive-model-idx", lambda e: sync(e.mlp, lambda a: a.receive(model_idx=1)),
         mx.ModelIndexError, "model_idx 1 out of range"),
    case("connect-input-model-idx", lambda e: connect_model(e.identity, 2),
         mx.ModelIndexError, "model_idx 2 out of range"),
    case("inport-assignment-model-idx", lambda e: sync(e.mlp, lambda a: a.inport_assignment(5)),
         mx.ModelIndexError, "model_idx 5 out of range"),
    case("group-id-too-big", lambda e: mx.SyncAccl(e.identity, group_id=1),
         mx.ModelIndexError, r"group_id 1 out of range: the simulated device has 1 chip group"),
    case("group-id-negative", lambda e: mx.SyncAccl(e.identity, group_id=-1),
         mx.ModelIndexError, "group_id must be >= 0, got -1"),
    case("group-id-str", lambda e: mx.SyncAccl(e.identity, group_id="0"),
         TypeError, "group_id must be an int, got str"),
    case("group-id-bool", lambda e: mx.AsyncAccl(e.identity, group_id=True),
         TypeError, "group_id must be an int, got bool"),
    case("stream-count-zero", lambda e: streams(e.identity, lambda i: None, lambda i, y: None, 0),
         ValueError, "stream_count must be a positive int, got 0"),
    case("stream-count-huge",
         lambda e: streams(e.identity, lambda i: None, lambda i, y: None, 10**6),
         mx.StreamCountError, r"stream_count 1000000: model 0 may have at most 4096 streams"),
    # a wrong type is a TypeError (issue 9)
    case("stream-count-str", lambda e: streams(e.identity, lambda i: None, lambda i, y: None, "4"),
         TypeError, r"stream_count must be an int, got str \('4'\)"),
    case("stream-count-bool",
         lambda e: streams(e.identity, lambda i: None, lambda i, y: None, True),
         TypeError, r"stream_count must be an int, got bool \(True\)"),
    case("stream-workers-zero", lambda e: mx.MultiStreamAsyncAccl(e.identity, stream_workers=0),
         ValueError, "stream_workers must be a positive int or None, got 0"),
    case("stream-workers-float", lambda e: mx.AsyncAccl(e.identity, stream_workers=2.5),
         ValueError, "stream_workers must be a positive int or None, got 2.5"),
    case("receive-timeout-negative", lambda e: sync(e.identity, lambda a: a.receive(timeout=-1)),
         ValueError, r"timeout must be None or a number of milliseconds >= 0, got -1"),
    case("send-timeout-str", lambda e: sync(e.identity, lambda a: a.send(X4, timeout="1s")),
         ValueError, "timeout must be None or a number of milliseconds >= 0, got '1s'"),
    case("receive-timeout-bool", lambda e: sync(e.identity, lambda a: a.receive(timeout=True)),
         ValueError, "timeout must be None or a number of milliseconds >= 0, got True"),
    case("receive-timeout-nan",
         lambda e: sync(e.identity, lambda a: a.receive(timeout=float("nan"))),
         ValueError, "timeout must be None or a number of milliseconds >= 0, got nan"),
    # -- callbacks: signatures, errors, junk ----------------------------------------------------
    case("input-callback-takes-an-arg", lambda e: callbacks(e.identity, lambda frame: None),
         mx.CallbackSignatureError, r"input callback of model 0 .* signature is \(frame\); "
                                    "input callbacks take no parameters"),
    case("input-callback-is-a-generator-object",
         lambda e: callbacks(e.identity, junk_generator()),
         mx.CallbackSignatureError, "input callback of model 0 must be callable, got generator"),
    case("output-callback-takes-nothing", lambda e: callbacks(e.identity, source(1), lambda: None),
         mx.CallbackSignatureError, r"output callback of model 0 .* called with 1 positional "
                                    r"argument, but its signature is \(no parameters\)"),
    case("output-callback-one-arg-for-two-outputs",
         lambda e: callbacks(e.split, source(1, X8), lambda y: None),
         mx.CallbackSignatureError, r"called with 2 positional arguments, but its signature "
                                    r"is \(y\)"),
    case("output-callback-none", lambda e: callbacks(e.identity, source(1), None),
         mx.CallbackSignatureError, "output callback of model 0 must be callable, got NoneType"),
    case("stream-input-without-index", lambda e: streams(e.identity, lambda: X4,
                                                         lambda i, y: None, 2),
         mx.CallbackSignatureError, r"input callback of model 0 .* called with 1 positional "
                                    "argument"),
    case("stream-output-without-index", lambda e: streams(e.identity, lambda i: None,
                                                          lambda y: None, 2),
         mx.CallbackSignatureError, r"called with 2 positional arguments, but its signature "
                                    r"is \(y\)"),
    case("input-callback-raises",
         lambda e: callbacks(e.identity, raises(RuntimeError("camera unplugged"))),
         RuntimeError, "camera unplugged", note="(raised by the input callback of model 0)"),
    case("output-callback-raises",
         lambda e: callbacks(e.identity, source(1), raises(KeyError("database down"))),
         KeyError, "database down", note="(raised by the output callback of model 0)"),
    case("stream-input-raises", lambda e: ms_input_raises_on_stream_1(e.identity),
         OSError, "camera 1 unplugged", note="input callback of model 0, stream 1"),
    case("async-input-raises", lambda e: callbacks(e.identity, async_source_raises),
         ConnectionResetError, "rtsp stream reset",
         note="(raised by the input callback of model 0)"),
    case("input-returns-str", lambda e: callbacks(e.identity, lambda: "frame"),
         mx.DtypeError, "frame must be a numpy.ndarray or a sequence of them, got str",
         note="(raised by the input callback of model 0)"),
    case("input-returns-dict", lambda e: callbacks(e.identity, lambda: {"x": X4}),
         mx.DtypeError, "frame must be a numpy.ndarray or a sequence of them, got dict"),
    case("input-returns-list-of-wrong-length", lambda e: callbacks(e.identity, lambda: [X4, X4]),
         mx.InputCountError, r"frame has 2 array\(s\), the model has 1 input port\(s\)"),
    case("input-returns-wrong-dtype", lambda e: callbacks(e.identity, lambda: X4.astype(np.int32)),
         mx.DtypeError, "expected dtype float32, got int32"),
    case("generator-yields-junk", lambda e: callbacks(e.identity, junk_generator),
         mx.DtypeError, "got str"),
    case("connect-input-twice", lambda e: connect_twice(e.identity, "connect_input"),
         mx.UsageError, "the input of model 0 is already connected"),
    case("connect-output-twice", lambda e: connect_twice(e.identity, "connect_output"),
         mx.UsageError, "the output of model 0 is already connected"),
    # -- unconnected ports --------------------------------------------------------------------
    case("wait-without-output",
         lambda e: wait_partly_connected(e.identity, connect_input=True, connect_output=False),
         mx.NotConnectedError, "not connected: model 0 output"),
    case("wait-without-input",
         lambda e: wait_partly_connected(e.identity, connect_input=False, connect_output=True),
         mx.NotConnectedError, "not connected: model 0 input"),
    case("wait-with-nothing-connected",
         lambda e: wait_partly_connected(e.identity, connect_input=False, connect_output=False),
         mx.NotConnectedError, "not connected: model 0 input, model 0 output"),
    case("wait-with-two-of-three-models-unconnected",
         lambda e: three_models_only_first_connected(e.three),
         mx.NotConnectedError, "model 1 input, model 1 output, model 2 input, model 2 output"),
    # -- calls after close --------------------------------------------------------------------
    case("run-after-close", lambda e: closed(mx.SyncAccl, e.identity).run(X4),
         mx.ClosedError, "this SyncAccl " + CLOSED),
    case("send-after-close", lambda e: closed(mx.SyncAccl, e.identity).send(X4),
         mx.ClosedError, CLOSED),
    case("receive-after-close", lambda e: closed(mx.SyncAccl, e.identity).receive(),
         mx.ClosedError, CLOSED),
    case("connect-input-after-close",
         lambda e: closed(mx.AsyncAccl, e.identity).connect_input(lambda: None),
         mx.ClosedError, "this AsyncAccl " + CLOSED),
    case("connect-output-after-close",
         lambda e: closed(mx.AsyncAccl, e.identity).connect_output(lambda y: None),
         mx.ClosedError, CLOSED),
    case("connect-streams-after-close",
         lambda e: closed(mx.MultiStreamAsyncAccl, e.identity).connect_streams(
             lambda i: None, lambda i, y: None, 2),
         mx.ClosedError, "this MultiStreamAsyncAccl " + CLOSED),
    case("set-preprocessing-after-close",
         lambda e: closed(mx.SyncAccl, e.identity).set_preprocessing_model(lambda x: x),
         mx.ClosedError, "closed"),
    case("set-postprocessing-after-close",
         lambda e: closed(mx.SyncAccl, e.identity).set_postprocessing_model(lambda y: y),
         mx.ClosedError, "closed"),
    case("arun-after-close",
         lambda e: asyncio.run(closed(mx.SyncAccl, e.identity).arun(X4)),
         mx.ClosedError, CLOSED),
    case("astream-after-close",
         lambda e: asyncio.run(anext(closed(mx.SyncAccl, e.identity).astream([X4]))),
         mx.ClosedError, CLOSED),
    case("wait-after-close", lambda e: closed(mx.AsyncAccl, e.identity).wait(),
         mx.ClosedError, CLOSED),
    case("with-after-close", lambda e: reenter(e.identity), mx.ClosedError, CLOSED),
    case("wait-twice", lambda e: wait_twice(e.identity), mx.ClosedError, CLOSED),
    case("wait-after-stop", lambda e: wait_after_stop(e.identity), mx.ClosedError, CLOSED),
    # -- DFP files and objects ----------------------------------------------------------------
    case("dfp-missing", lambda e: mx.SyncAccl(e.tmp / "nope.dfp"),
         FileNotFoundError, "DFP file not found: .*nope.dfp"),
    case("dfp-directory", lambda e: mx.AsyncAccl(e.tmp), IsADirectoryError,
         "DFP path is a directory, not a file"),
    case("dfp-empty", lambda e: mx.SyncAccl(write(e.tmp / "e.dfp", b"")),
         mx.DfpError, r"truncated DFP: empty \(0 bytes\)"),
    case("dfp-png", lambda e: mx.SyncAccl(write(e.tmp / "cat.png", PNG)),
         mx.DfpError, r"not a memryx DFP: starts with b'\\x89PNG"),
    case("dfp-onnx", lambda e: mx.MultiStreamAsyncAccl(
        write(e.tmp / "m.onnx", testing.model_bytes(testing.mlp_model()))),
         mx.DfpError, "not a memryx DFP.*other tools"),
    case("dfp-fifo", lambda e: mx.SyncAccl(fifo(e.tmp)),
         mx.DfpError, "is not a regular file"),
    case("dfp-sparse-5GiB", lambda e: mx.SyncAccl(sparse(e.tmp, 5 << 30)),
         mx.DfpError, "5368709120 bytes is larger than the 4294967296 a DFP may be"),
    case("dfp-truncated-bytes", lambda e: mx.SyncAccl(e.identity.to_bytes()[:300]),
         mx.DfpError, "truncated DFP"),
    case("dfp-newer-version", lambda e: mx.SyncAccl(
        e.identity.to_bytes()[:8] + (9).to_bytes(4, "little") + e.identity.to_bytes()[12:]),
         mx.DfpError, "version 9 is newer than this runtime reads"),
    case("dfp-int", lambda e: mx.SyncAccl(42), TypeError,
         "dfp must be a path, bytes, bytearray or Dfp, got int"),
    case("dfp-none", lambda e: mx.AsyncAccl(None), TypeError, "got NoneType"),
    case("dfp-onnx-model-object", lambda e: mx.SyncAccl(testing.mlp_model()), TypeError,
         "got ModelProto"),
    # -- pre/post-processing models --------------------------------------------------------
    case("pre-path-missing",
         lambda e: sync(e.identity, lambda a: a.set_preprocessing_model(e.tmp / "pre.onnx")),
         FileNotFoundError, "pre-processing model for model 0 not found: .*pre.onnx"),
    case("post-path-missing",
         lambda e: sync(e.identity, lambda a: a.set_postprocessing_model(str(e.tmp / "p.onnx"))),
         FileNotFoundError, "post-processing model for model 0 not found"),
    case("pre-path-not-onnx",
         lambda e: sync(e.identity, lambda a: a.set_preprocessing_model(
             write(e.tmp / "pre.txt", b"x"))),
         ValueError, r"only ONNX models \(.onnx\) are supported, got '.txt'"),
    case("post-path-is-a-dfp",
         lambda e: sync(e.identity, lambda a: a.set_postprocessing_model(
             e.identity.write(e.tmp / "m.dfp"))),
         ValueError, "only ONNX models.*got '.dfp'"),
    case("pre-object-not-a-model",
         lambda e: sync(e.identity, lambda a: a.set_preprocessing_model(e.identity)),
         TypeError, "must be an ONNX path, onnx.ModelProto, bytes or a callable, got Dfp"),
    case("pre-model-idx", lambda e: sync(e.identity, lambda a: a.set_preprocessing_model(
        lambda x: x, model_idx=1)), mx.ModelIndexError, "model_idx 1 out of range"),
    case("post-onnx-path-with-garbage",
         lambda e: sync(e.identity, lambda a: a.set_postprocessing_model(
             write(e.tmp / "post.onnx", PNG))),
         ValueError, r"post-processing model for model 0 \(.*post.onnx\) is not a loadable ONNX"),
    case("pre-onnx-bytes-garbage",
         lambda e: sync(e.identity, lambda a: a.set_preprocessing_model(b"not onnx")),
         ValueError, r"pre-processing model for model 0 \(bytes\) is not a loadable ONNX"),
    case("pre-callable-returns-junk", lambda e: pre(e.identity, lambda x: "junk"),
         TypeError, "pre-processing callable .* must return a numpy.ndarray or a sequence"),
    case("post-callable-returns-junk", lambda e: post(e.identity, lambda y: {"y": y}),
         TypeError, "post-processing callable .* must return a numpy.ndarray.*got dict"),
    case("pre-callable-raises", lambda e: pre(e.identity, raises(ZeroDivisionError("oops"))),
         ZeroDivisionError, "oops"),
    case("pre-output-wrong-shape",
         lambda e: pre(e.identity, lambda x: np.zeros((1, 5), np.float32)),
         mx.ShapeError, r"\(pre-processing output\): expected shape \(1, 4\) or \(4,\), "
                        r"got \(1, 5\)"),
    case("set-pre-after-connect", lambda e: set_after(e.identity, "pre"),
         mx.UsageError, "set the pre-processing model of model 0 before connecting its input"),
    case("set-post-after-connect", lambda e: set_after(e.identity, "post"),
         mx.UsageError, "set the post-processing model of model 0 before connecting its output"),
    # -- devices ------------------------------------------------------------------------------
    case("device-unknown", lambda e: mx.SyncAccl(e.identity, device="tpu"),
         ValueError, "unknown device 'tpu': expected 'sim'"),
    case("device-unix-without-path", lambda e: mx.SyncAccl(e.identity, device="unix:"),
         ValueError, "unknown device 'unix:'"),
    case("device-int", lambda e: mx.SyncAccl(e.identity, device=3),
         TypeError, "device must be a string or a Device, got int"),
    case("device-socket-missing",
         lambda e: mx.SyncAccl(e.identity, device=f"unix:{e.tmp / 'none.sock'}"),
         mx.DeviceError, "cannot reach the device server at .*none.sock"),
    case("device-socket-stale", lambda e: mx.AsyncAccl(e.identity, device=stale_socket(e.tmp)),
         mx.DeviceError, "cannot reach the device server.*Connection refused"),
    case("device-socket-is-a-regular-file",
         lambda e: mx.SyncAccl(e.identity, device=f"unix:{write(e.tmp / 'f', b'x')}"),
         mx.DeviceError, "cannot reach the device server"),
    case("fd-device-with-sim-options",
         lambda e: mx.SyncAccl(e.identity, device=f"unix:{e.tmp / 's'}", mode="fast"),
         TypeError, r"the fd device takes no options; got \['mode'\]"),
    case("sim-mode-unknown", lambda e: mx.SyncAccl(e.identity, device="sim:warp"),
         ValueError, "unknown simulated device mode 'warp'"),
    case("sim-queue-depth-zero", lambda e: mx.SyncAccl(e.identity, queue_depth=0),
         ValueError, "queue_depth must be an int >= 1, got 0"),
    case("sim-concurrency-str", lambda e: mx.SyncAccl(e.identity, concurrency="4"),
         ValueError, "concurrency must be an int >= 1"),
    # the SDK's **kwargs: an unknown keyword is ignored with a warning naming it
    case("sim-unknown-option", lambda e: mx.SyncAccl(e.identity, bogus=1),
         UserWarning, "ignoring unknown keyword argument.* 'bogus'"),
]


@pytest.mark.parametrize(("act", "exc", "match", "note", "exact"), CASES)
def test_misuse(env: Env, act: Callable[[Env], Any], exc: type[BaseException], match: str,
                note: str | None, exact: bool) -> None:
    with pytest.raises(exc, match=match) as info:
        act(env)
    if exact:
        assert type(info.value) is exc, f"{type(info.value).__name__}, not {exc.__name__}"
    if note is not None:
        assert any(note in n for n in getattr(info.value, "__notes__", [])), \
            getattr(info.value, "__notes__", None)
    assert_usable(env.identity)


def test_the_matrix_is_big_enough() -> None:
    assert len(CASES) + len(LOOP_CASES) >= 40
    ids = [c.id for c in CASES + LOOP_CASES]
    assert len(ids) == len(set(ids))


# -- inside a running event loop ------------------------------------------------------------------
def loop_case(id_: str, act: Callable[[Env], Any], exc: type[BaseException], match: str, *,
              bug: str | None = None) -> Any:
    marks = [pytest.mark.xfail(strict=True, reason=f"BUG: {bug}")] if bug else []
    return pytest.param(act, exc, match, bug is None, id=id_, marks=marks)


async def on_bound(dfp: mx.Dfp, fn: Callable[[Any], Any], cls: type = mx.SyncAccl) -> Any:
    async with cls(dfp) as accl:
        result = fn(accl)
        if asyncio.iscoroutine(result):
            result = await result
        return result


async def on_threaded(dfp: mx.Dfp, fn: Callable[[Any], Any], cls: type = mx.SyncAccl) -> Any:
    """``fn`` on an accelerator created outside any loop (it runs on its runner thread)."""
    accl = await asyncio.to_thread(cls, dfp)
    try:
        result = fn(accl)
        if asyncio.iscoroutine(result):
            result = await result
        return result
    finally:
        await accl.aclose()


async def wait_on_bound(dfp: mx.Dfp) -> None:
    async with mx.AsyncAccl(dfp) as accl:
        accl.connect_input(lambda: None)
        accl.connect_output(lambda y: None)
        accl.wait()


async def connect_unbound(dfp: mx.Dfp) -> None:
    accl = mx.AsyncAccl(dfp)
    try:
        accl.connect_input(lambda: None)
    finally:
        await accl.aclose()


async def astream_all(accl: Any, frames: Any, **kw: Any) -> list[Any]:
    return [y async for y in accl.astream(frames, **kw)]


def failing_frames() -> Iterator[Any]:
    yield X4
    raise BrokenPipeError("camera went away")


async def arun_on_fed_model(dfp: mx.Dfp) -> None:
    async with mx.AsyncAccl(dfp) as accl:
        accl.connect_input(lambda: X4)
        await accl.arun(X4)


async def await_done_async_output_raises(dfp: mx.Dfp) -> None:
    async def out(y: Any) -> None:
        raise LookupError("no such camera")

    async with mx.AsyncAccl(dfp) as accl:
        accl.connect_input(source(3))
        accl.connect_output(out)
        await accl.await_done()


async def arun_after_aclose(dfp: mx.Dfp) -> None:
    accl = mx.SyncAccl(dfp)
    async with accl:
        pass
    await accl.arun(X4)


async def reenter_async(dfp: mx.Dfp) -> None:
    accl = mx.AsyncAccl(dfp)
    async with accl:
        pass
    async with accl:
        pass  # pragma: no cover - refused on entry


async def arun_from_another_loop(dfp: mx.Dfp) -> None:
    """Bind to a loop on another thread, then await it from this loop."""
    other = asyncio.new_event_loop()
    thread = threading.Thread(target=other.run_forever, name="other-loop")
    thread.start()
    accl = mx.AsyncAccl(dfp)
    try:
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(accl.__aenter__(), other))
        await accl.arun(X4)
    finally:
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(accl.aclose(), other))
        other.call_soon_threadsafe(other.stop)
        await asyncio.to_thread(thread.join)
        other.close()


LOOP_CASES = [
    loop_case("run-on-the-bound-loop", lambda e: on_bound(e.identity, lambda a: a.run(X4)),
              mx.LoopBlockingError, r"run\(\) blocks.*use `await accl.arun\(\.\.\.\)` instead"),
    loop_case("receive-on-the-bound-loop",
              lambda e: on_bound(e.identity, lambda a: a.receive()),
              mx.LoopBlockingError, r"receive\(\) blocks.*`await accl.areceive\(\.\.\.\)`"),
    loop_case("send-on-the-bound-loop", lambda e: on_bound(e.identity, lambda a: a.send(X4)),
              mx.LoopBlockingError, r"send\(\) blocks.*`await accl.asend\(\.\.\.\)`"),
    loop_case("wait-on-the-bound-loop", lambda e: wait_on_bound(e.identity),
              mx.LoopBlockingError, r"wait\(\) blocks.*`await accl.await_done\(\)`"),
    loop_case("close-on-the-bound-loop", lambda e: on_bound(e.identity, lambda a: a.close()),
              mx.LoopBlockingError, r"close\(\) blocks.*`await accl.aclose\(\)`"),
    loop_case("with-exit-on-the-bound-loop",
              lambda e: on_bound(e.identity, lambda a: a.__exit__(None, None, None)),
              mx.LoopBlockingError, r"`await accl.aclose\(\)`"),
    loop_case("run-threaded-accl-from-a-coroutine",
              lambda e: on_threaded(e.identity, lambda a: a.run(X4)),
              mx.LoopBlockingError, r"called from a thread that runs an event loop.*"
                                    r"`await accl.arun\(\.\.\.\)`"),
    loop_case("wait-threaded-accl-from-a-coroutine",
              lambda e: on_threaded(e.identity, lambda a: a.wait(), mx.AsyncAccl),
              mx.LoopBlockingError, r"`await accl.await_done\(\)`"),
    loop_case("receive-threaded-accl-from-a-coroutine",
              lambda e: on_threaded(e.identity, lambda a: a.receive(timeout=10)),
              mx.LoopBlockingError, r"`await accl.areceive\(\.\.\.\)`"),
    loop_case("connect-before-binding", lambda e: connect_unbound(e.identity),
              mx.UsageError, r"bind AsyncAccl to it first: `async with AsyncAccl\(dfp\)"),
    loop_case("astream-threaded-accl",
              lambda e: on_threaded(e.identity, lambda a: astream_all(a, [X4])),
              mx.UsageError, "astream.* needs the accelerator bound to this event loop"),
    loop_case("arun-from-another-loop", lambda e: arun_from_another_loop(e.identity),
              mx.UsageError, "this AsyncAccl is bound to another event loop"),
    loop_case("astream-window-zero",
              lambda e: on_bound(e.identity, lambda a: astream_all(a, [X4], window=0)),
              ValueError, "window must be a positive int, got 0"),
    loop_case("astream-bad-frame",
              lambda e: on_bound(e.identity, lambda a: astream_all(a, [X4, X16])),
              mx.ShapeError, r"expected shape \(1, 4\) or \(4,\), got \(1, 16\)"),
    loop_case("astream-source-raises",
              lambda e: on_bound(e.identity, lambda a: astream_all(a, failing_frames())),
              BrokenPipeError, "camera went away"),
    loop_case("arun-junk", lambda e: on_bound(e.identity, lambda a: a.arun({"x": X4})),
              TypeError, "inputs must be a numpy.ndarray.*got dict"),
    loop_case("arun-wrong-count", lambda e: on_bound(e.add, lambda a: a.arun([[X8]])),
              mx.InputCountError, r"1 array\(s\), the model has 2 input port\(s\)"),
    loop_case("arun-model-idx", lambda e: on_bound(e.three, lambda a: a.arun(X16, model_idx=7)),
              mx.ModelIndexError, "model_idx 7 out of range"),
    loop_case("arun-on-a-callback-fed-model", lambda e: arun_on_fed_model(e.identity),
              mx.UsageError, "fed by its connected input callback"),
    loop_case("areceive-timeout-negative",
              lambda e: on_bound(e.identity, lambda a: a.areceive(timeout=-5)),
              ValueError, "timeout must be None or a number of milliseconds >= 0, got -5"),
    loop_case("async-output-callback-raises", lambda e: await_done_async_output_raises(e.identity),
              LookupError, "no such camera"),
    loop_case("arun-after-aclose", lambda e: arun_after_aclose(e.identity),
              mx.ClosedError, CLOSED),
    loop_case("async-with-after-close", lambda e: reenter_async(e.identity),
              mx.ClosedError, CLOSED),
]


@pytest.mark.asyncio
@pytest.mark.parametrize(("act", "exc", "match", "exact"), LOOP_CASES)
async def test_misuse_in_a_running_loop(env: Env, act: Callable[[Env], Any],
                                        exc: type[BaseException], match: str,
                                        exact: bool) -> None:
    with pytest.raises(exc, match=match) as info:
        await act(env)
    if exact:
        assert type(info.value) is exc, f"{type(info.value).__name__}, not {exc.__name__}"
    await assert_usable_async(env.identity)
    await asyncio.to_thread(assert_usable, env.identity)


# -- cases with timing or cleanup of their own ---------------------------------------------
@contextlib.contextmanager
def ctrl_c_when(ready: Callable[[], bool], seconds: float = 20.0,
                to: threading.Thread | None = None) -> Iterator[None]:
    """Deliver SIGINT to the main thread as soon as ``ready()`` is true (polled), as a
    KeyboardInterrupt raised only inside this block (never later, in another test). If it
    never becomes true within ``seconds`` the interrupt still comes (so the block ends)
    and the test fails. ``to``: deliver it to that thread (the kernel may pick any
    thread of the process; Python still handles it on the main thread)."""
    armed = threading.Event()
    on_time: list[bool] = []

    def on_sigint(signum: int, frame: Any) -> None:
        if armed.is_set():
            armed.clear()
            raise KeyboardInterrupt

    def interrupt() -> None:
        on_time.append(settle(ready, seconds))
        signal.pthread_kill((to or threading.main_thread()).ident or 0, signal.SIGINT)

    previous = signal.signal(signal.SIGINT, on_sigint)
    sender = threading.Thread(target=interrupt, name="ctrl-c")
    armed.set()
    sender.start()
    try:
        yield
    finally:
        armed.clear()
        sender.join()
        signal.signal(signal.SIGINT, previous)
    assert on_time == [True], "the condition for Ctrl-C never came true"


def test_keyboard_interrupt_during_wait_stops_everything(identity_dfp):
    """Ctrl-C while wait() blocks on an endless source: KeyboardInterrupt comes out of
    wait(), the accelerator is stopped (closed, no callback afterwards), no thread left."""
    calls_after = []
    stopped = threading.Event()

    def out(y: Any) -> None:
        if stopped.is_set():
            calls_after.append(y)

    before = set(threading.enumerate())
    accl = mx.AsyncAccl(identity_dfp)
    accl.connect_input(lambda: PROBE)
    accl.connect_output(out)

    def running_and_waiting() -> bool:  # frames flow, and the main thread blocks in wait()
        return (accl.statistics()["models"][0]["frames_out"] > 0
                and in_memryx_call("wait"))

    with ctrl_c_when(running_and_waiting), pytest.raises(KeyboardInterrupt) as info:
        accl.wait()
    interrupted = time.monotonic()
    stopped.set()
    assert "wait" in {entry.name for entry in info.traceback}
    with pytest.raises(mx.ClosedError):
        accl.connect_output(lambda y: None)
    accl.close()  # idempotent, raises nothing
    assert time.monotonic() - interrupted < 2.0
    # once the accelerator's threads have ended no callback can come: calls_after is final
    assert threads_ended(before), "the accelerator's threads did not end"
    assert calls_after == []
    assert_usable(identity_dfp)


def test_keyboard_interrupt_during_run_stops_submitting_the_batch(identity_dfp):
    with mx.SyncAccl(identity_dfp) as accl:
        # a slow post-processor (the sleep is the behaviour): the batch takes >= 6 s
        accl.set_postprocessing_model(lambda y: (time.sleep(0.002), y)[1])

        def model() -> Any:
            return accl.statistics()["models"][0]

        with ctrl_c_when(lambda: model()["frames_out"] > 0 and in_memryx_call("run")), \
                pytest.raises(KeyboardInterrupt):
            accl.run([PROBE] * 3000)
        # what was already in the pipeline drains, and nothing more of the batch comes in
        assert settle(lambda: model()["in_flight"] == 0, 20), model()
        before = model()["frames_in"]
        assert before < 3000, "the interrupted batch went on to its end"
        np.testing.assert_array_equal(accl.run(PROBE), PROBE)
        after = model()["frames_in"]
        assert after == before + 1, f"the interrupted batch went on: {before} -> {after} in"
    assert_usable(identity_dfp)


def test_ctrl_c_delivered_to_another_thread_interrupts_a_blocking_run(identity_dfp):
    """(regression) SIGINT that the kernel handed to a thread other than the main one only
    set Python's flag: the main thread, waiting on a lock without a timeout inside run(),
    never looked, and Ctrl-C waited for the whole batch (a 'hang' seen under load)."""
    other_ready = threading.Event()
    release = threading.Event()
    other = threading.Thread(target=lambda: (other_ready.set(), release.wait(30)),
                             name="not-main")
    other.start()
    try:
        with mx.SyncAccl(identity_dfp) as accl:
            # a slow post-processor (the sleep is the behaviour): the batch takes >= 6 s
            accl.set_postprocessing_model(lambda y: (time.sleep(0.002), y)[1])

            def model() -> Any:
                return accl.statistics()["models"][0]

            with ctrl_c_when(lambda: other_ready.is_set() and model()["frames_out"] > 0
                             and in_memryx_call("run"), to=other), \
                    pytest.raises(KeyboardInterrupt):
                t0 = time.monotonic()
                accl.run([PROBE] * 3000)
            assert time.monotonic() - t0 < 5.0, "Ctrl-C waited for the batch"
            assert model()["frames_in"] < 3000
    finally:
        release.set()
        other.join(10)
    assert_usable(identity_dfp)


BLOCKERS = ["input", "output", "generator-input", "async-input", "streams-16-input",
            "streams-16-output"]


@pytest.mark.parametrize("exit_by", ["stop", "with"])
@pytest.mark.parametrize("blocked", BLOCKERS)
def test_stop_returns_within_a_second_while_callbacks_block_forever(identity_dfp, blocked,
                                                                    exit_by):
    release = threading.Event()  # "forever": until the test ends
    entered = threading.Event()
    calls: list[str] = []

    def block() -> None:
        entered.set()
        release.wait(30)

    def inp(*_: Any) -> Any:
        calls.append("in")
        if blocked.endswith("input"):
            block()
            return None
        return PROBE

    def out(*_: Any) -> None:
        calls.append("out")
        if blocked.endswith("output"):
            block()

    def gen() -> Iterator[Any]:
        calls.append("in")
        block()
        yield PROBE

    async def ainp() -> Any:
        calls.append("in")
        entered.set()
        await asyncio.Event().wait()

    before = set(threading.enumerate())
    if blocked.startswith("streams"):
        accl: Any = mx.MultiStreamAsyncAccl(identity_dfp)
        accl.connect_streams(inp, out, 16)
    else:
        accl = mx.AsyncAccl(identity_dfp)
        accl.connect_input({"generator-input": gen, "async-input": ainp}.get(blocked, inp))
        accl.connect_output(out)
    try:
        assert entered.wait(5), "the callback never ran"
        t0 = time.monotonic()
        if exit_by == "stop":
            accl.stop()
        else:
            with accl:
                pass
        elapsed = time.monotonic() - t0
        n = len(calls)
        release.set()
        assert elapsed < 1.0, f"stop took {elapsed:.2f} s"
        # released, the abandoned callbacks return and their threads end: by then any call
        # after stop() would have been made
        assert threads_ended(before), "the accelerator's threads did not end once released"
        assert len(calls) == n, "a callback was called after stop() returned"
    finally:
        release.set()
        accl.close()
    assert_usable(identity_dfp)


def test_input_callback_returning_none_at_once_is_an_empty_run(identity_dfp):
    outputs: list[Any] = []
    accl = mx.AsyncAccl(identity_dfp)
    accl.connect_input(lambda: None)
    accl.connect_output(outputs.append)
    accl.wait()  # not an error: the stream simply had no frame
    assert outputs == []
    assert accl.statistics()["models"][0]["frames_in"] == 0
    assert_usable(identity_dfp)


def test_a_callback_error_comes_out_once_with_its_traceback(identity_dfp):
    def camera_source() -> Any:
        raise RuntimeError("camera unplugged")

    accl = mx.AsyncAccl(identity_dfp)
    accl.connect_input(camera_source)
    accl.connect_output(lambda y: None)
    with pytest.raises(RuntimeError, match="camera unplugged") as info:
        accl.wait()
    assert "camera_source" in {entry.name for entry in info.traceback}
    accl.close()  # already reported: not raised a second time
    accl.stop()
    assert_usable(identity_dfp)


def test_an_unseen_callback_error_comes_out_of_close(identity_dfp):
    raised = threading.Event()
    accl = mx.AsyncAccl(identity_dfp)
    accl.connect_input(raises(ValueError("bad frame source"), raised))
    accl.connect_output(lambda y: None)
    assert raised.wait(10), "the input callback never ran"
    with pytest.raises(ValueError, match="bad frame source"):
        accl.close()
    accl.close()
    assert_usable(identity_dfp)


def test_an_unseen_callback_error_comes_out_of_with_exit(identity_dfp):
    raised = threading.Event()
    with pytest.raises(ValueError, match="bad frame source") as info:
        with mx.AsyncAccl(identity_dfp) as accl:
            accl.connect_input(raises(ValueError("bad frame source"), raised))
            accl.connect_output(lambda y: None)
            assert raised.wait(10), "the input callback never ran"
    assert "(raised by the input callback of model 0)" in info.value.__notes__
    accl.close()  # reported once: not again
    assert_usable(identity_dfp)


def test_an_output_callback_that_raised_is_not_called_again(identity_dfp):
    calls = []

    def all_five_computed() -> bool:  # the other four wait for this callback
        model = accl.statistics()["models"][0]
        return bool(model["frames_in"] == 5 and model["queues"] == {"input": 0, "on_device": 0})

    def out(y: Any) -> None:
        calls.append(y)
        assert settle(all_five_computed, 10), accl.statistics()["models"][0]
        raise KeyError("database down")

    accl = mx.AsyncAccl(identity_dfp)
    accl.connect_input(source(5))
    accl.connect_output(out)
    with pytest.raises(KeyError, match="database down") as info:
        accl.wait()
    assert len(calls) == 1, f"called {len(calls)} times; notes: {info.value.__notes__}"


def test_wait_from_inside_an_output_callback_does_not_deadlock(identity_dfp):
    accl = mx.AsyncAccl(identity_dfp)
    inner: list[BaseException] = []

    def out(y: Any) -> None:
        try:
            accl.wait()
        except BaseException as exc:
            inner.append(exc)

    accl.connect_input(source(3))
    accl.connect_output(out)
    outer: list[BaseException] = []

    def waiter() -> None:
        try:
            accl.wait()
        except BaseException as exc:
            outer.append(exc)

    thread = threading.Thread(target=waiter)
    thread.start()
    try:
        thread.join(3)
        assert not thread.is_alive(), "wait() deadlocked"
        assert inner and isinstance(inner[0], mx.UsageError), inner
    finally:
        accl.stop()  # unblocks both waits
        thread.join(5)


@pytest.mark.asyncio
async def test_connecting_a_threaded_accelerator_from_a_coroutine_works(identity_dfp):
    """connect_* only take a moment, so they are allowed from a coroutine even on an
    accelerator that runs on its own runner thread (docs/async-guide.md)."""
    got: list[float] = []
    left = [np.full((1, 4), 3.0, np.float32)]

    def use(accl: Any) -> None:
        accl.connect_input(lambda: left.pop() if left else None)
        accl.connect_output(lambda y: got.append(float(y[0, 0])))

    accl = await asyncio.to_thread(mx.AsyncAccl, identity_dfp)
    try:
        use(accl)
        await accl.await_done()
    finally:
        await accl.aclose()
    assert got == [3.0]


def test_the_reliability_doc_counts_these_cases():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "reliability.md").read_text()
    assert f"{len(CASES)} wrong uses in sync programs" in doc
    assert f"{len(LOOP_CASES)} inside a running event loop" in doc
