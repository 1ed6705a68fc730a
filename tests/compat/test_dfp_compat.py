"""The Dfp attributes the SDK's users read, and vendor DFP files refused clearly."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

import memryx as mx


def test_sdk_attributes(three_model_dfp: mx.Dfp) -> None:
    d = three_model_dfp
    assert d.num_inports == 4 and d.num_outports == 4  # mlp 1/1, add 2/1, split 1/2
    assert d.output_names == [p.layer for p in d.output_ports]
    assert d.input_names == [p.layer for p in d.input_ports]
    assert d.chip_gen == 3.1 and d.sub_version == 0
    assert d.input_chip_shapes == [p.chip_shape for p in d.input_ports]
    assert all(len(s) == 4 for s in d.output_chip_shapes)
    assert d.input_shapes == [p.shape for p in d.input_ports]  # ours stay model shapes


def test_chip_shapes_of_an_image_model(mobilenet_dfp: mx.Dfp) -> None:
    assert mobilenet_dfp.input_shapes == [(1, 3, 64, 64)]
    assert mobilenet_dfp.input_chip_shapes == [(64, 64, 1, 3)]
    assert mobilenet_dfp.output_chip_shapes == [(1, 1, 1, 10)]


def _vendor_file(version: int, order: str = "<") -> bytes:
    # an 8-byte version, then a MessagePack map {"simulator": <bin>, ...} as the vendor writes
    body = b"\x83" + b"\xa9simulator" + b"\xc4\x04\x00\x01\x02\x03" + \
        b"\xa8hardware" + b"\xc4\x02\xff\xfe" + b"\xa5ports" + b"\x90"
    return struct.pack(f"{order}q", version) + body


@pytest.mark.parametrize("version", [5, 6])
def test_vendor_dfp_refused_with_the_way_out(tmp_path: Path, version: int) -> None:
    path = tmp_path / "yolov7.dfp"
    path.write_bytes(_vendor_file(version))
    for source in (str(path), path.read_bytes()):
        with pytest.raises(mx.DfpError) as info:
            mx.Dfp(source)
        msg = str(info.value)
        assert f"compiled by the vendor's MemryX tools (DFP format version {version})" in msg
        assert "mx_nc -m model.onnx" in msg and "NeuralCompiler(" in msg
    with pytest.raises(mx.DfpError, match="vendor"):
        mx.AsyncAccl(str(path))


def test_vendor_dfp_big_endian_version_too() -> None:
    with pytest.raises(mx.DfpError, match="format version 6"):
        mx.Dfp(_vendor_file(6, ">"))


def test_other_files_are_not_called_vendor_dfps() -> None:
    for data in (struct.pack("<q", 5) + b"{json", struct.pack("<q", 7) + b"\x83",
                 b"\x89PNG\r\n\x1a\n\x00"):
        with pytest.raises(mx.DfpError) as info:
            mx.Dfp(data)
        assert "vendor's MemryX tools" not in str(info.value)
