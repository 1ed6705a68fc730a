"""Keras models, TensorFlow SavedModels, frozen graphs and concrete functions to ONNX.

Every source becomes a ``tf.function`` with a fixed input signature (batch 1,
the source's own layout) that ``tf2onnx`` converts; the ONNX inputs and outputs
are then named after the source's (Keras layer names, signature keys).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import onnx

from .._exceptions import CompilerError
from . import Kind, _deps

__all__ = ["first_line", "rename_io", "to_onnx"]


def first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def rename_io(model: onnx.ModelProto, inputs: Sequence[str] | None,
              outputs: Sequence[str] | None) -> None:
    """Rename the graph's inputs / outputs (in order) to the source's names, in place."""
    graph = model.graph
    mapping: dict[str, str] = {}
    inits = {i.name for i in graph.initializer}
    real_inputs = [vi for vi in graph.input if vi.name not in inits]
    for vis, names in ((real_inputs, inputs), (list(graph.output), outputs)):
        if names is None or len(names) != len(vis) or len(set(names)) != len(names):
            continue
        for vi, name in zip(vis, names, strict=True):
            if vi.name != name:
                mapping[vi.name] = name
    taken = {o for n in graph.node for o in n.output} | {vi.name for vi in graph.input} | inits
    if not mapping or (set(mapping.values()) & (taken - set(mapping))):
        return  # a wanted name is already used inside the graph: keep the converter's names
    for vi in (*graph.input, *graph.output, *graph.value_info):
        vi.name = mapping.get(vi.name, vi.name)
    for node in graph.node:
        node.input[:] = [mapping.get(n, n) for n in node.input]
        node.output[:] = [mapping.get(n, n) for n in node.output]


def _fixed_shape(shape: Sequence[Any], name: str, what: str, kind: str, hint: str
                 ) -> list[int]:
    dims = [None if d is None or (isinstance(d, int) and d < 0) else int(d) for d in shape]
    if not dims:
        return []
    dynamic = [i for i, d in enumerate(dims) if d is None and i > 0]
    if dynamic:
        shown = tuple("None" if d is None else d for d in dims)
        raise CompilerError(
            f"{what}: {kind} input {name!r} has shape ({', '.join(map(str, shown))}) with "
            f"dynamic dimension(s) at axis {', '.join(map(str, dynamic))}; the MX3 needs fixed "
            f"shapes (only the batch may be left open): {hint}"
        )
    return [1 if dims[0] is None else dims[0], *[int(d) for d in dims[1:] if d is not None]]


def _convert(call: Callable[..., Any], specs: list[Any], in_names: list[str],
             out_names: list[str] | None, what: str, kind: str) -> onnx.ModelProto:
    tf = _deps.tensorflow(what, kind)
    t2o = _deps.tf2onnx(what, kind)

    def flat(*xs: Any) -> list[Any]:
        return list(tf.nest.flatten(call(*xs)))

    function = tf.function(flat, input_signature=specs, autograph=False)
    try:
        with _deps.quiet():
            model, _ = t2o.convert.from_function(function, input_signature=specs,
                                                 opset=_deps.OPSET)
    except CompilerError:
        raise
    except Exception as exc:
        raise CompilerError(
            f"{what}: tf2onnx could not convert the {kind} model to ONNX: {first_line(exc)}"
        ) from exc
    rename_io(model, in_names, out_names)
    return model  # type: ignore[no-any-return]


# -- Keras ---------------------------------------------------------------------------------
def _load_keras(path: Path, what: str) -> Any:
    tf = _deps.tensorflow(what, Kind.KERAS)
    try:
        with _deps.quiet():
            return tf.keras.models.load_model(str(path), compile=False)
    except Exception as exc:
        raise CompilerError(
            f"{what}: cannot load Keras model {path} ({first_line(exc)}); save it with "
            "model.save('model.keras') (or .h5) from the same Keras version, or load it "
            "yourself (keras.models.load_model) and pass the model object"
        ) from exc


def _keras(model: Any, what: str) -> onnx.ModelProto:
    tf = _deps.tensorflow(what, Kind.KERAS)
    try:
        inputs = list(model.inputs)
    except (AttributeError, ValueError):
        inputs = []
    if not inputs:
        raise CompilerError(
            f"{what}: the Keras model has no defined inputs (a subclassed or unbuilt "
            "model); build it from keras.Input(shape=...) or call it once on a batch"
        )
    in_names, specs = [], []
    for i, t in enumerate(inputs):
        history = getattr(t, "_keras_history", None)
        name = getattr(history[0], "name", None) if history else None
        name = str(name or getattr(t, "name", "") or f"input_{i}").split(":")[0]
        shape = _fixed_shape(
            list(t.shape), name, what, Kind.KERAS,
            "build the model with a fixed input shape, e.g. keras.Input(shape=(224, 224, 3)) "
            "or keras.applications.MobileNet(input_shape=(224, 224, 3))")
        in_names.append(name)
        specs.append(tf.TensorSpec(shape, tf.as_dtype(t.dtype), name=name))
    out_names = list(getattr(model, "output_names", None) or []) or None

    def call(*xs: Any) -> Any:
        return model(list(xs) if len(xs) > 1 else xs[0], training=False)

    converted = _convert(call, specs, in_names, out_names, what, Kind.KERAS)
    converted.graph.name = str(getattr(model, "name", "") or converted.graph.name)
    return converted


# -- SavedModel / concrete functions --------------------------------------------------------
def _load_saved_model(path: Path, what: str) -> Any:
    tf = _deps.tensorflow(what, Kind.SAVED_MODEL)
    if path.name == "saved_model.pb":
        path = path.parent
    try:
        with _deps.quiet():
            return tf.saved_model.load(str(path))
    except Exception as exc:
        raise CompilerError(
            f"{what}: cannot load the SavedModel at {path} ({first_line(exc)})") from exc


def _one_signature(loaded: Any, what: str) -> Any:
    sigs = dict(getattr(loaded, "signatures", {}) or {})
    if not sigs:
        raise CompilerError(
            f"{what}: the SavedModel has no signatures; export it with one, e.g. "
            "tf.saved_model.save(obj, path, signatures=obj.f.get_concrete_function(spec)) "
            "or model.export(path)"
        )
    if len(sigs) > 1 and "serving_default" in sigs:
        # Keras' model.export() writes 'serve' and 'serving_default', one endpoint twice:
        # signatures identical to serving_default are aliases, not a choice to make.
        main = sigs["serving_default"]

        def same(fn: Any) -> bool:
            return bool(fn.structured_input_signature == main.structured_input_signature and
                        str(fn.structured_outputs) == str(main.structured_outputs))

        if all(same(fn) for fn in sigs.values()):
            return main
    if len(sigs) > 1:
        raise CompilerError(
            f"{what}: the SavedModel has {len(sigs)} signatures {sorted(sigs)} and the compiler "
            "needs exactly one: pass the one to compile, e.g. NeuralCompiler(models="
            f"tf.saved_model.load(path).signatures[{sorted(sigs)[0]!r}])"
        )
    return next(iter(sigs.values()))


def _concrete(fn: Any, what: str, kind: str) -> onnx.ModelProto:
    tf = _deps.tensorflow(what, kind)
    if not hasattr(fn, "structured_input_signature"):  # a tf.function: needs its one trace
        traces = list(getattr(fn, "_list_all_concrete_functions_for_serialization", list)())
        if len(traces) != 1:
            raise CompilerError(
                f"{what}: a tf.function must be traced exactly once (it has {len(traces)} "
                "traces); pass fn.get_concrete_function(tf.TensorSpec(shape, dtype)) instead"
            )
        fn = traces[0]
    args, kwargs = fn.structured_input_signature
    flat_args = list(tf.nest.flatten(args))
    keys = sorted(kwargs)
    specs, names = [], []
    hint = ("export the model with a fixed input shape "
            "(tf.TensorSpec([1, 224, 224, 3], tf.float32)) in its signature")
    for i, spec in enumerate([*flat_args, *(kwargs[k] for k in keys)]):
        if not isinstance(spec, tf.TensorSpec):
            raise CompilerError(f"{what}: input {i} is a {type(spec).__name__}, not a tensor")
        name = keys[i - len(flat_args)] if i >= len(flat_args) else (spec.name or f"input_{i}")
        shape = _fixed_shape(spec.shape.as_list() if spec.shape.rank is not None else [],
                             name, what, kind, hint)
        if spec.shape.rank is None:
            raise CompilerError(f"{what}: input {name!r} has unknown rank; {hint}")
        specs.append(tf.TensorSpec(shape, spec.dtype, name=name))
        names.append(name)
    structured = fn.structured_outputs
    out_names = sorted(structured) if isinstance(structured, dict) else None
    n_args = len(flat_args)

    def call(*xs: Any) -> Any:
        return fn(*xs[:n_args], **dict(zip(keys, xs[n_args:], strict=True)))

    return _convert(call, specs, names, out_names, what, kind)


# -- frozen graphs -----------------------------------------------------------------------------
_NOT_OUTPUTS = frozenset({"NoOp", "Assert", "Const", "Placeholder", "SaveV2", "RestoreV2",
                          "VarHandleOp", "VariableV2"})


def _graph_def(source: Any, what: str) -> onnx.ModelProto:
    tf = _deps.tensorflow(what, Kind.GRAPH_DEF)
    if isinstance(source, (str, os.PathLike)):
        graph_def = tf.compat.v1.GraphDef()
        try:
            graph_def.ParseFromString(Path(source).read_bytes())
        except Exception as exc:
            raise CompilerError(
                f"{what}: {source} is not a frozen TensorFlow GraphDef ({first_line(exc)})"
            ) from exc
    else:
        graph_def = source
    placeholders = [n for n in graph_def.node if n.op == "Placeholder"]
    consumed = {i.lstrip("^").split(":")[0] for n in graph_def.node for i in n.input}
    outputs = [n.name for n in graph_def.node if n.name not in consumed
               and n.op not in _NOT_OUTPUTS]
    if not placeholders or not outputs:
        raise CompilerError(
            f"{what}: the frozen graph has {len(placeholders)} Placeholder input(s) and "
            f"{len(outputs)} output(s); it needs at least one of each"
        )
    try:
        with _deps.quiet():
            wrapped = tf.compat.v1.wrap_function(
                lambda: tf.compat.v1.import_graph_def(graph_def, name=""), [])
            graph = wrapped.graph
            pruned = wrapped.prune([graph.get_tensor_by_name(f"{p.name}:0") for p in placeholders],
                                   [graph.get_tensor_by_name(f"{o}:0") for o in outputs])
    except Exception as exc:
        raise CompilerError(f"{what}: cannot import the frozen graph ({first_line(exc)})"
                            ) from exc
    specs, names = [], []
    for p in placeholders:
        dims = ([d.size for d in p.attr["shape"].shape.dim]
                if not p.attr["shape"].shape.unknown_rank else None)
        if dims is None:
            raise CompilerError(f"{what}: Placeholder {p.name!r} has unknown rank; freeze the "
                                "graph with a fixed input shape")
        shape = _fixed_shape(dims, p.name, what, Kind.GRAPH_DEF,
                             "freeze the graph with a fixed input shape")
        specs.append(tf.TensorSpec(shape, tf.as_dtype(p.attr["dtype"].type), name=p.name))
        names.append(p.name)
    return _convert(lambda *xs: pruned(*xs), specs, names, outputs, what, Kind.GRAPH_DEF)


def to_onnx(source: Any, kind: str, what: str) -> onnx.ModelProto:
    """Convert a Keras / SavedModel / frozen-graph / tf.function ``source`` to ONNX."""
    path = Path(source) if isinstance(source, (str, os.PathLike)) else None
    if kind == Kind.KERAS:
        model = _keras(_load_keras(path, what) if path else source, what)
    elif kind == Kind.SAVED_MODEL:
        loaded = _load_saved_model(path, what) if path else source
        model = _concrete(_one_signature(loaded, what), what, kind)
    elif kind == Kind.TF_FUNCTION:
        model = _concrete(source, what, kind)
    elif kind == Kind.GRAPH_DEF:
        model = _graph_def(source, what)
    else:  # pragma: no cover - detect() returns no other kind
        raise CompilerError(f"{what}: cannot convert a {kind} model")
    return model
