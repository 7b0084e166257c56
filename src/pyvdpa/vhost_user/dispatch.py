"""The back-end's dispatcher: frames in, replies out, one typed handler call between.

Theory of operation (vhost-user spec, "Communication", "REPLY_ACK"; rust-vmm
``vhost``'s ``BackendReqHandler``): :meth:`Dispatcher.handle` takes one
received frame and, sans I/O, returns the :class:`~pyvdpa.vhost_user.link.Reply`
values to send back.  In order, it

1. decodes the frame with the codec (header, known request, REPLY flag
   clear, fd allow-list, exact payload size, payload validity);
2. checks the protocol-feature gate of the request;
3. finds the request's :class:`Route` in :data:`ROUTES` (a request without
   one is refused: this back-end does not implement it);
4. checks the connection's phase (SET_OWNER before the rest,
   :mod:`pyvdpa.vhost_user.states`);
5. calls the handler's method for the request with typed arguments taken
   from the payload the codec decoded for it;
6. answers: the request's own reply; or, with REPLY_ACK negotiated and
   NEED_REPLY set, a u64 that is 0 on success and non-zero on failure.

:data:`ROUTES` is written out request by request: the payload type the codec
decodes for the request (checked against the codec's table when this module
loads) and the handler call.  Nothing is looked up by name.

Refusals: a broken header, a truncated message or the REPLY flag on a
request drop the connection (the error is raised with ``drop_connection``);
anything else is refused with a non-zero REPLY_ACK when the front-end asked
for one, and the connection goes on.  A request that has its own reply and
cannot be answered closes the connection (the front-end would wait
forever), except GET_CONFIG, refused with an empty reply as the spec says,
and IOTLB_MSG, whose reply is its status.

fd ownership: every fd received stays in the frame's list until a handler
method that keeps one has returned (a :class:`Route` then removes it); the
dispatcher closes whatever is left, on success and on every error.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Generic, TypeVar

from pyvdpa.device import UnsupportedRequestError
from pyvdpa.errors import LocalProtocolError, ProtocolError, PyvdpaError, RemoteProtocolError
from pyvdpa.vhost_user import codec
from pyvdpa.vhost_user.codec import (
    U64,
    ConfigSpace,
    Inflight,
    IotlbMsg,
    LogArea,
    MemTable,
    NoPayload,
    Payload,
    SingleMemRegion,
    VringAddr,
    VringFile,
    VringState,
)
from pyvdpa.vhost_user.handler import BackendHandler
from pyvdpa.vhost_user.link import Reply
from pyvdpa.vhost_user.protocol import HeaderFlags, ProtocolFeature, Request
from pyvdpa.vhost_user.states import next_phase
from pyvdpa.vhost_user.transport import Frame, close_fds

__all__ = ["ROUTES", "Answer", "Dispatcher", "Route"]

log = logging.getLogger(__name__)

P = TypeVar("P", bound=Payload)

#: What a handler call gives the dispatcher: nothing (acknowledge), its own
#: reply's payload, or a reply already encoded with the fds it carries.
Answer = Payload | Reply | None


@dataclass(frozen=True, slots=True)
class Route(Generic[P]):
    """How one request reaches the handler: its decoded payload type and the call."""

    payload: type[P]
    call: Callable[[BackendHandler, P, list[int]], Answer]

    def invoke(self, handler: BackendHandler, payload: Payload, fds: list[int]) -> Answer:
        """Call the handler; a payload of another type is this side's bug, typed as such."""
        if not isinstance(payload, self.payload):
            raise LocalProtocolError(
                f"decoded {type(payload).__name__}, the handler takes {self.payload.__name__}"
            )
        return self.call(handler, payload, fds)


_Setter = Callable[[BackendHandler, int], None]
_FileSetter = Callable[[BackendHandler, int, "int | None"], None]


def _kept(fds: list[int], fd: int | None) -> None:
    """The handler returned: ``fd`` is its own now, not the dispatcher's to close."""
    if fd is not None:
        fds.remove(fd)


def _keeps_fd(method: _Setter) -> Route[NoPayload]:
    """A request whose one fd the handler keeps (SET_LOG_FD, SET_BACKEND_REQ_FD)."""

    def call(handler: BackendHandler, payload: NoPayload, fds: list[int]) -> None:
        fd = fds[0]
        method(handler, fd)
        _kept(fds, fd)

    return Route(NoPayload, call)


def _vring_file(method: _FileSetter) -> Route[U64]:
    """SET_VRING_KICK / CALL / ERR: a vring index and an eventfd unless NOFD."""

    def call(handler: BackendHandler, payload: U64, fds: list[int]) -> None:
        file = VringFile.from_u64(payload.value)
        fd = None if file.nofd else fds[0]
        method(handler, file.index, fd)
        _kept(fds, fd)

    return Route(U64, call)


def _set_log_base(handler: BackendHandler, area: LogArea, fds: list[int]) -> Answer:
    handler.set_log_base(fds[0], area.mmap_size, area.mmap_offset)
    return U64(0)


def _get_vring_base(handler: BackendHandler, state: VringState, fds: list[int]) -> Answer:
    return VringState(state.index, handler.get_vring_base(state.index))


def _get_config(handler: BackendHandler, query: ConfigSpace, fds: list[int]) -> Answer:
    data = handler.get_config(query.offset, query.size)
    return ConfigSpace(query.offset, query.size, query.flags, data)


def _get_inflight_fd(handler: BackendHandler, query: Inflight, fds: list[int]) -> Answer:
    region = handler.get_inflight_fd(query.num_queues, query.queue_size)
    reply = Inflight(region.mmap_size, 0, query.num_queues, query.queue_size)
    return Reply(codec.encode_reply(Request.GET_INFLIGHT_FD, reply), (region.fd,))


def _iotlb_msg(handler: BackendHandler, entry: IotlbMsg, fds: list[int]) -> Answer:
    handler.iotlb_msg(entry)
    return U64(0)


def _mac(value: int) -> bytes:
    # SEND_RARP's u64 holds the MAC address in its first six bytes.
    return struct.pack("<Q", value)[:6]


_R = Request
_H = BackendHandler

#: request -> route: every request this back-end implements.
ROUTES: Mapping[Request, Route[Any]] = MappingProxyType(
    {
        _R.GET_FEATURES: Route(NoPayload, lambda h, p, fds: U64(h.get_features())),
        _R.SET_FEATURES: Route(U64, lambda h, p, fds: h.set_features(p.value)),
        _R.SET_OWNER: Route(NoPayload, lambda h, p, fds: h.set_owner()),
        _R.RESET_OWNER: Route(NoPayload, lambda h, p, fds: h.reset_owner()),
        _R.SET_MEM_TABLE: Route(MemTable, lambda h, p, fds: h.set_mem_table(p.regions, fds)),
        _R.SET_LOG_BASE: Route(LogArea, _set_log_base),
        _R.SET_LOG_FD: _keeps_fd(_H.set_log_fd),
        _R.SET_VRING_NUM: Route(VringState, lambda h, p, fds: h.set_vring_num(p.index, p.num)),
        _R.SET_VRING_ADDR: Route(VringAddr, lambda h, p, fds: h.set_vring_addr(p)),
        _R.SET_VRING_BASE: Route(VringState, lambda h, p, fds: h.set_vring_base(p.index, p.num)),
        _R.GET_VRING_BASE: Route(VringState, _get_vring_base),
        _R.SET_VRING_KICK: _vring_file(_H.set_vring_kick),
        _R.SET_VRING_CALL: _vring_file(_H.set_vring_call),
        _R.SET_VRING_ERR: _vring_file(_H.set_vring_err),
        _R.GET_PROTOCOL_FEATURES: Route(
            NoPayload, lambda h, p, fds: U64(h.get_protocol_features())
        ),
        _R.SET_PROTOCOL_FEATURES: Route(U64, lambda h, p, fds: h.set_protocol_features(p.value)),
        _R.GET_QUEUE_NUM: Route(NoPayload, lambda h, p, fds: U64(h.get_queue_num())),
        _R.SET_VRING_ENABLE: Route(
            VringState, lambda h, p, fds: h.set_vring_enable(p.index, bool(p.num))
        ),
        _R.SEND_RARP: Route(U64, lambda h, p, fds: h.send_rarp(_mac(p.value))),
        _R.NET_SET_MTU: Route(U64, lambda h, p, fds: h.net_set_mtu(p.value)),
        _R.SET_BACKEND_REQ_FD: _keeps_fd(_H.set_backend_req_fd),
        _R.IOTLB_MSG: Route(IotlbMsg, _iotlb_msg),
        _R.GET_CONFIG: Route(ConfigSpace, _get_config),
        _R.SET_CONFIG: Route(ConfigSpace, lambda h, p, fds: h.set_config(p.offset, p.data)),
        _R.GET_INFLIGHT_FD: Route(Inflight, _get_inflight_fd),
        _R.SET_INFLIGHT_FD: Route(Inflight, lambda h, p, fds: h.set_inflight_fd(fds[0], p)),
        _R.RESET_DEVICE: Route(NoPayload, lambda h, p, fds: h.reset_device()),
        _R.VRING_KICK: Route(VringState, lambda h, p, fds: h.vring_kick(p.index)),
        _R.GET_MAX_MEM_SLOTS: Route(NoPayload, lambda h, p, fds: U64(h.get_max_mem_slots())),
        _R.ADD_MEM_REG: Route(SingleMemRegion, lambda h, p, fds: h.add_mem_reg(p.region, fds[0])),
        _R.REM_MEM_REG: Route(SingleMemRegion, lambda h, p, fds: h.rem_mem_reg(p.region)),
        _R.SET_STATUS: Route(U64, lambda h, p, fds: h.set_status(p.value)),
        _R.GET_STATUS: Route(NoPayload, lambda h, p, fds: U64(h.get_status())),
    }
)


def _check_routes() -> None:
    # A route takes the one payload type the codec decodes for its request.
    for request, route in ROUTES.items():
        decoded = codec.REQUESTS[request].payloads
        if decoded != (route.payload,):
            raise TypeError(f"{request.name}: route takes {route.payload}, codec gives {decoded}")


_check_routes()


class Dispatcher:
    """Feeds one connection's frames to its :class:`BackendHandler`; see the module doc."""

    def __init__(self, handler: BackendHandler) -> None:
        self.handler = handler

    def handle(self, frame: Frame) -> list[Reply]:
        """Apply one frame; return the replies to send (possibly none).

        Raises :class:`ProtocolError` with ``drop_connection`` set when the
        connection must be closed.  Every fd in ``frame.fds`` is either kept
        by the handler or closed before this returns.
        """
        handler = self.handler
        fds = frame.fds
        header = frame.header
        try:
            try:
                message = codec.decode_request(header, frame.body, fds)
                request = Request(message.request)
                codec.check_gate(request, handler.protocol_features)
                route = ROUTES.get(request)
                if route is None:
                    raise RemoteProtocolError(f"{request.name}: not supported by this back-end")
                next_phase(handler.phase, request)
                result = route.invoke(handler, message.payload, fds)
            except (PyvdpaError, UnsupportedRequestError) as exc:
                return self._refuse(header.request, header.flags, exc)
        finally:
            close_fds(fds)
            fds.clear()
        return self._answer(request, message.flags, result)

    def _wants_ack(self, flags: int) -> bool:
        return bool(
            self.handler.protocol_features & ProtocolFeature.REPLY_ACK
            and flags & HeaderFlags.NEED_REPLY
        )

    def _answer(self, request: Request, flags: int, result: Answer) -> list[Reply]:
        if isinstance(result, Reply):
            return [result]
        if result is not None:
            return [Reply(codec.encode_reply(request, result))]
        if self._wants_ack(flags):
            return [Reply(codec.encode_reply(request, U64(0)))]
        return []

    def _refuse(self, request: int, flags: int, exc: Exception) -> list[Reply]:
        name = self.handler.name
        # A dropped connection is logged once, by whoever closes it.
        if isinstance(exc, ProtocolError) and exc.drop_connection:
            raise exc
        if request not in Request.__members__.values():
            log.error("%s: request %d refused: %s", name, request, exc)
            return self._ack_failure(request, flags)
        req = Request(request)
        if req is Request.IOTLB_MSG:
            log.error("%s: %s refused: %s", name, req.name, exc)
            # Its reply is its status (QEMU reads it like a REPLY_ACK).
            return [Reply(codec.encode_reply(req, U64(1)))]
        if codec.has_reply(req) and req is not Request.GET_CONFIG:
            # The front-end waits for a reply we cannot give: close the connection.
            raise RemoteProtocolError(
                f"{req.name} refused, and it must be answered: {exc}", drop_connection=True
            ) from exc
        log.error("%s: %s refused: %s", name, req.name, exc)
        if req is Request.GET_CONFIG:
            # libvhost-user's convention: an empty payload tells QEMU it failed.
            return [Reply(codec.HEADER.pack(req, HeaderFlags.VERSION | HeaderFlags.REPLY, 0))]
        return self._ack_failure(request, flags)

    def _ack_failure(self, request: int, flags: int) -> list[Reply]:
        if not self._wants_ack(flags):
            return []
        return [Reply(codec.encode_ack_failure(request))]
