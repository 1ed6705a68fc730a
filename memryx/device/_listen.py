"""Where a device server listens, and who may be on the other end.

* :func:`default_socket_path`: ``$XDG_RUNTIME_DIR/memryx.sock``, else a socket
  in ``/tmp/memryx-<uid>/``, a directory only its owner may enter (checked, not
  assumed: a directory another user made first is refused, never used).
* :class:`SocketClaim`: one server per socket path. A lock file next to the
  socket is held (``flock``) for the server's life, so a second server finds it
  taken and refuses; a socket left by a server that died (lock free, nobody
  answering) is replaced; on exit a server removes the socket only if it is
  still the one it created.
* :func:`peer_uid` / :func:`check_server_owner`: ``SO_PEERCRED`` on both ends of
  a Unix socket.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import stat
import struct
from pathlib import Path
from typing import Any

from .._exceptions import DeviceError

__all__ = ["ServerRunningError", "SocketClaim", "check_server_owner", "default_socket_path",
           "peer_uid", "private_dir"]

_UCRED = struct.Struct("3i")


class ServerRunningError(OSError):
    """Another device server already listens on the socket path."""


def private_dir(path: Path) -> Path:
    """``path`` as a directory only we may use: created 0700, or checked when it exists.

    Raises :class:`PermissionError` when it is a symlink, not ours, or open to others.
    """
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise PermissionError(f"{path} is not a directory (a symlink or a file); refusing to "
                              "use it for the device socket")
    if info.st_uid != os.getuid():
        raise PermissionError(f"{path} belongs to uid {info.st_uid}, not to us (uid "
                              f"{os.getuid()}); refusing to use it for the device socket")
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise PermissionError(f"{path} is open to other users (mode "
                              f"{stat.S_IMODE(info.st_mode):o}); refusing to use it for the "
                              "device socket (chmod 700 it or remove it)")
    return path


def default_socket_path(create: bool = False) -> Path:
    """``$XDG_RUNTIME_DIR/memryx.sock``, else ``/tmp/memryx-<uid>/memryx.sock``.

    The ``/tmp`` directory is private to its owner; with ``create`` it is made
    (mode 0700) when missing, and in every case a directory that another user
    owns or may write is refused with :class:`PermissionError`.
    """
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "memryx.sock"
    directory = Path(f"/tmp/memryx-{os.getuid()}")
    if create or directory.exists() or directory.is_symlink():
        private_dir(directory)
    return directory / "memryx.sock"


def peer_uid(sock: Any) -> int:
    """The uid of the process on the other end of a connected Unix socket."""
    _pid, uid, _gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                    _UCRED.size))
    return int(uid)


def check_server_owner(sock: socket.socket, path: str) -> None:
    """Refuse a server run by another user (root excepted): it would see our frames."""
    uid = peer_uid(sock)
    if uid not in (os.getuid(), 0):
        raise DeviceError(f"refusing the device server at {path}: it runs as uid {uid}, not as "
                          f"this user (uid {os.getuid()}) or root; another user may have put a "
                          "socket there")


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


class SocketClaim:
    """The right to listen on ``path``, held through a lock file (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock_path = path.with_name(path.name + ".lock")
        self._lock_fd = -1
        self._identity: tuple[int, int] | None = None

    def acquire(self) -> None:
        """Take the path, or raise :class:`ServerRunningError` / :class:`FileExistsError`."""
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise ServerRunningError(
                    f"another memryx device server is already serving {self.path}") from None
            raise
        self._lock_fd = fd
        try:
            if self.path.exists() or self.path.is_symlink():
                if not self.path.is_socket():
                    raise FileExistsError(f"{self.path} exists and is not a socket; refusing to "
                                          "replace it")
                if _answers(self.path):  # a live server that predates lock files
                    raise ServerRunningError(
                        f"another device server is already listening on {self.path}")
                self.path.unlink()  # stale: its server died
        except BaseException:
            self.release()
            raise

    def bound(self) -> None:
        """Record the socket just created, so that only it is removed at the end."""
        info = os.lstat(self.path)
        self._identity = (info.st_dev, info.st_ino)

    def release(self) -> None:
        """Remove our socket (if it is still ours) and let go of the lock."""
        if self._identity is not None:
            with contextlib.suppress(FileNotFoundError):
                info = os.lstat(self.path)
                if (info.st_dev, info.st_ino) == self._identity:
                    self.path.unlink()
            self._identity = None
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
