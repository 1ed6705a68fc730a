"""Client addresses, deadlines and the token preamble, without a server."""

from __future__ import annotations

import pytest

import memryx as mx
from memryx.device import open_device
from memryx.device._auth import MAX_TOKEN_BYTES, PreambleReader, preamble, tokens_match
from memryx.device._transport import DEFAULT_TIMEOUT, Address, resolve_timeout
from memryx.device.fd import FdDevice


@pytest.mark.parametrize(("text", "expected"), [
    ("unix:/run/memryx.sock", Address("unix", path="/run/memryx.sock")),
    ("/run/memryx.sock", Address("unix", path="/run/memryx.sock")),
    ("tcp://127.0.0.1:10000", Address("tcp", host="127.0.0.1", port=10000)),
    ("tcps://box.local:443", Address("tcps", host="box.local", port=443)),
    ("tcp://[::1]:10000", Address("tcp", host="::1", port=10000)),
])
def test_addresses(text, expected):
    assert Address.parse(text) == expected
    assert Address.parse(str(expected)) == expected


@pytest.mark.parametrize("text", ["tcp://host", "tcp://:10", "tcp://h:0", "tcp://h:70000",
                                  "tcps://h:x", "unix:"])
def test_bad_addresses_name_the_form(text):
    with pytest.raises(ValueError, match="expected"):
        Address.parse(text)


def test_open_device_takes_tcp_specs_and_server_options():
    dev = open_device("tcp://127.0.0.1:10000", timeout=3, token="t")
    assert isinstance(dev, FdDevice) and dev.timeout == 3 and str(dev.address).startswith("tcp")
    assert isinstance(open_device("tcps://127.0.0.1:10000"), FdDevice)
    with pytest.raises(ValueError, match="tcp://HOST:PORT"):
        open_device("tcp:127.0.0.1:10000")
    with pytest.raises(TypeError, match="takes no options"):
        open_device("tcp://127.0.0.1:10000", mode="fast")


def test_timeout_from_argument_environment_or_default(monkeypatch):
    monkeypatch.delenv("MEMRYX_DEVICE_TIMEOUT", raising=False)
    assert resolve_timeout(None) == DEFAULT_TIMEOUT
    monkeypatch.setenv("MEMRYX_DEVICE_TIMEOUT", "2.5")
    assert resolve_timeout(None) == 2.5
    assert resolve_timeout(7) == 7.0
    monkeypatch.setenv("MEMRYX_DEVICE_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="MEMRYX_DEVICE_TIMEOUT='soon'"):
        resolve_timeout(None)
    for bad in (0, -1, True, "3", float("nan")):
        with pytest.raises(ValueError, match="positive number of seconds"):
            resolve_timeout(bad)  # type: ignore[arg-type]


def test_unreachable_tcp_server_is_a_device_error(mlp_dfp):
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(mx.DeviceError, match=f"cannot reach the device server at tcp://127.0.0.1:{port}"):
        mx.SyncAccl(mlp_dfp, device=f"tcp://127.0.0.1:{port}", timeout=5)


def test_token_preamble_reader_is_bounded_and_split_proof():
    data = preamble("secret") + b"MX-rest"
    reader = PreambleReader()
    got = None
    for i in range(len(data)):
        got = reader.feed(data[i:i + 1]) or got
        if got:
            rest = data[i + 1:]
            break
    assert got is not None and got[0] == b"secret" and got[1] + rest == b"MX-rest"
    with pytest.raises(ValueError, match="no token preamble"):
        PreambleReader().feed(b"MX\x01\x01")
    with pytest.raises(ValueError, match=f"at most {MAX_TOKEN_BYTES}"):
        PreambleReader().feed(b"MXTK\x01\x08")
    with pytest.raises(ValueError, match="longer than"):
        preamble("x" * (MAX_TOKEN_BYTES + 1))
    assert tokens_match(b"abc", "abc") and not tokens_match(b"abd", "abc")
    assert not tokens_match(b"", "abc")
