"""The control socket: JSON-RPC 2.0 on a Unix socket, owner only.

Theory of operation (SPDK's ``/var/tmp/spdk.sock``, QEMU's QMP socket): one
thread runs a :mod:`selectors` loop that accepts connections and reads and
writes them without blocking; each complete line is parsed by the sans-I/O
codec (:mod:`pyvdpa.manage.rpc`) and the request handed to a small pool of
worker threads, so a slow ``dev_add`` (a data path program loading) holds
up only its own connection.  A connection has one request in flight at a
time: it is not read again until the answer is written.

Rules:

* the socket is made ``0600`` in a private directory, then renamed into
  place, so no other user can ever connect; a peer whose credentials
  (``SO_PEERCRED``) are neither root's nor this process's user is refused;
* one server per path: a lock file (``PATH.lock``) is held while serving,
  so a second ``pyvdpa run`` on the same path is refused with a clear
  message; a stale socket left by a killed process is replaced;
* garbage gets an error object and the connection goes on; a line longer
  than the limit gets an error object and the connection is closed (the
  stream cannot be resynchronised); a client that disconnects mid-request
  loses its answer and nothing else; more than ``max_clients`` connections
  get an error object and are closed.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import fcntl
import logging
import os
import queue
import selectors
import socket
import stat
import struct
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pyvdpa.errors import ConfigError
from pyvdpa.manage.rpc import (
    INTERNAL_ERROR,
    INVALID_REQUEST,
    MAX_MESSAGE,
    MessageReader,
    Request,
    RpcError,
    encode_error,
    encode_result,
    parse_request,
)

__all__ = ["DEFAULT_CONTROL", "ControlServer", "RequestHandler"]

log = logging.getLogger(__name__)

#: The control socket of ``pyvdpa run`` when ``--control`` is not given.
DEFAULT_CONTROL = Path("/run/pyvdpa/control.sock")

#: Runs one request; returns its result or raises :class:`RpcError`.
RequestHandler = Callable[[Request], object]

_UCRED = struct.Struct("iII")
_READ_SIZE = 65536
_REFUSED = (errno.ECONNREFUSED, errno.ENOENT)
_DRAIN_LIMIT = 1 << 20


@dataclass(eq=False)
class _Connection:
    sock: socket.socket
    reader: MessageReader
    out: bytearray = field(default_factory=bytearray)
    lines: list[bytes] = field(default_factory=list)
    busy: bool = False
    #: Selector events watched (0: not registered).
    events: int = 0
    #: Close once ``out`` is written.
    closing: bool = False
    #: Answer written and sending shut: input is read and dropped until EOF (so the
    #: peer reads the answer instead of a reset), up to :data:`_DRAIN_LIMIT` bytes.
    draining: int = -1
    closed: bool = False


class ControlServer:
    """Serves JSON-RPC requests on the Unix socket ``path`` with ``handler``."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        handler: RequestHandler,
        *,
        max_clients: int = 32,
        limit: int = MAX_MESSAGE,
        workers: int = 4,
    ) -> None:
        self.path = Path(path)
        self.handler = handler
        self.max_clients = max_clients
        self.limit = limit
        self._workers = workers
        self._lock_fd: int | None = None
        self._listener: socket.socket | None = None
        self._inode: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._done: queue.SimpleQueue[tuple[_Connection, bytes | None]] = queue.SimpleQueue()
        self._connections: set[_Connection] = set()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._stopping = threading.Event()

    # ------------------------------------------------------------------ start / stop

    def start(self) -> None:
        """Take the path (refused when another server holds it), listen, serve."""
        self._take_lock()
        try:
            self._listener = self._bind()
        except OSError as exc:
            self._release_lock()
            raise ConfigError(f"control socket {self.path}: {exc}") from None
        except BaseException:
            self._release_lock()
            raise
        st = os.stat(self.path)
        self._inode = (st.st_dev, st.st_ino)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            self._workers, thread_name_prefix="pyvdpa-control"
        )
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._loop, name="pyvdpa-control", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Close every connection and the socket; requests running finish first."""
        self._stopping.set()
        self._wake()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        for conn in list(self._connections):
            self._close(conn)
        if self._listener is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(self._listener)
            self._listener.close()
            self._listener = None
            with contextlib.suppress(OSError):
                st = os.stat(self.path)
                if (st.st_dev, st.st_ino) == self._inode:
                    os.unlink(self.path)
        self._selector.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._release_lock()

    def __enter__(self) -> ControlServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def clients(self) -> int:
        """Connections open now."""
        return len(self._connections)

    def _take_lock(self) -> None:
        parent = self.path.parent
        if not parent.is_dir():
            try:
                parent.mkdir(mode=0o700, parents=True)
            except OSError as exc:
                raise ConfigError(f"cannot make {parent}: {os.strerror(exc.errno or 0)}") from None
        lock_path = f"{self.path}.lock"
        while True:
            try:
                fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                raise ConfigError(
                    f"control socket {self.path}: cannot open {lock_path}: "
                    f"{os.strerror(exc.errno or 0)}"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise ConfigError(
                    f"control socket {self.path} is in use by another pyvdpa run "
                    "(give another --control PATH)"
                ) from None
            # The holder may have removed the file between our open and lock.
            try:
                same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._lock_fd = fd
                return
            os.close(fd)

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(f"{self.path}.lock")
            os.close(self._lock_fd)
            self._lock_fd = None

    def _bind(self) -> socket.socket:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise ConfigError(f"control socket {self.path} exists and is not a socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                probe.connect(str(self.path))
            except OSError as exc:
                if exc.errno not in _REFUSED:
                    raise ConfigError(f"control socket {self.path}: {exc.strerror}") from None
            else:
                raise ConfigError(f"control socket {self.path} is in use by another process")
            finally:
                probe.close()
        # Bound in a directory only this user can enter, made 0600, then put in place.
        private = tempfile.mkdtemp(prefix=".pyvdpa-control-", dir=self.path.parent)
        staging = os.path.join(private, "s")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            listener.bind(staging)
            os.chmod(staging, 0o600)
            listener.listen(64)
            os.rename(staging, self.path)
        except OSError as exc:
            listener.close()
            with contextlib.suppress(OSError):
                os.unlink(staging)
            raise ConfigError(f"control socket {self.path}: {exc.strerror}") from None
        finally:
            with contextlib.suppress(OSError):
                os.rmdir(private)
        listener.setblocking(False)
        return listener

    # ------------------------------------------------------------------ the loop

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def _loop(self) -> None:
        while not self._stopping.is_set():
            for key, events in self._selector.select():
                if key.fileobj is self._listener:
                    self._accept()
                elif key.fileobj == self._wake_r:
                    with contextlib.suppress(OSError):
                        os.read(self._wake_r, 4096)
                    self._collect()
                else:
                    conn = key.data
                    assert isinstance(conn, _Connection)
                    if events & selectors.EVENT_WRITE:
                        self._flush(conn)
                    if events & selectors.EVENT_READ and not conn.closed:
                        self._read(conn)

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.warning("control: accept: %s", exc.strerror)
            return
        sock.setblocking(False)
        conn = _Connection(sock, MessageReader(self.limit))
        refusal = self._refusal(sock)
        self._connections.add(conn)
        self._interest(conn)
        if refusal is not None:
            self._fail(conn, RpcError(INVALID_REQUEST, refusal))

    def _refusal(self, sock: socket.socket) -> str | None:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        _, uid, _ = _UCRED.unpack(creds)
        if uid not in (0, os.geteuid()):
            return f"permission denied: uid {uid} may not use this control socket"
        if len(self._connections) >= self.max_clients:
            return f"too many clients ({self.max_clients})"
        return None

    def _read(self, conn: _Connection) -> None:
        try:
            data = conn.sock.recv(_READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(conn)
            return
        if conn.draining >= 0:
            conn.draining += len(data)
            if conn.draining > _DRAIN_LIMIT:
                self._close(conn)
            return
        try:
            conn.lines.extend(conn.reader.feed(data))
        except RpcError as exc:
            self._fail(conn, exc)
            return
        self._next(conn)

    def _next(self, conn: _Connection) -> None:
        """Start the next request of ``conn`` if none runs and its answers are written."""
        while conn.lines and not conn.busy and not conn.out and not conn.closing:
            line = conn.lines.pop(0)
            if not line.strip():
                continue
            try:
                request = parse_request(line)
            except RpcError as exc:
                conn.out += encode_error(exc)
                self._flush(conn)
                continue
            conn.busy = True
            assert self._pool is not None
            self._pool.submit(self._execute, conn, request)
        self._interest(conn)

    def _execute(self, conn: _Connection, request: Request) -> None:
        reply: bytes | None
        try:
            result = self.handler(request)
            reply = encode_result(request.id, result)
        except RpcError as exc:
            exc.request_id = request.id
            reply = encode_error(exc)
        except Exception as exc:  # a bug in a handler: answer it, keep serving
            log.exception("control: %s", request.method)
            reply = encode_error(
                RpcError(INTERNAL_ERROR, f"internal error: {exc}", request_id=request.id)
            )
        if len(reply) > self.limit * 64:
            reply = encode_error(RpcError(INTERNAL_ERROR, "reply too large", request_id=request.id))
        self._done.put((conn, None if request.notification else reply))
        self._wake()

    def _collect(self) -> None:
        while True:
            try:
                conn, reply = self._done.get_nowait()
            except queue.Empty:
                return
            conn.busy = False
            if conn.closed:
                continue
            if reply is not None:
                conn.out += reply
            self._flush(conn)
            if not conn.closed:
                self._next(conn)

    def _flush(self, conn: _Connection) -> None:
        while conn.out:
            try:
                sent = conn.sock.send(conn.out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._close(conn)
                return
            del conn.out[:sent]
        if not conn.out and conn.closing:
            if conn.draining < 0:
                conn.draining = 0
                with contextlib.suppress(OSError):
                    conn.sock.shutdown(socket.SHUT_WR)
                self._interest(conn)
            return
        if not conn.out:
            self._next(conn)
        else:
            self._interest(conn)

    def _interest(self, conn: _Connection) -> None:
        """Watch ``conn`` for what it waits for: writing its answer, or its next request.

        While its request runs it is not watched at all (an EOF is seen once
        the answer is written).
        """
        if conn.closed:
            return
        events = 0
        if conn.out:
            events |= selectors.EVENT_WRITE
        if (not conn.busy and not conn.out and not conn.closing) or conn.draining >= 0:
            events |= selectors.EVENT_READ
        if events == conn.events:
            return
        if conn.events == 0:
            self._selector.register(conn.sock, events, conn)
        elif events == 0:
            self._selector.unregister(conn.sock)
        else:
            self._selector.modify(conn.sock, events, conn)
        conn.events = events

    def _fail(self, conn: _Connection, error: RpcError) -> None:
        conn.out += encode_error(error)
        conn.closing = True
        conn.lines.clear()
        self._flush(conn)

    def _close(self, conn: _Connection) -> None:
        if conn.closed:
            return
        conn.closed = True
        if conn.events:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(conn.sock)
            conn.events = 0
        conn.sock.close()
        self._connections.discard(conn)
