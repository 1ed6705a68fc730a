"""Host-side pre/post-processing and the checks that frames fit their ports.

A processor turns a list of arrays into a list of arrays: an ONNX model run
with onnxruntime (the ``*_pre.onnx`` / ``*_post.onnx`` the NeuralCompiler
crops off), or a Python callable. ``conform`` checks user frames against port
descriptions (count, type, dtype, shape) and returns private copies.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .._exceptions import DtypeError, InputCountError, ShapeError
from .._lifecycle import GuardedSession

__all__ = ["OnnxProcessor", "PortSpec", "Processor", "check_post_inputs", "conform",
           "make_processor", "new_session"]

Array = NDArray[Any]


@dataclass(frozen=True)
class PortSpec:
    """What a port accepts, for validation messages."""

    model_idx: int
    port: int | None
    layer: str
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    where: str = "input port"


def new_session(model: bytes, threads: int = 1) -> Any:
    """An onnxruntime CPU session for serialized ONNX ``model``."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # fatal only: a failed run raises; the library prints nothing
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # guarded: the exit hook can end its runs (see memryx._lifecycle)
    return GuardedSession.create(model, opts, providers=["CPUExecutionProvider"])


class Processor:
    """A host-side processing step: ``list[array] -> list[array]``."""

    #: Port-like descriptions of the inputs, when known (ONNX models), for validation.
    input_specs: tuple[PortSpec, ...] | None = None
    #: The inputs' declared dimensions, None where the model leaves one open (when known).
    input_dims: tuple[tuple[int | None, ...], ...] | None = None
    n_outputs: int | None = None
    #: True when running it may take long enough that it belongs on a worker thread.
    blocking: bool = True

    def __call__(self, arrays: list[Array]) -> list[Array]:  # pragma: no cover - abstract
        raise NotImplementedError


class OnnxProcessor(Processor):
    def __init__(self, model: bytes, model_idx: int, role: str) -> None:
        self._session = new_session(model)
        self._names = [i.name for i in self._session.get_inputs()]
        self.n_outputs = len(self._session.get_outputs())
        specs = []
        dims = []
        for i, meta in enumerate(self._session.get_inputs()):
            shape = tuple(d if isinstance(d, int) and d > 0 else 1 for d in meta.shape)
            dims.append(tuple(d if isinstance(d, int) and d > 0 else None for d in meta.shape))
            elem = _ORT_TYPES.get(meta.type)
            dtype = np.dtype(elem) if elem else np.dtype(np.float32)
            specs.append(PortSpec(model_idx, i, meta.name, shape, dtype,
                                  where=f"{role} model input"))
        self.input_specs = tuple(specs)
        self.input_dims = tuple(dims)

    def __call__(self, arrays: list[Array]) -> list[Array]:
        outs = self._session.run(None, dict(zip(self._names, arrays, strict=True)))
        return [np.asarray(o) for o in outs]


_ORT_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(uint8)": "uint8", "tensor(int8)": "int8", "tensor(uint16)": "uint16",
    "tensor(int16)": "int16", "tensor(int32)": "int32", "tensor(int64)": "int64",
    "tensor(bool)": "bool",
}


#: The Python processors running on each thread (innermost last), so that an accelerator
#: can refuse a blocking call from its own pre- or post-processing (it would wait for itself).
_running = threading.local()


def running_processors() -> tuple[Processor, ...]:
    """The Python pre-/post-processing callables running on the calling thread."""
    return tuple(getattr(_running, "procs", ()))


class CallableProcessor(Processor):
    def __init__(self, fn: Callable[..., Any], role: str) -> None:
        self._fn = fn
        self._role = role
        # pre-processing outputs are copied anyway, into the device-ready frame (conform)
        self._copies = role != "pre-processing"

    def __call__(self, arrays: list[Array]) -> list[Array]:
        procs: list[Processor] | None = getattr(_running, "procs", None)
        if procs is None:
            procs = _running.procs = []
        procs.append(self)
        try:
            result = self._fn(*arrays)
        finally:
            procs.pop()
        if isinstance(result, (np.ndarray, np.generic)):
            return [self._own(result, arrays) if self._copies else np.asarray(result)]
        if isinstance(result, (list, tuple)) and all(
                isinstance(r, (np.ndarray, np.generic)) for r in result):
            return [self._own(r, arrays) if self._copies else np.asarray(r) for r in result]
        raise TypeError(
            f"{self._role} callable {getattr(self._fn, '__qualname__', self._fn)!r} must return "
            f"a numpy.ndarray or a sequence of them, got {type(result).__name__}"
        )

    @staticmethod
    def _own(result: Any, arrays: list[Array]) -> Array:
        """A result the runtime may keep: the callable's own array may be a buffer it
        writes again on its next call (outputs of a batch ``run``, concurrent ``arun``
        calls and ``receive`` are handed out after later frames were processed), so it is
        copied; an input array handed back as it is is the frame's own already."""
        if any(result is a for a in arrays):
            return result  # type: ignore[no-any-return]
        return np.array(result, copy=True)


def _onnx_processor(model: bytes, model_idx: int, role: str, source: str) -> OnnxProcessor:
    try:
        return OnnxProcessor(model, model_idx, role)
    except Exception as exc:  # onnxruntime raises its own bare exception types
        raise ValueError(f"{role} model for model {model_idx} ({source}) is not a loadable "
                         f"ONNX model: {exc}") from exc


def make_processor(model_or_path: Any, model_idx: int, role: str) -> Processor:
    """A processor from an ONNX path / ``onnx.ModelProto`` / bytes, or a Python callable.

    TFLite, Keras and TensorFlow models (paths or objects) go through
    :func:`memryx.formats.host.host_model` first (needs ``memryx[tf]``).
    """
    from ..formats.host import host_model

    converted = host_model(model_or_path, model_idx, role)
    if isinstance(converted, Processor):
        return converted
    if converted is not None:
        return _onnx_processor(converted, model_idx, role, "converted to ONNX")
    if isinstance(model_or_path, (str, os.PathLike)):
        path = Path(model_or_path)
        if not path.is_file():
            raise FileNotFoundError(f"{role} model for model {model_idx} not found: {path}")
        if path.suffix.lower() != ".onnx":
            raise ValueError(
                f"{role} model {path}: only ONNX models (.onnx) are supported, got {path.suffix!r}"
            )
        return _onnx_processor(path.read_bytes(), model_idx, role, str(path))
    if isinstance(model_or_path, (bytes, bytearray)):
        return _onnx_processor(bytes(model_or_path), model_idx, role, "bytes")
    if type(model_or_path).__name__ == "ModelProto":
        return _onnx_processor(model_or_path.SerializeToString(), model_idx, role, "ModelProto")
    if callable(model_or_path):
        return CallableProcessor(model_or_path, role)
    raise TypeError(
        f"{role} model for model {model_idx} must be an ONNX path, onnx.ModelProto, bytes or a "
        f"callable, got {type(model_or_path).__name__}"
    )


def check_post_inputs(proc: Processor, outputs: Sequence[PortSpec]) -> None:
    """A post-processing model must take what the model's output ports give: as many
    inputs, in port order, and (ONNX models) of the same dtypes and, where it fixes them,
    dimensions.

    Checked when it is set: a mismatch used to surface only at the first output, as
    onnxruntime's own untyped error from inside ``run()`` / ``wait()``.
    """
    specs = proc.input_specs
    if specs is None or not outputs:
        return
    model_idx = outputs[0].model_idx
    if len(specs) != len(outputs):
        raise InputCountError(
            f"post-processing model for model {model_idx} takes {len(specs)} input(s), but "
            f"the model has {len(outputs)} output port(s) "
            f"({', '.join(repr(o.layer) for o in outputs)})")
    dims = proc.input_dims
    if dims is None:  # declared dimensions unknown (not ONNX): the count is all we know
        return
    for spec, want, out in zip(specs, dims, outputs, strict=True):
        where = (f"post-processing model for model {model_idx}: its input {spec.port} "
                 f"({spec.layer!r}) gets output port {out.port} ({out.layer!r})")
        if spec.dtype != out.dtype:
            raise DtypeError(f"{where}, of dtype {out.dtype}, but takes {spec.dtype}")
        fits = len(want) == len(out.shape) and all(
            w is None or w == d for w, d in zip(want, out.shape, strict=True))
        if not fits:
            shown = ", ".join("?" if w is None else str(w) for w in want)
            raise ShapeError(f"{where}, of shape {out.shape}, but takes shape "
                             f"({shown}{',' if len(want) == 1 else ''})")


def _describe(spec: PortSpec, what: str = "frame") -> str:
    port = f" {spec.port}" if spec.port is not None else ""
    source = "" if what == "frame" else f" ({what})"
    return f"model {spec.model_idx}, {spec.where}{port} (layer {spec.layer!r}){source}"


def as_array_list(data: Any, n_ports: int, model_idx: int, what: str) -> list[Any]:
    """One frame as a list with an entry per port (accepts a bare array for 1 port)."""
    if isinstance(data, np.ndarray):
        items: list[Any] = [data]
    elif isinstance(data, (list, tuple)) and (n_ports > 1 or all(
            isinstance(x, np.ndarray) for x in data)):
        items = list(data)
    else:
        raise DtypeError(
            f"model {model_idx}: {what} must be a numpy.ndarray or a sequence of them, "
            f"got {type(data).__name__}"
        )
    if len(items) != n_ports:
        raise InputCountError(
            f"model {model_idx}: {what} has {len(items)} array(s), the model has {n_ports} "
            f"input port(s)"
        )
    return items


def conform(data: Any, specs: Sequence[PortSpec], what: str = "frame", *, copy: bool = True
            ) -> list[Array]:
    """Check one frame against ``specs`` and return C-contiguous private copies.

    With ``copy=False`` the checked arrays come back as they are (reshaped views).

    A frame matches its port's shape exactly, or leaves out a leading batch
    dimension of 1. The dtype must match exactly: nothing is cast silently.
    """
    if type(data) is np.ndarray and len(specs) == 1:  # the common case, checked cheaply
        spec = specs[0]
        if data.dtype == spec.dtype and data.shape == spec.shape:
            return [data.copy() if copy else data]  # ndarray.copy() is C-contiguous
    model_idx = specs[0].model_idx if specs else 0
    items = as_array_list(data, len(specs), model_idx, what)
    out = []
    for arr, spec in zip(items, specs, strict=True):
        if not isinstance(arr, np.ndarray):
            raise DtypeError(
                f"{_describe(spec, what)}: expected a numpy.ndarray of {spec.dtype}, "
                f"got {type(arr).__name__}"
            )
        if arr.dtype != spec.dtype:
            raise DtypeError(
                f"{_describe(spec, what)}: expected dtype {spec.dtype}, got {arr.dtype} "
                "(convert with .astype(); the runtime does not cast silently)"
            )
        if arr.shape != spec.shape:
            if spec.shape and spec.shape[0] == 1 and arr.shape == spec.shape[1:]:
                arr = arr.reshape(spec.shape)
            else:
                alt = f" or {spec.shape[1:]}" if spec.shape and spec.shape[0] == 1 else ""
                raise ShapeError(
                    f"{_describe(spec, what)}: expected shape {spec.shape}{alt}, got {arr.shape}"
                )
        out.append(np.array(arr, order="C", copy=True) if copy else arr)
    return out
