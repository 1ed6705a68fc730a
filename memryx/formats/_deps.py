"""Importing the optional ``tf`` extra quietly, or saying which extra is missing."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from typing import Any

from .._exceptions import CompilerError

OPSET = 17  # the opset memryx's own ONNX models use; tf2onnx supports it fully


def _missing(what: str, kind: str, package: str) -> CompilerError:
    return CompilerError(
        f"{what}: a {kind} model needs {package}, which is not installed: "
        "pip install 'memryx[tf]'"
    )


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Keep TensorFlow's and tf2onnx's import-time warnings and INFO logs out of the app."""
    loggers = [logging.getLogger(n) for n in ("tf2onnx", "tensorflow", "absl")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.level, logging.ERROR))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def tensorflow(what: str, kind: str) -> Any:
    """The ``tensorflow`` module (TensorFlow's C++ INFO logs off unless the app set them)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        with quiet():
            import tensorflow as tf
    except ImportError as exc:
        raise _missing(what, kind, "TensorFlow") from exc
    return tf


def tf2onnx(what: str, kind: str) -> Any:
    tensorflow(what, kind)
    try:
        with quiet():
            import tf2onnx as t2o
            import tf2onnx.convert
    except ImportError as exc:
        raise _missing(what, kind, "tf2onnx") from exc
    return t2o


def litert_interpreter(what: str) -> Any:
    """LiteRT's ``Interpreter`` class (``ai-edge-litert``)."""
    try:
        with quiet():
            from ai_edge_litert.interpreter import Interpreter
    except ImportError as exc:
        raise _missing(what, "TFLite", "LiteRT (ai-edge-litert)") from exc
    return Interpreter
