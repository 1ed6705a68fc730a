"""Model formats besides ONNX: Keras, TensorFlow (SavedModel, frozen ``.pb``) and TFLite.

The compiler's accelerated graph is always ONNX (the DFP's graph format, which
the simulated MX3 runs with onnxruntime), so every other format is converted
with ``tf2onnx`` on the way in; inputs keep the source's layout (NHWC for
Keras and TFLite). A TFLite model used as a host-side pre/post-processing
model runs natively with the LiteRT interpreter instead (see docs/models.md
for the measurements behind that split).

TensorFlow, tf2onnx and LiteRT are the optional extra ``memryx[tf]``; without
them, a model that needs them raises a one-line :class:`CompilerError` naming
the extra. Nothing here imports TensorFlow until such a model is given.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import onnx

from .._exceptions import CompilerError

__all__ = ["EXTRA", "Converted", "Kind", "convert", "detect", "source_name"]

#: What to install for Keras / TensorFlow / TFLite models.
EXTRA: Final = "pip install 'memryx[tf]'"


class Kind:
    """The formats a model source can be in."""

    ONNX: Final = "ONNX"
    TFLITE: Final = "TFLite"
    KERAS: Final = "Keras"
    SAVED_MODEL: Final = "TensorFlow SavedModel"
    GRAPH_DEF: Final = "TensorFlow frozen graph"
    TF_FUNCTION: Final = "TensorFlow concrete function"


FORMATS_HELP: Final = (
    "the compiler takes ONNX (.onnx, bytes, onnx.ModelProto), TFLite (.tflite, bytes), "
    "Keras (.h5, .keras, a keras.Model), a TensorFlow SavedModel directory or a frozen "
    "graph (.pb); export PyTorch models to ONNX (docs/models.md)"
)

_HDF5_MAGIC: Final = b"\x89HDF\r\n\x1a\n"
_ZIP_MAGIC: Final = b"PK\x03\x04"


def is_tflite(data: bytes) -> bool:
    """True when ``data`` carries the TFLite flatbuffer identifier."""
    return len(data) >= 8 and data[4:8] == b"TFL3"


def _module(obj: Any) -> str:
    return type(obj).__module__ or ""


def _is_keras_model(obj: Any) -> bool:
    for cls in type(obj).__mro__:
        mod = cls.__module__ or ""
        if cls.__name__ in ("Model", "Functional", "Sequential") and (
                mod.startswith(("keras", "tf_keras", "tensorflow"))):
            return True
    return False


def detect(source: Any) -> str:
    """The :class:`Kind` of ``source``, or a :class:`CompilerError` naming what it is."""
    if isinstance(source, onnx.ModelProto):
        return Kind.ONNX
    if isinstance(source, (bytes, bytearray, memoryview)):
        return Kind.TFLITE if is_tflite(bytes(source[:8])) else Kind.ONNX
    if isinstance(source, (str, os.PathLike)):
        return _detect_path(Path(source))
    if _is_keras_model(source):
        return Kind.KERAS
    mod, name = _module(source), type(source).__name__
    if mod.startswith("tensorflow"):
        if hasattr(source, "structured_input_signature") or hasattr(
                source, "get_concrete_function"):
            return Kind.TF_FUNCTION
        if name == "GraphDef":
            return Kind.GRAPH_DEF
        if hasattr(source, "signatures"):
            return Kind.SAVED_MODEL
    if mod.startswith("torch"):
        raise CompilerError(
            f"unsupported model type {mod}.{name}: export PyTorch models to ONNX first "
            "with torch.onnx.export and fixed input shapes (docs/models.md)"
        )
    raise CompilerError(f"unsupported model type {mod}.{name}; {FORMATS_HELP}")


def _detect_path(path: Path) -> str:
    if path.is_dir():
        if (path / "saved_model.pb").is_file() or (path / "saved_model.pbtxt").is_file():
            return Kind.SAVED_MODEL
        raise CompilerError(
            f"{path} is a directory but not a TensorFlow SavedModel (no saved_model.pb in "
            f"it); {FORMATS_HELP}"
        )
    if not path.is_file():
        what = "ONNX file" if path.suffix.lower() == ".onnx" else "model file or SavedModel"
        raise CompilerError(f"no {what} at {path}")
    with open(path, "rb") as f:
        head = f.read(8)
    suffix = path.suffix.lower()
    if is_tflite(head) or suffix in (".tflite", ".lite"):
        return Kind.TFLITE
    if head == _HDF5_MAGIC or suffix in (".h5", ".hdf5", ".keras"):
        return Kind.KERAS
    if path.name == "saved_model.pb":
        return Kind.SAVED_MODEL
    if suffix in (".pb", ".graphdef"):
        return Kind.GRAPH_DEF
    if suffix == ".onnx":
        return Kind.ONNX
    if head.startswith(_ZIP_MAGIC):
        return Kind.KERAS  # a .keras archive under another name
    try:  # no telling suffix: ONNX is the only format left that parses without TensorFlow
        onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise CompilerError(
            f"{path}: unknown model format (suffix {suffix or 'none'!r}, first bytes "
            f"{head!r}); {FORMATS_HELP}"
        ) from exc
    return Kind.ONNX


def source_name(source: Any, fallback: str) -> str:
    """A short name for ``source``, for file names and the DFP (``model_0_<name>_pre.onnx``)."""
    name = ""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        name = path.parent.name if path.name == "saved_model.pb" else path.stem or path.name
    elif isinstance(source, onnx.ModelProto):
        name = source.graph.name
    elif _is_keras_model(source):
        name = str(getattr(source, "name", "") or "")
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("._")
    return safe[:64] or fallback


@dataclass
class Converted:
    """A model brought to ONNX, with what the compiler needs to know of its source."""

    kind: str
    model: onnx.ModelProto
    #: The TFLite flatbuffer, for TFLite sources (cropping happens on it, not on the ONNX).
    tflite: bytes | None = field(default=None, repr=False)


def convert(source: Any, kind: str, what: str) -> Converted:
    """Bring a non-ONNX ``source`` of ``kind`` to ONNX (needs the ``tf`` extra)."""
    if kind == Kind.TFLITE:
        from . import tflite

        blob = tflite.read(source, what)
        return Converted(kind, tflite.to_onnx(blob, what), tflite=blob)
    from . import tensorflow

    return Converted(kind, tensorflow.to_onnx(source, kind, what))
