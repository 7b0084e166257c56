"""What the sans-I/O back-end core hands the I/O layer: values, and the port they go through.

Theory of operation (vhost-user spec, "Communication", "Back-end
communication"): a back-end talks to its front-end on two sockets.  On the
main one it only answers; the core returns each answer as a :class:`Reply`
(bytes and the fds that ride with them) for the I/O layer to send.  On the
back-end channel (SET_BACKEND_REQ_FD) it asks: a :class:`BackendMessage`
is one such request (IOTLB MISS, CONFIG_CHANGE_MSG, in-band VRING_CALL and
VRING_ERR), built by the core and encoded here.

Back-end requests are sent from device threads too (a queue that misses a
translation, a ring that signals without an eventfd), and some wait for the
front-end's acknowledgement, so they cannot be return values of the
dispatcher.  The core therefore holds a :class:`BackendLink`, a port that
the I/O layer implements (:class:`~pyvdpa.vhost_user.channel.BackendChannel`
over a socket) and that owns everything about the channel: the socket, one
request and reply at a time, one MISS per outstanding address.  The core
decides *what* to send and *when*; the link moves it.  Without an I/O layer
(:class:`NoBackendChannel`) a request fails as it would before the
front-end opened the channel.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from pyvdpa.device import Signal
from pyvdpa.errors import ProtocolError, RemoteProtocolError
from pyvdpa.vhost_user import codec
from pyvdpa.vhost_user.protocol import BackendRequest, HeaderFlags

__all__ = ["BackendLink", "BackendMessage", "NoBackendChannel", "Reply"]


@dataclass(frozen=True, slots=True)
class Reply:
    """An encoded message for the main socket and the fds sent with it (not closed by sending)."""

    data: bytes
    fds: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class BackendMessage:
    """A back-end request for the back-end channel; ``need_reply`` waits for the u64."""

    request: BackendRequest
    payload: codec.Payload
    need_reply: bool = False

    def encode(self) -> tuple[bytes, tuple[int, ...]]:
        """The wire bytes and fds (:class:`~pyvdpa.errors.LocalProtocolError` if invalid)."""
        flags = HeaderFlags.VERSION | (HeaderFlags.NEED_REPLY if self.need_reply else 0)
        return codec.encode(codec.Message(self.request, self.payload, HeaderFlags(flags)))

    @classmethod
    def signal(cls, signal: Signal, index: int) -> BackendMessage:
        """In-band VRING_CALL / VRING_ERR for ring ``index``, acknowledged by the front-end."""
        request = BackendRequest.VRING_CALL if signal is Signal.CALL else BackendRequest.VRING_ERR
        return cls(request, codec.VringState(index, 0), need_reply=True)


#: Whether an I/O virtual address has a translation now.
Covered = Callable[[int], bool]


class BackendLink(Protocol):
    """The back-end channel as the core sees it; every method is thread-safe."""

    def attach(self, fd: int) -> None:
        """SET_BACKEND_REQ_FD: take ``fd`` as the channel, replacing any previous one.

        Raises :class:`RemoteProtocolError` (``fd`` left to the caller) when
        it is not a unix stream socket.
        """

    def send(self, message: BackendMessage) -> int:
        """Send ``message``; with ``need_reply`` wait and return the front-end's u64, else 0.

        Raises :class:`ProtocolError` without a channel,
        :class:`~pyvdpa.errors.TransportError` if it broke.
        """

    def signal(self, signal: Signal, index: int) -> None:
        """In-band VRING_CALL / VRING_ERR for ring ``index``; returns once acknowledged.

        Raises :class:`RemoteProtocolError` when the front-end refuses it.
        """

    def request_translation(self, iova: int, write: bool, covered: Covered) -> None:
        """Send an IOTLB MISS for ``iova`` unless one is outstanding or ``covered(iova)``."""

    def translations_added(self, covered: Covered) -> None:
        """An UPDATE came: misses for addresses ``covered`` now are answered."""

    def forget_translations(self) -> None:
        """The device was reset: no miss is outstanding any more."""


class NoBackendChannel:
    """The link of a core without an I/O layer: nothing can be sent."""

    def attach(self, fd: int) -> None:
        """Refuse the channel (the caller keeps ``fd``)."""
        raise RemoteProtocolError("SET_BACKEND_REQ_FD: this connection has no back-end channel")

    def send(self, message: BackendMessage) -> int:
        """Fail: there is no channel."""
        raise ProtocolError("no back-end channel (SET_BACKEND_REQ_FD not received)")

    def signal(self, signal: Signal, index: int) -> None:
        """Fail: there is no channel."""
        self.send(BackendMessage.signal(signal, index))

    def request_translation(self, iova: int, write: bool, covered: Covered) -> None:
        """Nothing to ask through."""

    def translations_added(self, covered: Covered) -> None:
        """No miss was sent."""

    def forget_translations(self) -> None:
        """No miss was sent."""
