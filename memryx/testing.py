"""Deterministic ONNX model builders for tests, examples and benchmarks.

Every builder returns an :class:`onnx.ModelProto` (opset 17, IR version 8)
that passes ``onnx.checker.check_model(model, full_check=True)`` and loads in
onnxruntime.  Models are built in code, so no network access or model zoo is
needed.  Random weights come from ``numpy.random.default_rng(seed)``, so the
same arguments always yield byte-identical models.

Small models (:func:`identity_model`, :func:`add_model`, :func:`split_model`,
:func:`mlp_model`, :func:`mobilenet_like`) are meant for fast unit tests.
The large ones (:func:`mobilenet_v1`, :func:`resnet50`, :func:`yolov7_tiny`)
reproduce the layer structure and parameter counts of the real networks
(batch norm folded into convolution biases) with random weights, for
compiler and throughput experiments.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import helper

__all__ = [
    "OPSET",
    "IR_VERSION",
    "identity_model",
    "add_model",
    "split_model",
    "mlp_model",
    "mobilenet_like",
    "mobilenet_v1",
    "resnet50",
    "yolov7_tiny",
    "model_bytes",
    "count_parameters",
    "COLOR_LABELS",
    "color_classifier",
    "synthetic_frame",
]

#: Default-domain opset version of every generated model.
OPSET = 17
#: IR version of every generated model (loadable by onnxruntime 1.32).
IR_VERSION = 8

_FLOAT = onnx.TensorProto.FLOAT


def _elem_type(dtype: npt.DTypeLike) -> int:
    return int(helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))


def _value_info(name: str, elem_type: int, shape: Sequence[int]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, list(shape))


class _Graph:
    """Builds a model in place: appends nodes and initializers, hands out unique names."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        # Nodes and initializers are written straight into the final proto:
        # copying ~100 MB of ResNet-50 weights between messages is not free.
        self.proto = helper.make_model(
            onnx.GraphProto(),
            producer_name="memryx.testing",
            opset_imports=[helper.make_opsetid("", OPSET)],
            ir_version=IR_VERSION,
        )
        self.graph = self.proto.graph
        self._counts: dict[str, int] = {}

    def fresh(self, prefix: str) -> str:
        n = self._counts.get(prefix, 0)
        self._counts[prefix] = n + 1
        return f"{prefix}_{n}"

    def const(self, prefix: str, value: npt.ArrayLike, dtype: npt.DTypeLike = np.float32) -> str:
        name = self.fresh(prefix)
        arr = np.asarray(value, dtype=np.dtype(dtype).newbyteorder("<"))
        tensor = self.graph.initializer.add()
        tensor.name = name
        tensor.data_type = _elem_type(dtype)
        tensor.dims.extend(arr.shape)
        tensor.raw_data = arr.tobytes()
        return name

    def op(
        self, op_type: str, inputs: Sequence[str], output: str | None = None, **attrs: Any
    ) -> str:
        out = output if output is not None else self.fresh(op_type.lower())
        node_name = f"{op_type}_{len(self.graph.node)}"
        self.graph.node.append(helper.make_node(op_type, list(inputs), [out], node_name, **attrs))
        return out

    def weight(self, shape: Sequence[int], fan_in: int, gain: float) -> npt.NDArray[np.float32]:
        w = self.rng.standard_normal(tuple(shape), dtype=np.float32)
        w *= np.float32(gain / np.sqrt(fan_in))
        return w

    def bias(self, n: int) -> npt.NDArray[np.float32]:
        b = self.rng.standard_normal(n, dtype=np.float32)
        b *= np.float32(0.01)
        return b

    def act(self, x: str, kind: str | None, output: str | None = None) -> str:
        if kind is None:
            return x
        if kind == "relu":
            return self.op("Relu", [x], output)
        if kind == "leaky":
            return self.op("LeakyRelu", [x], output, alpha=0.1)
        raise ValueError(f"unknown activation {kind!r}")

    def conv(
        self,
        x: str,
        cin: int,
        cout: int,
        k: int = 1,
        stride: int = 1,
        groups: int = 1,
        act: str | None = "relu",
        gain: float = 1.0,
        output: str | None = None,
    ) -> str:
        """Conv (+ bias, i.e. folded BN) + optional activation, 'same' padding."""
        fan_in = cin // groups * k * k
        he = np.sqrt(2.0 / (1.0 + 0.01)) if act == "leaky" else np.sqrt(2.0 if act else 1.0)
        w = self.const("conv_w", self.weight((cout, cin // groups, k, k), fan_in, gain * he))
        b = self.const("conv_b", self.bias(cout))
        p = k // 2
        y = self.op(
            "Conv",
            [x, w, b],
            None if act else output,
            kernel_shape=[k, k],
            strides=[stride, stride],
            pads=[p, p, p, p],
            group=groups,
        )
        return self.act(y, act, output)

    def gemm(self, x: str, cin: int, cout: int, output: str | None = None) -> str:
        """Fully connected layer, weight stored [out, in] (transB=1)."""
        w = self.const("fc_w", self.weight((cout, cin), cin, 1.0))
        b = self.const("fc_b", self.bias(cout))
        return self.op("Gemm", [x, w, b], output, transB=1)

    def head(self, x: str, cin: int, num_classes: int, output: str) -> str:
        """GlobalAveragePool -> Flatten -> Gemm classifier."""
        pooled = self.op("GlobalAveragePool", [x])
        flat = self.op("Flatten", [pooled], axis=1)
        return self.gemm(flat, cin, num_classes, output)

    def dw_sep(self, x: str, cin: int, cout: int, stride: int) -> str:
        """MobileNet depthwise-separable block: dw3x3+ReLU, pw1x1+ReLU."""
        y = self.conv(x, cin, cin, k=3, stride=stride, groups=cin)
        return self.conv(y, cin, cout, k=1)

    def bottleneck(self, x: str, cin: int, width: int, stride: int) -> str:
        """ResNet bottleneck (1x1, 3x3 strided, 1x1 expand x4) with projection shortcut."""
        cout = width * 4
        y = self.conv(x, cin, width, k=1)
        y = self.conv(y, width, width, k=3, stride=stride)
        # Small gain on the residual branch keeps activations bounded without BN.
        y = self.conv(y, width, cout, k=1, act=None, gain=0.2)
        short = x
        if stride != 1 or cin != cout:
            short = self.conv(x, cin, cout, k=1, stride=stride, act=None)
        return self.op("Relu", [self.op("Add", [y, short])])

    def elan_tiny(self, x: str, cin: int, mid: int, cout: int) -> str:
        """YOLOv7-tiny ELAN block: two 1x1 branches, two chained 3x3, concat, 1x1."""
        a = self.conv(x, cin, mid, act="leaky")
        b = self.conv(x, cin, mid, act="leaky")
        c = self.conv(b, mid, mid, k=3, act="leaky")
        d = self.conv(c, mid, mid, k=3, act="leaky")
        cat = self.op("Concat", [d, c, b, a], axis=1)
        return self.conv(cat, 4 * mid, cout, act="leaky")

    def maxpool(self, x: str, k: int, stride: int) -> str:
        p = k // 2 if stride == 1 else 0
        return self.op("MaxPool", [x], kernel_shape=[k, k], strides=[stride, stride], pads=[p] * 4)

    def upsample2x(self, x: str) -> str:
        scales = self.const("scales", [1.0, 1.0, 2.0, 2.0])
        return self.op(
            "Resize",
            [x, "", scales],
            mode="nearest",
            coordinate_transformation_mode="asymmetric",
            nearest_mode="floor",
        )

    def model(
        self,
        name: str,
        inputs: Sequence[onnx.ValueInfoProto],
        outputs: Sequence[onnx.ValueInfoProto],
        value_info: Sequence[onnx.ValueInfoProto] = (),
    ) -> onnx.ModelProto:
        self.graph.name = name
        self.graph.input.extend(inputs)
        self.graph.output.extend(outputs)
        self.graph.value_info.extend(value_info)
        return self.proto


def _check_positive(**values: int) -> None:
    for key, value in values.items():
        if value < 1:
            raise ValueError(f"{key} must be >= 1, got {value}")


def identity_model(
    shape: Sequence[int] = (1, 16), dtype: npt.DTypeLike = np.float32
) -> onnx.ModelProto:
    """Return a one-node model ``y = Identity(x)`` with input "x" and output "y"."""
    g = _Graph()
    g.op("Identity", ["x"], "y")
    et = _elem_type(dtype)
    return g.model("identity", [_value_info("x", et, shape)], [_value_info("y", et, shape)])


def add_model(shape: Sequence[int] = (1, 8), dtype: npt.DTypeLike = np.float32) -> onnx.ModelProto:
    """Return a two-input model ``sum = a + b`` (inputs "a", "b"; output "sum")."""
    g = _Graph()
    g.op("Add", ["a", "b"], "sum")
    et = _elem_type(dtype)
    return g.model(
        "add",
        [_value_info("a", et, shape), _value_info("b", et, shape)],
        [_value_info("sum", et, shape)],
    )


def split_model(shape: Sequence[int] = (1, 8)) -> onnx.ModelProto:
    """Return a two-output float32 model: ``double = x * 2`` and ``neg = -x``."""
    g = _Graph()
    g.op("Mul", ["x", g.const("two", np.float32(2.0))], "double")
    g.op("Neg", ["x"], "neg")
    return g.model(
        "split",
        [_value_info("x", _FLOAT, shape)],
        [_value_info("double", _FLOAT, shape), _value_info("neg", _FLOAT, shape)],
    )


def mlp_model(
    in_features: int = 16, hidden: int = 32, out_features: int = 10, seed: int = 0
) -> onnx.ModelProto:
    """Return a Gemm-Relu-Gemm MLP: input "x" [1, in_features] -> "logits" [1, out_features]."""
    _check_positive(in_features=in_features, hidden=hidden, out_features=out_features)
    g = _Graph(seed)
    h = g.op("Relu", [g.gemm("x", in_features, hidden)])
    g.gemm(h, hidden, out_features, "logits")
    return g.model(
        "mlp",
        [_value_info("x", _FLOAT, [1, in_features])],
        [_value_info("logits", _FLOAT, [1, out_features])],
    )


def mobilenet_like(
    input_size: int = 64,
    num_classes: int = 10,
    width: int = 8,
    seed: int = 0,
    preprocessing: bool = False,
    softmax: bool = True,
) -> onnx.ModelProto:
    """Return a small MobileNetV1-shaped CNN classifier.

    Input "image" is NCHW ``[1, 3, S, S]`` float32.  The body is a stride-2
    3x3 conv + ReLU, four depthwise-separable blocks (channels ``2w, 4w, 4w,
    8w``; strides ``1, 2, 1, 2``), GlobalAveragePool, Flatten and a Gemm
    producing "logits" ``[1, num_classes]``; with ``softmax=True`` a Softmax
    produces the graph output "probs", otherwise "logits" is the output.

    With ``preprocessing=True`` the graph input is instead "frame", NHWC
    ``[1, S, S, 3]`` uint8, followed by Cast -> Sub(127.5) -> Div(127.5) ->
    Transpose(0, 3, 1, 2) yielding the internal tensor "image", so the model
    can be cropped at inputs ``["image"]`` / outputs ``["logits"]``.
    """
    _check_positive(input_size=input_size, num_classes=num_classes, width=width)
    g = _Graph(seed)
    s = input_size
    value_info: list[onnx.ValueInfoProto] = []
    if preprocessing:
        x = g.op("Cast", ["frame"], to=_FLOAT)
        x = g.op("Sub", [x, g.const("mean", np.float32(127.5))])
        x = g.op("Div", [x, g.const("scale", np.float32(127.5))])
        g.op("Transpose", [x], "image", perm=[0, 3, 1, 2])
        graph_input = _value_info("frame", onnx.TensorProto.UINT8, [1, s, s, 3])
        value_info.append(_value_info("image", _FLOAT, [1, 3, s, s]))
    else:
        graph_input = _value_info("image", _FLOAT, [1, 3, s, s])
    x = g.conv("image", 3, width, k=3, stride=2)
    cin = width
    for cout, stride in ((2 * width, 1), (4 * width, 2), (4 * width, 1), (8 * width, 2)):
        x = g.dw_sep(x, cin, cout, stride)
        cin = cout
    g.head(x, cin, num_classes, "logits")
    logits = _value_info("logits", _FLOAT, [1, num_classes])
    if softmax:
        g.op("Softmax", ["logits"], "probs", axis=-1)
        value_info.append(logits)
        output = _value_info("probs", _FLOAT, [1, num_classes])
    else:
        output = logits
    return g.model("mobilenet_like", [graph_input], [output], value_info)


def mobilenet_v1(
    input_size: int = 224, num_classes: int = 1000, alpha: float = 1.0, seed: int = 0
) -> onnx.ModelProto:
    """Return MobileNetV1 (Howard et al. 2017) with random weights.

    Stride-2 3x3 stem with 32 channels, then 13 depthwise-separable blocks
    (64, 128/2, 128, 256/2, 256, 512/2, 5x512, 1024/2, 1024), all widths
    scaled by ``alpha``; GlobalAveragePool, Flatten, Gemm.  Input "image"
    ``[1, 3, S, S]`` float32, output "logits" ``[1, num_classes]``.  About
    4.2M parameters at ``alpha=1``, ``num_classes=1000``.
    """
    _check_positive(input_size=input_size, num_classes=num_classes)
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")

    def ch(c: int) -> int:
        return max(1, int(c * alpha))

    g = _Graph(seed)
    x = g.conv("image", 3, ch(32), k=3, stride=2)
    cin = ch(32)
    blocks = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)]
    blocks += [(512, 1)] * 5 + [(1024, 2), (1024, 1)]
    for c, stride in blocks:
        x = g.dw_sep(x, cin, ch(c), stride)
        cin = ch(c)
    g.head(x, cin, num_classes, "logits")
    return g.model(
        "mobilenet_v1",
        [_value_info("image", _FLOAT, [1, 3, input_size, input_size])],
        [_value_info("logits", _FLOAT, [1, num_classes])],
    )


def resnet50(input_size: int = 224, num_classes: int = 1000, seed: int = 0) -> onnx.ModelProto:
    """Return ResNet-50 (He et al. 2015) with random weights, BN folded into conv biases.

    7x7/2 stem, 3x3/2 max pool, bottleneck stages of 3, 4, 6, 3 blocks
    (widths 64, 128, 256, 512, expansion 4; the stride sits on the 3x3 conv
    as in torchvision), GlobalAveragePool, Flatten, Gemm.  Input "image"
    ``[1, 3, S, S]`` float32, output "logits" ``[1, num_classes]``.  About
    25.5M parameters at ``num_classes=1000``; any ``input_size >= 32`` works.
    """
    _check_positive(input_size=input_size, num_classes=num_classes)
    g = _Graph(seed)
    x = g.conv("image", 3, 64, k=7, stride=2)
    x = g.op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin = 64
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for i in range(blocks):
            x = g.bottleneck(x, cin, width, stride if i == 0 else 1)
            cin = width * 4
    g.head(x, cin, num_classes, "logits")
    return g.model(
        "resnet50",
        [_value_info("image", _FLOAT, [1, 3, input_size, input_size])],
        [_value_info("logits", _FLOAT, [1, num_classes])],
    )


def yolov7_tiny(input_size: int = 416, num_classes: int = 80, seed: int = 0) -> onnx.ModelProto:
    """Return an approximation of YOLOv7-tiny (``cfg/training/yolov7-tiny.yaml``).

    Backbone of ELAN-tiny blocks with LeakyReLU(0.1) and 2x2 max pools, an
    SPPCSP-style block (max pools 5/9/13), an FPN/PAN neck with nearest
    Resize upsampling and concatenation, and three 1x1 detection convs with
    ``3 * (num_classes + 5)`` channels.  BN is folded into biases and the
    IDetect implicit layers are omitted.  Input "image" ``[1, 3, S, S]``
    float32 (``S`` divisible by 32); outputs are raw NCHW conv maps "p3"
    ``[1, 3*(nc+5), S/8, S/8]``, "p4" (stride 16) and "p5" (stride 32).
    About 6.2M parameters at ``num_classes=80`` (the real fused model has 6,219,709).
    """
    _check_positive(input_size=input_size, num_classes=num_classes)
    if input_size % 32:
        raise ValueError(f"input_size must be divisible by 32, got {input_size}")
    g = _Graph(seed)
    # Backbone.
    x = g.conv("image", 3, 32, k=3, stride=2, act="leaky")
    x = g.conv(x, 32, 64, k=3, stride=2, act="leaky")
    c2 = g.elan_tiny(x, 64, 32, 64)  # stride 4
    c3 = g.elan_tiny(g.maxpool(c2, 2, 2), 64, 64, 128)  # stride 8
    c4 = g.elan_tiny(g.maxpool(c3, 2, 2), 128, 128, 256)  # stride 16
    c5 = g.elan_tiny(g.maxpool(c4, 2, 2), 256, 256, 512)  # stride 32
    # SPPCSP block.
    a = g.conv(c5, 512, 256, act="leaky")
    b = g.conv(c5, 512, 256, act="leaky")
    pools = [g.maxpool(b, k, 1) for k in (13, 9, 5)]
    y = g.conv(g.op("Concat", [*pools, b], axis=1), 1024, 256, act="leaky")
    p5 = g.conv(g.op("Concat", [y, a], axis=1), 512, 256, act="leaky")
    # Top-down path.
    up = g.upsample2x(g.conv(p5, 256, 128, act="leaky"))
    lat = g.conv(c4, 256, 128, act="leaky")
    p4 = g.elan_tiny(g.op("Concat", [lat, up], axis=1), 256, 64, 128)
    up = g.upsample2x(g.conv(p4, 128, 64, act="leaky"))
    lat = g.conv(c3, 128, 64, act="leaky")
    n3 = g.elan_tiny(g.op("Concat", [lat, up], axis=1), 128, 32, 64)
    # Bottom-up path.
    down = g.conv(n3, 64, 128, k=3, stride=2, act="leaky")
    n4 = g.elan_tiny(g.op("Concat", [down, p4], axis=1), 256, 64, 128)
    down = g.conv(n4, 128, 256, k=3, stride=2, act="leaky")
    n5 = g.elan_tiny(g.op("Concat", [down, p5], axis=1), 512, 128, 256)
    # Detection heads.
    no = 3 * (num_classes + 5)
    outputs = []
    for name, feat, cin, stride in (("p3", n3, 64, 8), ("p4", n4, 128, 16), ("p5", n5, 256, 32)):
        h = g.conv(feat, cin, 2 * cin, k=3, act="leaky")
        g.conv(h, 2 * cin, no, act=None, output=name)
        side = input_size // stride
        outputs.append(_value_info(name, _FLOAT, [1, no, side, side]))
    return g.model(
        "yolov7_tiny", [_value_info("image", _FLOAT, [1, 3, input_size, input_size])], outputs
    )


def model_bytes(model: onnx.ModelProto) -> bytes:
    """Return the serialized protobuf bytes of ``model``."""
    data: bytes = model.SerializeToString()
    return data


def count_parameters(model: onnx.ModelProto) -> int:
    """Return the total number of elements over all initializers of ``model``."""
    return sum(int(np.prod(t.dims, dtype=np.int64)) for t in model.graph.initializer)


#: Class names of :func:`color_classifier`, by class index.
COLOR_LABELS: tuple[str, str, str] = ("red", "green", "blue")

#: Scale of the colour-evidence convolution: sets how confident the softmax is.
_COLOR_GAIN = 8.0


def color_classifier(input_size: int = 64) -> onnx.ModelProto:
    """Return a tiny CNN with hand-set weights that classifies a frame's dominant colour.

    Unlike the other builders the weights are not random: the model really
    works, so examples and tests can check predictions against known labels
    (see :func:`synthetic_frame` and :data:`COLOR_LABELS`).

    Graph: input "frame", NHWC ``[1, S, S, 3]`` uint8 (a camera frame) ->
    Cast(float) -> Div(255) -> Transpose(0, 3, 1, 2) giving the internal NCHW
    tensor "image" -> a 1x1 Conv whose output channel ``c`` computes the
    evidence ``8 * (x_c - mean of the other two channels)`` per pixel -> Relu ->
    GlobalAveragePool giving "pooled" ``[1, 3, 1, 1]`` -> Flatten giving
    "logits" ``[1, 3]`` -> Softmax giving the graph output "probs" ``[1, 3]``
    (classes red, green, blue, as in :data:`COLOR_LABELS`).

    ``NeuralCompiler(model, autocrop=True)`` crops the leading
    Cast/Div/Transpose into a pre-processing model ("frame" -> "image") and the
    trailing Flatten/Softmax into a post-processing model ("pooled" -> "probs");
    the accelerated part is then "image" ``[1, 3, S, S]`` float32 -> "pooled".
    """
    _check_positive(input_size=input_size)
    s = input_size
    g = _Graph()
    x = g.op("Cast", ["frame"], to=_FLOAT)
    x = g.op("Div", [x, g.const("scale", np.float32(255.0))])
    g.op("Transpose", [x], "image", perm=[0, 3, 1, 2])
    # Output channel c: +1 for colour channel c, -1/2 for each of the other two.
    w = np.full((3, 3, 1, 1), -0.5, dtype=np.float32)
    for c in range(3):
        w[c, c, 0, 0] = 1.0
    w *= np.float32(_COLOR_GAIN)
    evidence = g.op(
        "Conv",
        ["image", g.const("color_w", w), g.const("color_b", np.zeros(3, np.float32))],
        kernel_shape=[1, 1],
    )
    g.op("GlobalAveragePool", [g.op("Relu", [evidence])], "pooled")
    g.op("Flatten", ["pooled"], "logits", axis=1)
    g.op("Softmax", ["logits"], "probs", axis=-1)
    return g.model(
        "color_classifier",
        [_value_info("frame", onnx.TensorProto.UINT8, [1, s, s, 3])],
        [_value_info("probs", _FLOAT, [1, 3])],
        [
            _value_info("image", _FLOAT, [1, 3, s, s]),
            _value_info("pooled", _FLOAT, [1, 3, 1, 1]),
            _value_info("logits", _FLOAT, [1, 3]),
        ],
    )


def synthetic_frame(label: int, size: int = 64, seed: int = 0) -> npt.NDArray[np.uint8]:
    """Return a noisy camera-like frame, NHWC ``[size, size, 3]`` uint8 (no batch
    dimension), whose dominant colour is ``COLOR_LABELS[label]``.

    The frame has a random base colour in which channel ``label`` is clearly the
    strongest, a random brightness gradient, a darker blob and per-pixel
    Gaussian noise, all drawn from ``numpy.random.default_rng(seed)``.
    """
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or \
            not 0 <= label < len(COLOR_LABELS):
        raise ValueError(f"label must be an int in 0..{len(COLOR_LABELS) - 1}, got {label!r}")
    _check_positive(size=size)
    rng = np.random.default_rng(seed)
    dominant = rng.uniform(150.0, 230.0)
    base = rng.uniform(10.0, dominant - 90.0, size=3)
    base[int(label)] = dominant
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / np.float32(max(size - 1, 1))
    angle = rng.uniform(0.0, 2.0 * np.pi)
    ramp = np.cos(angle) * xx + np.sin(angle) * yy
    gain = 0.8 + 0.3 * (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    cy, cx = rng.uniform(0.2, 0.8, size=2)
    radius = rng.uniform(0.1, 0.25)
    blob = ((yy - cy) ** 2 + (xx - cx) ** 2) < radius**2
    gain = np.where(blob, gain * 0.6, gain)
    img = base[None, None, :] * gain[:, :, None]
    img = img + rng.normal(0.0, 20.0, size=(size, size, 3))
    frame: npt.NDArray[np.uint8] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return frame

# Fault injection for testing applications (see memryx.faults and docs/testing-your-app.md).
from .clock import VirtualClock  # noqa: E402
from .faults import (  # noqa: E402
    DeviceFault,
    FaultNotReachedWarning,
    Faults,
    FaultScriptError,
    FaultyDevice,
    Hang,
    Jitter,
    Stall,
    Throttle,
    fault,
)

__all__ += ["VirtualClock"]
__all__ += ["DeviceFault", "FaultNotReachedWarning", "FaultScriptError", "Faults",
            "FaultyDevice", "Hang", "Jitter", "Stall", "Throttle", "fault"]
