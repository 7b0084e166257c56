"""The tracing proxy: a vhost-user front-end and back-end talk through it, unchanged.

Theory of operation (QEMU ``docs/interop/vhost-user.rst``, "Communication"
and "Back-end communication"): the proxy owns one socket towards each peer
and relays whole messages between them, each direction on its own thread.
A message is read with the transport (:meth:`Channel.recv
<pyvdpa.vhost_user.transport.Channel.recv>`: the 12-byte header, checked and
capped, then exactly ``size`` payload bytes and every fd that came with
them), recorded, and sent on with the same bytes and the same fds attached
to its first byte (SCM_RIGHTS); the proxy then closes its own copies of the
fds.  The header is sent as the three integers read (``=III`` gives the
same 12 bytes back) and the payload as received: the decoded copy serves
the display only.

The back-end channel is interposed: the fd of SET_BACKEND_REQ_FD, a socket
of the front-end's, stays with the proxy, and the back-end receives one end
of a new socketpair instead; the proxy relays between the two exactly as on
the main socket, so back-end requests (IOTLB_MSG misses, CONFIG_CHANGE_MSG,
VRING_HOST_NOTIFIER_MSG, in-band VRING_CALL) and the front-end's replies are
traced too.  An fd that is not a unix stream socket is passed on untouched.

What ends a connection pair: either peer closing its socket, a message that
cannot be framed (header with a wrong version or reserved flags, a size
above the transport's cap, more fds than a message may carry, a stream cut
mid-message), or a send that fails.  The proxy shuts both sockets down (the
other peer sees the connection close, as if its peer had gone), records why,
closes every fd of the pair, and waits for the next pair.  A message that is
framed but does not decode is recorded as malformed and forwarded unchanged:
the receiving peer decides what it is worth.

Roles: towards the front-end the proxy listens (``--listen``: QEMU with a
client chardev, DPDK virtio-user, ``pyvdpa drive``) or connects (QEMU
``server=on``, virtio-user ``server=1``, ``pyvdpa drive --server``); towards
the back-end it connects (``--connect``: a listening back-end) or listens (a
back-end in client mode: ``pyvdpa run --client``, net_vhost ``client=1``).
A pair is opened listening side first (the front-end's when both listen),
and pairs follow one another until :meth:`TraceProxy.stop`.
"""

from __future__ import annotations

import os
import socket
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from pyvdpa.errors import RemoteProtocolError, TransportError
from pyvdpa.trace.conversation import Conversation
from pyvdpa.trace.render import ChannelKind, ConnectionRecord, MessageRecord, Side
from pyvdpa.vhost_user.codec import HEADER
from pyvdpa.vhost_user.protocol import Request
from pyvdpa.vhost_user.transport import Channel, Frame, Listener, close_fds, connect

__all__ = ["MAX_BACKEND_CHANNELS", "Endpoint", "Record", "TraceProxy"]

Record = MessageRecord | ConnectionRecord
Sink = Callable[[Record], None]


class SinkError(Exception):
    """Raised by a sink that can no longer record: the proxy relays nothing more and stops."""


#: Back-end channels interposed at once on one pair; a front-end handing over
#: more before the back-end closes the old ones gets its sockets passed on as they are.
MAX_BACKEND_CHANNELS = 4

#: Seconds between attempts to open a pair after a failure.
_RETRY_INTERVAL = 0.2


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One side of the proxy: a socket path it listens on or connects to."""

    path: Path
    listen: bool

    def describe(self, side: Side) -> str:
        """How the proxy reaches ``side`` here, in words."""
        return f"{side.value} {'accepted on' if self.listen else 'connected to'} {self.path}"


class _Link:
    """Two channels relayed to each other, one thread per direction.

    The first end (a peer closing, a framing error, a failed send) shuts
    both channels down, which wakes the other direction's thread.
    """

    def __init__(self, kind: ChannelKind, frontend: Channel, backend: Channel) -> None:
        self.kind = kind
        self.channels = {Side.FRONTEND: frontend, Side.BACKEND: backend}
        self.threads: list[threading.Thread] = []
        self.reason: str | None = None
        self._lock = threading.Lock()

    def end(self, reason: str) -> bool:
        """Shut both channels down; return whether this call ended the link."""
        with self._lock:
            first = self.reason is None
            if first:
                self.reason = reason
        for channel in self.channels.values():
            channel.shutdown()
        return first

    @property
    def finished(self) -> bool:
        """Whether the link has ended and both its threads are gone."""
        return self.reason is not None and not any(t.is_alive() for t in self.threads)

    def join(self) -> None:
        for thread in self.threads:
            thread.join()

    def close(self) -> None:
        for channel in self.channels.values():
            channel.close()


class _Pair:
    """A connection pair: the main link and the back-end channels interposed on it."""

    def __init__(self, number: int, main: _Link, conversation: Conversation) -> None:
        self.number = number
        self.main = main
        self.conversation = conversation
        self.backend_links: list[_Link] = []
        self.lock = threading.Lock()
        self.closing = False

    def backend_room(self) -> bool:
        """Close the back-end channels that have ended; whether another may be interposed."""
        with self.lock:
            finished = [link for link in self.backend_links if link.finished]
            for link in finished:
                self.backend_links.remove(link)
                link.close()
            return len(self.backend_links) < MAX_BACKEND_CHANNELS

    def add_backend_link(self, link: _Link) -> bool:
        with self.lock:
            if self.closing:
                return False
            self.backend_links.append(link)
            return True

    def end(self, reason: str) -> None:
        with self.lock:
            self.closing = True
            links = list(self.backend_links)
        self.main.end(reason)
        for link in links:
            link.end("the connection pair ended")


class TraceProxy:
    """Relay vhost-user connections between ``frontend`` and ``backend``, recording every message.

    ``sink`` receives each record on the relaying thread, serialised: one
    :class:`~pyvdpa.trace.render.ConnectionRecord` when a pair opens and
    closes, one :class:`~pyvdpa.trace.render.MessageRecord` per message,
    before the message is forwarded.  A sink that raises :class:`SinkError`
    stops the proxy there: the message it was given is not forwarded and the
    pair ends, so nothing passes untraced.  ``device_id`` names device-specific
    feature bits (inferred from GET_FEATURES when ``None``);
    ``connect_timeout`` bounds each attempt to reach a listening peer.
    """

    def __init__(
        self,
        frontend: Endpoint,
        backend: Endpoint,
        sink: Sink,
        *,
        device_id: int | None = None,
        connect_timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Describe the proxy; :meth:`start` opens its sockets."""
        self.frontend = frontend
        self.backend = backend
        self._sink = sink
        self._device_id = device_id
        self._connect_timeout = connect_timeout
        self._clock = clock
        self._start_time = clock()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._listeners: dict[Side, Listener] = {}
        self._number = 0
        self._pair: _Pair | None = None
        self._failed = False
        self._thread: threading.Thread | None = None

    def start(self) -> Self:
        """Listen where the proxy listens and start relaying pairs on a thread."""
        try:
            for side, endpoint in ((Side.FRONTEND, self.frontend), (Side.BACKEND, self.backend)):
                if endpoint.listen:
                    self._listeners[side] = Listener(endpoint.path)
        except BaseException:
            self._close_listeners()
            raise
        self._thread = threading.Thread(target=self._serve, name="trace", daemon=True)
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        """Whether the relaying thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        """End the current pair, stop listening and wait for every thread."""
        self._stop.set()
        self._close_listeners()
        with self._lock:
            pair = self._pair
        if pair is not None:
            pair.end("the proxy stopped")
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> Self:
        """Start the proxy."""
        return self.start()

    def __exit__(self, *exc: object) -> None:
        """Stop the proxy."""
        self.stop()

    def _now(self) -> float:
        return self._clock() - self._start_time

    def _emit(self, record: Record) -> bool:
        """Give ``record`` to the sink (the caller holds the lock); ``False`` once it failed."""
        if self._failed:
            return False
        try:
            self._sink(record)
        except SinkError:
            self._failed = True
            self._stop.set()
            if self._pair is not None:
                self._pair.end("the trace cannot be written")
            return False
        return True

    def _close_listeners(self) -> None:
        for listener in self._listeners.values():
            listener.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                frontend, backend = self._open_pair()
            except TransportError as exc:
                if self._stop.is_set():
                    return
                # Numbered as the pair it would have been; the next attempt takes the number.
                with self._lock:
                    self._emit(ConnectionRecord(self._now(), self._number + 1, "failed", str(exc)))
                self._stop.wait(_RETRY_INTERVAL)
                continue
            self._run_pair(frontend, backend)

    def _open_pair(self) -> tuple[Channel, Channel]:
        """Reach both peers, the listening side first (the front-end's when both listen)."""
        order = (Side.FRONTEND, Side.BACKEND)
        if self.backend.listen and not self.frontend.listen:
            order = (Side.BACKEND, Side.FRONTEND)
        first = self._reach(order[0])
        try:
            second = self._reach(order[1])
        except BaseException:
            first.close()
            raise
        channels = {order[0]: first, order[1]: second}
        return channels[Side.FRONTEND], channels[Side.BACKEND]

    def _reach(self, side: Side) -> Channel:
        endpoint = self.frontend if side is Side.FRONTEND else self.backend
        listener = self._listeners.get(side)
        if listener is not None:
            return listener.accept()
        try:
            return connect(endpoint.path, timeout=self._connect_timeout, stop=self._stop)
        except TransportError as exc:
            raise TransportError(f"{side.value}: {exc}") from exc

    def _run_pair(self, frontend: Channel, backend: Channel) -> None:
        self._number += 1
        number = self._number
        main = _Link(ChannelKind.MAIN, frontend, backend)
        pair = _Pair(number, main, Conversation(number, self._device_id))
        with self._lock:
            self._pair = pair
            self._emit(
                ConnectionRecord(
                    self._now(),
                    number,
                    "open",
                    f"{self.frontend.describe(Side.FRONTEND)}, "
                    f"{self.backend.describe(Side.BACKEND)}",
                )
            )
        if self._stop.is_set():
            pair.end("the proxy stopped")
        self._start_link(pair, main)
        main.join()
        pair.end(main.reason or "closed")
        with pair.lock:
            links = list(pair.backend_links)
        for link in links:
            link.join()
            link.close()
        main.close()
        with self._lock:
            self._pair = None
            self._emit(ConnectionRecord(self._now(), number, "close", main.reason or "closed"))

    def _start_link(self, pair: _Pair, link: _Link) -> None:
        for sender in (Side.FRONTEND, Side.BACKEND):
            thread = threading.Thread(
                target=self._pump,
                args=(pair, link, sender),
                name=f"trace-{pair.number}-{link.kind.value}-{sender.name.lower()}",
                daemon=True,
            )
            link.threads.append(thread)
        for thread in link.threads:
            thread.start()

    def _pump(self, pair: _Pair, link: _Link, sender: Side) -> None:
        """Relay what ``sender`` sends on ``link`` until the link ends."""
        source = link.channels[sender]
        reason = "closed"
        try:
            while True:
                frame = source.recv()
                try:
                    self._relay(pair, link, sender, frame)
                finally:
                    close_fds(frame.fds)
        except RemoteProtocolError as exc:
            reason = f"{sender.value} sent a message that cannot be framed: {exc}"
            with self._lock:
                self._emit(ConnectionRecord(self._now(), pair.number, "malformed", reason))
        except TransportError as exc:
            reason = f"{sender.value}: {exc}"
        finally:
            if link.end(reason) and link.kind is ChannelKind.BACKEND:
                with self._lock:
                    self._emit(
                        ConnectionRecord(self._now(), pair.number, "backend-channel-close", reason)
                    )

    def _relay(self, pair: _Pair, link: _Link, sender: Side, frame: Frame) -> None:
        """Record ``frame`` and send it on; interpose the back-end channel it hands over."""
        header = frame.header
        links = [_fd_link(fd) for fd in frame.fds]
        send_fds = list(frame.fds)
        note = None
        interposed: _Link | None = None
        backend_end: socket.socket | None = None
        if (
            link.kind is ChannelKind.MAIN
            and sender is Side.FRONTEND
            and header.request == Request.SET_BACKEND_REQ_FD
            and len(frame.fds) == 1
        ):
            if not pair.backend_room():
                note = f"not interposed: {MAX_BACKEND_CHANNELS} back-end channels open"
                frontend_side = None
            else:
                frontend_side = _stream_socket(frame.fds[0])
            if frontend_side is not None:
                # The front-end's socket is now the proxy's to close.
                frame.fds.clear()
                proxy_end, backend_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                interposed = _Link(ChannelKind.BACKEND, Channel(frontend_side), Channel(proxy_end))
                send_fds = [backend_end.fileno()]
                note = "back-end channel interposed"
        try:
            with self._lock:
                record = pair.conversation.observe(
                    link.kind, sender, header, frame.body, links, self._now(), note
                )
                recorded = self._emit(record)
            if not recorded:
                if interposed is not None:
                    interposed.close()
                raise TransportError("the trace cannot be written")
            if interposed is not None:
                if pair.add_backend_link(interposed):
                    self._start_link(pair, interposed)
                else:
                    interposed.close()
                    interposed = None
            data = HEADER.pack(header.request, header.flags, header.size) + frame.body
            try:
                link.channels[sender.other].send(data, send_fds)
            except TransportError as exc:
                raise TransportError(f"cannot forward to the {sender.other.value}: {exc}") from exc
        finally:
            if backend_end is not None:
                backend_end.close()


def _fd_link(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"


def _stream_socket(fd: int) -> socket.socket | None:
    """``fd`` as a socket object owning it, if it is a unix stream socket."""
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            return None
        sock = socket.socket(fileno=fd)
    except OSError:
        return None
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        return None
    return sock
