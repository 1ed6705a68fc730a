"""Cutting an ONNX graph into pre-processing, accelerated part and post-processing."""

from __future__ import annotations

import onnx

from ._exceptions import CompilerError

__all__ = ["autocrop_points", "extract", "graph_inputs"]


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


_PRE_OPS = frozenset({"Cast", "Sub", "Div", "Mul", "Add", "Transpose", "Reshape", "Squeeze",
                      "Unsqueeze"})
_POST_OPS = frozenset({"Softmax", "LogSoftmax", "Sigmoid", "Reshape", "Flatten", "Transpose",
                       "Squeeze", "Unsqueeze", "ArgMax"})


def _constant_names(model: onnx.ModelProto) -> set[str]:
    names = {i.name for i in model.graph.initializer}
    names.update(o for n in model.graph.node if n.op_type == "Constant" for o in n.output)
    return names


def autocrop_points(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """Find where the accelerated part begins and ends.

    Leading chains of cheap element-wise / layout ops (Cast, Sub, Div,
    Transpose, ...) on each input become pre-processing; trailing Softmax,
    Sigmoid, Flatten, Reshape, ... on each output become post-processing.
    """
    consts = _constant_names(model)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    producer: dict[str, onnx.NodeProto] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
        for name in node.output:
            producer[name] = node
    outputs = {o.name for o in model.graph.output}

    starts = []
    for vi in graph_inputs(model):
        name = vi.name
        while True:
            users = consumers.get(name, [])
            if len(users) != 1 or name in outputs:
                break
            node = users[0]
            dynamic = [i for i in node.input if i and i not in consts]
            if node.op_type not in _PRE_OPS or dynamic != [name] or len(node.output) != 1:
                break
            if node.output[0] in outputs:
                break  # keep the last op for the accelerator: never crop the whole graph
            name = node.output[0]
        starts.append(name)

    ends = []
    for out in model.graph.output:
        name = out.name
        while name in producer:
            node = producer[name]
            dynamic = [i for i in node.input if i and i not in consts]
            if node.op_type not in _POST_OPS or len(dynamic) != 1 or dynamic[0] in starts:
                break
            name = dynamic[0]
        ends.append(name)
    return list(dict.fromkeys(starts)), list(dict.fromkeys(ends))


def extract(model: onnx.ModelProto, inputs: list[str], outputs: list[str], what: str
             ) -> onnx.ModelProto:
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
        sub = onnx.utils.Extractor(inferred).extract_model(inputs, outputs)
    except Exception as exc:
        raise CompilerError(f"{what}: cannot cut the graph at inputs={inputs} "
                            f"outputs={outputs} ({exc})") from exc
    # The Extractor declares every requested input whether or not the cut needs it and
    # silently drops tensors the cut needs but was not given: check the nodes instead.
    known = {i.name for i in sub.graph.input} | {i.name for i in sub.graph.initializer}
    known.update(o for n in sub.graph.node for o in n.output)
    missing = list(dict.fromkeys(i for n in sub.graph.node for i in n.input
                                 if i and i not in known))
    if missing:
        raise CompilerError(
            f"{what}: the part between inputs={inputs} and outputs={outputs} also needs "
            f"tensor(s) {missing}; add them to the crop points"
        )
    used = {i for n in sub.graph.node for i in n.input} | {o.name for o in sub.graph.output}
    unused = [n for n in inputs if n not in used]
    if unused:
        raise CompilerError(f"{what}: crop input(s) {unused} do not feed outputs={outputs}")
    return sub
