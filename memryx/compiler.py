"""NeuralCompiler: ONNX models in, a DFP out.

The compiler checks that each model can run on the MX3 (static shapes but for
the batch dimension, standard ONNX operators, no control flow, weights that fit
the chips), crops host-side pre- and post-processing off the accelerated part
when asked, and packs everything into a :class:`~memryx.dfp.Dfp`.

Weight capacity: the MX3 datasheet gives 10.5 MB of weight memory per chip,
i.e. 10.5 million 8-bit weight parameters (42 million on the 4-chip M.2 module);
the compiler assumes 8-bit weights, so a DFP may carry at most
``10.5e6 * num_chips`` parameters over all its models.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np
import onnx
from onnx import helper

from . import formats
from ._compiler_options import (
    EFFORTS,
    IGNORED_KEYWORDS,
    PORT_FORMATS,
    chip_gen_value,
    choice,
    dfp_path,
    num_chips_value,
)
from ._crop import autocrop_points as _autocrop
from ._crop import extract as _extract
from ._crop import graph_inputs as _graph_inputs
from ._exceptions import CompilerError, DfpError
from ._version import __version__
from .dfp import (
    MAX_MODELED_FPS,
    MAX_MODELED_LATENCY_MS,
    MIN_MODELED_FPS,
    PORT_DTYPES,
    Dfp,
    ModelInfo,
    PortInfo,
)
from .timing import estimate, layer_costs

__all__ = ["WEIGHTS_PER_CHIP", "NeuralCompiler"]

log = logging.getLogger("memryx.compiler")

#: 8-bit weight parameters one MX3 chip holds (MX3 datasheet: 10.5 MB weight memory).
WEIGHTS_PER_CHIP: Final = 10_500_000

#: A model: ONNX (path, bytes, ``onnx.ModelProto``), TFLite (path, bytes), Keras (``.h5``,
#: ``.keras``, a ``keras.Model``), a SavedModel directory or object, a frozen ``.pb``.
ModelSource = str | os.PathLike[str] | bytes | onnx.ModelProto | Any
CropSpec = str | Sequence[str] | None

_CONTROL_FLOW = frozenset({"If", "Loop", "Scan", "SequenceMap"})
def _load_onnx(source: Any, idx: int) -> onnx.ModelProto:
    if isinstance(source, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(source)
        return model
    if isinstance(source, (bytes, bytearray, memoryview)):
        try:
            return onnx.load_model_from_string(bytes(source))
        except Exception as exc:
            raise CompilerError(f"model {idx}: bytes are not an ONNX model (nor TFLite: no "
                                f"'TFL3' identifier) ({exc})") from exc
    path = Path(source)
    try:  # external weight data (model.onnx + model.onnx.data) is read from beside the file
        return onnx.load(str(path))
    except Exception as exc:
        raise CompilerError(
            f"model {idx}: cannot read ONNX model {path} ({exc}); if its weights are in a "
            "separate file (torch.onnx.export writes model.onnx.data), keep that file next "
            "to it under the name the model refers to"
        ) from exc


def _load(source: Any, idx: int) -> tuple[onnx.ModelProto, str, bytes | None]:
    """The model as ONNX, its format, and the TFLite flatbuffer for TFLite sources."""
    try:
        kind = formats.detect(source)
    except CompilerError as exc:
        raise CompilerError(f"model {idx}: {exc}") from exc
    if kind == formats.Kind.ONNX:
        return _load_onnx(source, idx), kind, None
    converted = formats.convert(source, kind, f"model {idx} ({kind})")
    return converted.model, kind, converted.tflite


def _as_names(spec: CropSpec, what: str) -> list[str] | None:
    if spec is None:
        return None
    if isinstance(spec, str):
        names = [n.strip() for n in spec.split(",") if n.strip()]
    else:
        names = list(spec)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise CompilerError(f"{what}: expected tensor names, got {spec!r}")
    return names


def _per_model(spec: Any, count: int, what: str) -> list[list[str] | None]:
    """Spread ``inputs=`` / ``outputs=`` over the models.

    One model: a name, a comma-separated string or a list of names. Several
    models: a list with one such entry (or None) per model.
    """
    if spec is None:
        return [None] * count
    if count == 1:
        return [_as_names(spec, what)]
    if isinstance(spec, str) or not isinstance(spec, Sequence) or len(spec) != count:
        raise CompilerError(
            f"{what}: with {count} models give a list of {count} entries (names or None), "
            f"got {spec!r}"
        )
    return [_as_names(s, f"{what}[{i}]") for i, s in enumerate(spec)]


def _fix_batch(model: onnx.ModelProto, what: str) -> None:
    """Pin a dynamic leading batch dimension to 1; refuse any other dynamic dimension."""
    for vi in _graph_inputs(model):
        if not vi.type.HasField("tensor_type"):
            raise CompilerError(f"{what}: input {vi.name!r} is not a tensor")
        dims = vi.type.tensor_type.shape.dim
        if not vi.type.tensor_type.HasField("shape"):
            raise CompilerError(f"{what}: input {vi.name!r} has no static shape")
        for i, d in enumerate(dims):
            if d.HasField("dim_value") and d.dim_value > 0:
                continue
            if i == 0:
                d.Clear()
                d.dim_value = 1
                continue
            label = d.dim_param or "?"
            raise CompilerError(
                f"{what}: input {vi.name!r} has a dynamic dimension {label!r} at axis {i}; "
                "only the batch dimension (axis 0) may be dynamic: export the model with a "
                "fixed input shape (torch.onnx.export without dynamic_shapes/dynamic_axes; "
                "see docs/models.md)"
            )


def _check_supported(model: onnx.ModelProto, what: str) -> None:
    for node in model.graph.node:
        if node.op_type in _CONTROL_FLOW:
            raise CompilerError(
                f"{what}: operator {node.op_type} (node {node.name!r}) is control flow, "
                "which the MX3 dataflow cannot run"
            )
        if node.domain not in ("", "ai.onnx"):
            raise CompilerError(
                f"{what}: operator {node.domain}.{node.op_type} (node {node.name!r}) is not "
                "a standard ONNX operator"
            )


def count_weights(model: onnx.ModelProto) -> int:
    """Weight parameters of a graph: elements of its initializers and Constant nodes."""
    total = sum(int(np.prod(t.dims)) if t.dims else 1 for t in model.graph.initializer)
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.HasField("t"):
                    total += int(np.prod(attr.t.dims)) if attr.t.dims else 1
    return total


def _ports(model: onnx.ModelProto, what: str, model_idx: int, first_in: int, first_out: int
           ) -> tuple[tuple[PortInfo, ...], tuple[PortInfo, ...]]:
    """Port descriptions, with output shapes taken from a real run on zeros."""
    import onnxruntime as ort

    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 4  # fatal only: a failed run raises; the library prints nothing
        opts.intra_op_num_threads = 1
        sess = ort.InferenceSession(model.SerializeToString(), opts,
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise CompilerError(f"{what}: the graph is not executable ({exc})") from exc
    feeds: dict[str, np.ndarray[Any, Any]] = {}
    inputs = []
    for i, vi in enumerate(_graph_inputs(model)):
        elem = vi.type.tensor_type.elem_type
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(elem))
        if dtype.name not in PORT_DTYPES:
            raise CompilerError(f"{what}: input {vi.name!r} has unsupported dtype {dtype}")
        shape = tuple(d.dim_value for d in vi.type.tensor_type.shape.dim)
        feeds[vi.name] = np.zeros(shape, dtype)
        inputs.append(PortInfo(first_in + i, model_idx, vi.name, shape, dtype))
    try:
        results = sess.run(None, feeds)
    except Exception as exc:
        raise CompilerError(f"{what}: the graph fails on a frame of zeros ({exc})") from exc
    outputs = []
    for i, (meta, value) in enumerate(zip(sess.get_outputs(), results, strict=True)):
        arr = np.asarray(value)
        if arr.dtype.name not in PORT_DTYPES:
            raise CompilerError(f"{what}: output {meta.name!r} has unsupported dtype {arr.dtype}")
        if arr.ndim == 0 or 0 in arr.shape:
            raise CompilerError(f"{what}: output {meta.name!r} has empty shape {arr.shape}")
        outputs.append(PortInfo(first_out + i, model_idx, meta.name, tuple(arr.shape), arr.dtype))
    return tuple(inputs), tuple(outputs)


def _per_model_number(value: Any, count: int, what: str, low: float, high: float
                      ) -> list[float | None]:
    """One number per model, each in ``(0, high]`` and at least ``low`` (what a DFP may
    hold: out of it, the DFP would be refused as corrupted after compiling)."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * count
    if len(values) != count:
        raise CompilerError(f"{what}: expected one value per model ({count}), got {len(values)}")
    for v in values:
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or
                              not v > 0 or v != v or v == float("inf")):
            raise CompilerError(f"{what}: expected a positive finite number, got {v!r}")
        if v is not None and not low <= v <= high:
            raise CompilerError(f"{what}: {v!r} is out of range: it must be from {low:g} to "
                                f"{high:g}")
    return [float(v) if v is not None else None for v in values]


class NeuralCompiler:
    """Compile models into a DFP for the MX3.

    Parameters:
        models: a model or a list of them; a list makes a multi-model DFP,
            ``model_idx`` in list order. ONNX (path, bytes, ``onnx.ModelProto``),
            TFLite (``.tflite`` path or bytes), Keras (``.h5``/``.keras`` path or a
            ``keras.Model``), a TensorFlow SavedModel (directory or loaded object
            with one signature), a frozen graph (``.pb``) or a concrete
            ``tf.function``. All but ONNX need ``pip install 'memryx[tf]'`` and are
            converted with tf2onnx; inputs keep the source's layout (NHWC).
        dfp_fname: where :meth:`run` writes the DFP (``.dfp`` is appended when
            missing) and, when cropping, the cropped parts beside it as the
            vendor's compiler names them: ``model_<idx>_<name>_pre.onnx`` /
            ``_post.onnx`` (``.tflite`` for TFLite sources). None writes nothing.
        num_chips: MX3 chips the DFP targets (1..16, an int or a string of one);
            bounds the weight capacity.
        verbose: 0 quiet; 1 and up log progress at INFO on ``memryx.compiler``.
        inputs / outputs: tensor names where the accelerated part begins / ends;
            for several models, a list with an entry (or None) per model. For a
            TFLite source these are TFLite tensor names.
        autocrop: crop cheap leading/trailing ops (casts, normalisation,
            transposes / softmax, flatten, ...) to host-side models automatically.
        fps / latency_ms: override the timing model's estimate (e.g. with figures
            measured on a real MX3); a number for every model or a list per model.
        chip_gen: ``"mx3"`` (also ``3``/``"3.1"``), the only generation there is.
        effort: ``"lazy"``, ``"normal"`` or ``"hard"``: how long the vendor's mapper
            searches. Validated and recorded; the modeled mapping does not search.
        no_sim_dfp: the vendor's switch to skip its separate simulator DFP; a memryx
            DFP is one file for device and simulator alike, so nothing changes.
        input_format / output_format: the real chip's port data format (one of
            :data:`PORT_FORMATS`). Validated and recorded; frames and outputs on
            the host keep the model's own dtypes.

    Each model's modeled MX3 throughput and latency (:mod:`memryx.timing`) are
    stored in the DFP (``ModelInfo.perf``); the simulated device paces outputs
    to them in its default ``"timed"`` mode. Other keywords of the vendor's
    compiler give a ``UserWarning`` naming them and are ignored.

    Raises:
        CompilerError: unreadable or unknown model format, missing ``tf`` extra,
            dynamic dimension other than batch, control flow or non-standard
            operator, bad crop points, bad keyword values, or weights that do
            not fit ``num_chips`` chips.
    """

    def __init__(self, models: ModelSource | Sequence[ModelSource], dfp_fname: str |
                 os.PathLike[str] | None = None, num_chips: int | str = 4, verbose: int = 0,
                 inputs: Any = None, outputs: Any = None, autocrop: bool = False,
                 fps: float | Sequence[float | None] | None = None,
                 latency_ms: float | Sequence[float | None] | None = None, *,
                 chip_gen: str | int | float = "mx3", effort: str = "normal",
                 no_sim_dfp: bool = False, input_format: str = "FP32",
                 output_format: str = "FP32", **kwargs: Any) -> None:
        if isinstance(models, (list, tuple)):
            self._sources: list[Any] = list(models)
        else:
            self._sources = [models]
        if not self._sources:
            raise CompilerError("models: expected at least one model, got an empty list")
        self.dfp_fname = dfp_path(dfp_fname)
        self.num_chips = num_chips_value(num_chips)
        self.chip_gen = chip_gen_value(chip_gen)
        self.effort = choice(effort, EFFORTS, "effort")
        if not isinstance(no_sim_dfp, bool):
            raise CompilerError(f"no_sim_dfp must be True or False, got {no_sim_dfp!r}")
        self.no_sim_dfp = no_sim_dfp
        self.input_format = choice(input_format, PORT_FORMATS, "input_format")
        self.output_format = choice(output_format, PORT_FORMATS, "output_format")
        for key in kwargs:
            known = "a vendor compiler option with no meaning here" if key in \
                IGNORED_KEYWORDS else "unknown"
            warnings.warn(f"NeuralCompiler: keyword {key!r} ignored ({known})", UserWarning,
                          stacklevel=2)
        self.verbose = verbose
        self.autocrop = autocrop
        self._inputs = _per_model(inputs, len(self._sources), "inputs")
        self._outputs = _per_model(outputs, len(self._sources), "outputs")
        self._fps = _per_model_number(fps, len(self._sources), "fps", MIN_MODELED_FPS,
                                      MAX_MODELED_FPS)
        self._latency = _per_model_number(latency_ms, len(self._sources), "latency_ms", 0.0,
                                          MAX_MODELED_LATENCY_MS)
        #: After :meth:`run`: the pre-/post-processing model of each model (or None), as ONNX.
        #: For a TFLite source it is the ONNX form of the cropped TFLite part, or None when
        #: that part cannot be converted (custom operators): use the written ``.tflite``.
        self.pre_models: list[onnx.ModelProto | None] = []
        self.post_models: list[onnx.ModelProto | None] = []
        #: After :meth:`run` with ``dfp_fname``: the cropped-part files written beside the DFP.
        self.cropped_files: list[Path] = []
        self._files: list[dict[str, tuple[str, bytes]]] = []
        self._names: list[str] = []

    def _info(self, msg: str, *args: Any) -> None:
        if self.verbose:
            log.info(msg, *args)

    def run(self) -> Dfp:
        """Compile, write ``dfp_fname`` if one was given, and return the DFP."""
        self.pre_models, self.post_models, self._files, self._names = [], [], [], []
        self.cropped_files = []
        parts = []
        for idx, source in enumerate(self._sources):
            model, kind, tflite = _load(source, idx)
            if kind != formats.Kind.ONNX and model.graph.name in ("", "tf2onnx"):
                model.graph.name = formats.source_name(source, f"model{idx}")
            name = model.graph.name or f"model{idx}"
            what = f"model {idx} ({name!r})" if kind == formats.Kind.ONNX else \
                f"model {idx} ({name!r}, {kind})"
            if kind != formats.Kind.ONNX:
                self._info("%s: converted to ONNX with tf2onnx", what)
            self._names.append(formats.source_name(source, name))
            try:
                onnx.checker.check_model(model)
            except Exception as exc:
                raise CompilerError(f"{what}: not a valid ONNX model ({exc})") from exc
            _check_supported(model, what)
            _fix_batch(model, what)
            if tflite is not None:
                core, pre, post = self._crop_tflite(tflite, model, idx, what)
            else:
                core, pre, post = self._crop(model, idx, what)
            parts.append((idx, name, what, core, pre, post, count_weights(core)))
        total_weights = sum(p[-1] for p in parts)
        capacity = WEIGHTS_PER_CHIP * self.num_chips
        if total_weights > capacity:
            raise CompilerError(
                f"the model(s) need {total_weights / 1e6:.2f}M weight parameters but "
                f"{self.num_chips} MX3 chip(s) hold {capacity / 1e6:.2f}M "
                f"({WEIGHTS_PER_CHIP / 1e6:.1f}M 8-bit weights per chip); raise num_chips"
            )
        costs = [sum(c.macs for c in layer_costs(core)) for _, _, _, core, *_ in parts]
        infos: list[ModelInfo] = []
        first_in = first_out = 0
        for (idx, name, what, core, pre, post, weights), macs in zip(parts, costs, strict=True):
            ins, outs = _ports(core, what, idx, first_in, first_out)
            first_in += len(ins)
            first_out += len(outs)
            # Models of one DFP share the chips' engines in proportion to their work.
            share = self.num_chips * (macs / sum(costs) if sum(costs) else 1 / len(parts))
            perf = estimate(core, share, fps=self._fps[idx], latency_ms=self._latency[idx])
            self._info("%s: %d inputs, %d outputs, %.2fM weights, %.2f GMAC, modeled %.0f fps "
                       "(%s-bound), %.2f ms", what, len(ins), len(outs), weights / 1e6,
                       macs / 1e9, perf.fps, perf.bound, perf.latency_ms)
            infos.append(ModelInfo(
                index=idx, name=name, inputs=ins, outputs=outs, graph=core.SerializeToString(),
                pre_model=pre.SerializeToString() if pre is not None else None,
                post_model=post.SerializeToString() if post is not None else None,
                perf=perf.to_json(),
            ))
            self.pre_models.append(pre)
            self.post_models.append(post)
        try:
            dfp = Dfp.build(infos, num_chips=self.num_chips, compiler_version=__version__)
        except DfpError as exc:  # e.g. a rank > 8 port or a 2000-character tensor name
            raise CompilerError(f"the model(s) do not fit the DFP format: {exc}") from exc
        if self.dfp_fname is not None:
            self._write(dfp)
        return dfp

    def _crop_points(self, idx: int, orig_in: list[str], orig_out: list[str],
                     auto: Any) -> tuple[list[str], list[str]]:
        crop_in, crop_out = self._inputs[idx], self._outputs[idx]
        if self.autocrop and crop_in is None and crop_out is None:
            crop_in, crop_out = auto()
        return crop_in or orig_in, crop_out or orig_out

    def _crop(self, model: onnx.ModelProto, idx: int, what: str
              ) -> tuple[onnx.ModelProto, onnx.ModelProto | None, onnx.ModelProto | None]:
        orig_in = [i.name for i in _graph_inputs(model)]
        orig_out = [o.name for o in model.graph.output]
        crop_in, crop_out = self._crop_points(idx, orig_in, orig_out, lambda: _autocrop(model))
        files: dict[str, tuple[str, bytes]] = {}
        self._files.append(files)
        if crop_in == orig_in and crop_out == orig_out:
            return model, None, None
        tensors = set(orig_in) | {o for n in model.graph.node for o in n.output}
        for name in (*crop_in, *crop_out):
            if name not in tensors:
                raise CompilerError(f"{what}: crop point {name!r} is not a tensor of the model")
        core = _extract(model, crop_in, crop_out, f"{what} accelerated part")
        pre = None if crop_in == orig_in else _extract(model, orig_in, crop_in,
                                                       f"{what} pre-processing")
        post = None if crop_out == orig_out else _extract(model, crop_out, orig_out,
                                                          f"{what} post-processing")
        _fix_batch(core, what)
        for kind, part in (("pre", pre), ("post", post)):
            if part is not None:
                files[kind] = (".onnx", part.SerializeToString())
        self._info("%s: cropped at inputs=%s outputs=%s", what, crop_in, crop_out)
        return core, pre, post

    def _crop_tflite(self, blob: bytes, model: onnx.ModelProto, idx: int, what: str
                     ) -> tuple[onnx.ModelProto, onnx.ModelProto | None, onnx.ModelProto | None]:
        """Crop a TFLite source on its own graph: the parts stay TFLite (written as
        ``.tflite``); the accelerated part is converted to ONNX."""
        from .formats import tflite

        orig_in, orig_out = tflite.io_names(blob)
        crop_in, crop_out = self._crop_points(idx, orig_in, orig_out,
                                              lambda: tflite.autocrop(blob))
        files: dict[str, tuple[str, bytes]] = {}
        self._files.append(files)
        if crop_in == orig_in and crop_out == orig_out:
            return model, None, None
        core_blob = tflite.crop(blob, crop_in, crop_out, f"{what} accelerated part")
        core = tflite.to_onnx(core_blob, f"{what} accelerated part")
        _check_supported(core, f"{what} accelerated part")
        _fix_batch(core, what)
        onnx_parts: dict[str, onnx.ModelProto | None] = {"pre": None, "post": None}
        for kind, ins, outs in (("pre", orig_in, crop_in), ("post", crop_out, orig_out)):
            if ins == outs:
                continue
            part = tflite.crop(blob, ins, outs, f"{what} {kind}-processing")
            files[kind] = (".tflite", part)
            try:
                onnx_parts[kind] = tflite.to_onnx(part, f"{what} {kind}-processing")
            except CompilerError as exc:  # e.g. TFLite_Detection_PostProcess: LiteRT only
                self._info("%s: %s part stays TFLite only (%s)", what, kind, exc)
        self._info("%s: cropped at TFLite tensors inputs=%s outputs=%s", what, crop_in,
                   crop_out)
        return core, onnx_parts["pre"], onnx_parts["post"]

    def _write(self, dfp: Dfp) -> None:
        assert self.dfp_fname is not None
        dfp.write(self.dfp_fname)
        folder = self.dfp_fname.parent
        for idx, (name, files) in enumerate(zip(self._names, self._files, strict=True)):
            for kind in ("pre", "post"):
                if kind in files:
                    suffix, blob = files[kind]
                    path = folder / f"model_{idx}_{name}_{kind}{suffix}"
                    path.write_bytes(blob)
                    self.cropped_files.append(path)
                    self._info("wrote %s", path)
        self._info("wrote %s", self.dfp_fname)
