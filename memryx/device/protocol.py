"""The wire protocol between a runtime client and the device server, sans I/O.

The device server is a separate process that runs one (simulated) MX3 and is
shared by many client processes over a Unix socket. This module is only the
protocol: framing, payload codecs and the conversation's state machine. It
opens no sockets, runs no event loop and starts no threads: bytes go in and
events come out (:meth:`Connection.receive_data`), events go in and bytes come
out (:meth:`Connection.send`). The async glue that owns the socket and the
waiters lives elsewhere.

Framing
=======

Every message is a 16-byte header followed by ``length`` payload bytes. All
integers are little-endian (``struct`` format ``"<2sBBIII"``)::

    offset  size  field
    0       2     magic b"MX"
    2       1     protocol version (u8), currently 1
    3       1     kind (u8), a :class:`Kind`
    4       4     model (u32): a model index, 0 when unused
    8       4     seq (u32): a frame number or request id, 0 when unused
    12      4     length (u32): payload bytes that follow

A reader rejects a bad magic, an unknown version, an unknown kind, a length
(or, for a chunked message, a running total) above its ``max_payload``, or a
length the kind cannot have (CLOSE carries no payload, OPEN exactly 36 bytes,
JSON at most :data:`MAX_JSON_BYTES`) as soon as the header bytes arrive, before
it buffers any payload. The payload buffer
then grows only with the bytes actually received: a peer's claim allocates
nothing.

Messages
========

======================  ======  =================================================
kind                    sender  payload
======================  ======  =================================================
HELLO                   client  JSON ``{"protocol": 1, "client": str, "pid": int,
                                "scheduler": {...}, "stream_tags": bool}``
                                (scheduler and stream_tags optional)
WELCOME                 server  JSON ``{"protocol": 1, "server": str, "max_payload": int,
                                "idle_timeout": float, "scheduler": {...},
                                "stream_tags": bool}`` (all but the first three
                                optional)
OPEN                    client  32-byte sha256 of the DFP bytes, u32 group_id
NEED_DFP                server  empty: the server has no cached copy of that DFP
DFP                     client  the DFP bytes (their sha256 must equal OPEN's)
OPENED                  server  JSON ``{"models": [{"capacity": int}, ...]}``
FRAME (model, seq)      client  a tensor pack (:func:`pack_arrays`); with stream tags
                                (see *Stream tags*) an i64 stream first
OUTPUT (model, seq)     server  a tensor pack; seq echoes the frame's
STATS (seq)             client  empty; seq is a request id
STATS_REPLY (seq)       server  JSON object; seq echoes the request's
ERROR (model, seq)      both    JSON ``{"code": str, "message": str, "fatal": bool}``
CLOSE                   client  empty: the client sends nothing more
BYE                     server  empty: the answer to CLOSE, the server's last message
CHUNK (model=kind)      both    the first bytes of a DFP, FRAME or OUTPUT payload
======================  ======  =================================================

Chunks
------

A DFP, FRAME or OUTPUT payload larger than the sender's ``chunk_size`` travels
as CHUNK messages followed by the message itself: each CHUNK's ``model`` field
holds the kind of the message it belongs to (its ``seq`` is 0, its payload is
not empty), and the final message carries the last bytes with its own header.
The receiver checks at the first CHUNK header that the peer may send that
kind now, and at every header that the running total stays within its
``max_payload``; no other message may come between. So payloads of any size
(beyond the u32 length of one header) pass, and ``max_payload`` bounds the
whole message, not a piece of it.

Scheduler options
-----------------

HELLO's optional ``scheduler`` object asks for this client's turns on the
chip, with the SDK's names: ``frame_limit`` (int >= 1), ``time_limit`` (ms,
>= 0; 0: the server's longest turn), ``stop_on_empty`` (bool),
``ifmap_queue_size`` and ``ofmap_queue_size`` (ints >= 1). The server checks
them (a value it cannot take ends that connection with a fatal ``options``
ERROR), caps them by its own maxima and answers WELCOME with the ``scheduler``
object it applies, every field present. A client that sends none gets the
server's own options, and WELCOME still reports them. The fields were added
without a version bump: a peer ignores JSON fields it does not know, so a
server that predates them simply applies its own options and sends no
``scheduler`` back (the client then knows its options were not applied).

Stream tags
-----------

A device that works per input stream (the simulated device's ``sampled`` mode
answers a frame with its own stream's newest outputs) must know each frame's
stream. A client that sends them says ``"stream_tags": true`` in HELLO; a server
that takes them answers ``"stream_tags": true`` in WELCOME (only when asked: a
WELCOME that agrees to tags nobody asked for is a protocol error). From then on
every FRAME payload of that connection starts with the frame's stream, a
little-endian signed 64-bit integer (``"<q"``: a callback stream's index, or a
negative number per request receiver), and the tensor pack follows it (its
8-byte padding still counts from the start of the payload). A tagged FRAME
shorter than those 8 bytes is a protocol error. Like the scheduler options this
was added without a version bump: a server that predates it ignores the field
and answers without it, so the client sends untagged frames (then all frames of
a connection are one stream to the server, as before); a client that predates
it never asks, and a new server reads its frames untagged.

JSON payloads are UTF-8, decode to an object, nest at most
:data:`MAX_JSON_DEPTH` containers deep and contain no NaN / Infinity. Header
fields a kind does not use (model, seq) must be 0.

Tensor pack
===========

``u16 count`` (at most :data:`MAX_ARRAYS`), then per array: ``u8 dtype code``
(:data:`DTYPE_CODES`), ``u8 ndim`` (at most :data:`MAX_NDIM`), ``ndim x u32``
dims, zero padding up to an 8-byte boundary (counted from the start of the
payload), then the array's C-order little-endian bytes. The bytes of the last
array end the payload exactly.

Conversation
============

::

    client                           server
    HELLO            ------------>
                     <------------   WELCOME         (or a fatal ERROR)
    OPEN(hash, grp)  ------------>
                     <------------   NEED_DFP        (only when not cached)
    DFP(bytes)       ------------>
                     <------------   OPENED(models)
    FRAME ...        ------------>
                     <------------   OUTPUT ...
    CLOSE            ------------>
                     <------------   OUTPUT ... (still in flight), BYE

STATS / STATS_REPLY and CLOSE may come any time after the handshake. One
connection opens one DFP; a failed OPEN is answered with a fatal ERROR. A side
sends nothing after its CLOSE, BYE or fatal ERROR; the other side keeps
receiving what was already in flight (a server answers CLOSE with the OUTPUTs
still in flight, then BYE).

Both peers run a :class:`Connection` and track the same conversation. A message
the state does not allow raises :class:`ProtocolError`: on receive the
connection becomes :attr:`~Connection.broken` and every later call raises; on
send (local misuse) nothing changes and the connection stays usable.
"""

from __future__ import annotations

import enum
import hashlib
import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final, NoReturn, TypeAlias

import numpy as np
from numpy.typing import NDArray

from .._exceptions import ProtocolError
from ..dfp import MAX_MODELS

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_MAX_PAYLOAD",
    "DTYPE_CODES",
    "HEADER",
    "HEADER_SIZE",
    "MAGIC",
    "MAX_ARRAYS",
    "MAX_JSON_BYTES",
    "MAX_JSON_DEPTH",
    "MAX_MESSAGE",
    "MAX_NDIM",
    "MAX_PENDING_STATS",
    "PROTOCOL_VERSION",
    "Bye",
    "Close",
    "Closed",
    "Connection",
    "DfpData",
    "Error",
    "Event",
    "Frame",
    "Hello",
    "Kind",
    "NeedDfp",
    "Open",
    "Opened",
    "OpenedModel",
    "Output",
    "ProtocolError",
    "Role",
    "State",
    "Stats",
    "StatsReply",
    "Welcome",
    "dfp_digest",
    "pack_arrays",
    "unpack_arrays",
]


MAGIC: Final = b"MX"
PROTOCOL_VERSION: Final = 1
HEADER: Final = struct.Struct("<2sBBIII")
HEADER_SIZE: Final = HEADER.size
#: Default limit of one message's payload (chunks included), for both directions.
DEFAULT_MAX_PAYLOAD: Final = 64 * 1024 * 1024
#: Payloads above this many bytes are sent in CHUNKs of this size (see *Chunks*).
DEFAULT_CHUNK_SIZE: Final = 16 * 1024 * 1024
#: Largest ``max_payload`` a connection may have (a chunked message's total).
MAX_MESSAGE: Final = 1 << 50
#: Limit of a JSON payload (control messages are small), on top of ``max_payload``.
MAX_JSON_BYTES: Final = 1024 * 1024
#: Deepest container nesting a JSON payload may have (``{}`` is 1, ``{"a": []}`` 2).
MAX_JSON_DEPTH: Final = 16
#: Most arrays in one tensor pack.
MAX_ARRAYS: Final = 1024
#: Most dimensions of one array in a tensor pack.
MAX_NDIM: Final = 8
#: Most STATS requests a client may have unanswered at once.
MAX_PENDING_STATS: Final = 1024

_U32_MAX: Final = 0xFFFFFFFF
_HASH_SIZE: Final = 32
_OPEN = struct.Struct("<32sI")
_COUNT = struct.Struct("<H")
_STREAM = struct.Struct("<q")
_I64_MIN: Final = -(1 << 63)
_I64_MAX: Final = (1 << 63) - 1
# numpy refuses shapes whose non-zero dims multiply past intp, even when one dim is 0.
_MAX_SHAPE_BYTES: Final = 1 << 48

#: The dtypes a tensor pack carries, by wire code (little-endian on the wire).
DTYPE_CODES: Final[Mapping[int, np.dtype[Any]]] = MappingProxyType({
    1: np.dtype("<f4"),
    2: np.dtype("<f2"),
    3: np.dtype("<f8"),
    4: np.dtype("u1"),
    5: np.dtype("i1"),
    6: np.dtype("<u2"),
    7: np.dtype("<i2"),
    8: np.dtype("<i4"),
    9: np.dtype("<i8"),
    10: np.dtype("?"),
})
_CODE_OF: Final = {(dt.kind, dt.itemsize): code for code, dt in DTYPE_CODES.items()}


class Kind(enum.IntEnum):
    """The kind byte of a message header."""

    HELLO = 1
    WELCOME = 2
    OPEN = 3
    NEED_DFP = 4
    DFP = 5
    OPENED = 6
    FRAME = 7
    OUTPUT = 8
    STATS = 9
    STATS_REPLY = 10
    ERROR = 11
    CLOSE = 12
    BYE = 13
    CHUNK = 14


class Role(enum.Enum):
    """Which end of the conversation a :class:`Connection` is."""

    CLIENT = "client"
    SERVER = "server"


class State(enum.Enum):
    """Where the conversation stands (the same on both ends once a message arrived)."""

    AWAIT_HELLO = "await_hello"
    """Nothing yet: the client's first message must be HELLO."""
    AWAIT_WELCOME = "await_welcome"
    """HELLO sent; the server answers WELCOME."""
    IDLE = "idle"
    """Handshake done, no DFP open: the client may OPEN."""
    OPENING = "opening"
    """OPEN sent; the server answers NEED_DFP or OPENED."""
    SENDING_DFP = "sending_dfp"
    """NEED_DFP sent; the client sends DFP."""
    LOADING = "loading"
    """DFP sent; the server answers OPENED."""
    OPEN = "open"
    """OPENED: frames and outputs flow."""


_KIND_VALUES: Final = frozenset(int(k) for k in Kind)
_CHUNKABLE: Final = frozenset({Kind.DFP, Kind.FRAME, Kind.OUTPUT})
_SENDS: Final[Mapping[Role, frozenset[Kind]]] = MappingProxyType({
    Role.CLIENT: frozenset({Kind.HELLO, Kind.OPEN, Kind.DFP, Kind.FRAME, Kind.STATS,
                            Kind.ERROR, Kind.CLOSE}),
    Role.SERVER: frozenset({Kind.WELCOME, Kind.NEED_DFP, Kind.OPENED, Kind.OUTPUT,
                            Kind.STATS_REPLY, Kind.ERROR, Kind.BYE}),
})
_AFTER_HANDSHAKE: Final = frozenset(
    {State.IDLE, State.OPENING, State.SENDING_DFP, State.LOADING, State.OPEN})
_ALLOWED_IN: Final[Mapping[Kind, frozenset[State]]] = MappingProxyType({
    Kind.HELLO: frozenset({State.AWAIT_HELLO}),
    Kind.WELCOME: frozenset({State.AWAIT_WELCOME}),
    Kind.OPEN: frozenset({State.IDLE}),
    Kind.NEED_DFP: frozenset({State.OPENING}),
    Kind.DFP: frozenset({State.SENDING_DFP}),
    Kind.OPENED: frozenset({State.OPENING, State.LOADING}),
    Kind.FRAME: frozenset({State.OPEN}),
    Kind.OUTPUT: frozenset({State.OPEN}),
    Kind.STATS: _AFTER_HANDSHAKE,
    Kind.STATS_REPLY: _AFTER_HANDSHAKE,
    Kind.CLOSE: _AFTER_HANDSHAKE,
    Kind.BYE: _AFTER_HANDSHAKE,
    Kind.ERROR: frozenset(State),
})
_USES_MODEL: Final = frozenset({Kind.FRAME, Kind.OUTPUT, Kind.ERROR})
_USES_SEQ: Final = frozenset({Kind.FRAME, Kind.OUTPUT, Kind.STATS, Kind.STATS_REPLY, Kind.ERROR})
_FIXED_LENGTH: Final[Mapping[Kind, int]] = MappingProxyType({
    Kind.NEED_DFP: 0, Kind.STATS: 0, Kind.CLOSE: 0, Kind.BYE: 0, Kind.OPEN: _OPEN.size,
})
_JSON_KINDS: Final = frozenset(
    {Kind.HELLO, Kind.WELCOME, Kind.OPENED, Kind.STATS_REPLY, Kind.ERROR})


# -- events -----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Hello:
    """Client → server, first message: who is calling."""

    client: str
    pid: int
    scheduler: Mapping[str, Any] | None = None
    """The scheduler options asked for (see *Scheduler options*), or None: the server's."""
    stream_tags: bool = False
    """The client tags each FRAME with its stream, if the server agrees (*Stream tags*)."""


@dataclass(frozen=True, slots=True)
class Welcome:
    """Server → client, answer to HELLO; ``max_payload`` bounds what the client may send.

    ``idle_timeout``: seconds of silence after which the server drops a
    connection with nothing in flight (0: never); clients send STATS to keep
    an idle connection alive.
    """

    server: str
    max_payload: int
    idle_timeout: float = 0.0
    scheduler: Mapping[str, Any] | None = None
    """The scheduler options the server applies to this client (None: a server that
    predates per-client options)."""
    stream_tags: bool = False
    """The server reads FRAMEs tagged with their stream (only when HELLO asked)."""


@dataclass(frozen=True, slots=True)
class Open:
    """Client → server: load the DFP whose sha256 is ``dfp_hash`` on chip group ``group_id``."""

    dfp_hash: bytes
    group_id: int


@dataclass(frozen=True, slots=True)
class NeedDfp:
    """Server → client: the DFP is not cached; send its bytes."""


@dataclass(frozen=True, slots=True)
class DfpData:
    """Client → server: the DFP bytes asked for by NEED_DFP (``bytes`` when received)."""

    data: bytes | bytearray | memoryview


@dataclass(frozen=True, slots=True)
class OpenedModel:
    """One model of an opened DFP."""

    capacity: int
    """How many frames of the model may be in flight at once."""


@dataclass(frozen=True, slots=True)
class Opened:
    """Server → client: the DFP is loaded; one entry per model, in ``model_idx`` order."""

    models: tuple[OpenedModel, ...]


@dataclass(frozen=True, slots=True, eq=False)
class Frame:
    """Client → server: one frame (the arrays of all input ports) for ``model``.

    Received arrays are writable views into a buffer that belongs to this event
    alone (no copy). Compared by identity: arrays have no plain ``==``. ``stream``
    travels only on a connection with stream tags (received untagged: 0).
    """

    model: int
    seq: int
    arrays: Sequence[NDArray[Any]]
    stream: int = 0


@dataclass(frozen=True, slots=True, eq=False)
class Output:
    """Server → client: the outputs of frame ``seq`` of ``model`` (arrays as in :class:`Frame`)."""

    model: int
    seq: int
    arrays: Sequence[NDArray[Any]]


@dataclass(frozen=True, slots=True)
class Stats:
    """Client → server: ask for the server's statistics; ``seq`` is the request id."""

    seq: int


@dataclass(frozen=True, slots=True)
class StatsReply:
    """Server → client: the statistics asked for by request ``seq``."""

    seq: int
    data: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Error:
    """Either way: something failed. After a ``fatal`` error its sender sends nothing more.

    ``model`` and ``seq`` name the frame or request the error is about (0 when none).
    """

    code: str
    message: str
    fatal: bool
    model: int = 0
    seq: int = 0


@dataclass(frozen=True, slots=True)
class Close:
    """Client → server: the client sends nothing more; the server drains and says BYE."""


@dataclass(frozen=True, slots=True)
class Bye:
    """Server → client: answer to CLOSE, the server's last message."""


@dataclass(frozen=True, slots=True)
class Closed:
    """The peer closed the transport (``receive_data(b"")``); never sent."""


Event: TypeAlias = (Hello | Welcome | Open | NeedDfp | DfpData | Opened | Frame | Output | Stats
                    | StatsReply | Error | Close | Bye | Closed)

_KIND_OF: Final[Mapping[type, Kind]] = MappingProxyType({
    Hello: Kind.HELLO, Welcome: Kind.WELCOME, Open: Kind.OPEN, NeedDfp: Kind.NEED_DFP,
    DfpData: Kind.DFP, Opened: Kind.OPENED, Frame: Kind.FRAME, Output: Kind.OUTPUT,
    Stats: Kind.STATS, StatsReply: Kind.STATS_REPLY, Error: Kind.ERROR, Close: Kind.CLOSE,
    Bye: Kind.BYE,
})


def dfp_digest(data: bytes | bytearray | memoryview) -> bytes:
    """The 32-byte sha256 that OPEN names a DFP by."""
    return hashlib.sha256(data).digest()


# -- tensor pack ------------------------------------------------------------------------------
def _fail(message: str) -> NoReturn:
    raise ProtocolError(message)


def _bytes_view(data: bytes | bytearray | memoryview) -> memoryview:
    """``data`` as a flat memoryview of unsigned bytes (no copy)."""
    view = memoryview(data)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _pack(arrays: Sequence[NDArray[Any]], prefix: bytes = b""
          ) -> tuple[list[bytes | memoryview], int]:
    """The pieces of a tensor pack after ``prefix`` (8 bytes or none: the padding counts
    from the start of the payload), and their length."""
    if len(arrays) > MAX_ARRAYS:
        _fail(f"tensor pack: {len(arrays)} arrays, at most {MAX_ARRAYS} allowed")
    pieces: list[bytes | memoryview] = []
    head = bytearray(prefix + _COUNT.pack(len(arrays)))
    offset = len(head)
    for i, array in enumerate(arrays):
        if not isinstance(array, np.ndarray):
            raise TypeError(f"tensor pack: array {i} is a {type(array).__name__}, not an ndarray")
        code = _CODE_OF.get((array.dtype.kind, array.dtype.itemsize))
        if code is None or array.dtype.fields is not None:
            _fail(f"tensor pack: array {i} has dtype {array.dtype}, which the wire does not carry "
                  f"(supported: {', '.join(dt.name for dt in DTYPE_CODES.values())})")
        if array.ndim > MAX_NDIM:
            _fail(f"tensor pack: array {i} has {array.ndim} dimensions, at most {MAX_NDIM} allowed")
        if any(d > _U32_MAX for d in array.shape):
            _fail(f"tensor pack: array {i} has a dimension above {_U32_MAX}: {array.shape}")
        wire = DTYPE_CODES[code]
        if array.dtype != wire:  # big-endian input
            array = array.astype(wire)
        if not array.flags.c_contiguous:
            array = array.copy(order="C")
        head += struct.pack(f"<BB{array.ndim}I", code, array.ndim, *array.shape)
        offset += 2 + 4 * array.ndim
        pad = -offset % 8
        head += bytes(pad)
        offset += pad
        if array.nbytes:
            pieces.append(bytes(head))
            head = bytearray()
            pieces.append(array.reshape(-1).view(np.uint8).data)
            offset += array.nbytes
    if head:
        pieces.append(bytes(head))
    return pieces, offset


def pack_arrays(arrays: Sequence[NDArray[Any]]) -> list[bytes | memoryview]:
    """Encode ``arrays`` as a tensor pack, as pieces for ``sendmsg`` / ``writelines``.

    The array data is not copied: the pieces hold small header ``bytes`` and
    ``memoryview`` objects of the arrays' own buffers, so the arrays must not be
    changed until the pieces are written. Arrays that are not C-contiguous (or
    big-endian) are converted first. Raises :class:`ProtocolError` for a dtype
    the wire does not carry, too many arrays or dimensions, and ``TypeError``
    for something that is not an ``ndarray``.
    """
    return _pack(arrays)[0]


def _unpack(view: memoryview, *, copy: bool, writable: bool) -> list[NDArray[Any]]:
    size = len(view)
    if size < _COUNT.size:
        _fail(f"tensor pack truncated: {size} bytes, the array count alone needs {_COUNT.size}")
    (count,) = _COUNT.unpack_from(view, 0)
    if count > MAX_ARRAYS:
        _fail(f"tensor pack: {count} arrays, at most {MAX_ARRAYS} allowed")
    pos = _COUNT.size
    arrays: list[NDArray[Any]] = []
    for i in range(count):
        if size - pos < 2:
            _fail(f"tensor pack truncated: array {i} header missing at offset {pos}")
        code, ndim = view[pos], view[pos + 1]
        dtype = DTYPE_CODES.get(code)
        if dtype is None:
            _fail(f"tensor pack: array {i} has unknown dtype code {code}")
        if ndim > MAX_NDIM:
            _fail(f"tensor pack: array {i} has {ndim} dimensions, at most {MAX_NDIM} allowed")
        pos += 2
        if size - pos < 4 * ndim:
            _fail(f"tensor pack truncated: array {i} dims missing at offset {pos}")
        dims = struct.unpack_from(f"<{ndim}I", view, pos)
        pos += 4 * ndim
        pad = -pos % 8
        if size - pos < pad:
            _fail(f"tensor pack truncated: array {i} padding missing at offset {pos}")
        if any(view[pos: pos + pad]):
            _fail(f"tensor pack: array {i} has non-zero padding at offset {pos}")
        pos += pad
        nbytes = shape_bytes = dtype.itemsize
        for d in dims:
            nbytes *= d
            shape_bytes *= max(d, 1)
            if shape_bytes > _MAX_SHAPE_BYTES:
                _fail(f"tensor pack: array {i} dims {dims} overflow ({dtype.name})")
        if nbytes > size - pos:
            _fail(f"tensor pack: array {i} ({dtype.name}{list(dims)}) needs {nbytes} bytes, "
                  f"only {size - pos} left in the payload")
        if dtype.kind == "b" and nbytes and np.frombuffer(view, np.uint8, nbytes, pos).max() > 1:
            _fail(f"tensor pack: array {i} (bool) holds a byte other than 0 or 1")
        array = np.frombuffer(view, dtype, nbytes // dtype.itemsize, pos).reshape(dims)
        if copy:
            array = array.copy()
        elif array.flags.writeable != writable:
            array.flags.writeable = writable
        arrays.append(array)
        pos += nbytes
    if pos != size:
        _fail(f"tensor pack: {size - pos} unexpected trailing bytes after {count} arrays")
    return arrays


def unpack_arrays(buf: bytes | bytearray | memoryview, *, copy: bool = True
                  ) -> list[NDArray[Any]]:
    """Decode a tensor pack.

    With ``copy=True`` every array owns its (writable) data; with ``copy=False``
    the arrays are read-only views into ``buf``, which must then stay unchanged.
    Every count, dimension and size is checked against the buffer before
    anything is allocated; a malformed pack raises :class:`ProtocolError`.
    """
    return _unpack(_bytes_view(buf), copy=copy, writable=False)


# -- JSON -------------------------------------------------------------------------------------
def _reject_constant(name: str) -> NoReturn:
    _fail(f"JSON payload holds {name}, which is not valid JSON")


def _too_deep(value: Any) -> bool:
    """Whether ``value`` nests containers deeper than MAX_JSON_DEPTH, without recursion."""
    depth, level = 0, [value]
    while True:
        containers = [v for v in level if isinstance(v, (dict, list))]
        if not containers:
            return False
        depth += 1
        if depth > MAX_JSON_DEPTH:
            return True
        level = [c for v in containers for c in (v.values() if isinstance(v, dict) else v)]


def _decode_json(payload: bytearray, kind: Kind) -> dict[str, Any]:
    problem = None
    try:
        value = json.loads(str(payload, "utf-8"), parse_constant=_reject_constant)
    except RecursionError:
        problem = f"JSON nested deeper than {MAX_JSON_DEPTH} levels"
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError included
        problem = f"not valid UTF-8 JSON ({exc})"
    if problem is not None:
        _fail(f"{kind.name} payload: {problem}")
    if not isinstance(value, dict):
        _fail(f"{kind.name} payload must be a JSON object, got {type(value).__name__}")
    if _too_deep(value):
        _fail(f"{kind.name} payload: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return value


def _encode_json(value: Mapping[str, Any], kind: Kind) -> bytes:
    if _too_deep(dict(value)):
        _fail(f"{kind.name} payload: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    problem = None
    try:
        data = json.dumps(dict(value), allow_nan=False, ensure_ascii=False,
                          separators=(",", ":")).encode("utf-8")
    except (TypeError, ValueError) as exc:  # UnicodeEncodeError included
        problem = str(exc)
    if problem is not None:
        _fail(f"{kind.name} payload cannot be encoded as JSON: {problem}")
    if len(data) > MAX_JSON_BYTES:
        _fail(f"{kind.name} payload: {len(data)} bytes of JSON, at most {MAX_JSON_BYTES} allowed")
    return data


def _int(value: Any, what: str, lo: int = 0, hi: int = _U32_MAX) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        _fail(f"{what}: expected an integer in [{lo}, {hi}], got {value!r:.80}")
    return value


def _seconds(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            0 <= value <= 1e9):
        _fail(f"{what}: expected a number of seconds in [0, 1e9], got {value!r:.80}")
    return float(value)


def _str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        _fail(f"{what}: expected a string, got {type(value).__name__}")
    return value


def _bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        _fail(f"{what}: expected true or false, got {value!r:.80}")
    return value


def _object(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        _fail(f"{what}: expected an object, got {type(value).__name__}")
    return value


def _optional_object(value: Any, what: str) -> Mapping[str, Any] | None:
    return None if value is None else _object(value, what)


def _protocol_field(obj: Mapping[str, Any], kind: Kind) -> None:
    version = obj.get("protocol")
    if isinstance(version, bool) or version != PROTOCOL_VERSION:
        _fail(f"{kind.name}: protocol {version!r:.40} is not supported "
              f"(this runtime speaks {PROTOCOL_VERSION})")


def _models(raw: Any) -> tuple[OpenedModel, ...]:
    if not isinstance(raw, (list, tuple)) or not 1 <= len(raw) <= MAX_MODELS:
        _fail(f"OPENED.models: expected a list of 1..{MAX_MODELS} models")
    out = []
    for i, entry in enumerate(raw):
        if isinstance(entry, OpenedModel):
            entry = {"capacity": entry.capacity}
        if not isinstance(entry, dict):
            _fail(f"OPENED.models[{i}]: expected an object, got {type(entry).__name__}")
        out.append(OpenedModel(_int(entry.get("capacity"), f"OPENED.models[{i}].capacity", 1)))
    return tuple(out)


# -- decoding one message ---------------------------------------------------------------------
def _decode(kind: Kind, model: int, seq: int, payload: bytearray, tagged: bool = False
            ) -> Event:
    if kind is Kind.HELLO:
        obj = _decode_json(payload, kind)
        _protocol_field(obj, kind)
        return Hello(_str(obj.get("client"), "HELLO.client"), _int(obj.get("pid"), "HELLO.pid"),
                     _optional_object(obj.get("scheduler"), "HELLO.scheduler"),
                     _bool(obj.get("stream_tags", False), "HELLO.stream_tags"))
    if kind is Kind.WELCOME:
        obj = _decode_json(payload, kind)
        _protocol_field(obj, kind)
        return Welcome(_str(obj.get("server"), "WELCOME.server"),
                       _int(obj.get("max_payload"), "WELCOME.max_payload", 1, MAX_MESSAGE),
                       _seconds(obj.get("idle_timeout", 0.0), "WELCOME.idle_timeout"),
                       _optional_object(obj.get("scheduler"), "WELCOME.scheduler"),
                       _bool(obj.get("stream_tags", False), "WELCOME.stream_tags"))
    if kind is Kind.OPEN:
        dfp_hash, group_id = _OPEN.unpack(payload)
        return Open(dfp_hash, group_id)
    if kind is Kind.NEED_DFP:
        return NeedDfp()
    if kind is Kind.DFP:
        return DfpData(bytes(payload))
    if kind is Kind.OPENED:
        return Opened(_models(_decode_json(payload, kind).get("models")))
    if kind is Kind.FRAME:
        if not tagged:
            return Frame(model, seq, tuple(_unpack(memoryview(payload), copy=False,
                                                   writable=True)))
        if len(payload) < _STREAM.size:
            _fail(f"FRAME payload truncated: {len(payload)} bytes, its stream tag alone "
                  f"needs {_STREAM.size}")
        (stream,) = _STREAM.unpack_from(payload)
        return Frame(model, seq, tuple(_unpack(memoryview(payload)[_STREAM.size:], copy=False,
                                               writable=True)), stream)
    if kind is Kind.OUTPUT:
        return Output(model, seq, tuple(_unpack(memoryview(payload), copy=False, writable=True)))
    if kind is Kind.STATS:
        return Stats(seq)
    if kind is Kind.STATS_REPLY:
        return StatsReply(seq, _decode_json(payload, kind))
    if kind is Kind.ERROR:
        obj = _decode_json(payload, kind)
        return Error(_str(obj.get("code"), "ERROR.code"), _str(obj.get("message"), "ERROR.message"),
                     _bool(obj.get("fatal"), "ERROR.fatal"), model, seq)
    if kind is Kind.CLOSE:
        return Close()
    return Bye()


# -- the connection ---------------------------------------------------------------------------
class Connection:
    """One end of a client-server conversation: bytes in, events out; events in, bytes out.

    ``role`` is :attr:`Role.CLIENT` or :attr:`Role.SERVER`; ``max_payload``
    bounds the payload of every message this end accepts (and, on a server,
    the WELCOME announcement; a client obeys the limit the server announces).

    Not thread-safe: one owner drives it, typically the task that owns the socket.
    """

    def __init__(self, role: Role, *, max_payload: int = DEFAULT_MAX_PAYLOAD,
                 chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        if not isinstance(role, Role):
            raise TypeError(f"role must be a Role, got {role!r:.80}")
        if isinstance(max_payload, bool) or not isinstance(max_payload, int) or not (
                1 <= max_payload <= MAX_MESSAGE):
            raise ValueError(f"max_payload must be an integer in [1, {MAX_MESSAGE}], "
                             f"got {max_payload!r:.80}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or not (
                1 <= chunk_size <= _U32_MAX):
            raise ValueError(f"chunk_size must be an integer in [1, {_U32_MAX}], "
                             f"got {chunk_size!r:.80}")
        self.role: Final = role
        self.max_payload: Final = max_payload
        self.chunk_size: Final = chunk_size
        self._peer: Final = Role.SERVER if role is Role.CLIENT else Role.CLIENT
        self._state = State.AWAIT_HELLO
        self._done: dict[Role, str | None] = {Role.CLIENT: None, Role.SERVER: None}
        self._close_seen = False
        self._peer_closed = False
        self._broken: ProtocolError | None = None
        self._peer_max_payload: int | None = None
        self._dfp_hash: bytes | None = None
        self._models: tuple[OpenedModel, ...] = ()
        self._pending_stats: set[int] = set()
        self._tags_asked = False
        self._stream_tags = False
        # receive side: a partial header, or a parsed header and the payload so far
        self._head = bytearray()
        self._header: tuple[Kind, int, int, int] | None = None
        self._payload = bytearray()  # the message's payload so far, chunks included
        self._msg_end = 0  # len(self._payload) once the current header's bytes are in
        self._chunking: Kind | None = None  # the kind whose CHUNKs are arriving

    # -- inspection -----------------------------------------------------------------------
    @property
    def state(self) -> State:
        return self._state

    @property
    def broken(self) -> bool:
        """The peer broke the protocol; every further call raises :class:`ProtocolError`."""
        return self._broken is not None

    @property
    def local_done(self) -> bool:
        """This end sent its last message (CLOSE, BYE or a fatal ERROR)."""
        return self._done[self.role] is not None

    @property
    def remote_done(self) -> bool:
        """The peer sent its last message (CLOSE, BYE or a fatal ERROR)."""
        return self._done[self._peer] is not None

    @property
    def peer_closed(self) -> bool:
        """The transport reached end of file (a :class:`Closed` event was returned)."""
        return self._peer_closed

    @property
    def models(self) -> tuple[OpenedModel, ...]:
        """The models of the opened DFP (empty until OPENED)."""
        return self._models

    @property
    def stream_tags(self) -> bool:
        """FRAMEs carry their stream (HELLO asked for it and WELCOME agreed)."""
        return self._stream_tags

    @property
    def send_limit(self) -> int:
        """Most payload bytes one outgoing message may have."""
        return self._peer_max_payload if self._peer_max_payload is not None else self.max_payload

    def __repr__(self) -> str:
        flags = [f for f, on in (("local_done", self.local_done), ("remote_done", self.remote_done),
                                 ("peer_closed", self._peer_closed), ("broken", self.broken)) if on]
        return f"<Connection {self.role.value} {self._state.name}{''.join(' ' + f for f in flags)}>"

    # -- receiving ------------------------------------------------------------------------
    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Feed bytes read from the transport; returns the events they complete.

        Any split works: a message may arrive one byte at a time, or many in one
        chunk. The bytes are copied, so the caller may reuse its buffer. Empty
        ``data`` means end of file and yields :class:`Closed` (a
        :class:`ProtocolError` when it cuts a message short).
        """
        self._check_usable()
        if self._peer_closed:
            raise ProtocolError("receive_data() after the peer closed the connection")
        view = _bytes_view(data)
        try:
            if not len(view):
                return [self._end_of_file()]
            return self._feed(view)
        except ProtocolError as exc:
            self._broken = exc
            raise

    def _end_of_file(self) -> Closed:
        if self._header is not None or self._chunking is not None:
            kind = self._chunking or (self._header[0] if self._header else Kind.CHUNK)
            _fail(f"connection closed mid-message: truncated {kind.name}, "
                  f"{len(self._payload)} of {self._msg_end} payload bytes received")
        if self._head:
            _fail(f"connection closed mid-message: truncated header, "
                  f"{len(self._head)} of {HEADER_SIZE} bytes received")
        self._peer_closed = True
        return Closed()

    def _feed(self, view: memoryview) -> list[Event]:
        events: list[Event] = []
        pos, end = 0, len(view)
        while pos < end:
            if self._header is None:
                take = min(HEADER_SIZE - len(self._head), end - pos)
                self._head += view[pos: pos + take]
                pos += take
                self._check_header_prefix()
                if len(self._head) < HEADER_SIZE:
                    break
                self._header = self._parse_header()
                self._head.clear()
            else:
                take = min(self._msg_end - len(self._payload), end - pos)
                self._payload += view[pos: pos + take]
                pos += take
            if len(self._payload) == self._msg_end:
                event = self._complete()
                if event is not None:
                    events.append(event)
        return events

    def _check_header_prefix(self) -> None:
        head = self._head
        if head[:2] != MAGIC[: len(head)]:
            _fail(f"bad magic {bytes(head[:2])!r}, expected {MAGIC!r}: "
                  "the peer does not speak the memryx device protocol")
        if len(head) > 2 and head[2] != PROTOCOL_VERSION:
            _fail(f"unsupported protocol version {head[2]} (this runtime speaks "
                  f"{PROTOCOL_VERSION})")
        if len(head) > 3 and head[3] not in _KIND_VALUES:
            _fail(f"unknown message kind {head[3]}")

    def _parse_header(self) -> tuple[Kind, int, int, int]:
        _, _, raw_kind, model, seq, length = HEADER.unpack(self._head)
        kind = Kind(raw_kind)
        base = len(self._payload)  # bytes of earlier CHUNKs of the same message
        if kind is Kind.CHUNK:
            return self._parse_chunk(model, seq, length, base)
        if self._chunking is not None and kind is not self._chunking:
            _fail(f"{kind.name} in the middle of a chunked {self._chunking.name}")
        if base + length > self.max_payload:
            _fail(f"{kind.name} payload length {base + length} exceeds max_payload "
                  f"{self.max_payload}")
        self._check(self._peer, kind, model, seq, None)
        fixed = _FIXED_LENGTH.get(kind)
        if fixed is not None and length != fixed:
            _fail(f"{kind.name} payload length {length}, must be {fixed}")
        if kind in _JSON_KINDS and length > MAX_JSON_BYTES:
            _fail(f"{kind.name} payload length {length} exceeds the JSON limit {MAX_JSON_BYTES}")
        self._msg_end = base + length
        return kind, model, seq, length

    def _parse_chunk(self, model: int, seq: int, length: int, base: int
                     ) -> tuple[Kind, int, int, int]:
        if model not in _KIND_VALUES or Kind(model) not in _CHUNKABLE:
            _fail(f"CHUNK of kind {model}: only {', '.join(k.name for k in _CHUNKABLE)} "
                  "payloads are chunked")
        final = Kind(model)
        if self._chunking is not None and final is not self._chunking:
            _fail(f"CHUNK of {final.name} in the middle of a chunked {self._chunking.name}")
        if seq or not length:
            _fail("CHUNK header seq must be 0 and its payload not empty")
        if base + length > self.max_payload:
            _fail(f"chunked {final.name} payload length {base + length} exceeds max_payload "
                  f"{self.max_payload}")
        if self._chunking is None:
            self._check(self._peer, final, 0, 0, None)  # may the peer send it now?
        self._chunking = final
        self._msg_end = base + length
        return Kind.CHUNK, model, seq, length

    def _complete(self) -> Event | None:
        assert self._header is not None
        kind, model, seq, _ = self._header
        self._header = None
        if kind is Kind.CHUNK:
            return None  # the payload goes on accumulating
        self._chunking = None
        payload = self._payload
        self._payload = bytearray()  # the event's arrays keep the old buffer
        event = _decode(kind, model, seq, payload, self._stream_tags)
        self._check(self._peer, kind, model, seq, event)
        self._commit(self._peer, kind, event)
        return event

    # -- sending --------------------------------------------------------------------------
    def send(self, event: Event) -> list[bytes | memoryview]:
        """The bytes of ``event``, as pieces for ``sendmsg`` / ``writelines``.

        FRAME, OUTPUT and DFP payloads are not copied (see :func:`pack_arrays`):
        keep them unchanged until the pieces are written. Raises
        :class:`ProtocolError`, and changes nothing, when the event is not
        allowed now or cannot be encoded.
        """
        self._check_usable()
        kind = _KIND_OF.get(type(event))
        if kind is None:
            raise TypeError(f"cannot send {event!r:.80}: not a sendable protocol event")
        if kind not in _SENDS[self.role]:
            _fail(f"cannot send {kind.name}: a {self.role.value} never sends it")
        model, seq, pieces, length = self._encode(kind, event)
        if length > self.send_limit:
            _fail(f"cannot send {kind.name}: payload of {length} bytes exceeds the "
                  f"limit of {self.send_limit}")
        self._check(self.role, kind, model, seq, event)
        self._commit(self.role, kind, event)
        if length > self.chunk_size and kind in _CHUNKABLE:
            return self._chunked(kind, model, seq, pieces, length)
        header = HEADER.pack(MAGIC, PROTOCOL_VERSION, kind, model, seq, length)
        if pieces and isinstance(pieces[0], bytes):
            pieces[0] = header + pieces[0]
        else:
            pieces.insert(0, header)
        return pieces

    def _chunked(self, kind: Kind, model: int, seq: int, pieces: list[bytes | memoryview],
                 length: int) -> list[bytes | memoryview]:
        """``pieces`` as CHUNK messages then the final ``kind`` message (no copies)."""
        views = [_bytes_view(piece) for piece in pieces]
        out: list[bytes | memoryview] = []
        index = offset = 0
        remaining = length
        while remaining:
            size = min(self.chunk_size, remaining)
            remaining -= size
            if remaining:
                out.append(HEADER.pack(MAGIC, PROTOCOL_VERSION, Kind.CHUNK, kind, 0, size))
            else:
                out.append(HEADER.pack(MAGIC, PROTOCOL_VERSION, kind, model, seq, size))
            while size:
                view = views[index]
                part = view[offset: offset + size]
                out.append(part)
                size -= len(part)
                offset += len(part)
                if offset == len(view):
                    index, offset = index + 1, 0
        return out

    def send_bytes(self, event: Event) -> bytes:
        """:meth:`send`, joined into one ``bytes`` (copies; for tests and small messages)."""
        return b"".join(self.send(event))

    def _encode(self, kind: Kind, event: Event
                ) -> tuple[int, int, list[bytes | memoryview], int]:
        model = seq = 0
        pieces: list[bytes | memoryview] = []
        if isinstance(event, Hello):
            hello: dict[str, Any] = {"protocol": PROTOCOL_VERSION,
                                     "client": _str(event.client, "HELLO.client"),
                                     "pid": _int(event.pid, "HELLO.pid")}
            if event.scheduler is not None:
                hello["scheduler"] = dict(_object(event.scheduler, "HELLO.scheduler"))
            if event.stream_tags:
                hello["stream_tags"] = _bool(event.stream_tags, "HELLO.stream_tags")
            pieces.append(_encode_json(hello, kind))
        elif isinstance(event, Welcome):
            limit = _int(event.max_payload, "WELCOME.max_payload", 1, self.max_payload)
            welcome: dict[str, Any] = {"protocol": PROTOCOL_VERSION,
                                       "server": _str(event.server, "WELCOME.server"),
                                       "max_payload": limit}
            if event.idle_timeout:
                welcome["idle_timeout"] = _seconds(event.idle_timeout, "WELCOME.idle_timeout")
            if event.scheduler is not None:
                welcome["scheduler"] = dict(_object(event.scheduler, "WELCOME.scheduler"))
            if event.stream_tags:
                welcome["stream_tags"] = _bool(event.stream_tags, "WELCOME.stream_tags")
            pieces.append(_encode_json(welcome, kind))
        elif isinstance(event, Open):
            if not isinstance(event.dfp_hash, bytes) or len(event.dfp_hash) != _HASH_SIZE:
                _fail(f"OPEN.dfp_hash: expected {_HASH_SIZE} bytes (a sha256 digest)")
            pieces.append(_OPEN.pack(event.dfp_hash, _int(event.group_id, "OPEN.group_id")))
        elif isinstance(event, DfpData):
            view = _bytes_view(event.data)
            if view.nbytes:
                pieces.append(view)
        elif isinstance(event, Opened):
            models = _models(event.models)
            pieces.append(_encode_json({"models": [{"capacity": m.capacity} for m in models]},
                                       kind))
        elif isinstance(event, (Frame, Output)):
            model = _int(event.model, f"{kind.name}.model")
            seq = _int(event.seq, f"{kind.name}.seq")
            prefix = b""
            if isinstance(event, Frame) and self._stream_tags:
                prefix = _STREAM.pack(_int(event.stream, "FRAME.stream", _I64_MIN, _I64_MAX))
            pieces, length = _pack(event.arrays, prefix)
            return model, seq, pieces, length
        elif isinstance(event, (Stats, StatsReply)):
            seq = _int(event.seq, f"{kind.name}.seq")
            if isinstance(event, StatsReply):
                if not isinstance(event.data, Mapping):
                    _fail(f"STATS_REPLY.data: expected a mapping, got {type(event.data).__name__}")
                pieces.append(_encode_json(event.data, kind))
        elif isinstance(event, Error):
            model = _int(event.model, "ERROR.model")
            seq = _int(event.seq, "ERROR.seq")
            pieces.append(_encode_json({"code": _str(event.code, "ERROR.code"),
                                        "message": _str(event.message, "ERROR.message"),
                                        "fatal": _bool(event.fatal, "ERROR.fatal")}, kind))
        return model, seq, pieces, sum(len(p) if isinstance(p, bytes) else p.nbytes
                                       for p in pieces)

    def farewell(self, code: str, message: str) -> bytes:
        """A fatal ERROR to send as the last message, whatever the state (even broken).

        For a server answering a peer that broke the protocol: it says why before
        hanging up. Nothing may be sent after it.
        """
        payload = _encode_json({"code": _str(code, "ERROR.code"),
                                "message": _str(message[:4096], "ERROR.message"),
                                "fatal": True}, Kind.ERROR)
        header = HEADER.pack(MAGIC, PROTOCOL_VERSION, Kind.ERROR, 0, 0, len(payload))
        self._done[self.role] = "fatal ERROR"
        return header + payload

    # -- the state machine ----------------------------------------------------------------
    def _check_usable(self) -> None:
        if self._broken is not None:
            raise ProtocolError(f"connection is broken: {self._broken}") from self._broken

    def _check(self, sender: Role, kind: Kind, model: int, seq: int, event: Event | None) -> None:
        """Raise ProtocolError unless ``sender`` may send ``kind`` now (event None: header only)."""
        name = f"{kind.name} from the {sender.value}"
        if kind not in _SENDS[sender]:
            other = Role.SERVER if sender is Role.CLIENT else Role.CLIENT
            _fail(f"{name}: only the {other.value} sends {kind.name}")
        done = self._done[sender]
        if done is not None:
            _fail(f"{name} after its {done}: it may send nothing more")
        if kind not in _USES_MODEL and model:
            _fail(f"{name}: header model must be 0, got {model}")
        if kind not in _USES_SEQ and seq:
            _fail(f"{name}: header seq must be 0, got {seq}")
        state = self._state
        if state not in _ALLOWED_IN[kind]:
            allowed = ", ".join(s.name for s in State if s in _ALLOWED_IN[kind])
            _fail(f"{name} is not allowed in state {state.name} (only in {allowed})")
        if kind is Kind.ERROR:
            if state is State.AWAIT_HELLO and sender is Role.CLIENT:
                _fail(f"{name} before HELLO: the client's first message must be HELLO")
            if (state in (State.AWAIT_HELLO, State.AWAIT_WELCOME) and isinstance(event, Error)
                    and not event.fatal):
                _fail(f"{name} before the handshake completed must be fatal")
        elif kind in (Kind.FRAME, Kind.OUTPUT):
            if model >= len(self._models):
                _fail(f"{name} for model {model}: the DFP has {len(self._models)} model(s)")
        elif kind is Kind.STATS:
            if seq in self._pending_stats:
                _fail(f"{name}: request id {seq} is already pending")
            if len(self._pending_stats) >= MAX_PENDING_STATS:
                _fail(f"{name}: more than {MAX_PENDING_STATS} STATS requests pending")
        elif kind is Kind.STATS_REPLY:
            if seq not in self._pending_stats:
                _fail(f"{name}: no STATS request {seq} is pending")
        elif kind is Kind.BYE:
            if not self._close_seen:
                _fail(f"{name} before CLOSE: BYE answers the client's CLOSE")
        elif (kind is Kind.WELCOME and isinstance(event, Welcome) and event.stream_tags
              and not self._tags_asked):
            _fail(f"{name} agrees to stream tags that HELLO did not ask for")
        elif (kind is Kind.DFP and isinstance(event, DfpData) and sender is self._peer
              and dfp_digest(event.data) != self._dfp_hash):
            # checked on receipt only: the sender named the hash it computed itself
            _fail(f"{name}: the sha256 of the {memoryview(event.data).nbytes} DFP bytes "
                      "does not match the hash named by OPEN")

    def _commit(self, sender: Role, kind: Kind, event: Event) -> None:
        if isinstance(event, Hello):
            self._state = State.AWAIT_WELCOME
            self._tags_asked = event.stream_tags
        elif isinstance(event, Welcome):
            self._state = State.IDLE
            self._stream_tags = event.stream_tags
            if self.role is Role.CLIENT:
                self._peer_max_payload = event.max_payload
        elif isinstance(event, Open):
            self._state = State.OPENING
            self._dfp_hash = event.dfp_hash
        elif isinstance(event, NeedDfp):
            self._state = State.SENDING_DFP
        elif isinstance(event, DfpData):
            self._state = State.LOADING
        elif isinstance(event, Opened):
            self._state = State.OPEN
            self._models = _models(event.models)
        elif isinstance(event, Stats):
            self._pending_stats.add(event.seq)
        elif isinstance(event, StatsReply):
            self._pending_stats.discard(event.seq)
        elif isinstance(event, Close):
            self._done[sender] = "CLOSE"
            self._close_seen = True
        elif isinstance(event, Bye):
            self._done[sender] = "BYE"
        elif isinstance(event, Error) and event.fatal:
            self._done[sender] = "fatal ERROR"
