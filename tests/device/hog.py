"""Hostile device-server clients, run as their own processes by tests and benchmarks.

    python tests/device/hog.py MODE ADDRESS [SHAPE]

MODE:
  flood      open an identity DFP of SHAPE (default 1x256x256x3 float32), send frames
             as fast as the server takes them, never read an output
  sleep      the same, but stop after the capacity's worth of frames and sleep
  slowloris  drip a HELLO one byte per second, forever
  idle       connect and say nothing
  trickle    send one frame of SHAPE and read its output at about 1 MB/s

A ``+`` after the mode (``flood+``) connects again each time it is cut off,
until killed. Prints one line each time the server hangs up (``cut off after N
frames: ...``); a single-shot hog then exits 0.
"""

from __future__ import annotations

import os
import socket
import sys
import time

import numpy as np

import memryx as mx
from memryx import testing
from memryx.device import protocol as p
from memryx.device._auth import client_token, preamble


def dial(address: str) -> socket.socket:
    if address.startswith("unix:"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(address[5:])
        return sock
    host, _, port = address.removeprefix("tcp://").rpartition(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(preamble(client_token()))
    return sock


_DFPS: dict[tuple[int, ...], bytes] = {}


def open_dfp(sock: socket.socket, conn: p.Connection, shape: tuple[int, ...]) -> int:
    def roundtrip(event: p.Event) -> p.Event:
        sock.sendall(b"".join(bytes(b) for b in conn.send(event)))
        while True:
            events = conn.receive_data(sock.recv(1 << 20))
            if events:
                return events[0]

    roundtrip(p.Hello("hog", os.getpid()))
    data = _DFPS.get(shape)
    if data is None:  # compiled once per process: a reconnecting hog costs the server, not us
        data = _DFPS[shape] = mx.NeuralCompiler(models=testing.identity_model(shape)).run(
        ).to_bytes()
    reply = roundtrip(p.Open(p.dfp_digest(data), 0))
    if isinstance(reply, p.NeedDfp):
        reply = roundtrip(p.DfpData(data))
    assert isinstance(reply, p.Opened), reply
    return reply.models[0].capacity


def main() -> None:
    mode, address = sys.argv[1], sys.argv[2]
    shape = tuple(int(d) for d in sys.argv[3].split("x")) if len(sys.argv) > 3 else (1, 256, 256, 3)
    if mode.endswith("+"):
        while True:
            once(mode[:-1], address, shape)
            time.sleep(0.1)  # the hog's own pace of reconnecting
    once(mode, address, shape)


def once(mode: str, address: str, shape: tuple[int, ...]) -> None:
    sock = dial(address)
    sent = 0
    try:
        if mode == "slowloris":
            hello = p.Connection(p.Role.CLIENT).send_bytes(p.Hello("slow", os.getpid()))
            for byte in hello:
                sock.sendall(bytes([byte]))
                time.sleep(1)  # a byte a second: the slowloris itself
        elif mode == "idle":
            sock.recv(1)  # until the server hangs up
        elif mode == "trickle":  # one frame, then read its output at about 1 MB/s
            conn = p.Connection(p.Role.CLIENT, max_payload=1 << 40)
            open_dfp(sock, conn, shape)
            sock.sendall(b"".join(bytes(b) for b in conn.send(p.Frame(0, 0, [
                np.ones(shape, np.float32)]))))
            sent, got, events = 1, 0, []
            while not events:
                data = sock.recv(100_000)
                if not data:
                    break
                got += len(data)
                events = conn.receive_data(data)
                time.sleep(0.1)  # the trickle's read rate
            print(f"trickled {got} bytes: {type(events[0]).__name__ if events else 'nothing'}",
                  flush=True)
            return
        else:
            conn = p.Connection(p.Role.CLIENT, max_payload=0xFFFFFFFF)
            cap = open_dfp(sock, conn, shape)
            frame = [np.ones(shape, np.float32)]
            print(f"opened, capacity {cap}", flush=True)
            limit = cap if mode == "sleep" else 1 << 30
            while sent < limit:
                sock.sendall(b"".join(bytes(b) for b in conn.send(p.Frame(0, sent, frame))))
                sent += 1
            print(f"sent {sent} frames, now reading nothing", flush=True)
            sock.settimeout(None)
            while True:  # wait, reading nothing, until the server hangs up on us
                probe = sock.recv(1, socket.MSG_PEEK)
                if not probe:
                    break
                time.sleep(0.2)  # polling: reads nothing, so nothing to wait on
    except OSError as exc:
        print(f"cut off after {sent} frames: {exc!r}", flush=True)
        return
    finally:
        sock.close()
    print(f"cut off after {sent} frames: the server closed the connection", flush=True)


if __name__ == "__main__":
    main()
