"""The DFP container: what the NeuralCompiler writes and the accelerator loads.

A DFP ("dataflow program") holds one or more compiled models. For each model it
keeps its input and output ports (port id, layer name, shape, dtype, model
index), the executable graph (ONNX bytes that the simulated device runs),
optional pre- and post-processing models (ONNX bytes run on the host) and room
for a performance model.

Binary layout (all integers little-endian)::

    offset  size  field
    0       8     magic  b"MXDFP\\x00\\r\\n"
    8       4     format version (uint32), currently 1
    12      4     header length H (uint32), at most 16 MiB
    16      4     CRC-32 of the header bytes (uint32)
    20      H     header: UTF-8 JSON object (see docs/dfp-format.md)
    20+H    ...   payload: the sections, back to back, in header order

Every section has its length and CRC-32 in the header; the payload must be
exactly as long as the sections add up to. Loading never executes anything from
the file (JSON and protobuf only, no pickle) and bounds every size it reads.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np

from ._exceptions import DfpError
from ._version import __version__

__all__ = ["FORMAT_VERSION", "Dfp", "ModelInfo", "PortInfo", "vendor_dfp_version"]

MAGIC: Final = b"MXDFP\x00\r\n"
FORMAT_VERSION: Final = 1
_PREFIX = struct.Struct("<III")
_FIXED = len(MAGIC) + _PREFIX.size

MAX_HEADER_BYTES: Final = 16 * 1024 * 1024
MAX_FILE_BYTES: Final = 4 * 1024 * 1024 * 1024
MAX_MODELS: Final = 256
MAX_PORTS: Final = 1024
MAX_RANK: Final = 8
MAX_DIM: Final = 1 << 31
MAX_NAME: Final = 1024
#: Chips one DFP may target (the MX3 datasheet: up to 16 chips on one board).
MAX_CHIPS: Final = 16
MAX_PERF_DEPTH: Final = 32

#: dtypes a port may carry, by numpy name.
PORT_DTYPES: Final = frozenset(
    {"float32", "float16", "float64", "uint8", "int8", "uint16", "int16", "int32", "int64", "bool"}
)

@dataclass(frozen=True)
class PortInfo:
    """One input or output port of a compiled model."""

    port: int
    """Port id, unique among the DFP's input (or output) ports."""
    model_idx: int
    """Index of the model the port belongs to."""
    layer: str
    """Name of the model tensor the port carries."""
    shape: tuple[int, ...]
    """The model's own shape of the tensor (batch dimension fixed to 1)."""
    dtype: np.dtype[Any]
    """Element type; frames must match it exactly."""

    @property
    def chip_shape(self) -> tuple[int, int, int, int]:
        """The port's shape as the MX3 lays it out: ``[row, col, z, ch]``.

        NCHW maps to ``[H, W, 1, C]``; a vector ``[N, C]`` to ``[1, 1, 1, C]``.
        """
        dims = self.shape[1:] if len(self.shape) > 1 and self.shape[0] == 1 else self.shape
        if len(dims) == 3:
            c, h, w = dims
            return (h, w, 1, c)
        if len(dims) == 1:
            return (1, 1, 1, dims[0])
        if len(dims) == 2:
            return (dims[0], 1, 1, dims[1])
        size = int(np.prod(dims)) if dims else 1
        return (1, 1, 1, size)

    def _to_json(self) -> dict[str, Any]:
        return {"port": self.port, "layer": self.layer, "shape": list(self.shape),
                "dtype": self.dtype.name}


@dataclass(frozen=True)
class ModelInfo:
    """One model of a DFP."""

    index: int
    name: str
    inputs: tuple[PortInfo, ...]
    outputs: tuple[PortInfo, ...]
    graph: bytes = field(repr=False)
    """The accelerated graph, as ONNX bytes."""
    pre_model: bytes | None = field(default=None, repr=False)
    """The host-side pre-processing model cropped off by the compiler (ONNX bytes)."""
    post_model: bytes | None = field(default=None, repr=False)
    """The host-side post-processing model cropped off by the compiler (ONNX bytes)."""
    perf: Mapping[str, Any] | None = None
    """The compiler's performance estimate (filled by the timing model)."""


def _fail(msg: str) -> DfpError:
    return DfpError(msg)


def _check_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_NAME:
        raise _fail(f"{what}: expected a name of 1..{MAX_NAME} characters, got {value!r:.80}")
    return value


def _check_int(value: Any, what: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise _fail(f"{what}: expected an integer in [{lo}, {hi}], got {value!r:.80}")
    return value


def _json_depth(value: Any) -> int:
    """Nesting depth of a JSON value, without recursion (``1`` for a scalar)."""
    depth, level = 0, [value]
    while level:
        depth += 1
        level = [c for v in level if isinstance(v, (dict, list))
                 for c in (v.values() if isinstance(v, dict) else v)]
    return depth


def _parse_port(raw: Any, model_idx: int, what: str) -> PortInfo:
    if not isinstance(raw, dict):
        raise _fail(f"{what}: expected an object, got {type(raw).__name__}")
    port = _check_int(raw.get("port"), f"{what}.port", 0, MAX_PORTS * MAX_MODELS)
    layer = _check_name(raw.get("layer"), f"{what}.layer")
    shape_raw = raw.get("shape")
    if not isinstance(shape_raw, list) or not 0 <= len(shape_raw) <= MAX_RANK:
        raise _fail(f"{what}.shape: expected a list of at most {MAX_RANK} dimensions")
    shape = tuple(_check_int(d, f"{what}.shape", 1, MAX_DIM) for d in shape_raw)
    dtype_name = raw.get("dtype")
    # isinstance first: ``[] in PORT_DTYPES`` raises TypeError (unhashable), not DfpError.
    if not isinstance(dtype_name, str) or dtype_name not in PORT_DTYPES:
        raise _fail(f"{what}.dtype: unsupported dtype {dtype_name!r:.40}")
    return PortInfo(port, model_idx, layer, shape, np.dtype(str(dtype_name)))


class Dfp:
    """A compiled dataflow program: load it, inspect it, write it back.

    ``Dfp(source)`` loads from a path (``str`` or ``Path``), or from the bytes
    of a DFP (``bytes``, ``bytearray``, ``memoryview``); a ``Dfp`` passes
    through unchanged. Raises :class:`DfpError` when the file is truncated,
    corrupted, not a DFP, or of a newer format version, and ``FileNotFoundError``
    / ``IsADirectoryError`` for a path that is not a file.
    """

    __slots__ = ("_models", "compiler_version", "num_chips", "version")

    version: int
    compiler_version: str
    num_chips: int
    _models: tuple[ModelInfo, ...]

    def __init__(self, source: str | os.PathLike[str] | bytes | bytearray | memoryview | Dfp
                 ) -> None:
        if isinstance(source, Dfp):
            self._adopt(source)
            return
        if isinstance(source, (bytes, bytearray, memoryview)):
            data = bytes(source)
        elif isinstance(source, (str, os.PathLike)):
            data = _read_bounded(Path(source))
        else:
            raise TypeError(
                f"dfp must be a path, bytes, bytearray or Dfp, got {type(source).__name__}"
            )
        self._adopt(_decode(data))

    def _adopt(self, other: Dfp) -> None:
        self.version = other.version
        self.compiler_version = other.compiler_version
        self.num_chips = other.num_chips
        self._models = other._models

    @classmethod
    def build(cls, models: Sequence[ModelInfo], *, num_chips: int,
              compiler_version: str = __version__) -> Dfp:
        """Assemble a DFP from already-validated models (used by the NeuralCompiler)."""
        self = cls.__new__(cls)
        self.version = FORMAT_VERSION
        self.compiler_version = compiler_version
        self.num_chips = num_chips
        self._models = tuple(models)
        # Round-trip through the encoder's checks so a built Dfp is always writable.
        _decode(self.to_bytes())
        return self

    # -- inspection -----------------------------------------------------------------
    @property
    def models(self) -> tuple[ModelInfo, ...]:
        """The models, in ``model_idx`` order."""
        return self._models

    @property
    def num_models(self) -> int:
        return len(self._models)

    @property
    def input_ports(self) -> list[PortInfo]:
        """Every input port of every model, in port order."""
        return [p for m in self._models for p in m.inputs]

    @property
    def output_ports(self) -> list[PortInfo]:
        """Every output port of every model, in port order."""
        return [p for m in self._models for p in m.outputs]

    @property
    def input_shapes(self) -> list[tuple[int, ...]]:
        """The model shapes of every input port (the vendor's are chip shapes: see
        :attr:`input_chip_shapes`)."""
        return [p.shape for p in self.input_ports]

    @property
    def output_shapes(self) -> list[tuple[int, ...]]:
        """The model shapes of every output port (chip shapes: :attr:`output_chip_shapes`)."""
        return [p.shape for p in self.output_ports]

    # -- the vendor SDK's attribute names ---------------------------------------------
    @property
    def num_inports(self) -> int:
        """How many input ports the DFP has (all models)."""
        return len(self.input_ports)

    @property
    def num_outports(self) -> int:
        """How many output ports the DFP has (all models)."""
        return len(self.output_ports)

    @property
    def output_names(self) -> list[str]:
        """The layer names of every output port, in port order."""
        return [p.layer for p in self.output_ports]

    @property
    def input_names(self) -> list[str]:
        """The layer names of every input port, in port order."""
        return [p.layer for p in self.input_ports]

    @property
    def input_chip_shapes(self) -> list[tuple[int, int, int, int]]:
        """Every input port's shape in the chip layout ``[row, col, z, ch]`` (what the
        vendor's ``input_shapes`` gives)."""
        return [p.chip_shape for p in self.input_ports]

    @property
    def output_chip_shapes(self) -> list[tuple[int, int, int, int]]:
        """Every output port's shape in the chip layout ``[row, col, z, ch]``."""
        return [p.chip_shape for p in self.output_ports]

    @property
    def chip_gen(self) -> float:
        """The chip generation the DFP targets, as the SDK numbers it (3.1: MX3)."""
        return CHIP_GEN

    @property
    def sub_version(self) -> int:
        """The vendor format's sub-version; memryx DFPs have none (0)."""
        return 0

    def model(self, model_idx: int) -> ModelInfo:
        """The model at ``model_idx``; :class:`ModelIndexError` when out of range."""
        from ._exceptions import ModelIndexError

        if isinstance(model_idx, bool) or not isinstance(model_idx, int):
            raise TypeError(f"model_idx must be an int, got {type(model_idx).__name__}")
        if not 0 <= model_idx < len(self._models):
            raise ModelIndexError(
                f"model_idx {model_idx} out of range: the DFP holds {len(self._models)} "
                f"model(s) (valid: 0..{len(self._models) - 1})"
            )
        return self._models[model_idx]

    def __repr__(self) -> str:
        names = ", ".join(m.name for m in self._models)
        return f"<Dfp v{self.version} chips={self.num_chips} models=[{names}]>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Dfp) and self.to_bytes() == other.to_bytes()

    __hash__ = None  # type: ignore[assignment]

    # -- writing --------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """The DFP as bytes, in the layout of this module's docstring."""
        sections: list[bytes] = []

        def section(blob: bytes | None) -> int | None:
            if blob is None:
                return None
            sections.append(blob)
            return len(sections) - 1

        models = []
        for m in self._models:
            models.append({
                "name": m.name,
                "inputs": [p._to_json() for p in m.inputs],
                "outputs": [p._to_json() for p in m.outputs],
                "graph": section(m.graph),
                "pre": section(m.pre_model),
                "post": section(m.post_model),
                "perf": dict(m.perf) if m.perf is not None else None,
            })
        header = {
            "format": "memryx-dfp",
            "compiler_version": self.compiler_version,
            "num_chips": self.num_chips,
            "models": models,
            "sections": [{"length": len(s), "crc32": zlib.crc32(s)} for s in sections],
        }
        head = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
        prefix = MAGIC + _PREFIX.pack(FORMAT_VERSION, len(head), zlib.crc32(head))
        return b"".join([prefix, head, *sections])

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write the DFP to ``path`` atomically: readers see the old file or the whole
        new one, never a torn one, even with several writers at once (each writes its
        own uniquely named temporary file, then renames it over ``path``)."""
        target = Path(path)
        data = self.to_bytes()
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(8)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                     0o666)  # the umask applies, as for a plain open()
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return target

    save = write


#: The slowest modeled rate a DFP may claim (frames/s): slower would stall a run for ages.
MIN_MODELED_FPS = 0.1
#: The fastest modeled rate a DFP may claim (frames/s).
MAX_MODELED_FPS = 1e9
#: The longest modeled latency a DFP may claim (ms).
MAX_MODELED_LATENCY_MS = 60_000.0


def _check_modeled(perf: Mapping[str, Any], mi: int) -> None:
    """The modeled figures the simulator paces by must be sane numbers."""
    checks = (("fps", MIN_MODELED_FPS, MAX_MODELED_FPS),
              ("latency_ms", 0.0, MAX_MODELED_LATENCY_MS))
    for key, low, high in checks:
        if key not in perf:
            continue
        value = perf[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not low <= value <= high:  # also refuses NaN
            raise DfpError(f"corrupted DFP: model {mi} modeled {key} is {value!r}; it must be "
                           f"a number from {low:g} to {high:g}")
    depth = perf.get("pipeline_depth")
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, (int, float))
                              or not 0 <= depth <= 1e6):
        raise DfpError(f"corrupted DFP: model {mi} modeled pipeline_depth is {depth!r}")


def _read_bounded(path: Path) -> bytes:
    if not path.exists():
        raise FileNotFoundError(f"DFP file not found: {path}")
    if path.is_dir():
        raise IsADirectoryError(f"DFP path is a directory, not a file: {path}")
    if not path.is_file():
        raise DfpError(f"{path} is not a regular file (a device, FIFO or socket cannot be a DFP)")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise DfpError(f"{path}: {size} bytes is larger than the {MAX_FILE_BYTES} a DFP may be")
    with path.open("rb") as f:
        data = f.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise DfpError(f"{path}: larger than the {MAX_FILE_BYTES} bytes a DFP may be")
    return data


#: Format versions of the vendor's own DFP files (8-byte version, then a packed dictionary).
VENDOR_VERSIONS: Final = (5, 6)
#: The chip generation number the SDK uses for the MX3.
CHIP_GEN: Final = 3.1


def vendor_dfp_version(data: bytes) -> int | None:
    """The format version of a DFP written by the vendor's compiler, else None.

    Those files start with their version as an 8-byte integer (5 or 6) followed
    by a packed (MessagePack) dictionary; ours start with :data:`MAGIC`.
    """
    if len(data) < 9:
        return None
    for version in (int.from_bytes(data[:8], "little"), int.from_bytes(data[:8], "big")):
        if version in VENDOR_VERSIONS:
            marker = data[8]
            if 0x80 <= marker <= 0x8F or marker in (0xDE, 0xDF):  # a MessagePack map
                return version
    return None


def _decode(data: bytes) -> Dfp:
    if not data:
        raise DfpError("truncated DFP: empty (0 bytes)")
    if len(data) < _FIXED:
        if data and not MAGIC.startswith(data[: len(MAGIC)]):
            raise DfpError(f"not a DFP: starts with {data[:8]!r}, expected {MAGIC!r}")
        raise DfpError(f"truncated DFP: {len(data)} bytes, the fixed header alone is {_FIXED}")
    vendor = vendor_dfp_version(data)
    if vendor is not None:
        raise DfpError(
            f"this DFP was compiled by the vendor's MemryX tools (DFP format version "
            f"{vendor}): its hardware image is encrypted and memryx cannot execute it. "
            "Recompile the source model (ONNX, or a Keras/TF/TFLite model) with memryx: "
            "`mx_nc -m model.onnx` or `memryx compile model.onnx -o model.dfp`, or in Python "
            "`NeuralCompiler(models='model.onnx', dfp_fname='model.dfp').run()`")
    if data[: len(MAGIC)] != MAGIC:
        raise DfpError(
            f"not a memryx DFP: starts with {data[:8]!r}, expected {MAGIC!r} "
            "(files from other tools, including the vendor's compiler, cannot be loaded)"
        )
    version, head_len, head_crc = _PREFIX.unpack_from(data, len(MAGIC))
    if version > FORMAT_VERSION:
        raise DfpError(
            f"DFP format version {version} is newer than this runtime reads "
            f"(up to {FORMAT_VERSION}); upgrade memryx"
        )
    if version < 1:
        raise DfpError(f"DFP format version {version} is not valid")
    if head_len > MAX_HEADER_BYTES:
        raise DfpError(f"DFP header length {head_len} exceeds the limit of {MAX_HEADER_BYTES}")
    if len(data) < _FIXED + head_len:
        raise DfpError(
            f"truncated DFP: header needs {head_len} bytes, only {len(data) - _FIXED} present"
        )
    head = data[_FIXED: _FIXED + head_len]
    if zlib.crc32(head) != head_crc:
        raise DfpError("corrupted DFP: header checksum mismatch")
    try:
        header = json.loads(head.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise DfpError(f"corrupted DFP: header is not valid JSON ({exc})") from None
    if not isinstance(header, dict) or header.get("format") != "memryx-dfp":
        raise DfpError("corrupted DFP: header is not a memryx-dfp header")

    sections_raw = header.get("sections")
    if not isinstance(sections_raw, list) or len(sections_raw) > 3 * MAX_MODELS:
        raise DfpError("corrupted DFP: bad section table")
    payload = memoryview(data)[_FIXED + head_len:]
    sections: list[bytes] = []
    pos = 0
    for i, sec in enumerate(sections_raw):
        if not isinstance(sec, dict):
            raise DfpError(f"corrupted DFP: section {i} is not an object")
        length = _check_int(sec.get("length"), f"section {i} length", 0, MAX_FILE_BYTES)
        crc = _check_int(sec.get("crc32"), f"section {i} crc32", 0, 0xFFFFFFFF)
        if pos + length > len(payload):
            raise DfpError(
                f"truncated DFP: section {i} needs {length} bytes at payload offset {pos}, "
                f"payload has {len(payload)}"
            )
        blob = bytes(payload[pos: pos + length])
        if zlib.crc32(blob) != crc:
            raise DfpError(f"corrupted DFP: section {i} checksum mismatch")
        sections.append(blob)
        pos += length
    if pos != len(payload):
        raise DfpError(f"corrupted DFP: {len(payload) - pos} unexpected trailing bytes")

    num_chips = _check_int(header.get("num_chips"), "num_chips", 1, MAX_CHIPS)
    compiler_version = header.get("compiler_version")
    if not isinstance(compiler_version, str) or len(compiler_version) > MAX_NAME:
        raise DfpError("corrupted DFP: compiler_version is not a string")
    models_raw = header.get("models")
    if not isinstance(models_raw, list) or not 1 <= len(models_raw) <= MAX_MODELS:
        raise DfpError(f"corrupted DFP: expected 1..{MAX_MODELS} models")

    used: set[int] = set()

    def take(ref: Any, what: str, required: bool) -> bytes | None:
        if ref is None and not required:
            return None
        idx = _check_int(ref, what, 0, len(sections) - 1 if sections else -1)
        if idx in used:
            raise DfpError(f"corrupted DFP: {what} reuses section {idx}")
        used.add(idx)
        return sections[idx]

    models: list[ModelInfo] = []
    seen_in: set[int] = set()
    seen_out: set[int] = set()
    for mi, raw in enumerate(models_raw):
        if not isinstance(raw, dict):
            raise DfpError(f"corrupted DFP: model {mi} is not an object")
        name = _check_name(raw.get("name"), f"model {mi} name")
        ports: dict[str, tuple[PortInfo, ...]] = {}
        for kind, seen in (("inputs", seen_in), ("outputs", seen_out)):
            plist = raw.get(kind)
            if not isinstance(plist, list) or not 1 <= len(plist) <= MAX_PORTS:
                raise DfpError(f"corrupted DFP: model {mi} needs 1..{MAX_PORTS} {kind}")
            parsed = tuple(_parse_port(p, mi, f"model {mi} {kind}[{j}]")
                           for j, p in enumerate(plist))
            for p in parsed:
                if p.port in seen:
                    raise DfpError(f"corrupted DFP: {kind[:-1]} port {p.port} appears twice")
                seen.add(p.port)
            ports[kind] = parsed
        perf = raw.get("perf")
        if perf is not None and not isinstance(perf, dict):
            raise DfpError(f"corrupted DFP: model {mi} perf is not an object")
        # A perf nested almost to the recursion limit loads, then cannot be written back.
        if perf is not None and _json_depth(perf) > MAX_PERF_DEPTH:
            raise DfpError(f"corrupted DFP: model {mi} perf nests deeper than {MAX_PERF_DEPTH}")
        if perf is not None:
            _check_modeled(perf, mi)
        graph = take(raw.get("graph"), f"model {mi} graph", True)
        assert graph is not None
        models.append(ModelInfo(
            index=mi, name=name, inputs=ports["inputs"], outputs=ports["outputs"], graph=graph,
            pre_model=take(raw.get("pre"), f"model {mi} pre", False),
            post_model=take(raw.get("post"), f"model {mi} post", False),
            perf=perf,
        ))
    if len(used) != len(sections):
        raise DfpError("corrupted DFP: sections not referenced by any model")

    dfp = Dfp.__new__(Dfp)
    dfp.version = version
    dfp.compiler_version = compiler_version
    dfp.num_chips = num_chips
    dfp._models = tuple(models)
    return dfp
