"""vhost-user transport: unix stream sockets carrying frames and fds.

Theory of operation (vhost-user spec, "Communication"): every message is a
12-byte header followed by ``size`` payload bytes; file descriptors ride as
``SCM_RIGHTS`` ancillary data on the same ``sendmsg`` as the header.  The
receiver therefore reads the header with ``recvmsg`` and a control buffer
large enough for :data:`MAX_FDS` descriptors, then reads exactly ``size``
payload bytes.

This module is the only place that touches sockets and errno: OS errors are
mapped into :class:`~pyvdpa.errors.TransportError` here, once.  Every fd
received is owned by the caller of :meth:`Channel.recv` on success and
closed here on every error path.

Roles: a :class:`Listener` binds a path in *server* mode (refusing a path
that already exists, as DPDK does) and accepts connections; :func:`connect`
is the *client* role and retries until the peer listens.
"""

from __future__ import annotations

import array
import contextlib
import errno
import os
import socket
import stat
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pyvdpa.errors import ConfigError, ProtocolError, RemoteProtocolError, TransportError
from pyvdpa.vhost_user.codec import Header, decode_header
from pyvdpa.vhost_user.protocol import HEADER_SIZE

__all__ = ["MAX_FDS", "Channel", "Frame", "Listener", "close_fds", "connect"]

#: Most fds one message may carry (SET_MEM_TABLE with 8 regions).
MAX_FDS = 8

_INT_SIZE = array.array("i").itemsize
_CMSG_SPACE = socket.CMSG_SPACE(MAX_FDS * _INT_SIZE)


def close_fds(fds: Sequence[int]) -> None:
    """Close every fd in ``fds``, ignoring ones already closed."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


@dataclass(slots=True)
class Frame:
    """One received message: its header, payload bytes and owned fds."""

    header: Header
    body: bytes
    fds: list[int] = field(default_factory=list)


def _fds_from_ancillary(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - (len(data) % _INT_SIZE)
            fds.extend(array.array("i", data[:usable]))
    return fds


class Channel:
    """A connected vhost-user socket: send and receive whole messages.

    ``recv`` and ``send`` may be used from different threads; each direction
    is serialised by its own lock so that concurrent senders never
    interleave frames.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._send_lock = threading.Lock()
        self._recv_lock = threading.Lock()
        self._closed = False

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def fileno(self) -> int:
        """The socket's fd (for ``select``)."""
        return self._sock.fileno()

    def recv(self) -> Frame:
        """Read one message.

        Raises :class:`TransportError` when the peer is gone (EOF, reset,
        a message cut short) and :class:`RemoteProtocolError` when the header
        is malformed or more fds arrived than any message may carry.  In
        both cases every fd received is closed.
        """
        with self._recv_lock:
            try:
                data, ancdata, msg_flags, _ = self._sock.recvmsg(HEADER_SIZE, _CMSG_SPACE)
            except OSError as exc:
                raise TransportError(f"receive failed: {os.strerror(exc.errno or 0)}") from exc
            fds = _fds_from_ancillary(ancdata)
            try:
                if not data:
                    raise TransportError("peer closed the connection")
                if msg_flags & socket.MSG_CTRUNC:
                    raise RemoteProtocolError(
                        f"message carried more than {MAX_FDS} fds", drop_connection=True
                    )
                if len(data) < HEADER_SIZE:
                    data += self._recv_exact(HEADER_SIZE, fds, "header", len(data))
                header = decode_header(data)
                what = f"request {header.request} payload"
                body = self._recv_exact(header.size, fds, what) if header.size else b""
            except (TransportError, ProtocolError):
                close_fds(fds)
                raise
            return Frame(header, body, fds)

    def _recv_exact(self, size: int, fds: list[int], what: str, have: int = 0) -> bytes:
        """Read the rest of ``what`` (``size`` bytes, ``have`` of them already read).

        Stray fds on later segments are kept for closing.
        """
        chunks: list[bytes] = []
        remaining = size - have
        while remaining:
            try:
                chunk, ancdata, _, _ = self._sock.recvmsg(remaining, _CMSG_SPACE)
            except OSError as exc:
                raise TransportError(f"receive failed: {os.strerror(exc.errno or 0)}") from exc
            fds.extend(_fds_from_ancillary(ancdata))
            if not chunk:
                raise TransportError(
                    f"peer disconnected mid-message: {size - remaining} of {size} {what} bytes"
                )
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)

    def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send one encoded message, its fds attached to the first byte."""
        if len(fds) > MAX_FDS:
            raise TransportError(f"cannot send {len(fds)} fds (at most {MAX_FDS})")
        ancdata = []
        if fds:
            ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        with self._send_lock:
            try:
                sent = self._sock.sendmsg([data], ancdata)
                if sent < len(data):
                    self._sock.sendall(data[sent:])
            except OSError as exc:
                raise TransportError(f"send failed: {os.strerror(exc.errno or 0)}") from exc

    def shutdown(self) -> None:
        """Wake a thread blocked in :meth:`recv` (it sees EOF)."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Close the socket."""
        self._closed = True
        self._sock.close()

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @classmethod
    def pair(cls) -> tuple[Channel, Channel]:
        """Two connected channels (a socketpair), for in-process peers and tests."""
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        return cls(a), cls(b)


class Listener:
    """A listening vhost-user socket (server mode).

    Refuses a path that already exists: a stale socket from a dead process
    must be removed by the user knowingly, as DPDK requires.
    """

    def __init__(self, path: str | os.PathLike[str], *, backlog: int = 8) -> None:
        self.path = Path(path)
        if len(os.fsencode(self.path)) >= 108:
            raise ConfigError(f"socket path too long (max 107 bytes): {self.path}")
        if self.path.exists() or self.path.is_symlink():
            raise ConfigError(f"socket path already exists: {self.path}")
        if not self.path.parent.is_dir():
            raise ConfigError(f"socket directory does not exist: {self.path.parent}")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.bind(str(self.path))
            self._sock.listen(backlog)
        except OSError as exc:
            self._sock.close()
            raise ConfigError(
                f"cannot listen on {self.path}: {os.strerror(exc.errno or 0)}"
            ) from exc
        self._ino = os.stat(self.path).st_ino
        self._closed = False

    def fileno(self) -> int:
        """The listening socket's fd."""
        return self._sock.fileno()

    def accept(self) -> Channel:
        """Wait for and return the next connection."""
        try:
            conn, _ = self._sock.accept()
        except OSError as exc:
            raise TransportError(f"accept failed: {os.strerror(exc.errno or 0)}") from exc
        return Channel(conn)

    def close(self) -> None:
        """Stop listening and remove the socket path (only if it is still ours)."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        with contextlib.suppress(OSError):
            st = os.lstat(self.path)
            if stat.S_ISSOCK(st.st_mode) and st.st_ino == self._ino:
                self.path.unlink()

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_RETRYABLE = {errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN}


def connect(
    path: str | os.PathLike[str],
    *,
    timeout: float | None = None,
    retry_interval: float = 0.1,
    stop: threading.Event | None = None,
) -> Channel:
    """Connect to a listening vhost-user socket (client mode).

    Retries while the path is missing or refuses connections, until
    ``timeout`` seconds pass (``None``: forever) or ``stop`` is set.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    for _ in _attempts(deadline, retry_interval, stop):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(os.fspath(path))
        except OSError as exc:
            sock.close()
            if exc.errno not in _RETRYABLE:
                raise TransportError(
                    f"cannot connect to {os.fspath(path)}: {os.strerror(exc.errno or 0)}"
                ) from exc
            continue
        return Channel(sock)
    raise TransportError(f"cannot connect to {os.fspath(path)}: no listener")


def _attempts(
    deadline: float | None, interval: float, stop: threading.Event | None
) -> Iterator[int]:
    attempt = 0
    while True:
        yield attempt
        attempt += 1
        if deadline is not None and time.monotonic() >= deadline:
            return
        if stop is not None:
            if stop.wait(interval):
                return
        else:
            time.sleep(interval)
