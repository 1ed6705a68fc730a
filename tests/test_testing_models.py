"""Tests for the ONNX model builders in :mod:`memryx.testing`."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import onnx
import onnx.shape_inference
import onnx.utils
import onnxruntime as ort
import pytest

from memryx import testing

Feeds = dict[str, np.ndarray]

# Reference parameter counts of the real networks.
MOBILENET_V1_PARAMS = 4_231_976  # Keras MobileNet(alpha=1.0), trainable
RESNET50_PARAMS = 25_557_032  # torchvision resnet50
YOLOV7_TINY_PARAMS = 6_219_709  # WongKinYiu/yolov7 yolov7-tiny, 80 classes, fused


def _shape(vi: onnx.ValueInfoProto) -> list[int]:
    return [d.dim_value for d in vi.type.tensor_type.shape.dim]


def _random_feeds(model: onnx.ModelProto, seed: int = 0) -> Feeds:
    rng = np.random.default_rng(seed)
    feeds: Feeds = {}
    for vi in model.graph.input:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        shape = _shape(vi)
        if np.issubdtype(dtype, np.floating):
            feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
        else:
            info = np.iinfo(dtype)
            lo, hi = max(info.min, -100), min(info.max, 100)
            feeds[vi.name] = rng.integers(lo, hi, size=shape, endpoint=True).astype(dtype)
    return feeds


def _run(model: onnx.ModelProto, feeds: Feeds) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(testing.model_bytes(model), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds), strict=True))


def _check_and_run(
    model: onnx.ModelProto, expected: Mapping[str, tuple[int, ...]]
) -> tuple[Feeds, dict[str, np.ndarray]]:
    """check_model(full_check), opset/IR version, run on random input, shapes, finiteness."""
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 8
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    assert [o.name for o in model.graph.output] == list(expected)
    feeds = _random_feeds(model)
    outputs = _run(model, feeds)
    for name, shape in expected.items():
        assert outputs[name].shape == shape, name
        assert np.all(np.isfinite(outputs[name])), name
    return feeds, outputs


def _inferred_output_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    return {o.name: _shape(o) for o in inferred.graph.output}


@pytest.fixture(scope="module")
def resnet() -> onnx.ModelProto:
    # The architecture ends in GlobalAveragePool, so a 64x64 input runs fast.
    return testing.resnet50(input_size=64)


# --------------------------------------------------------------------- small


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int32, np.uint8])
def test_identity_model(dtype: type[np.generic]) -> None:
    model = testing.identity_model(dtype=dtype)
    assert [i.name for i in model.graph.input] == ["x"]
    feeds, out = _check_and_run(model, {"y": (1, 16)})
    assert out["y"].dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out["y"], feeds["x"])


def test_identity_model_custom_shape() -> None:
    _check_and_run(testing.identity_model((2, 3, 4)), {"y": (2, 3, 4)})


@pytest.mark.parametrize("dtype", [np.float32, np.int64])
def test_add_model(dtype: type[np.generic]) -> None:
    model = testing.add_model(shape=(2, 8), dtype=dtype)
    assert [i.name for i in model.graph.input] == ["a", "b"]
    feeds, out = _check_and_run(model, {"sum": (2, 8)})
    assert out["sum"].dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out["sum"], feeds["a"] + feeds["b"])


def test_split_model() -> None:
    feeds, out = _check_and_run(testing.split_model(), {"double": (1, 8), "neg": (1, 8)})
    np.testing.assert_array_equal(out["double"], feeds["x"] * 2)
    np.testing.assert_array_equal(out["neg"], -feeds["x"])


def test_mlp_model() -> None:
    model = testing.mlp_model(in_features=16, hidden=32, out_features=10)
    _, out = _check_and_run(model, {"logits": (1, 10)})
    assert np.ptp(out["logits"]) > 0
    assert testing.count_parameters(model) == 16 * 32 + 32 + 32 * 10 + 10
    _check_and_run(testing.mlp_model(4, 5, 3), {"logits": (1, 3)})


# ------------------------------------------------------------ mobilenet_like


def test_mobilenet_like_softmax() -> None:
    model = testing.mobilenet_like()
    assert [i.name for i in model.graph.input] == ["image"]
    assert _shape(model.graph.input[0]) == [1, 3, 64, 64]
    _, out = _check_and_run(model, {"probs": (1, 10)})
    probs = out["probs"]
    assert np.all(probs >= 0)
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, rtol=1e-5)
    assert np.ptp(probs) > 0


def test_mobilenet_like_logits() -> None:
    model = testing.mobilenet_like(input_size=32, num_classes=5, width=4, softmax=False)
    _, out = _check_and_run(model, {"logits": (1, 5)})
    assert np.ptp(out["logits"]) > 0


def test_mobilenet_like_softmax_matches_logits() -> None:
    feeds = _random_feeds(testing.mobilenet_like())
    probs = _run(testing.mobilenet_like(), feeds)["probs"]
    logits = _run(testing.mobilenet_like(softmax=False), feeds)["logits"]
    expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-7)


def test_mobilenet_like_preprocessing_and_crop() -> None:
    model = testing.mobilenet_like(preprocessing=True)
    frame_vi = model.graph.input[0]
    assert frame_vi.name == "frame"
    assert frame_vi.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert _shape(frame_vi) == [1, 64, 64, 3]
    feeds, out = _check_and_run(model, {"probs": (1, 10)})
    np.testing.assert_allclose(out["probs"].sum(), 1.0, rtol=1e-5)

    # Crop away the pre- and post-processing; the core must match the full model.
    core = onnx.utils.Extractor(model).extract_model(["image"], ["logits"])
    onnx.checker.check_model(core, full_check=True)
    assert [i.name for i in core.graph.input] == ["image"]
    assert {n.op_type for n in core.graph.node}.isdisjoint({"Cast", "Sub", "Div", "Softmax"})
    image = ((feeds["frame"].astype(np.float32) - 127.5) / 127.5).transpose(0, 3, 1, 2)
    logits = _run(core, {"image": image})["logits"]
    assert logits.shape == (1, 10)
    np.testing.assert_allclose(
        np.exp(logits) / np.exp(logits).sum(), out["probs"], rtol=1e-4, atol=1e-6
    )
    # Same seed, same weights: the unprocessed model's core gives the same logits.
    plain = testing.mobilenet_like(softmax=False)
    np.testing.assert_allclose(_run(plain, {"image": image})["logits"], logits, rtol=1e-5)


# ---------------------------------------------------------------- big models


def test_mobilenet_v1() -> None:
    model = testing.mobilenet_v1()
    assert _shape(model.graph.input[0]) == [1, 3, 224, 224]
    dw = [n for n in model.graph.node if any(a.name == "group" and a.i > 1 for a in n.attribute)]
    assert len(dw) == 13
    _, out = _check_and_run(model, {"logits": (1, 1000)})
    assert np.ptp(out["logits"]) > 0
    params = testing.count_parameters(model)
    assert abs(params - MOBILENET_V1_PARAMS) / MOBILENET_V1_PARAMS < 0.10


def test_mobilenet_v1_small() -> None:
    model = testing.mobilenet_v1(input_size=96, num_classes=10, alpha=0.25)
    _check_and_run(model, {"logits": (1, 10)})
    assert testing.count_parameters(model) < testing.count_parameters(testing.mobilenet_v1())


def test_resnet50(resnet: onnx.ModelProto) -> None:
    params = testing.count_parameters(resnet)
    assert abs(params - RESNET50_PARAMS) / RESNET50_PARAMS < 0.10
    adds = sum(n.op_type == "Add" for n in resnet.graph.node)
    assert adds == 3 + 4 + 6 + 3
    _, out = _check_and_run(resnet, {"logits": (1, 1000)})
    assert np.ptp(out["logits"]) > 0


def test_resnet50_shape_inference_at_224() -> None:
    # Only the input shape depends on input_size; check the default via shape inference.
    model = testing.resnet50(num_classes=7)
    assert _shape(model.graph.input[0]) == [1, 3, 224, 224]
    assert _inferred_output_shapes(model) == {"logits": [1, 7]}


@pytest.mark.parametrize("input_size", [416, 160])
def test_yolov7_tiny(input_size: int) -> None:
    model = testing.yolov7_tiny(input_size=input_size)
    s = input_size
    expected = {"p3": (1, 255, s // 8, s // 8), "p4": (1, 255, s // 16, s // 16)}
    expected["p5"] = (1, 255, s // 32, s // 32)
    assert _inferred_output_shapes(model) == {k: list(v) for k, v in expected.items()}
    _, out = _check_and_run(model, expected)
    assert all(np.ptp(v) > 0 for v in out.values())
    ops = {n.op_type for n in model.graph.node}
    assert {"LeakyRelu", "MaxPool", "Resize", "Concat"} <= ops
    params = testing.count_parameters(model)
    assert abs(params - YOLOV7_TINY_PARAMS) / YOLOV7_TINY_PARAMS < 0.10


def test_yolov7_tiny_num_classes() -> None:
    model = testing.yolov7_tiny(input_size=64, num_classes=3)
    _check_and_run(model, {"p3": (1, 24, 8, 8), "p4": (1, 24, 4, 4), "p5": (1, 24, 2, 2)})


# --------------------------------------------------------------- determinism

Builder = Callable[..., onnx.ModelProto]

SEEDED: list[tuple[Builder, dict[str, object]]] = [
    (testing.mlp_model, {}),
    (testing.mobilenet_like, {}),
    (testing.mobilenet_like, {"preprocessing": True, "softmax": False}),
    (testing.mobilenet_v1, {"alpha": 0.5}),
    (testing.yolov7_tiny, {"input_size": 64}),
]


@pytest.mark.parametrize(("builder", "kwargs"), SEEDED)
def test_deterministic(builder: Builder, kwargs: dict[str, object]) -> None:
    a = testing.model_bytes(builder(**kwargs))
    assert a == testing.model_bytes(builder(**kwargs))
    assert a == testing.model_bytes(builder(seed=0, **kwargs))
    assert a != testing.model_bytes(builder(seed=1, **kwargs))


def test_unseeded_builders_deterministic() -> None:
    for builder in (testing.identity_model, testing.add_model, testing.split_model):
        assert testing.model_bytes(builder()) == testing.model_bytes(builder())


def test_resnet50_deterministic(resnet: onnx.ModelProto) -> None:
    assert testing.model_bytes(testing.resnet50(input_size=64)) == testing.model_bytes(resnet)


# -------------------------------------------------------------------- misc


def test_count_parameters_and_model_bytes() -> None:
    model = testing.add_model()
    assert testing.count_parameters(model) == 0
    assert testing.count_parameters(testing.split_model()) == 1
    data = testing.model_bytes(model)
    assert isinstance(data, bytes)
    assert onnx.load_model_from_string(data) == model


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: testing.yolov7_tiny(input_size=100), "divisible by 32"),
        (lambda: testing.mobilenet_v1(alpha=0.0), "alpha"),
        (lambda: testing.mlp_model(hidden=0), "hidden"),
        (lambda: testing.mobilenet_like(width=0), "width"),
    ],
)
def test_invalid_arguments(call: Callable[[], onnx.ModelProto], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()
