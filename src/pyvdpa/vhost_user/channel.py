"""The back-end channel: the socket on which the back-end asks the front-end.

Theory of operation (vhost-user spec, "Back-end communication", "IOMMU
support", "In-band notifications"): SET_BACKEND_REQ_FD hands the back-end
one end of a unix socket.  On it the back-end sends requests
(:class:`~pyvdpa.vhost_user.link.BackendMessage`) and, when it set
NEED_REPLY, reads the front-end's u64 acknowledgement.  Device threads send
concurrently (IOTLB misses, in-band VRING_CALL / VRING_ERR for rings without
eventfds), so one lock holds the channel for one request and its reply.

:class:`BackendChannel` is the I/O layer's implementation of
:class:`~pyvdpa.vhost_user.link.BackendLink`, owned by
:class:`~pyvdpa.vhost_user.server.BackendServer` for each connection:

* the socket (a :class:`~pyvdpa.vhost_user.transport.Channel`), replaced
  by a later SET_BACKEND_REQ_FD (a thread waiting on the old one wakes);
* in-band signals, which wait for the front-end's acknowledgement;
* IOTLB misses, one per outstanding address: a MISS is not repeated until
  an UPDATE covered its address (and it was invalidated again) or the
  device was reset.  A miss that cannot be sent is logged; the ring then
  waits until the front-end maps the address by itself.
"""

from __future__ import annotations

import logging
import socket
import threading

from pyvdpa.device import Signal
from pyvdpa.errors import ProtocolError, PyvdpaError, RemoteProtocolError
from pyvdpa.vhost_user import codec
from pyvdpa.vhost_user.link import BackendMessage, Covered
from pyvdpa.vhost_user.protocol import BackendRequest, IotlbPerm, IotlbType
from pyvdpa.vhost_user.transport import Channel, close_fds

__all__ = ["BackendChannel"]

log = logging.getLogger(__name__)


class BackendChannel:
    """One connection's back-end channel (a :class:`~pyvdpa.vhost_user.link.BackendLink`)."""

    def __init__(self, name: str = "vhost-user") -> None:
        self.name = name
        self._channel: Channel | None = None
        # One back-end request and its reply at a time.
        self._lock = threading.Lock()
        self._misses: set[int] = set()

    @property
    def channel(self) -> Channel | None:
        """The socket, once SET_BACKEND_REQ_FD gave one."""
        return self._channel

    def attach(self, fd: int) -> None:
        """Take ``fd`` (a unix stream socket) as the channel; see :class:`BackendLink`."""
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise RemoteProtocolError("SET_BACKEND_REQ_FD: fd is not a socket") from exc
        if sock.family != socket.AF_UNIX:
            sock.detach()
            raise RemoteProtocolError("SET_BACKEND_REQ_FD: fd is not a unix socket")
        old = self._channel
        if old is not None:
            # Wake a device thread waiting for a reply on the old channel.
            old.shutdown()
        with self._lock:
            self._channel = Channel(sock)
        if old is not None:
            old.close()

    def send(self, message: BackendMessage) -> int:
        """Send ``message``, waiting for the u64 when it asks for one; see :class:`BackendLink`."""
        data, fds = message.encode()
        with self._lock:
            channel = self._channel
            if channel is None:
                raise ProtocolError("no back-end channel (SET_BACKEND_REQ_FD not received)")
            channel.send(data, fds)
            if not message.need_reply:
                return 0
            frame = channel.recv()
        try:
            reply = codec.decode_backend_reply(message.request, frame.header, frame.body, frame.fds)
        finally:
            close_fds(frame.fds)
        payload = reply.payload
        if not isinstance(payload, codec.U64):
            raise RemoteProtocolError(f"{message.request.name}: reply is not a u64")
        return payload.value

    def signal(self, signal: Signal, index: int) -> None:
        """VRING_CALL / VRING_ERR for ring ``index``, blocking until the front-end processed it."""
        message = BackendMessage.signal(signal, index)
        result = self.send(message)
        if result:
            raise RemoteProtocolError(f"front-end answered {message.request.name} with {result}")

    def request_translation(self, iova: int, write: bool, covered: Covered) -> None:
        """Send an IOTLB MISS for ``iova`` unless one is outstanding or it is ``covered``."""
        with self._lock:
            if iova in self._misses or covered(iova):
                return
            self._misses.add(iova)
        perm = IotlbPerm.WO if write else IotlbPerm.RO
        miss = codec.IotlbMsg(iova, 0, 0, perm, IotlbType.MISS)
        try:
            self.send(BackendMessage(BackendRequest.IOTLB_MSG, miss))
        except PyvdpaError as exc:
            log.error("%s: IOTLB miss at %#x not sent: %s", self.name, iova, exc)

    def translations_added(self, covered: Covered) -> None:
        """Forget the misses an UPDATE answered."""
        with self._lock:
            self._misses = {iova for iova in self._misses if not covered(iova)}

    def forget_translations(self) -> None:
        """Forget every outstanding miss (the device was reset)."""
        with self._lock:
            self._misses.clear()

    def shutdown(self) -> None:
        """Wake device threads waiting for a reply (they see the channel gone)."""
        channel = self._channel
        if channel is not None:
            channel.shutdown()

    def close(self) -> None:
        """Close the socket (after :meth:`shutdown`, nobody waits on it)."""
        channel = self._channel
        if channel is not None:
            channel.close()
