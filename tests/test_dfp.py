"""The DFP container: loading, writing, inspection, and refusing bad files."""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import struct
import tracemalloc
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import memryx as mx
from memryx import dfp as dfp_mod
from memryx import testing
from memryx.dfp import FORMAT_VERSION, MAGIC, MAX_HEADER_BYTES, MAX_PERF_DEPTH

_PREFIX = struct.Struct("<III")
_FIXED = len(MAGIC) + _PREFIX.size  # 20


# -- helpers ----------------------------------------------------------------------------
def split(data: bytes) -> tuple[int, dict[str, Any], bytes]:
    """(version, header, payload) of valid DFP bytes."""
    version, head_len, _ = _PREFIX.unpack_from(data, len(MAGIC))
    header = json.loads(data[_FIXED: _FIXED + head_len])
    return version, header, data[_FIXED + head_len:]


def assemble(header: Any, payload: bytes, *, version: int = FORMAT_VERSION,
             raw_header: bytes | None = None) -> bytes:
    """DFP bytes with a consistent header length and CRC (so only the content is wrong)."""
    head = raw_header if raw_header is not None else json.dumps(header).encode()
    return MAGIC + _PREFIX.pack(version, len(head), zlib.crc32(head)) + head + payload


def load_error(data: bytes) -> str:
    with pytest.raises(mx.DfpError) as info:
        mx.Dfp(data)
    return str(info.value)


@pytest.fixture(scope="module")
def cropped_dfp() -> mx.Dfp:
    """A DFP with three sections per model: graph, pre and post."""
    return mx.NeuralCompiler(models=testing.mobilenet_like(preprocessing=True),
                             inputs=["image"], outputs=["logits"]).run()


@pytest.fixture(scope="module")
def all_dfps(identity_dfp: mx.Dfp, mlp_dfp: mx.Dfp, add_dfp: mx.Dfp, split_dfp: mx.Dfp,
             three_model_dfp: mx.Dfp, cropped_dfp: mx.Dfp) -> list[mx.Dfp]:
    return [identity_dfp, mlp_dfp, add_dfp, split_dfp, three_model_dfp, cropped_dfp]


# -- loading and writing ----------------------------------------------------------------
def test_load_from_str_and_path(tmp_path: Path, three_model_dfp: mx.Dfp) -> None:
    target = tmp_path / "three.dfp"
    assert three_model_dfp.write(target) == target
    assert os.listdir(tmp_path) == ["three.dfp"]  # the temporary file was renamed away
    assert target.read_bytes() == three_model_dfp.to_bytes()
    for source in (target, str(target)):
        loaded = mx.Dfp(source)
        assert loaded == three_model_dfp
        assert loaded.models == three_model_dfp.models


def test_save_is_write(tmp_path: Path, add_dfp: mx.Dfp) -> None:
    out = add_dfp.save(str(tmp_path / "add.dfp"))
    assert isinstance(out, Path)
    assert mx.Dfp(out) == add_dfp
    # Writing over an existing file replaces it.
    add_dfp.write(out)
    assert out.read_bytes() == add_dfp.to_bytes()


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_load_from_buffers(kind: Any, three_model_dfp: mx.Dfp) -> None:
    data = three_model_dfp.to_bytes()
    loaded = mx.Dfp(kind(data))
    assert loaded == three_model_dfp
    assert loaded.to_bytes() == data


def test_dfp_passes_through(add_dfp: mx.Dfp) -> None:
    assert mx.Dfp(add_dfp) == add_dfp


def test_other_source_types_are_a_type_error() -> None:
    with pytest.raises(TypeError, match="path, bytes"):
        mx.Dfp(12345)  # type: ignore[arg-type]


def test_round_trip_is_exact(all_dfps: list[mx.Dfp], tmp_path: Path) -> None:
    for i, dfp in enumerate(all_dfps):
        data = dfp.to_bytes()
        again = mx.Dfp(data)
        assert again == dfp
        assert again.to_bytes() == data
        assert again.models == dfp.models
        assert (again.version, again.num_chips, again.compiler_version) == (
            dfp.version, dfp.num_chips, dfp.compiler_version)
        path = dfp.write(tmp_path / f"{i}.dfp")
        assert mx.Dfp(path).to_bytes() == data


def test_equality(add_dfp: mx.Dfp, split_dfp: mx.Dfp) -> None:
    assert add_dfp == mx.Dfp(add_dfp.to_bytes())
    assert add_dfp != split_dfp
    assert add_dfp != add_dfp.to_bytes()
    with pytest.raises(TypeError):
        hash(add_dfp)


def test_perf_survives_the_round_trip(add_dfp: mx.Dfp) -> None:
    _, header, payload = split(add_dfp.to_bytes())
    # the modeled figures must be numbers in range (checked at load); other keys are free
    header["models"][0]["perf"] = {"fps": 123.5, "latency_ms": 2.5, "note": ["x", 1]}
    loaded = mx.Dfp(assemble(header, payload))
    assert loaded.models[0].perf == {"fps": 123.5, "latency_ms": 2.5, "note": ["x", 1]}
    assert mx.Dfp(loaded.to_bytes()) == loaded


# -- inspection -------------------------------------------------------------------------
def test_inspection_of_three_models(three_model_dfp: mx.Dfp) -> None:
    d = three_model_dfp
    assert d.version == FORMAT_VERSION == 1
    assert d.num_chips == 4
    assert d.compiler_version == mx.__version__
    assert d.num_models == len(d.models) == 3
    assert [m.name for m in d.models] == ["mlp", "add", "split"]
    assert [m.index for m in d.models] == [0, 1, 2]

    f32 = np.dtype(np.float32)
    assert d.input_ports == [
        mx.PortInfo(0, 0, "x", (1, 16), f32),
        mx.PortInfo(1, 1, "a", (1, 8), f32),
        mx.PortInfo(2, 1, "b", (1, 8), f32),
        mx.PortInfo(3, 2, "x", (1, 8), f32),
    ]
    assert d.output_ports == [
        mx.PortInfo(0, 0, "logits", (1, 10), f32),
        mx.PortInfo(1, 1, "sum", (1, 8), f32),
        mx.PortInfo(2, 2, "double", (1, 8), f32),
        mx.PortInfo(3, 2, "neg", (1, 8), f32),
    ]
    assert d.input_shapes == [(1, 16), (1, 8), (1, 8), (1, 8)]
    assert d.output_shapes == [(1, 10), (1, 8), (1, 8), (1, 8)]
    assert d.model(1) is d.models[1]
    assert [p.layer for p in d.model(1).inputs] == ["a", "b"]
    assert [p.layer for p in d.model(2).outputs] == ["double", "neg"]
    for m in d.models:
        assert m.perf is not None
        assert m.perf["fps"] > 0
        assert m.perf["latency_ms"] > 0
        assert m.pre_model is None
        assert m.post_model is None
        onnx.checker.check_model(onnx.load_model_from_string(m.graph))
    assert "add" in repr(d)


def test_graph_section_is_the_executable_model(add_dfp: mx.Dfp) -> None:
    import onnxruntime as ort

    sess = ort.InferenceSession(add_dfp.model(0).graph, providers=["CPUExecutionProvider"])
    a = np.arange(8, dtype=np.float32).reshape(1, 8)
    (out,) = sess.run(None, {"a": a, "b": a})
    assert np.array_equal(out, 2 * a)


def test_pre_and_post_models_are_kept(cropped_dfp: mx.Dfp) -> None:
    info = mx.Dfp(cropped_dfp.to_bytes()).model(0)
    assert info.pre_model is not None
    assert info.post_model is not None
    pre = onnx.load_model_from_string(info.pre_model)
    post = onnx.load_model_from_string(info.post_model)
    assert [i.name for i in pre.graph.input] == ["frame"]
    assert [o.name for o in pre.graph.output] == ["image"]
    assert [i.name for i in post.graph.input] == ["logits"]
    assert [o.name for o in post.graph.output] == ["probs"]
    assert info.inputs[0].layer == "image"
    assert info.outputs[0].layer == "logits"


@pytest.mark.parametrize("idx", [3, 4, 100, -1, -4])
def test_model_index_out_of_range(three_model_dfp: mx.Dfp, idx: int) -> None:
    with pytest.raises(mx.ModelIndexError, match=r"out of range.*3 model\(s\).*0\.\.2"):
        three_model_dfp.model(idx)
    with pytest.raises(IndexError):
        three_model_dfp.model(idx)


@pytest.mark.parametrize("idx", [True, 1.0, "1", None])
def test_model_index_must_be_an_int(three_model_dfp: mx.Dfp, idx: Any) -> None:
    with pytest.raises(TypeError):
        three_model_dfp.model(idx)


def test_chip_shape(three_model_dfp: mx.Dfp) -> None:
    f32 = np.dtype(np.float32)
    assert mx.PortInfo(0, 0, "i", (1, 3, 64, 32), f32).chip_shape == (64, 32, 1, 3)
    assert mx.PortInfo(0, 0, "v", (1, 10), f32).chip_shape == (1, 1, 1, 10)
    assert three_model_dfp.input_ports[0].chip_shape == (1, 1, 1, 16)


# -- truncated, corrupted, foreign, newer -----------------------------------------------
def test_truncated_at_every_offset(add_dfp: mx.Dfp, cropped_dfp: mx.Dfp) -> None:
    data = add_dfp.to_bytes()
    for cut in range(len(data)):
        msg = load_error(data[:cut])
        assert "truncated" in msg, (cut, msg)
    # A bigger, three-section file: cut at a spread of offsets through every section.
    data = cropped_dfp.to_bytes()
    for cut in [*range(0, 200), *range(200, len(data), max(1, len(data) // 500))]:
        msg = load_error(data[:cut])
        assert "truncated" in msg, (cut, msg)


def test_truncation_messages_say_what_is_missing(add_dfp: mx.Dfp) -> None:
    data = add_dfp.to_bytes()
    _, head_len, _ = _PREFIX.unpack_from(data, len(MAGIC))
    assert "0 bytes" in load_error(b"")
    assert "fixed header" in load_error(data[:10])
    assert f"header needs {head_len} bytes" in load_error(data[: _FIXED + 5])
    assert "section 0 needs" in load_error(data[:-1])


def _sections(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each section, as absolute offsets."""
    _, header, payload = split(data)
    pos = len(data) - len(payload)
    spans = []
    for sec in header["sections"]:
        spans.append((pos, pos + sec["length"]))
        pos += sec["length"]
    return spans


def test_flipped_byte_anywhere(three_model_dfp: mx.Dfp) -> None:
    data = three_model_dfp.to_bytes()
    _, head_len, _ = _PREFIX.unpack_from(data, len(MAGIC))
    spans = _sections(data)
    for pos in range(len(data)):
        for mask in (0x01, 0x80, 0xFF):
            bad = bytearray(data)
            bad[pos] ^= mask
            msg = load_error(bytes(bad))
            if pos < 8:
                expected: tuple[str, ...] = ("not a memryx DFP",)
            elif pos < 12:
                expected = ("newer", "not valid")
            elif pos < 16:
                expected = ("exceeds the limit", "truncated", "header checksum mismatch")
            elif pos < _FIXED + head_len:
                expected = ("header checksum mismatch",)
            else:
                sec = next(i for i, (a, b) in enumerate(spans) if a <= pos < b)
                expected = (f"section {sec} checksum mismatch",)
            assert any(e in msg for e in expected), (pos, mask, msg)


def test_trailing_bytes(add_dfp: mx.Dfp) -> None:
    assert "trailing" in load_error(add_dfp.to_bytes() + b"\x00")


def _zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("model.dfp", b"not really")
    return buf.getvalue()


FOREIGN = {
    "png": b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + bytes(40),
    "zip": _zip_bytes(),
    "random": np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
    "text": b"this is a text file, not a dataflow program\n" * 4,
    "onnx": testing.model_bytes(testing.identity_model()),
    "pickle": pickle.dumps({"graph": b"x", "version": 1}),
    "short": b"PK\x03",
}


@pytest.mark.parametrize("name", sorted(FOREIGN))
def test_foreign_files(name: str, tmp_path: Path) -> None:
    data = FOREIGN[name]
    msg = load_error(data)
    for fragment in ("not a", "DFP"):
        assert fragment in msg, msg
    assert repr(data[:8]) in msg  # says what the file starts with
    path = tmp_path / f"file.{name}"
    path.write_bytes(data)
    with pytest.raises(mx.DfpError, match="not a"):
        mx.Dfp(path)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.dfp"
    path.write_bytes(b"")
    with pytest.raises(mx.DfpError, match=r"truncated DFP: empty \(0 bytes\)"):
        mx.Dfp(path)


@pytest.mark.parametrize("prefix", [MAGIC[:1], MAGIC[:5], MAGIC, MAGIC + b"\x01\x00"])
def test_magic_prefix_is_truncated_not_foreign(prefix: bytes) -> None:
    assert "truncated" in load_error(prefix)


@pytest.mark.parametrize("version", [2, 3, 255, 0xFFFFFFFF])
def test_newer_version(add_dfp: mx.Dfp, version: int) -> None:
    _, header, payload = split(add_dfp.to_bytes())
    msg = load_error(assemble(header, payload, version=version))
    assert f"version {version} is newer" in msg
    assert "upgrade memryx" in msg


def test_version_zero(add_dfp: mx.Dfp) -> None:
    _, header, payload = split(add_dfp.to_bytes())
    assert "version 0 is not valid" in load_error(assemble(header, payload, version=0))


def test_missing_path_and_directory(tmp_path: Path) -> None:
    for missing in (tmp_path / "nope.dfp", str(tmp_path / "nope.dfp")):
        with pytest.raises(FileNotFoundError) as info:
            mx.Dfp(missing)
        assert not isinstance(info.value, mx.DfpError)
    for directory in (tmp_path, str(tmp_path)):
        with pytest.raises(IsADirectoryError) as dinfo:
            mx.Dfp(directory)
        assert not isinstance(dinfo.value, mx.DfpError)


# -- hostile headers --------------------------------------------------------------------
def _peak_bytes(data: bytes) -> tuple[str, int]:
    tracemalloc.start()
    try:
        msg = load_error(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return msg, peak


def test_oversized_header_length_is_refused_without_allocating(add_dfp: mx.Dfp) -> None:
    data = add_dfp.to_bytes()
    for head_len in (0xFFFFFFFF, MAX_HEADER_BYTES + 1):
        bad = MAGIC + _PREFIX.pack(FORMAT_VERSION, head_len, 0) + data[_FIXED:]
        msg, peak = _peak_bytes(bad)
        assert f"header length {head_len} exceeds the limit" in msg
        assert peak < 1 << 20, peak
    # At the limit, but the file does not hold that much: truncated, nothing allocated.
    bad = MAGIC + _PREFIX.pack(FORMAT_VERSION, MAX_HEADER_BYTES, 0) + data[_FIXED:]
    msg, peak = _peak_bytes(bad)
    assert "truncated" in msg
    assert str(MAX_HEADER_BYTES) in msg
    assert peak < 1 << 20, peak


@pytest.mark.parametrize("length", [2**31, 2**32 - 1, 2**32, 2**40])
def test_oversized_section_length_is_refused_without_allocating(add_dfp: mx.Dfp,
                                                                length: int) -> None:
    _, header, payload = split(add_dfp.to_bytes())
    header["sections"][0]["length"] = length
    msg, peak = _peak_bytes(assemble(header, payload))
    assert "section 0" in msg
    assert ("truncated" in msg) or ("length" in msg)
    assert peak < 1 << 20, peak


def test_huge_section_table_is_refused(add_dfp: mx.Dfp) -> None:
    _, header, payload = split(add_dfp.to_bytes())
    header["sections"] = [{"length": 0, "crc32": 0}] * 100_000
    assert "bad section table" in load_error(assemble(header, payload))


@pytest.mark.parametrize("depth", [1_000, 10_000, 200_000])
def test_deeply_nested_json_header(depth: int) -> None:
    raw = b"[" * depth + b"]" * depth
    msg = load_error(assemble(None, b"", raw_header=raw))
    assert "not valid JSON" in msg or "not a memryx-dfp header" in msg


@pytest.mark.parametrize("field", ["name", "perf", "layer", "shape", "dtype", "graph",
                                   "compiler_version", "length"])
def test_deeply_nested_json_in_every_field(add_dfp: mx.Dfp, field: str) -> None:
    """Nesting right at the JSON parser's recursion limit: DfpError, never RecursionError."""
    _, header, payload = split(add_dfp.to_bytes())
    marker = "@@NESTED@@"
    if field in ("name", "perf", "graph"):
        header["models"][0][field] = marker
    elif field in ("layer", "shape", "dtype"):
        header["models"][0]["inputs"][0][field] = marker
    elif field == "length":
        header["sections"][0]["length"] = marker
    else:
        header[field] = marker
    text = json.dumps(header)
    for depth in [*range(5, 100, 7), *range(900, 1010, 3), 5_000]:
        nested = "[" * depth + "]" * depth
        if field == "perf":
            nested = '{"a": ' + nested + "}"
        data = assemble(None, payload, raw_header=text.replace(json.dumps(marker),
                                                               nested).encode())
        if field == "perf" and depth + 1 <= MAX_PERF_DEPTH:
            _load_or_dfp_error(data)  # a shallow perf is fine
        else:
            msg = load_error(data)
            assert "RecursionError" not in msg


def test_deeply_nested_perf_is_refused(add_dfp: mx.Dfp) -> None:
    """perf is the one free-form field: it must stay shallow enough to write back."""
    _, header, payload = split(add_dfp.to_bytes())
    perf: Any = 1
    for _ in range(MAX_PERF_DEPTH - 1):
        perf = {"a": perf}
    header["models"][0]["perf"] = perf
    loaded = mx.Dfp(assemble(header, payload))
    assert mx.Dfp(loaded.to_bytes()) == loaded
    header["models"][0]["perf"] = {"a": perf}
    assert "perf nests deeper" in load_error(assemble(header, payload))


def _set(header: dict[str, Any], path: str, value: Any) -> None:
    obj: Any = header
    keys = path.split(".")
    for k in keys[:-1]:
        obj = obj[int(k)] if isinstance(obj, list) else obj[k]
    last = keys[-1]
    if isinstance(obj, list):
        obj[int(last)] = value
    elif value is _DELETE:
        del obj[last]
    else:
        obj[last] = value


_DELETE = object()

HEADER_CASES = [
    ("format", "onnx", "not a memryx-dfp header"),
    ("format", _DELETE, "not a memryx-dfp header"),
    ("num_chips", 0, "num_chips"),
    ("num_chips", "4", "num_chips"),
    ("num_chips", True, "num_chips"),
    ("num_chips", 4.0, "num_chips"),
    ("compiler_version", 1, "compiler_version"),
    ("models", [], "1..256 models"),
    ("models", {}, "1..256 models"),
    ("models.0", "model", "model 0 is not an object"),
    ("models.0.name", "", "model 0 name"),
    ("models.0.name", None, "model 0 name"),
    ("models.0.name", "n" * 1025, "model 0 name"),
    ("models.0.inputs", [], "model 0 needs 1..1024 inputs"),
    ("models.0.outputs", None, "model 0 needs 1..1024 outputs"),
    ("models.0.inputs.0", 7, "inputs[0]: expected an object"),
    ("models.0.inputs.0.port", -1, "inputs[0].port"),
    ("models.0.inputs.0.port", 1, "input port 1 appears twice"),
    ("models.0.inputs.0.port", "0", "inputs[0].port"),
    ("models.0.inputs.0.layer", "", "inputs[0].layer"),
    ("models.0.inputs.0.shape", [1, 0], "inputs[0].shape"),
    ("models.0.inputs.0.shape", [1, -8], "inputs[0].shape"),
    ("models.0.inputs.0.shape", [1.0, 8], "inputs[0].shape"),
    ("models.0.inputs.0.shape", [1] * 9, "inputs[0].shape"),
    ("models.0.inputs.0.shape", "1,8", "inputs[0].shape"),
    ("models.0.inputs.0.shape", [1, 2**40], "inputs[0].shape"),
    ("models.0.inputs.0.dtype", "complex64", "unsupported dtype"),
    ("models.0.inputs.0.dtype", "object", "unsupported dtype"),
    ("models.0.inputs.0.dtype", ["float32"], "unsupported dtype"),
    ("models.0.inputs.0.dtype", {"name": "float32"}, "unsupported dtype"),
    ("models.0.inputs.0.dtype", None, "unsupported dtype"),
    ("models.0.graph", None, "model 0 graph"),
    ("models.0.graph", 1, "model 0 graph"),
    ("models.0.graph", "0", "model 0 graph"),
    ("models.0.pre", 0, "reuses section 0"),
    ("models.0.perf", [1, 2], "perf is not an object"),
    ("sections", None, "bad section table"),
    ("sections.0", 3, "section 0 is not an object"),
    ("sections.0.length", -1, "section 0 length"),
    ("sections.0.length", 0, "section 0 checksum mismatch"),
    ("sections.0.length", 2**32 + 1, "section 0 length"),
    ("sections.0.crc32", 0, "section 0 checksum mismatch"),
    ("sections.0.crc32", 2**32, "section 0 crc32"),
]


@pytest.mark.parametrize(("path", "value", "fragment"), HEADER_CASES)
def test_bad_header_fields(add_dfp: mx.Dfp, path: str, value: Any, fragment: str) -> None:
    _, header, payload = split(add_dfp.to_bytes())
    _set(header, path, value)
    assert fragment in load_error(assemble(header, payload))


def test_unreferenced_section(add_dfp: mx.Dfp) -> None:
    _, header, payload = split(add_dfp.to_bytes())
    extra = b"spare"
    header["sections"].append({"length": len(extra), "crc32": zlib.crc32(extra)})
    assert "not referenced" in load_error(assemble(header, payload + extra))


def test_header_is_not_json_or_not_utf8() -> None:
    assert "not valid JSON" in load_error(assemble(None, b"", raw_header=b"{\"format\": "))
    assert "not valid JSON" in load_error(assemble(None, b"", raw_header=b"\xff\xfe{}"))
    assert "not a memryx-dfp header" in load_error(assemble(None, b"", raw_header=b"[]"))


# -- loading never executes code --------------------------------------------------------
class _Boom:
    """Unpickling this creates a directory: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.marker),))


def test_pickle_payload_is_just_a_dfp_error(tmp_path: Path, add_dfp: mx.Dfp,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("the DFP loader unpickled something")

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)

    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Boom(marker))
    # A bare pickle, as bytes and as a file.
    assert "not a memryx DFP" in load_error(payload)
    path = tmp_path / "evil.dfp"
    path.write_bytes(payload)
    with pytest.raises(mx.DfpError):
        mx.Dfp(path)
    # A pickle right after a valid prefix (where a header would be).
    _, header, body = split(add_dfp.to_bytes())
    with pytest.raises(mx.DfpError):
        mx.Dfp(assemble(None, body, raw_header=payload))
    # A well-formed DFP whose graph section is a pickle: it loads, as opaque bytes.
    header["sections"][0] = {"length": len(payload), "crc32": zlib.crc32(payload)}
    loaded = mx.Dfp(assemble(header, payload))
    assert loaded.model(0).graph == payload
    assert not marker.exists()
    source = Path(dfp_mod.__file__).read_text()
    assert not re.search(r"^\s*(import|from)\s+(pickle|marshal|shelve|dill)\b", source, re.M)


# -- fuzzing ----------------------------------------------------------------------------
_mutation = st.one_of(
    st.tuples(st.just("flip"), st.floats(0, 1, exclude_max=True), st.integers(1, 255)),
    st.tuples(st.just("insert"), st.floats(0, 1), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), st.floats(0, 1, exclude_max=True), st.integers(1, 16)),
    st.tuples(st.just("truncate"), st.floats(0, 1, exclude_max=True), st.none()),
    st.tuples(st.just("set_int"), st.sampled_from([8, 12, 16]),
              st.integers(0, 2**32 - 1)),
)


def _mutate(data: bytes, mutations: list[tuple[str, Any, Any]]) -> bytes:
    buf = bytearray(data)
    for op, where, arg in mutations:
        if op == "set_int":
            if len(buf) >= where + 4:
                struct.pack_into("<I", buf, where, arg)
            continue
        pos = int(where * len(buf))
        if op == "flip" and pos < len(buf):
            buf[pos] ^= arg
        elif op == "insert":
            buf[pos:pos] = arg
        elif op == "delete":
            del buf[pos: pos + arg]
        elif op == "truncate":
            del buf[pos:]
    return bytes(buf)


def _load_or_dfp_error(data: bytes) -> None:
    error: mx.DfpError | None = None
    try:
        loaded = mx.Dfp(data)
    except mx.DfpError as exc:
        error = exc
    if error is not None:
        assert str(error)  # an error that says something
        return
    # Whatever loads must be a consistent DFP that writes back and reloads.
    assert mx.Dfp(loaded.to_bytes()) == loaded
    assert loaded.num_models == len(loaded.models) >= 1


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.integers(0, 3), mutations=st.lists(_mutation, min_size=1, max_size=4))
def test_fuzz_mutated_bytes(three_model_dfp: mx.Dfp, add_dfp: mx.Dfp, split_dfp: mx.Dfp,
                            identity_dfp: mx.Dfp, which: int,
                            mutations: list[tuple[str, Any, Any]]) -> None:
    base = [three_model_dfp, add_dfp, split_dfp, identity_dfp][which].to_bytes()
    _load_or_dfp_error(_mutate(base, mutations))


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats()
    | st.text(max_size=20) | st.sampled_from(["float32", "uint8", "memryx-dfp", ""]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                  max_size=4),
    max_leaves=12,
)


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_header_values(three_model_dfp: mx.Dfp, data: st.DataObject) -> None:
    """Replace any value of a valid header with any JSON value, CRCs fixed up."""
    _, valid, payload = split(three_model_dfp.to_bytes())
    header: Any = valid
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(_paths(header)))
        value = data.draw(_json)
        if not path:
            header = value
            continue
        obj: Any = header
        for k in path[:-1]:
            obj = obj[k]
        obj[path[-1]] = value
    raw = json.dumps(header).encode()
    _load_or_dfp_error(assemble(None, payload, raw_header=raw))
