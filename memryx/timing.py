"""The MX3 timing model: how fast a model will run on the chip.

The MX3 is a dataflow machine: every layer of a model has compute engines of
its own, and all layers work at once on successive rows of successive frames.
So a model's throughput is set by its slowest stage, and its latency by the
pipeline it fills. The model here has three limits, each per frame:

* **compute**: the compiler shares the chips' engines among the layers in
  proportion to their work, so the whole pipeline runs at
  ``utilization * peak_macs * num_chips / total_macs`` frames/s;
* **streaming**: a layer streams its output feature map pixel by pixel, at most
  ``pixel_rate`` pixels/s however many engines it gets, so the layer with the
  largest output map (rows x columns) caps the frame rate;
* **host I/O**: input and output feature maps cross PCIe at ``io_bandwidth``
  bytes/s (and ``io_overhead_s`` per frame).

``fps = min(compute, streaming, io)``. Latency is the time to move a frame in
and out plus one frame through the slowest stage plus a small fill delay per
layer: ``io_time + 1/fps + layers * layer_delay_s``.

The constants are calibrated on the MX3 figures MemryX publishes for a 4-chip
M.2 module (MobileNetV1 1583 FPS, ResNet50 992 FPS, YOLOv7-tiny-416 404 FPS;
MobileNetV1 latency 1.8 ms); ``docs/timing-model.md`` records the error per
model. The peak is the datasheet's 5 TOPS per chip (2.5 TMAC/s).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Final

import numpy as np
import onnx
from onnx import helper, shape_inference

__all__ = ["MX3", "LayerCost", "Mx3Params", "PerfEstimate", "estimate", "layer_costs"]


@dataclass(frozen=True)
class Mx3Params:
    """The constants of the timing model (see the module docstring)."""

    peak_macs: float = 2.5e12          # per chip: 5 TOPS (datasheet, nominal mode)
    utilization: float = 0.4072        # calibrated: ResNet50 at 992 FPS on 4 chips
    pixel_rate: float = 1.863e7        # calibrated: MobileNetV1 and YOLOv7-tiny (geometric mean)
    io_bandwidth: float = 3.2e9        # bytes/s: PCIe Gen3 x4 (the M.2's 2x2 lanes) after overhead
    io_overhead_s: float = 20e-6       # per frame: driver and DMA set-up (assumed)
    layer_delay_s: float = 3.28e-5     # calibrated: MobileNetV1 latency 1.8 ms


MX3: Final = Mx3Params()

#: Operators whose cost is counted as multiply-accumulates.
_COMPUTE_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


@dataclass(frozen=True)
class LayerCost:
    """What one node of a graph costs on the MX3."""

    name: str
    op: str
    macs: int
    weights: int
    out_pixels: int


@dataclass(frozen=True)
class PerfEstimate:
    """A model's modeled MX3 performance."""

    fps: float
    latency_ms: float
    macs: int
    weights: int
    bound: str
    """Which limit sets ``fps``: ``compute``, ``streaming``, ``io`` or ``override``."""
    num_chips: float
    """Chips' worth of engines the model gets (its share when models share the chips)."""
    pipeline_depth: int
    """Frames in flight inside the chip when it runs at ``fps``."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    try:
        inferred = shape_inference.infer_shapes(model)
    except Exception:  # shape inference is best effort; unknown shapes cost nothing
        inferred = model
    shapes: dict[str, tuple[int, ...]] = {}
    for vi in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        tt = vi.type.tensor_type
        if tt.HasField("shape"):
            dims = tuple(d.dim_value if d.HasField("dim_value") else 0 for d in tt.shape.dim)
            if all(d > 0 for d in dims):
                shapes[vi.name] = dims
    for init in model.graph.initializer:
        shapes[init.name] = tuple(init.dims)
    return shapes


def _spatial(shape: tuple[int, ...]) -> int:
    """Rows x columns of a feature map (NCHW), or 1 for vectors."""
    return int(np.prod(shape[2:])) if len(shape) > 2 else 1


def layer_costs(model: onnx.ModelProto) -> list[LayerCost]:
    """Per-node MACs, weights and output-map size of ``model`` (batch 1)."""
    shapes = _shapes(model)
    inits = {i.name for i in model.graph.initializer}
    costs = []
    for node in model.graph.node:
        out = shapes.get(node.output[0], ()) if node.output else ()
        out_elems = int(np.prod(out)) if out else 0
        weights = sum(int(np.prod(shapes.get(i, (0,)))) for i in node.input if i in inits)
        macs = 0
        if node.op_type in ("Conv", "ConvTranspose") and len(node.input) > 1:
            w = shapes.get(node.input[1], ())
            if len(w) >= 3 and out_elems:
                group = next((a.i for a in node.attribute if a.name == "group"), 1) or 1
                per_output = int(np.prod(w[1:])) if node.op_type == "Conv" else \
                    int(np.prod(w[2:])) * max(1, w[0] // group)
                macs = out_elems * per_output
        elif node.op_type in ("Gemm", "MatMul") and len(node.input) > 1:
            a = shapes.get(node.input[0], ())
            if a and out_elems:
                trans_a = any(x.name == "transA" and x.i for x in node.attribute)
                k = a[-2] if trans_a and len(a) >= 2 else a[-1]
                macs = out_elems * k
        else:
            macs = out_elems  # element-wise work: one operation per output element
        costs.append(LayerCost(node.name or node.op_type, node.op_type, macs, weights,
                               _spatial(out) if out else 1))
    return costs


def _io_bytes(model: onnx.ModelProto) -> int:
    shapes = _shapes(model)
    inits = {i.name for i in model.graph.initializer}
    total = 0
    for vi in (*model.graph.input, *model.graph.output):
        if vi.name in inits:
            continue
        dims = shapes.get(vi.name, ())
        elem = vi.type.tensor_type.elem_type
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(elem)).itemsize if elem else 4
        total += int(np.prod(dims)) * itemsize if dims else 0
    return total


def estimate(model: onnx.ModelProto, num_chips: float = 4, params: Mx3Params = MX3, *,
             fps: float | None = None, latency_ms: float | None = None) -> PerfEstimate:
    """Modeled MX3 throughput and latency of ``model`` (the accelerated graph).

    ``fps`` / ``latency_ms`` override the model's figures (e.g. with measured ones).
    """
    costs = layer_costs(model)
    macs = sum(c.macs for c in costs)
    weights = sum(c.weights for c in costs)
    compute_layers = [c for c in costs if c.op in _COMPUTE_OPS] or costs
    io_time = params.io_overhead_s + _io_bytes(model) / params.io_bandwidth
    limits = {
        "compute": params.utilization * params.peak_macs * num_chips / max(macs, 1),
        "streaming": params.pixel_rate / max(c.out_pixels for c in compute_layers)
        if compute_layers else math.inf,
        "io": 1.0 / io_time,
    }
    bound = min(limits, key=lambda k: limits[k])
    modeled_fps = limits[bound]
    if fps is not None:
        if not fps > 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        modeled_fps, bound = float(fps), "override"
    latency = io_time + 1.0 / modeled_fps + len(compute_layers) * params.layer_delay_s
    if latency_ms is not None:
        if not latency_ms > 0:
            raise ValueError(f"latency_ms must be > 0, got {latency_ms}")
        latency = latency_ms / 1000.0
    depth = max(1, math.ceil(latency * modeled_fps))
    return PerfEstimate(fps=modeled_fps, latency_ms=latency * 1000.0, macs=macs, weights=weights,
                        bound=bound, num_chips=num_chips, pipeline_depth=depth)
