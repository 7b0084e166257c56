"""The vhost-user back-end: one connection, in the layers of rust-vmm's ``vhost``.

Theory of operation (vhost-user spec, "Front-end message types", "Ring
states", "REPLY_ACK"): a connection is three parts, each with its own
module, and a device beneath them.

1. The *dispatcher* (:mod:`pyvdpa.vhost_user.dispatch`) decodes a frame,
   checks the protocol-feature gate and the connection's phase, calls the
   handler and answers (the request's own reply, or a REPLY_ACK); it owns
   the fds until a handler keeps them.  Sans I/O: frames in,
   :class:`~pyvdpa.vhost_user.link.Reply` values out.
2. The *handler* (:mod:`pyvdpa.vhost_user.handler`) has one method per
   request, with typed arguments, over the connection's state; its state
   machines are tables (:mod:`pyvdpa.vhost_user.states`).
3. A :class:`~pyvdpa.device.Device` is told when a ring starts (with a
   :class:`~pyvdpa.device.RingSpec` the handler built and checked, once)
   and stops (handing back the exact :class:`~pyvdpa.device.RingPosition`).

What the back-end asks the front-end goes through a
:class:`~pyvdpa.vhost_user.link.BackendLink` the I/O layer owns (the
back-end channel, :mod:`pyvdpa.vhost_user.channel`); sockets and threads
live in :mod:`pyvdpa.vhost_user.server`.
"""

from __future__ import annotations

from pyvdpa.device import Device
from pyvdpa.vhost_user.dispatch import Dispatcher
from pyvdpa.vhost_user.handler import (
    IMPLEMENTED_PROTOCOL_FEATURES,
    MAX_MEM_SLOTS,
    BackendHandler,
    Vring,
)
from pyvdpa.vhost_user.link import BackendLink, Reply
from pyvdpa.vhost_user.states import RING_TRANSITIONS, RingEvent, RingState
from pyvdpa.vhost_user.transport import Frame

__all__ = [
    "IMPLEMENTED_PROTOCOL_FEATURES",
    "MAX_MEM_SLOTS",
    "RING_TRANSITIONS",
    "BackendConnection",
    "RingEvent",
    "RingState",
    "Vring",
]


class BackendConnection(BackendHandler):
    """One front-end's connection to a device: the handler and its dispatcher, sans I/O.

    Feed each received :class:`~pyvdpa.vhost_user.transport.Frame` to
    :meth:`handle` and send back the replies it returns; call :meth:`close`
    when the connection ends.  ``backend`` is the back-end channel the I/O
    layer owns (:class:`~pyvdpa.vhost_user.channel.BackendChannel`).
    """

    def __init__(
        self, device: Device, *, name: str = "vhost-user", backend: BackendLink | None = None
    ) -> None:
        super().__init__(device, name=name, backend=backend)
        self._dispatcher = Dispatcher(self)

    def handle(self, frame: Frame) -> list[Reply]:
        """Apply one frame; return the replies to send (see :class:`Dispatcher`)."""
        return self._dispatcher.handle(frame)
