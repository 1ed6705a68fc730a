"""TFLite models: validation, conversion to ONNX, cropping, and a LiteRT host processor.

The accelerated part goes to ONNX with ``tf2onnx`` (the DFP's graph format).
Cropping (``inputs=``/``outputs=``/``autocrop``) happens on the TFLite graph
itself, so the cropped pre/post parts stay TFLite models (written as
``model_0_<name>_pre.tflite`` / ``_post.tflite``, as the vendor's compiler does)
and run natively with LiteRT on the host, custom operators such as
``TFLite_Detection_PostProcess`` included.
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .._core.processing import PortSpec, Processor
from .._exceptions import CompilerError
from . import Kind, _deps, is_tflite
from .tensorflow import first_line, rename_io

__all__ = ["LiteRTProcessor", "autocrop", "crop", "io_names", "read", "to_onnx"]

# Leading / trailing TFLite operators autocrop moves to the host (cf. the ONNX lists).
_PRE_OPS = frozenset({"CAST", "DEQUANTIZE", "QUANTIZE", "SUB", "DIV", "MUL", "ADD", "TRANSPOSE",
                      "RESHAPE", "SQUEEZE", "EXPAND_DIMS"})
_POST_OPS = frozenset({"SOFTMAX", "LOG_SOFTMAX", "LOGISTIC", "RESHAPE", "SQUEEZE", "TRANSPOSE",
                       "ARG_MAX", "DEQUANTIZE", "EXPAND_DIMS"})
#: Custom operators that are host-side post-processing by nature (NMS and friends).
_POST_CUSTOM = frozenset({"TFLite_Detection_PostProcess"})


def _interpreter(blob: bytes, what: str) -> Any:
    interpreter_cls = _deps.litert_interpreter(what)
    try:
        with _deps.quiet():
            interp = interpreter_cls(model_content=blob, num_threads=1)
            interp.allocate_tensors()
    except Exception as exc:
        raise CompilerError(
            f"{what}: not a valid TFLite model ({first_line(exc)}); re-export it with "
            "tf.lite.TFLiteConverter (the file may be truncated or corrupt)"
        ) from exc
    return interp


def read(source: Any, what: str) -> bytes:
    """The flatbuffer of a TFLite path or bytes, checked by loading it in LiteRT."""
    blob = Path(source).read_bytes() if isinstance(source, (str, os.PathLike)) else bytes(source)
    if not is_tflite(blob):
        raise CompilerError(
            f"{what}: not a TFLite model (no 'TFL3' identifier in its first 8 bytes); the "
            "file may be truncated or in another format"
        )
    _interpreter(blob, what)
    return blob


def _schema() -> Any:
    from ai_edge_litert import schema_py_generated as schema

    return schema


def _load(blob: bytes) -> Any:
    schema = _schema()
    return schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(bytearray(blob), 0))


def _dump(model: Any) -> bytes:
    import flatbuffers

    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _names(sg: Any) -> list[str]:
    return [t.name.decode() if isinstance(t.name, bytes) else str(t.name) for t in sg.tensors]


def io_names(blob: bytes) -> tuple[list[str], list[str]]:
    """Tensor names of the main subgraph's inputs and outputs."""
    sg = _load(blob).subgraphs[0]
    names = _names(sg)
    return [names[i] for i in sg.inputs], [names[i] for i in sg.outputs]


def _signature_names(blob: bytes) -> tuple[list[str] | None, list[str] | None]:
    """The single signature's input/output keys, in subgraph order, when there is one."""
    model = _load(blob)
    sigs = model.signatureDefs or []
    if len(sigs) != 1:
        return None, None
    sg = model.subgraphs[0]

    def keyed(maps: Any, order: Any) -> list[str] | None:
        by_index = {int(m.tensorIndex): (m.name.decode() if isinstance(m.name, bytes)
                                         else str(m.name)) for m in maps or []}
        names = [by_index.get(int(i)) for i in order]
        return None if None in names else [str(n) for n in names]

    return keyed(sigs[0].inputs, sg.inputs), keyed(sigs[0].outputs, sg.outputs)


def to_onnx(blob: bytes, what: str) -> onnx.ModelProto:
    """Convert a TFLite flatbuffer to ONNX with tf2onnx (the layout stays as in TFLite)."""
    t2o = _deps.tf2onnx(what, Kind.TFLITE)
    with tempfile.TemporaryDirectory(prefix="memryx-tflite-") as tmp:
        path = os.path.join(tmp, "model.tflite")
        with open(path, "wb") as f:
            f.write(blob)
        try:
            with _deps.quiet():
                model, _ = t2o.convert.from_tflite(path, opset=_deps.OPSET)
        except Exception as exc:
            raise CompilerError(
                f"{what}: tf2onnx could not convert the TFLite model to ONNX: "
                f"{first_line(exc)}"
            ) from exc
    ins, outs = _signature_names(blob)
    rename_io(model, ins, outs)
    return model  # type: ignore[no-any-return]


def _opname(model: Any, op: Any) -> str:
    code = model.operatorCodes[op.opcodeIndex]
    builtin = max(int(code.builtinCode or 0), int(code.deprecatedBuiltinCode or 0))
    if code.customCode:
        custom = code.customCode
        return "CUSTOM:" + (custom.decode() if isinstance(custom, bytes) else str(custom))
    names = {v: k for k, v in vars(_schema().BuiltinOperator).items() if not k.startswith("_")}
    return str(names.get(builtin, builtin))


def _constants(model: Any, sg: Any) -> set[int]:
    consts = set()
    for i, t in enumerate(sg.tensors):
        buf = model.buffers[t.buffer] if 0 <= t.buffer < len(model.buffers) else None
        if buf is not None and ((buf.data is not None and len(buf.data) > 0) or
                                int(getattr(buf, "size", 0) or 0) > 0):
            consts.add(i)
    return consts


def autocrop(blob: bytes) -> tuple[list[str], list[str]]:
    """Crop points on the TFLite graph: leading casts/normalisation/layout ops and
    trailing softmax/sigmoid/reshape/argmax/detection post-processing go to the host."""
    model = _load(blob)
    sg = model.subgraphs[0]
    names = _names(sg)
    consts = _constants(model, sg)
    consumers: dict[int, list[Any]] = {}
    producer: dict[int, Any] = {}
    for op in sg.operators:
        for i in op.inputs:
            consumers.setdefault(int(i), []).append(op)
        for o in op.outputs:
            producer[int(o)] = op
    outputs = {int(o) for o in sg.outputs}
    starts: list[int] = []
    for t in (int(i) for i in sg.inputs):
        while True:
            users = consumers.get(t, [])
            if len(users) != 1 or t in outputs:
                break
            op = users[0]
            dynamic = [int(i) for i in op.inputs if i >= 0 and int(i) not in consts]
            if _opname(model, op) not in _PRE_OPS or dynamic != [t] or len(op.outputs) != 1:
                break
            if int(op.outputs[0]) in outputs:
                break  # never crop the whole graph
            t = int(op.outputs[0])
        starts.append(t)
    ends: list[int] = []
    pending = [int(o) for o in sg.outputs]
    while pending:
        t = pending.pop(0)
        op = producer.get(t)
        if op is None:
            ends.append(t)
            continue
        name = _opname(model, op)
        dynamic = [int(i) for i in op.inputs if i >= 0 and int(i) not in consts]
        host = (name in _POST_OPS and len(dynamic) == 1) or name[7:] in _POST_CUSTOM
        if not host or not dynamic or set(dynamic) & set(starts):
            ends.append(t)
            continue
        pending[:0] = [d for d in dynamic if d not in pending and d not in ends]
    return (list(dict.fromkeys(names[i] for i in starts)),
            list(dict.fromkeys(names[i] for i in ends)))


def crop(blob: bytes, inputs: list[str], outputs: list[str], what: str) -> bytes:
    """The part of the TFLite model between tensors ``inputs`` and ``outputs``, as TFLite."""
    model = _load(blob)
    sg = model.subgraphs[0]
    names = _names(sg)
    index: dict[str, int] = {}
    for i, n in enumerate(names):
        index.setdefault(n, i)
    unknown = [n for n in (*inputs, *outputs) if n not in index]
    if unknown:
        raise CompilerError(f"{what}: crop point(s) {unknown} are not tensors of the TFLite "
                            "model (use the TFLite tensor names, as Netron shows them)")
    in_idx = [index[n] for n in inputs]
    out_idx = [index[n] for n in outputs]
    consts = _constants(model, sg)
    producer = {int(o): k for k, op in enumerate(sg.operators) for o in op.outputs}
    needed: set[int] = set()
    seen: set[int] = set()
    missing: list[str] = []
    stack = list(out_idx)
    while stack:
        t = stack.pop()
        if t in seen:
            continue
        seen.add(t)
        if t in in_idx or t in consts:
            continue
        if t not in producer:
            missing.append(names[t])
            continue
        k = producer[t]
        if k not in needed:
            needed.add(k)
            stack.extend(int(i) for i in sg.operators[k].inputs if i >= 0)
    if missing:
        raise CompilerError(f"{what}: the part between inputs={inputs} and outputs={outputs} "
                            f"also needs tensor(s) {missing}; add them to the crop points")
    unused = [names[i] for i in in_idx if i not in seen]
    if unused:
        raise CompilerError(f"{what}: crop input(s) {unused} do not feed outputs={outputs}")
    sg.operators = [op for k, op in enumerate(sg.operators) if k in needed]
    sg.inputs = np.array(in_idx, dtype=np.int32)
    sg.outputs = np.array(out_idx, dtype=np.int32)
    model.subgraphs = [sg, *model.subgraphs[1:]]
    model.signatureDefs = []  # the signature names the uncropped inputs/outputs
    return _dump(model)


class LiteRTProcessor(Processor):
    """A TFLite pre/post-processing model run by the LiteRT interpreter on the host."""

    def __init__(self, blob: bytes, model_idx: int, role: str, source: str) -> None:
        self._interp = _interpreter(blob, f"{role} model for model {model_idx} ({source})")
        self._lock = threading.Lock()  # one interpreter, called from worker threads
        self._in = self._interp.get_input_details()
        self._out = self._interp.get_output_details()
        self.n_outputs = len(self._out)
        self.input_specs = tuple(
            PortSpec(model_idx, i, str(d["name"]), tuple(int(x) for x in d["shape"]),
                     np.dtype(d["dtype"]), where=f"{role} model input")
            for i, d in enumerate(self._in))

    def __call__(self, arrays: list[Any]) -> list[Any]:
        with self._lock:
            for detail, arr in zip(self._in, arrays, strict=True):
                arr = np.asarray(arr)  # a wrong dtype is refused by set_tensor, never cast
                shape = tuple(int(x) for x in detail["shape"])
                if arr.shape != shape and arr.size == int(np.prod(shape)):
                    arr = arr.reshape(shape)  # e.g. a batchless frame for a batch-1 input
                self._interp.set_tensor(detail["index"], np.ascontiguousarray(arr))
            self._interp.invoke()
            return [np.array(self._interp.get_tensor(d["index"])) for d in self._out]
