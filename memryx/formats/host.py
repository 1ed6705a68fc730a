"""Pre/post-processing models in Keras, TensorFlow and TFLite formats.

``set_preprocessing_model`` / ``set_postprocessing_model`` hand their argument
here first: a TFLite model becomes a :class:`~memryx.formats.tflite.LiteRTProcessor`
(run natively), a Keras model / SavedModel / frozen graph becomes ONNX bytes
(run by onnxruntime like any ONNX processing model). ONNX models and plain
callables are left to the caller (``None``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .._core.processing import Processor
from . import Kind, _is_keras_model, convert, detect, is_tflite

__all__ = ["host_model"]


def host_model(source: Any, model_idx: int, role: str) -> bytes | Processor | None:
    """ONNX bytes or a processor for a non-ONNX ``source``; None when it is not one."""
    what = f"{role} model for model {model_idx}"
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists() or path.suffix.lower() == ".onnx":
            return None  # the caller's own messages (not found / not loadable)
        if path.is_file() and path.suffix.lower() not in (
                ".tflite", ".lite", ".h5", ".hdf5", ".keras", ".pb"):
            with open(path, "rb") as f:
                if not is_tflite(f.read(8)):
                    return None
        kind = detect(path)
        what = f"{what} ({path})"
    elif isinstance(source, (bytes, bytearray, memoryview)):
        if not is_tflite(bytes(source[:8])):
            return None
        kind = Kind.TFLITE
    elif _is_keras_model(source) or ((type(source).__module__ or "").startswith("tensorflow")
                                     and not hasattr(source, "get_concrete_function")):
        kind = detect(source)  # a plain tf.function stays a Python callable
    else:
        return None
    if kind == Kind.ONNX:
        return None
    if kind == Kind.TFLITE:
        from .tflite import LiteRTProcessor, read

        blob = read(source if not isinstance(source, memoryview) else bytes(source), what)
        return LiteRTProcessor(blob, model_idx, role, str(source)[:80] if not isinstance(
            source, (bytes, bytearray)) else "bytes")
    return bytes(convert(source, kind, what).model.SerializeToString())
