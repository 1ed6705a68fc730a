"""Regenerate the fuzz regression corpus in this directory.

    python tests/reliability/corpus/make_corpus.py

Handcrafted nasty inputs for the two parsers that take bytes from outside:

* ``dfp-*.dfp``: DFP files (``memryx.dfp``), built by hand from the layout in
  docs/dfp-format.md so they do not depend on the compiler's output;
* ``proto-*.c2s.bin``: what a (hostile) client sends to the device server;
* ``proto-*.s2c.bin``: what a (hostile) server sends to a client, starting with its
  WELCOME (the client has sent HELLO, and answers WELCOME with OPEN and NEED_DFP
  with DFP).

tests/reliability/test_corpus.py loads every file and expects only ``DfpError`` /
``ProtocolError``. Add a file by adding an entry to ``build()`` and re-running.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

# -- DFP ------------------------------------------------------------------------------------------
MAGIC = b"MXDFP\x00\r\n"


def dfp(header: dict[str, Any] | bytes, sections: list[bytes], *, version: int = 1,
        head_len: int | None = None, head_crc: int | None = None) -> bytes:
    head = header if isinstance(header, bytes) else json.dumps(
        header, separators=(",", ":"), sort_keys=True).encode()
    prefix = struct.pack("<III", version, len(head) if head_len is None else head_len,
                         zlib.crc32(head) if head_crc is None else head_crc)
    return MAGIC + prefix + head + b"".join(sections)


def port(port_id: int, layer: str, shape: list[int], dtype: str = "float32") -> dict[str, Any]:
    return {"port": port_id, "layer": layer, "shape": shape, "dtype": dtype}


def header(graph: bytes, *, shape: list[int] | None = None, perf: Any = None,
           sections: list[dict[str, int]] | None = None, **top: Any) -> dict[str, Any]:
    shape = [1, 4] if shape is None else shape
    model = {"name": "identity", "inputs": [port(0, "x", shape)], "outputs": [port(0, "y", shape)],
             "graph": 0, "pre": None, "post": None, "perf": perf}
    head = {"format": "memryx-dfp", "compiler_version": "corpus", "num_chips": 4,
            "models": [model],
            "sections": sections if sections is not None else
            [{"length": len(graph), "crc32": zlib.crc32(graph)}]}
    head.update(top)
    return head


def identity_graph() -> bytes:
    """ONNX bytes of y = Identity(x), x: float32 (1, 4), written without the onnx package."""

    def field(num: int, wire: int, payload: bytes | int) -> bytes:
        key = varint(num << 3 | wire)
        if wire == 0:
            assert isinstance(payload, int)
            return key + varint(payload)
        assert isinstance(payload, bytes)
        return key + varint(len(payload)) + payload

    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            byte, n = n & 0x7F, n >> 7
            out.append(byte | (0x80 if n else 0))
            if not n:
                return bytes(out)

    def value_info(name: str) -> bytes:
        dims = b"".join(field(1, 2, field(1, 0, d)) for d in (1, 4))   # TensorShapeProto.dim
        tensor = field(1, 0, 1) + field(2, 2, dims)                      # elem_type FLOAT, shape
        return field(1, 2, name.encode()) + field(2, 2, field(1, 2, tensor))

    node = field(1, 2, b"x") + field(2, 2, b"y") + field(4, 2, b"Identity")
    graph = field(1, 2, node) + field(2, 2, b"g") + field(11, 2, value_info("x")) + \
        field(12, 2, value_info("y"))
    opset = field(2, 0, 17)
    return field(1, 0, 8) + field(7, 2, graph) + field(8, 2, opset)  # ir_version 8


def nested(depth: int, inner: Any = 1) -> Any:
    value = inner
    for _ in range(depth):
        value = {"a": value}
    return value


def dfp_files() -> dict[str, bytes]:
    graph = identity_graph()
    valid = dfp(header(graph), [graph])
    pickle_bomb = b"\x80\x04\x95\x1d\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x8c\x06system" \
                  b"\x93\x8c\x0becho pwned\x85R."
    deep = b"[" * 5000 + b"]" * 5000  # far beyond the recursion limit
    huge = header(graph, sections=[{"length": 4 << 30, "crc32": 0}])
    return {
        "dfp-truncated-in-header.dfp": valid[:40],
        "dfp-truncated-in-section.dfp": valid[:-10],
        "dfp-header-claims-4gib.dfp": dfp(b'{"format":"memryx-dfp"}', [], head_len=0xFFFFFFFF),
        "dfp-section-claims-4gib.dfp": dfp(huge, [graph[:16]]),
        "dfp-deeply-nested-header.dfp": dfp(deep, []),
        "dfp-deeply-nested-perf.dfp": dfp(header(graph, perf=nested(40)), [graph]),
        "dfp-header-not-utf8.dfp": dfp(b'{"format":"\xff\xfe"}', []),
        "dfp-header-nan.dfp": dfp(json.dumps(header(graph, num_chips=float("nan"))).encode(),
                                  [graph]),
        "dfp-header-crc-mismatch.dfp": dfp(header(graph), [graph], head_crc=0),
        "dfp-too-many-sections.dfp": dfp(header(graph, sections=[{"length": 0, "crc32": 0}] * 769),
                                         []),
        "dfp-newer-version.dfp": dfp(header(graph), [graph], version=2),
        "dfp-png.dfp": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(64),
        "dfp-pickle-as-graph.dfp": dfp(header(pickle_bomb), [pickle_bomb]),
        "dfp-empty-graph.dfp": dfp(header(b""), [b""]),
        "dfp-ports-disagree-with-graph.dfp": dfp(header(graph, shape=[1, 5]), [graph]),
    }


# -- the device protocol --------------------------------------------------------------------
HEADER = struct.Struct("<2sBBIII")
HELLO, WELCOME, OPEN, NEED_DFP, DFP, OPENED, FRAME, OUTPUT, STATS, STATS_REPLY = range(1, 11)


def msg(kind: int, payload: bytes = b"", *, model: int = 0, seq: int = 0,
        length: int | None = None) -> bytes:
    return HEADER.pack(b"MX", 1, kind, model, seq,
                       len(payload) if length is None else length) + payload


def js(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def pack(*arrays: tuple[int, list[int], bytes], count: int | None = None) -> bytes:
    """A tensor pack of (dtype code, dims, data) entries (see memryx/device/protocol.py)."""
    out = bytearray(struct.pack("<H", len(arrays) if count is None else count))
    for code, dims, data in arrays:
        out += struct.pack("<BB", code, len(dims)) + struct.pack(f"<{len(dims)}I", *dims)
        out += bytes(-len(out) % 8)
        out += data
    return bytes(out)


HANDSHAKE_DFP = dfp(header(identity_graph()), [identity_graph()])


def client_handshake() -> bytes:
    digest = hashlib.sha256(HANDSHAKE_DFP).digest()
    return (msg(HELLO, js({"protocol": 1, "client": "corpus", "pid": 1}))
            + msg(OPEN, struct.pack("<32sI", digest, 0))
            + msg(DFP, HANDSHAKE_DFP))


def server_handshake() -> bytes:
    return (msg(WELCOME, js({"protocol": 1, "server": "corpus", "max_payload": 1 << 20}))
            + msg(NEED_DFP) + msg(OPENED, js({"models": [{"capacity": 4}]})))


def protocol_files() -> dict[str, bytes]:
    hs = client_handshake()
    f32 = (1, [1, 4], bytes(16))
    return {
        "proto-http.c2s.bin": b"GET / HTTP/1.1\r\nHost: memryx\r\n\r\n",
        "proto-hello-claims-4gib.c2s.bin": msg(HELLO, length=0xFFFFFFFF) + b"{",
        "proto-hello-nested-17.c2s.bin": msg(HELLO, js(nested(17))),
        "proto-hello-nested-5000.c2s.bin": msg(HELLO, b"[" * 5000 + b"]" * 5000),
        "proto-hello-nan.c2s.bin": msg(HELLO, b'{"protocol":1,"client":"x","pid":NaN}'),
        "proto-frame-claims-4gib.c2s.bin": hs + msg(FRAME, length=0xFFFFFFFF) + bytes(64),
        "proto-frame-dims-overflow.c2s.bin": hs + msg(FRAME, pack((1, [0xFFFFFFFF] * 8, b""))),
        "proto-frame-dims-beyond-payload.c2s.bin":
            hs + msg(FRAME, pack((9, [0xFFFF, 0xFFFF], bytes(64)))),
        "proto-frame-1025-arrays.c2s.bin": hs + msg(FRAME, pack(f32, count=1025)),
        "proto-frame-for-model-7.c2s.bin": hs + msg(FRAME, pack(f32), model=7),
        "proto-frame-truncated.c2s.bin": hs + msg(FRAME, pack(f32))[:-7],
        "proto-dfp-hash-mismatch.c2s.bin":
            hs[: -len(msg(DFP, HANDSHAKE_DFP))] + msg(DFP, HANDSHAKE_DFP[:-1] + b"!"),
        "proto-output-dims-overflow.s2c.bin":
            server_handshake() + msg(OUTPUT, pack((1, [0xFFFFFFFF] * 8, b""))),
        "proto-output-bool-not-0-or-1.s2c.bin":
            server_handshake() + msg(OUTPUT, pack((10, [3], b"\0\1\2"))),
        "proto-welcome-nested-5000.s2c.bin": msg(WELCOME, b'{"a":' * 5000 + b"1" + b"}" * 5000),
        "proto-stats-reply-unasked.s2c.bin": server_handshake() + msg(STATS_REPLY, js({}), seq=9),
    }


def build() -> dict[str, bytes]:
    return {**dfp_files(), **protocol_files()}


def main(write: Callable[[Path, bytes], Any] = Path.write_bytes) -> None:
    for name, data in sorted(build().items()):
        write(HERE / name, data)
        print(f"{len(data):>8}  {name}")


if __name__ == "__main__":
    main()
    sys.exit(0)
