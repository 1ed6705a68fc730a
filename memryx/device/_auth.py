"""The shared secret of TCP connections.

Over TCP the client's first bytes, before any protocol message, are a token
preamble: ``b"MXTK"``, a u16 length (little-endian, at most
:data:`MAX_TOKEN_BYTES`), the token's UTF-8 bytes. The server compares it with
its own token in constant time (``hmac.compare_digest`` of the two sha256
digests, so neither content nor length leaks through timing) before it looks
at anything else; an ``--insecure`` server reads the preamble and ignores it.
Unix sockets carry no preamble: there the kernel tells who the peer is.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from pathlib import Path
from typing import Final

__all__ = ["MAX_TOKEN_BYTES", "PREAMBLE_MAGIC", "TOKEN_ENV", "PreambleReader", "client_token",
           "preamble", "read_token_file", "tokens_match"]

#: Environment variable holding the shared secret (clients, and servers without --token-file).
TOKEN_ENV: Final = "MEMRYX_TOKEN"
PREAMBLE_MAGIC: Final = b"MXTK"
MAX_TOKEN_BYTES: Final = 1024
_HEAD: Final = struct.Struct("<4sH")


def client_token(token: str | None = None) -> str:
    """The token a client sends: the argument, else ``$MEMRYX_TOKEN``, else empty."""
    if token is None:
        token = os.environ.get(TOKEN_ENV, "")
    if not isinstance(token, str):
        raise TypeError(f"token must be a str, got {type(token).__name__}")
    return token.strip()


def read_token_file(path: str | os.PathLike[str]) -> str:
    """A server's token from a file (surrounding whitespace dropped); refuses an empty one."""
    text = Path(path).read_text(encoding="utf-8").strip()
    if not text:
        raise ValueError(f"the token file {path} is empty")
    if len(text.encode()) > MAX_TOKEN_BYTES:
        raise ValueError(f"the token in {path} is longer than {MAX_TOKEN_BYTES} bytes")
    return text


def preamble(token: str) -> bytes:
    """The bytes a TCP client sends first."""
    data = token.encode("utf-8")
    if len(data) > MAX_TOKEN_BYTES:
        raise ValueError(f"the token is longer than {MAX_TOKEN_BYTES} bytes")
    return _HEAD.pack(PREAMBLE_MAGIC, len(data)) + data


def tokens_match(given: bytes, expected: str) -> bool:
    """Constant-time comparison of a received token with the server's."""
    return hmac.compare_digest(hashlib.sha256(given).digest(),
                               hashlib.sha256(expected.encode("utf-8")).digest())


class PreambleReader:
    """Collects a token preamble from a byte stream (sans I/O, bounded).

    :meth:`feed` returns ``None`` while more bytes are needed, else the token
    bytes and whatever followed the preamble. A wrong magic or a length above
    :data:`MAX_TOKEN_BYTES` raises ``ValueError`` as soon as the header is in.
    """

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> tuple[bytes, bytes] | None:
        self._buf += data
        if len(self._buf) >= 4 and self._buf[:4] != PREAMBLE_MAGIC:
            raise ValueError("the client sent no token preamble (a TCP client must send "
                             "MEMRYX_TOKEN first; is it an older memryx?)")
        if len(self._buf) < _HEAD.size:
            return None
        _, length = _HEAD.unpack_from(self._buf)
        if length > MAX_TOKEN_BYTES:
            raise ValueError(f"token preamble of {length} bytes, at most {MAX_TOKEN_BYTES}")
        end = _HEAD.size + length
        if len(self._buf) < end:
            return None
        token, rest = bytes(self._buf[_HEAD.size:end]), bytes(self._buf[end:])
        self._buf.clear()
        return token, rest
