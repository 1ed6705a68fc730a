"""NeuralCompiler: ONNX models in, a DFP out."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import memryx as mx
from memryx import compiler as compiler_mod
from memryx import testing


# -- helpers ----------------------------------------------------------------------------
def session(model: onnx.ModelProto | bytes) -> Any:
    import onnxruntime as ort

    blob = model if isinstance(model, bytes) else model.SerializeToString()
    return ort.InferenceSession(blob, providers=["CPUExecutionProvider"])


def run(model: onnx.ModelProto | bytes, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return [np.asarray(o) for o in session(model).run(None, feeds)]


def make_model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto],
               outputs: list[onnx.ValueInfoProto], name: str = "g",
               extra_opsets: tuple[tuple[str, int], ...] = ()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs)
    opsets = [helper.make_opsetid("", testing.OPSET)]
    opsets += [helper.make_opsetid(d, v) for d, v in extra_opsets]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=testing.IR_VERSION)
    onnx.checker.check_model(model)
    return model


def vi(name: str, shape: list[Any], elem: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


@pytest.fixture(scope="module")
def prep_model() -> onnx.ModelProto:
    """frame (NHWC uint8) -> Cast/Sub/Div/Transpose -> image -> ... -> logits -> Softmax -> probs"""
    return testing.mobilenet_like(preprocessing=True)


@pytest.fixture(scope="module")
def frames_u8() -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [rng.integers(0, 256, (1, 64, 64, 3), dtype=np.uint8) for _ in range(3)]


def chain(dfp: mx.Dfp, frame: np.ndarray, model_idx: int = 0) -> np.ndarray:
    """pre -> accelerated graph -> post, all with onnxruntime."""
    info = dfp.model(model_idx)
    assert info.pre_model is not None
    assert info.post_model is not None
    (image,) = run(info.pre_model, {"frame": frame})
    (logits,) = run(info.graph, {"image": image})
    (probs,) = run(info.post_model, {"logits": logits})
    return probs


# -- sources ----------------------------------------------------------------------------
def test_every_source_type_gives_the_same_dfp(tmp_path: Path) -> None:
    model = testing.mlp_model()
    path = tmp_path / "mlp.onnx"
    onnx.save(model, str(path))
    dfps = [mx.NeuralCompiler(models=src).run()
            for src in (model, testing.model_bytes(model), path, str(path), [model], (model,))]
    assert all(isinstance(d, mx.Dfp) for d in dfps)
    assert all(d == dfps[0] for d in dfps[1:])
    d = dfps[0]
    assert d.num_models == 1
    assert d.num_chips == 4
    assert d.compiler_version == mx.__version__
    assert d.model(0).name == "mlp"
    assert d.input_ports == [mx.PortInfo(0, 0, "x", (1, 16), np.dtype(np.float32))]
    assert d.output_ports == [mx.PortInfo(0, 0, "logits", (1, 10), np.dtype(np.float32))]


def test_compiled_graph_computes_like_the_model() -> None:
    model = testing.mlp_model()
    dfp = mx.NeuralCompiler(models=model).run()
    x = np.random.default_rng(0).standard_normal((1, 16)).astype(np.float32)
    assert np.allclose(run(dfp.model(0).graph, {"x": x})[0], run(model, {"x": x})[0])


def test_dfp_fname_writes_the_dfp(tmp_path: Path) -> None:
    target = tmp_path / "out" / "mlp.dfp"
    target.parent.mkdir()
    dfp = mx.NeuralCompiler(models=testing.mlp_model(), dfp_fname=str(target)).run()
    assert mx.Dfp(target) == dfp
    assert sorted(p.name for p in target.parent.iterdir()) == ["mlp.dfp"]  # nothing cropped


def test_no_dfp_fname_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    mx.NeuralCompiler(models=testing.mobilenet_like(preprocessing=True), inputs=["image"],
                      outputs=["logits"]).run()
    assert list(tmp_path.iterdir()) == []


def test_num_chips_is_recorded() -> None:
    for chips in (1, 2, 16):
        dfp = mx.NeuralCompiler(models=testing.identity_model(), num_chips=chips).run()
        assert dfp.num_chips == chips
        assert mx.Dfp(dfp.to_bytes()).num_chips == chips


def test_caller_model_is_not_modified() -> None:
    shape: tuple[Any, ...] = ("N", 8)  # a symbolic batch dimension
    model = testing.identity_model(shape)
    before = model.SerializeToString()
    mx.NeuralCompiler(models=model).run()
    assert model.SerializeToString() == before


# -- several models ---------------------------------------------------------------------
def test_two_models() -> None:
    dfp = mx.NeuralCompiler(models=[testing.add_model(), testing.split_model()]).run()
    f32 = np.dtype(np.float32)
    assert [m.name for m in dfp.models] == ["add", "split"]
    assert dfp.input_ports == [mx.PortInfo(0, 0, "a", (1, 8), f32),
                               mx.PortInfo(1, 0, "b", (1, 8), f32),
                               mx.PortInfo(2, 1, "x", (1, 8), f32)]
    assert dfp.output_ports == [mx.PortInfo(0, 0, "sum", (1, 8), f32),
                                mx.PortInfo(1, 1, "double", (1, 8), f32),
                                mx.PortInfo(2, 1, "neg", (1, 8), f32)]


def test_three_models_in_list_order(three_model_dfp: mx.Dfp) -> None:
    d = three_model_dfp
    assert [m.name for m in d.models] == ["mlp", "add", "split"]
    assert [(p.port, p.model_idx, p.layer) for p in d.input_ports] == [
        (0, 0, "x"), (1, 1, "a"), (2, 1, "b"), (3, 2, "x")]
    assert [(p.port, p.model_idx, p.layer) for p in d.output_ports] == [
        (0, 0, "logits"), (1, 1, "sum"), (2, 2, "double"), (3, 2, "neg")]
    assert [len(m.inputs) for m in d.models] == [1, 2, 1]
    assert [len(m.outputs) for m in d.models] == [1, 1, 2]
    # The order of the list is the model order.
    rev = mx.NeuralCompiler(
        models=[testing.split_model(), testing.add_model(), testing.mlp_model()]).run()
    assert [m.name for m in rev.models] == ["split", "add", "mlp"]
    assert [(p.port, p.model_idx, p.layer) for p in rev.input_ports] == [
        (0, 0, "x"), (1, 1, "a"), (2, 1, "b"), (3, 2, "x")]
    # Each graph is its own model.
    a = np.ones((1, 8), np.float32)
    assert np.array_equal(run(d.model(1).graph, {"a": a, "b": a})[0], 2 * a)
    double, neg = run(d.model(2).graph, {"x": a})
    assert np.array_equal(double, 2 * a)
    assert np.array_equal(neg, -a)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.uint8, np.int8, np.int32,
                                   np.int64, np.bool_])
def test_port_dtypes(dtype: Any) -> None:
    dfp = mx.NeuralCompiler(models=testing.identity_model((1, 2, 3), dtype)).run()
    (inp,), (out,) = dfp.input_ports, dfp.output_ports
    assert inp.dtype == out.dtype == np.dtype(dtype)
    assert inp.shape == out.shape == (1, 2, 3)


def test_multi_input_and_multi_output_shapes() -> None:
    dfp = mx.NeuralCompiler(models=[testing.add_model((1, 3, 4, 5), np.int32),
                                    testing.split_model((2, 7))]).run()
    assert dfp.input_shapes == [(1, 3, 4, 5), (1, 3, 4, 5), (2, 7)]
    assert dfp.output_shapes == [(1, 3, 4, 5), (2, 7), (2, 7)]
    assert [p.dtype for p in dfp.input_ports] == [np.dtype(np.int32)] * 2 + [
        np.dtype(np.float32)]


def test_output_shape_comes_from_the_graph_not_the_declaration() -> None:
    """A model declaring a wrong/unknown output shape still gets the real shape."""
    model = make_model([helper.make_node("Transpose", ["x"], ["y"], perm=[0, 2, 1])],
                       [vi("x", [1, 3, 5])], [vi("y", ["a", "b", "c"])])
    dfp = mx.NeuralCompiler(models=model).run()
    assert dfp.output_shapes == [(1, 5, 3)]


# -- batch dimension --------------------------------------------------------------------
@pytest.mark.parametrize("batch", ["N", "batch", None])
def test_dynamic_batch_compiles_with_batch_one(batch: Any) -> None:
    dfp = mx.NeuralCompiler(models=testing.add_model((batch, 3, 4))).run()
    assert dfp.input_shapes == [(1, 3, 4), (1, 3, 4)]
    assert dfp.output_shapes == [(1, 3, 4)]
    graph = onnx.load_model_from_string(dfp.model(0).graph)
    for inp in graph.graph.input:
        assert inp.type.tensor_type.shape.dim[0].dim_value == 1


@pytest.mark.parametrize(("shape", "axis", "label"), [
    ((1, "C"), 1, "C"),
    (("N", 3, "H", 8), 2, "H"),
    ((1, 3, 8, None), 3, "?"),
])
def test_other_dynamic_dims_are_refused(shape: tuple[Any, ...], axis: int, label: str) -> None:
    with pytest.raises(mx.CompilerError) as info:
        mx.NeuralCompiler(models=testing.identity_model(shape)).run()
    msg = str(info.value)
    for fragment in ("'x'", f"axis {axis}", repr(label)):
        assert fragment in msg, msg


def test_dynamic_dim_names_the_input_of_a_multi_input_model() -> None:
    model = make_model([helper.make_node("Add", ["left", "right"], ["out"])],
                       [vi("left", [1, 4]), vi("right", [1, "W"])], [vi("out", [1, 4])])
    with pytest.raises(mx.CompilerError, match=r"'right'.*'W' at axis 1"):
        mx.NeuralCompiler(models=model).run()


# -- cropping ---------------------------------------------------------------------------
def test_crop_keeps_pre_and_post(tmp_path: Path, prep_model: onnx.ModelProto,
                                 frames_u8: list[np.ndarray]) -> None:
    target = tmp_path / "mobile.dfp"
    nc = mx.NeuralCompiler(models=prep_model, dfp_fname=target, inputs=["image"],
                           outputs=["logits"])
    assert nc.pre_models == []
    assert nc.post_models == []
    dfp = nc.run()

    (inp,), (out,) = dfp.input_ports, dfp.output_ports
    assert (inp.layer, inp.shape, inp.dtype) == ("image", (1, 3, 64, 64), np.dtype(np.float32))
    assert (out.layer, out.shape, out.dtype) == ("logits", (1, 10), np.dtype(np.float32))

    info = dfp.model(0)
    pre, post = nc.pre_models[0], nc.post_models[0]
    assert isinstance(pre, onnx.ModelProto)
    assert isinstance(post, onnx.ModelProto)
    assert info.pre_model == pre.SerializeToString()
    assert info.post_model == post.SerializeToString()
    core = onnx.load_model_from_string(info.graph)
    assert [i.name for i in core.graph.input] == ["image"]
    assert [o.name for o in core.graph.output] == ["logits"]
    assert "Softmax" not in {n.op_type for n in core.graph.node}
    assert {"Cast", "Transpose"}.isdisjoint(n.op_type for n in core.graph.node)

    # Files beside the DFP, and the DFP on disk keeps pre and post too.
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "mobile.dfp", "model_0_mobilenet_like_post.onnx", "model_0_mobilenet_like_pre.onnx"]
    assert onnx.load(str(tmp_path / "model_0_mobilenet_like_pre.onnx")) == pre
    assert onnx.load(str(tmp_path / "model_0_mobilenet_like_post.onnx")) == post
    assert nc.cropped_files == [tmp_path / "model_0_mobilenet_like_pre.onnx",
                                tmp_path / "model_0_mobilenet_like_post.onnx"]
    on_disk = mx.Dfp(target)
    assert on_disk == dfp
    assert on_disk.model(0).pre_model == info.pre_model

    # pre -> core -> post equals the full model.
    for frame in frames_u8:
        (full,) = run(prep_model, {"frame": frame})
        assert np.allclose(chain(dfp, frame), full, atol=1e-6)
        # The separate ModelProtos give the same result as the DFP sections.
        (image,) = run(pre, {"frame": frame})
        (logits,) = run(info.graph, {"image": image})
        assert np.allclose(run(post, {"logits": logits})[0], full, atol=1e-6)


@pytest.mark.parametrize(("inputs", "outputs"), [("image", "logits"), (["image"], "logits"),
                                                 ("image, ", ["logits"])])
def test_crop_names_as_strings(prep_model: onnx.ModelProto, inputs: Any, outputs: Any) -> None:
    dfp = mx.NeuralCompiler(models=prep_model, inputs=inputs, outputs=outputs).run()
    assert [p.layer for p in dfp.input_ports] == ["image"]
    assert [p.layer for p in dfp.output_ports] == ["logits"]


def test_autocrop_finds_the_same_points(prep_model: onnx.ModelProto,
                                        frames_u8: list[np.ndarray]) -> None:
    explicit = mx.NeuralCompiler(models=prep_model, inputs=["image"], outputs=["logits"]).run()
    nc = mx.NeuralCompiler(models=prep_model, autocrop=True)
    auto = nc.run()
    assert auto == explicit
    assert nc.pre_models[0] is not None
    assert nc.post_models[0] is not None
    assert np.allclose(chain(auto, frames_u8[0]), run(prep_model, {"frame": frames_u8[0]})[0],
                       atol=1e-6)


def test_autocrop_leaves_plain_models_alone() -> None:
    # mobilenet_like() without preprocessing still ends in a Softmax: only post is cut.
    nc = mx.NeuralCompiler(models=testing.mobilenet_like(), autocrop=True)
    dfp = nc.run()
    assert [p.layer for p in dfp.input_ports] == ["image"]
    assert [p.layer for p in dfp.output_ports] == ["logits"]
    assert nc.pre_models == [None]
    assert nc.post_models[0] is not None
    nc = mx.NeuralCompiler(models=testing.mlp_model(), autocrop=True)
    assert nc.run() == mx.NeuralCompiler(models=testing.mlp_model()).run()
    assert nc.pre_models == [None]
    assert nc.post_models == [None]


def test_autocrop_never_crops_everything() -> None:
    """A model made only of cheap layout ops keeps its ops on the accelerator."""
    model = make_model([helper.make_node("Transpose", ["x"], ["y"], perm=[1, 0])],
                       [vi("x", [1, 4])], [vi("y", [4, 1])], name="t")
    nc = mx.NeuralCompiler(models=model, autocrop=True)
    dfp = nc.run()
    assert [p.layer for p in dfp.input_ports] == ["x"]
    assert [p.layer for p in dfp.output_ports] == ["y"]
    assert nc.pre_models == [None]
    assert nc.post_models == [None]


def test_crop_only_one_side(prep_model: onnx.ModelProto) -> None:
    nc = mx.NeuralCompiler(models=prep_model, inputs=["image"])
    dfp = nc.run()
    assert [p.layer for p in dfp.output_ports] == ["probs"]
    assert nc.pre_models[0] is not None
    assert nc.post_models == [None]
    assert dfp.model(0).post_model is None
    nc = mx.NeuralCompiler(models=prep_model, outputs=["logits"])
    dfp = nc.run()
    assert dfp.input_ports[0].layer == "frame"
    assert dfp.input_ports[0].dtype == np.dtype(np.uint8)
    assert nc.pre_models == [None]
    assert nc.post_models[0] is not None


def test_crop_several_models(tmp_path: Path, prep_model: onnx.ModelProto,
                             frames_u8: list[np.ndarray]) -> None:
    target = tmp_path / "multi.dfp"
    nc = mx.NeuralCompiler(models=[testing.add_model(), prep_model, prep_model],
                           dfp_fname=target, inputs=[None, ["image"], "image"],
                           outputs=[None, ["logits"], None])
    dfp = nc.run()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "model_1_mobilenet_like_post.onnx", "model_1_mobilenet_like_pre.onnx",
        "model_2_mobilenet_like_pre.onnx", "multi.dfp"]
    assert nc.pre_models[0] is None
    assert nc.post_models[0] is None
    assert nc.post_models[2] is None
    assert [(p.port, p.model_idx, p.layer) for p in dfp.input_ports] == [
        (0, 0, "a"), (1, 0, "b"), (2, 1, "image"), (3, 2, "image")]
    assert [(p.port, p.model_idx, p.layer) for p in dfp.output_ports] == [
        (0, 0, "sum"), (1, 1, "logits"), (2, 2, "probs")]
    assert np.allclose(chain(dfp, frames_u8[1], model_idx=1),
                       run(prep_model, {"frame": frames_u8[1]})[0], atol=1e-6)


@pytest.mark.parametrize(("inputs", "outputs", "fragment"), [
    (["nope"], ["logits"], "crop point 'nope' is not a tensor"),
    (["image"], ["nope"], "crop point 'nope' is not a tensor"),
    (["image"], ["conv_w_0"], "crop point 'conv_w_0' is not a tensor"),
    (["logits"], ["image"], "also needs tensor(s) ['frame']"),
    (["image", "frame"], ["logits"], "crop input(s) ['frame'] do not feed"),
    ([], ["logits"], "expected tensor names"),
    ("", None, "expected tensor names"),
    ([1], None, "expected tensor names"),
    ([""], None, "expected tensor names"),
])
def test_bad_crop_points(prep_model: onnx.ModelProto, inputs: Any, outputs: Any,
                         fragment: str) -> None:
    with pytest.raises(mx.CompilerError) as info:
        mx.NeuralCompiler(models=prep_model, inputs=inputs, outputs=outputs).run()
    assert fragment in str(info.value)


def test_crop_needing_another_tensor() -> None:
    """The accelerated part may not silently depend on a tensor outside the crop points."""
    model = make_model(
        [helper.make_node("Relu", ["a"], ["ra"]), helper.make_node("Add", ["ra", "b"], ["s"]),
         helper.make_node("Relu", ["s"], ["y"])],
        [vi("a", [1, 4]), vi("b", [1, 4])], [vi("y", [1, 4])])
    with pytest.raises(mx.CompilerError, match=r"also needs tensor\(s\) \['b'\]"):
        mx.NeuralCompiler(models=model, inputs=["ra"]).run()
    dfp = mx.NeuralCompiler(models=model, inputs=["ra", "b"]).run()
    assert [p.layer for p in dfp.input_ports] == ["ra", "b"]


def test_crop_spec_for_several_models_must_match(prep_model: onnx.ModelProto) -> None:
    for spec in (["image"], "image", [["image"]], [None, None, None]):
        with pytest.raises(mx.CompilerError, match="with 2 models"):
            mx.NeuralCompiler(models=[prep_model, prep_model], inputs=spec)


# -- weight capacity --------------------------------------------------------------------
@pytest.fixture(scope="module")
def resnet() -> onnx.ModelProto:
    return testing.resnet50()


def test_resnet50_does_not_fit_two_chips(resnet: onnx.ModelProto) -> None:
    assert testing.count_parameters(resnet) > 2 * compiler_mod.WEIGHTS_PER_CHIP
    with pytest.raises(mx.CompilerError) as info:
        mx.NeuralCompiler(models=resnet, num_chips=2).run()
    msg = str(info.value)
    for fragment in ("25.53M", "21.00M", "num_chips"):
        assert fragment in msg, msg


def test_resnet50_fits_four_chips(resnet: onnx.ModelProto, tmp_path: Path) -> None:
    dfp = mx.NeuralCompiler(models=resnet, num_chips=4, dfp_fname=tmp_path / "r.dfp").run()
    assert dfp.num_chips == 4
    assert dfp.input_shapes == [(1, 3, 224, 224)]
    assert dfp.output_shapes == [(1, 1000)]
    assert mx.Dfp(tmp_path / "r.dfp").model(0).graph == dfp.model(0).graph


def test_capacity_boundary(monkeypatch: pytest.MonkeyPatch) -> None:
    """Exactly at capacity fits; one weight over does not; all models count together."""
    model = testing.mlp_model()
    weights = testing.count_parameters(model)
    monkeypatch.setattr(compiler_mod, "WEIGHTS_PER_CHIP", weights)
    mx.NeuralCompiler(models=model, num_chips=1).run()
    mx.NeuralCompiler(models=[model, model], num_chips=2).run()
    with pytest.raises(mx.CompilerError, match="weight"):
        mx.NeuralCompiler(models=[model, model], num_chips=1).run()
    monkeypatch.setattr(compiler_mod, "WEIGHTS_PER_CHIP", weights - 1)
    with pytest.raises(mx.CompilerError, match="weight"):
        mx.NeuralCompiler(models=model, num_chips=1).run()


def test_cropped_off_weights_do_not_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the accelerated part needs chip memory."""
    model = testing.mobilenet_like(preprocessing=True)
    core_weights = compiler_mod.count_weights(onnx.load_model_from_string(
        mx.NeuralCompiler(models=model, inputs="image").run().model(0).graph))
    assert core_weights < testing.count_parameters(model)  # mean and scale stay on the host
    monkeypatch.setattr(compiler_mod, "WEIGHTS_PER_CHIP", core_weights)
    mx.NeuralCompiler(models=model, inputs="image", num_chips=1).run()
    with pytest.raises(mx.CompilerError, match="weight"):
        mx.NeuralCompiler(models=model, num_chips=1).run()


# -- unsupported graphs -----------------------------------------------------------------
def test_control_flow_is_refused() -> None:
    then_g = helper.make_graph([helper.make_node("Identity", ["x"], ["t"])], "then", [],
                               [vi("t", [1, 4])])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [],
                               [vi("e", [1, 4])])
    model = make_model(
        [helper.make_node("If", ["cond"], ["y"], "the_if", then_branch=then_g,
                          else_branch=else_g)],
        [vi("x", [1, 4]), vi("cond", [], TensorProto.BOOL)], [vi("y", [1, 4])])
    with pytest.raises(mx.CompilerError, match=r"operator If \(node 'the_if'\) is control flow"):
        mx.NeuralCompiler(models=model).run()


def test_custom_domain_op_is_refused() -> None:
    model = make_model([helper.make_node("MyOp", ["x"], ["y"], "custom", domain="com.example")],
                       [vi("x", [1, 4])], [vi("y", [1, 4])],
                       extra_opsets=(("com.example", 1),))
    with pytest.raises(mx.CompilerError, match=r"com\.example\.MyOp.*not a standard ONNX"):
        mx.NeuralCompiler(models=model).run()


def test_bad_model_in_a_list_is_named_by_index() -> None:
    model = make_model([helper.make_node("MyOp", ["x"], ["y"], domain="com.example")],
                       [vi("x", [1, 4])], [vi("y", [1, 4])],
                       extra_opsets=(("com.example", 1),))
    with pytest.raises(mx.CompilerError, match=r"^model 1 "):
        mx.NeuralCompiler(models=[testing.mlp_model(), model]).run()


def test_huge_rank_is_a_compiler_error() -> None:
    with pytest.raises(mx.CompilerError, match="at most 8 dimensions"):
        mx.NeuralCompiler(models=testing.identity_model((1,) * 9)).run()


def test_unsupported_dtype_is_a_compiler_error() -> None:
    model = make_model([helper.make_node("Identity", ["x"], ["y"])],
                       [vi("x", [1, 4], TensorProto.STRING)],
                       [vi("y", [1, 4], TensorProto.STRING)])
    with pytest.raises(mx.CompilerError, match="unsupported dtype"):
        mx.NeuralCompiler(models=model).run()


# -- not ONNX ---------------------------------------------------------------------------
class Module:
    """Looks like a framework model; is not ONNX."""


@pytest.mark.parametrize("source", [object(), Module(), 42, None, {"model": 1},
                                    np.zeros(4, np.float32)])
def test_non_onnx_objects(source: Any) -> None:
    with pytest.raises(mx.CompilerError) as info:
        mx.NeuralCompiler(models=source).run()
    msg = str(info.value)
    assert "unsupported model type" in msg
    assert type(source).__name__ in msg
    assert "ONNX" in msg


def test_missing_path_and_directory(tmp_path: Path) -> None:
    for source in (tmp_path / "missing.onnx", str(tmp_path / "missing.onnx")):
        with pytest.raises(mx.CompilerError, match=r"no ONNX file at"):
            mx.NeuralCompiler(models=source).run()
    with pytest.raises(mx.CompilerError, match=r"no model file or SavedModel at"):
        mx.NeuralCompiler(models=tmp_path / "missing.h5").run()
    with pytest.raises(mx.CompilerError, match=r"is a directory but not a TensorFlow SavedModel"):
        mx.NeuralCompiler(models=tmp_path).run()


@pytest.mark.parametrize("blob", [b"garbage \x00\xff bytes", b"\xff" * 64, b"",
                                  b"MXDFP\x00\r\n"])
def test_garbage_bytes(blob: bytes, tmp_path: Path) -> None:
    with pytest.raises(mx.CompilerError, match=r"not (an|a valid) ONNX model"):
        mx.NeuralCompiler(models=blob).run()
    path = tmp_path / "bad.onnx"
    path.write_bytes(blob)
    with pytest.raises(mx.CompilerError, match=r"(cannot read ONNX model|not a valid ONNX)"):
        mx.NeuralCompiler(models=path).run()


def test_a_dfp_is_not_a_model(tmp_path: Path, add_dfp: mx.Dfp) -> None:
    with pytest.raises(mx.CompilerError, match="unsupported model type"):
        mx.NeuralCompiler(models=add_dfp).run()  # type: ignore[arg-type]
    with pytest.raises(mx.CompilerError):
        mx.NeuralCompiler(models=add_dfp.write(tmp_path / "add.dfp")).run()


def test_empty_model_list() -> None:
    with pytest.raises(mx.CompilerError, match="at least one model"):
        mx.NeuralCompiler(models=[])


# -- options ----------------------------------------------------------------------------
@pytest.mark.parametrize("num_chips", [0, -1, 17, 100, True, 2.0, "four", "0", "17", None])
def test_num_chips_out_of_range(num_chips: Any) -> None:
    with pytest.raises(mx.CompilerError, match=r"num_chips must be an integer in 1\.\.16"):
        mx.NeuralCompiler(models=testing.identity_model(), num_chips=num_chips)


def test_verbose_logs_and_prints_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    with caplog.at_level(logging.DEBUG, logger="memryx.compiler"):
        mx.NeuralCompiler(models=testing.mobilenet_like(preprocessing=True), verbose=1,
                          dfp_fname=tmp_path / "v.dfp", autocrop=True).run()
    messages = [r.getMessage() for r in caplog.records if r.name == "memryx.compiler"]
    assert any("cropped" in m for m in messages), messages
    assert any("weights" in m for m in messages), messages
    assert any("v.dfp" in m for m in messages), messages
    assert all(r.levelno == logging.INFO for r in caplog.records if r.name == "memryx.compiler")
    out, err = capsys.readouterr()
    assert out == ""
    assert err == ""


def test_quiet_by_default(caplog: pytest.LogCaptureFixture,
                          capsys: pytest.CaptureFixture[str]) -> None:
    with caplog.at_level(logging.DEBUG, logger="memryx.compiler"):
        mx.NeuralCompiler(models=testing.mlp_model()).run()
    assert [r for r in caplog.records if r.name.startswith("memryx")] == []
    assert capsys.readouterr() == ("", "")


def test_verbose_prints_nothing_at_the_fd_level(tmp_path: Path,
                                                capfd: pytest.CaptureFixture[str]) -> None:
    """Not even onnxruntime's or onnx's native code writes to stdout/stderr."""
    mx.NeuralCompiler(models=testing.mobilenet_like(preprocessing=True), verbose=1,
                      dfp_fname=tmp_path / "v.dfp", autocrop=True).run()
    assert capfd.readouterr() == ("", "")


def test_run_twice_resets_pre_and_post(prep_model: onnx.ModelProto) -> None:
    nc = mx.NeuralCompiler(models=prep_model, inputs="image", outputs="logits")
    first = nc.run()
    second = nc.run()
    assert first == second
    assert len(nc.pre_models) == len(nc.post_models) == 1


# -- the vendor SDK's keywords ----------------------------------------------------------------
def test_sdk_keywords_are_accepted_and_validated(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    model = testing.identity_model()
    nc = mx.NeuralCompiler(models=model, num_chips="2", chip_gen="mx3", effort="hard",
                           no_sim_dfp=True, input_format="bf16", output_format="FP32")
    assert (nc.num_chips, nc.chip_gen, nc.effort, nc.no_sim_dfp) == (2, "mx3", "hard", True)
    assert (nc.input_format, nc.output_format) == ("BF16", "FP32")
    assert nc.run().num_chips == 2
    for gen in (3, "3", "3.1", 3.1, "MX3"):
        assert mx.NeuralCompiler(models=model, chip_gen=gen).chip_gen == "mx3"
    bad: list[tuple[dict[str, Any], str]] = [
        ({"chip_gen": "mx4"}, "chip_gen: this compiler targets the MX3 only"),
        ({"chip_gen": True}, "chip_gen"),
        ({"effort": "extreme"}, "effort must be one of 'lazy', 'normal', 'hard'"),
        ({"effort": 2}, "effort must be one of"),
        ({"no_sim_dfp": "yes"}, "no_sim_dfp must be True or False"),
        ({"input_format": "RGB"}, "input_format must be one of 'FP32'"),
        ({"output_format": None}, "output_format must be one of"),
        ({"num_chips": " 3x"}, "num_chips must be an integer"),
        ({"dfp_fname": 5}, "dfp_fname must be a path"),
    ]
    for kwargs, fragment in bad:
        with pytest.raises(mx.CompilerError, match=re_escape(fragment)):
            mx.NeuralCompiler(models=model, **kwargs)


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


@pytest.mark.parametrize(("given", "written"), [
    ("net", "net.dfp"), ("net.dfp", "net.dfp"), ("net.v2", "net.v2.dfp"), ("NET.DFP", "NET.DFP"),
])
def test_dfp_fname_gets_dfp_appended(tmp_path: Path, given: str, written: str) -> None:
    nc = mx.NeuralCompiler(models=testing.identity_model(), dfp_fname=tmp_path / given)
    nc.run()
    assert nc.dfp_fname == tmp_path / written
    assert [p.name for p in tmp_path.iterdir()] == [written]


def test_unknown_keywords_warn_and_are_ignored() -> None:
    with pytest.warns(UserWarning, match=r"keyword 'frobnicate' ignored \(unknown\)"):
        nc = mx.NeuralCompiler(models=testing.identity_model(), frobnicate=1)
    nc.run()
    with pytest.warns(UserWarning, match=r"keyword 'show_optimization' ignored \(a vendor"):
        mx.NeuralCompiler(models=testing.identity_model(), show_optimization=True)


# -- ONNX with its weights in a separate file (what torch.onnx.export writes) -----------------
def test_external_weight_data_next_to_the_model(tmp_path: Path) -> None:
    model = testing.mlp_model()
    path = tmp_path / "mlp.onnx"
    to_save = onnx.ModelProto()
    to_save.CopyFrom(model)  # saving with external data rewrites the proto it is given
    onnx.save_model(to_save, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="mlp.onnx.data", size_threshold=0)
    assert (tmp_path / "mlp.onnx.data").stat().st_size > path.stat().st_size
    dfp = mx.NeuralCompiler(models=path).run()
    x = np.random.default_rng(0).standard_normal(dfp.input_ports[0].shape).astype(np.float32)
    name = dfp.input_ports[0].layer
    np.testing.assert_allclose(run(dfp.model(0).graph, {name: x})[0], run(model, {name: x})[0],
                               rtol=1e-6)
    (tmp_path / "mlp.onnx.data").unlink()
    with pytest.raises(mx.CompilerError, match=r"mlp\.onnx\.data.*weights are in a separate file"):
        mx.NeuralCompiler(models=path).run()
