"""Serving a device on a vhost-user socket, in server or client role.

Theory of operation: the back-end protocol core
(:class:`~pyvdpa.vhost_user.backend.BackendConnection`) is sans-I/O; this
module gives it threads and sockets.  Each connection runs on its own thread:
receive a frame, hand it to the connection, send the replies, until the
peer goes away or breaks the protocol badly enough that the stream cannot
be trusted.  A bad connection is closed alone; the socket keeps serving.
Each connection's back-end channel
(:class:`~pyvdpa.vhost_user.channel.BackendChannel`) is owned here too: it is
shut down before the connection closes, so that a device thread waiting for
the front-end's reply gives up before its ring is stopped, and closed after.

* Server role: a :class:`~pyvdpa.vhost_user.transport.Listener` accepts
  front-ends (QEMU with ``server=off`` on its chardev, DPDK virtio-user).
* Client role (QEMU ``server=on``, DPDK ``server=1``): connect, serve, and
  when the front-end goes away connect again, as DPDK's vhost library does
  with ``RTE_VHOST_USER_CLIENT``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable

from pyvdpa.device import Device
from pyvdpa.errors import ProtocolError, PyvdpaError, TransportError
from pyvdpa.vhost_user.backend import BackendConnection
from pyvdpa.vhost_user.channel import BackendChannel
from pyvdpa.vhost_user.transport import Channel, Listener, connect

__all__ = ["BackendServer"]

log = logging.getLogger(__name__)

DeviceFactory = Callable[[], Device]
ConnectionHook = Callable[[BackendConnection], None]


class BackendServer:
    """Serve devices made by ``device_factory`` on the socket at ``path``.

    ``client=True`` connects to a listening front-end instead of listening,
    and reconnects after each disconnect until :meth:`stop`.  ``on_connect``
    and ``on_disconnect`` are called on the connection's thread, and so is
    ``device_factory``, which may refuse a front-end by raising
    :class:`~pyvdpa.errors.PyvdpaError`: that connection alone is closed.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        device_factory: DeviceFactory,
        *,
        client: bool = False,
        reconnect_interval: float = 0.5,
        on_connect: ConnectionHook | None = None,
        on_disconnect: ConnectionHook | None = None,
    ) -> None:
        self.path = os.fspath(path)
        self.client = client
        self._factory = device_factory
        self._interval = reconnect_interval
        self._on_connect = on_connect
        self._on_disconnect = on_disconnect
        self._stop = threading.Event()
        self._listener: Listener | None = None
        self._threads: list[threading.Thread] = []
        self._channels: set[Channel] = set()
        self._lock = threading.Lock()
        self.connections: list[BackendConnection] = []

    def start(self) -> None:
        """Listen (server role) or start connecting (client role); returns at once.

        Raises :class:`~pyvdpa.errors.ConfigError` when the path cannot be
        listened on (for instance, it already exists).
        """
        if self.client:
            self._spawn(self._client_loop, "vhost-user-connect")
        else:
            self._listener = Listener(self.path)
            self._spawn(self._accept_loop, "vhost-user-accept")

    def stop(self) -> None:
        """Close the socket and every connection, and wait for their threads."""
        self._stop.set()
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            channels = list(self._channels)
        for channel in channels:
            channel.shutdown()
        for thread in list(self._threads):
            if thread is not threading.current_thread():
                thread.join()

    def __enter__(self) -> BackendServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, target: Callable[..., None], name: str, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._stop.is_set():
            try:
                channel = listener.accept()
            except TransportError:
                return
            self._spawn(self._serve, "vhost-user-conn", channel)

    def _client_loop(self) -> None:
        while not self._stop.is_set():
            try:
                channel = connect(self.path, retry_interval=self._interval, stop=self._stop)
            except TransportError:
                if self._stop.is_set():
                    return
                log.warning("%s: cannot connect, retrying", self.path)
                self._stop.wait(self._interval)
                continue
            log.info("%s: connected to front-end", self.path)
            self._serve(channel)

    def _serve(self, channel: Channel) -> None:
        with self._lock:
            self._channels.add(channel)
        try:
            device = self._factory()
        except PyvdpaError as exc:
            # The factory refuses this front-end (e.g. the device is busy): close it alone.
            log.warning("%s: refusing front-end: %s", self.path, exc)
            with self._lock:
                self._channels.discard(channel)
            channel.close()
            return
        backend = BackendChannel(self.path)
        connection = BackendConnection(device, name=self.path, backend=backend)
        with self._lock:
            self.connections.append(connection)
        if self._on_connect is not None:
            self._on_connect(connection)
        try:
            self._dispatch(channel, connection)
        finally:
            backend.shutdown()
            connection.close()
            backend.close()
            with self._lock:
                self._channels.discard(channel)
                if connection in self.connections:
                    self.connections.remove(connection)
            channel.close()
            if self._on_disconnect is not None:
                with contextlib.suppress(Exception):
                    self._on_disconnect(connection)

    def _dispatch(self, channel: Channel, connection: BackendConnection) -> None:
        while not self._stop.is_set():
            try:
                frame = channel.recv()
                for reply in connection.handle(frame):
                    channel.send(reply.data, reply.fds)
            except TransportError as exc:
                log.info("%s: connection closed: %s", self.path, exc)
                return
            except ProtocolError as exc:
                log.error("%s: dropping connection: %s", self.path, exc)
                return
