"""The vhost-user front-end: the VMM's side of the socket.

Theory of operation (vhost-user spec, "Front-end message types"): the
front-end owns guest memory and the rings in it; it tells the back-end where
they are (SET_MEM_TABLE, SET_VRING_*), hands it eventfds to kick and call,
and negotiates features.  This is the role QEMU plays, that DPDK calls
virtio-user and that the vDPA literature calls vhost-vfio.

:class:`Frontend` is one method per request over a
:class:`~pyvdpa.vhost_user.transport.Channel`: it encodes with the codec,
sends, and for requests that answer, waits for and validates the reply
(flags exactly VERSION|REPLY, same request, exact size; the codec's
:func:`~pyvdpa.vhost_user.codec.decode_reply`).  With REPLY_ACK negotiated
every request without a reply of its own asks for an ack, so a refusal is
reported as :class:`BackendRefusedError` at the request that caused it.

Back-end requests (SET_BACKEND_REQ_FD) are served on a thread of their own
and checked like front-end requests (header, known request, payload,
protocol-feature gate); VRING_CALL / VRING_ERR / CONFIG_CHANGE_MSG are handed
to callbacks.  A request that fails any check, or whose callback raises, is
answered with a non-zero REPLY_ACK when the back-end asked for one, and its
error is kept in :attr:`Frontend.backend_error`; the channel goes on.  With
in-band notifications (vhost-user spec, "In-band notifications") kicks are
VRING_KICK requests and calls arrive as VRING_CALL, each acknowledged so that
the sender waits until the other side processed it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Callable, Sequence

from pyvdpa.errors import PyvdpaError, RemoteProtocolError, TransportError
from pyvdpa.memory import MemoryRegion
from pyvdpa.vhost_user import codec
from pyvdpa.vhost_user.codec import Message
from pyvdpa.vhost_user.protocol import (
    VRING_NOFD_MASK,
    BackendRequest,
    HeaderFlags,
    ProtocolFeature,
    Request,
)
from pyvdpa.vhost_user.transport import Channel, Frame, Listener, close_fds, connect

__all__ = ["BackendRefusedError", "Frontend"]

log = logging.getLogger(__name__)

BackendHandler = Callable[[Message], int]


class BackendRefusedError(PyvdpaError):
    """The back-end answered a request with a non-zero REPLY_ACK."""


class Frontend:
    """Drive a vhost-user back-end over ``channel``.

    Use :meth:`connect` (the back-end listens) or :meth:`listen` (the
    back-end connects, as with QEMU's ``server=on``).
    """

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.protocol_features = ProtocolFeature(0)
        self._lock = threading.Lock()
        self._backend_channel: Channel | None = None
        self._backend_thread: threading.Thread | None = None
        self.backend_handlers: dict[BackendRequest, BackendHandler] = {}
        #: The first error the back-end channel met: a request refused (malformed,
        #: unknown, not negotiated, or failed by its callback) or the channel broken.
        self.backend_error: PyvdpaError | None = None
        self._closing = False

    @classmethod
    def connect(cls, path: str | os.PathLike[str], *, timeout: float = 10.0) -> Frontend:
        """Connect to a back-end listening on ``path``."""
        return cls(connect(path, timeout=timeout))

    @classmethod
    def listen(cls, path: str | os.PathLike[str], *, timeout: float = 30.0) -> Frontend:
        """Listen on ``path`` and wait for one back-end to connect."""
        with Listener(path) as listener:
            sock = socket.socket(fileno=os.dup(listener.fileno()))
            sock.settimeout(timeout)
            try:
                conn, _ = sock.accept()
            except TimeoutError as exc:
                raise TransportError(f"no back-end connected to {path} in {timeout} s") from exc
            finally:
                sock.close()
        conn.settimeout(None)
        return cls(Channel(conn))

    # ------------------------------------------------------------------ core

    def request(
        self,
        request: Request,
        payload: codec.Payload | None = None,
        fds: Sequence[int] = (),
        *,
        ack: bool | None = None,
    ) -> Message | None:
        """Send ``request``; return its reply, if it has one.

        ``ack`` asks for a REPLY_ACK (default: whenever REPLY_ACK is
        negotiated and the request has no reply of its own).
        """
        payload = payload if payload is not None else codec.NoPayload()
        has_reply = codec.has_reply(request)
        if ack is None:
            ack = bool(self.protocol_features & ProtocolFeature.REPLY_ACK) and not has_reply
        flags = HeaderFlags.VERSION | (HeaderFlags.NEED_REPLY if ack else 0)
        data, out_fds = codec.encode(Message(request, payload, HeaderFlags(flags), tuple(fds)))
        with self._lock:
            self.channel.send(data, out_fds)
            if not (has_reply or ack):
                return None
            frame = self.channel.recv()
            try:
                if has_reply:
                    return codec.decode_reply(request, frame.header, frame.body, frame.fds)
                reply = codec.decode_reply_ack(request, frame.header, frame.body, frame.fds)
            except RemoteProtocolError:
                close_fds(frame.fds)
                raise
        if reply:
            raise BackendRefusedError(f"back-end refused {request.name} (REPLY_ACK {reply})")
        return None

    def _u64(self, request: Request) -> int:
        reply = self.request(request)
        assert reply is not None and isinstance(reply.payload, codec.U64)
        return reply.payload.value

    # ------------------------------------------------------------------ requests

    def get_features(self) -> int:
        """GET_FEATURES."""
        return self._u64(Request.GET_FEATURES)

    def set_features(self, features: int) -> None:
        """SET_FEATURES."""
        self.request(Request.SET_FEATURES, codec.U64(features))

    def get_protocol_features(self) -> ProtocolFeature:
        """GET_PROTOCOL_FEATURES."""
        return ProtocolFeature(self._u64(Request.GET_PROTOCOL_FEATURES))

    def set_protocol_features(self, features: ProtocolFeature) -> None:
        """SET_PROTOCOL_FEATURES; later requests use REPLY_ACK if it is among them."""
        self.request(Request.SET_PROTOCOL_FEATURES, codec.U64(features), ack=False)
        self.protocol_features = ProtocolFeature(features)

    def set_owner(self) -> None:
        """SET_OWNER."""
        self.request(Request.SET_OWNER)

    def reset_owner(self) -> None:
        """RESET_OWNER."""
        self.request(Request.RESET_OWNER)

    def reset_device(self) -> None:
        """RESET_DEVICE."""
        self.request(Request.RESET_DEVICE)

    def get_queue_num(self) -> int:
        """GET_QUEUE_NUM."""
        return self._u64(Request.GET_QUEUE_NUM)

    def get_max_mem_slots(self) -> int:
        """GET_MAX_MEM_SLOTS."""
        return self._u64(Request.GET_MAX_MEM_SLOTS)

    def set_mem_table(self, regions: Sequence[tuple[MemoryRegion, int]]) -> None:
        """SET_MEM_TABLE with one fd per region."""
        table = codec.MemTable(tuple(r for r, _ in regions))
        self.request(Request.SET_MEM_TABLE, table, [fd for _, fd in regions])

    def add_mem_reg(self, region: MemoryRegion, fd: int) -> None:
        """ADD_MEM_REG."""
        self.request(Request.ADD_MEM_REG, codec.SingleMemRegion(region), [fd])

    def rem_mem_reg(self, region: MemoryRegion) -> None:
        """REM_MEM_REG."""
        self.request(Request.REM_MEM_REG, codec.SingleMemRegion(region))

    def set_vring_num(self, index: int, num: int) -> None:
        """SET_VRING_NUM."""
        self.request(Request.SET_VRING_NUM, codec.VringState(index, num))

    def set_vring_base(self, index: int, base: int) -> None:
        """SET_VRING_BASE."""
        self.request(Request.SET_VRING_BASE, codec.VringState(index, base))

    def get_vring_base(self, index: int) -> int:
        """GET_VRING_BASE: stops the ring, returns the next avail index."""
        reply = self.request(Request.GET_VRING_BASE, codec.VringState(index, 0))
        assert reply is not None and isinstance(reply.payload, codec.VringState)
        return reply.payload.num

    def set_vring_addr(self, addr: codec.VringAddr) -> None:
        """SET_VRING_ADDR (front-end virtual addresses)."""
        self.request(Request.SET_VRING_ADDR, addr)

    def _vring_fd(self, request: Request, index: int, fd: int | None) -> None:
        value = index | (VRING_NOFD_MASK if fd is None else 0)
        self.request(request, codec.U64(value), [] if fd is None else [fd])

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        """SET_VRING_KICK (``None``: no fd, the back-end polls)."""
        self._vring_fd(Request.SET_VRING_KICK, index, fd)

    def set_vring_call(self, index: int, fd: int | None) -> None:
        """SET_VRING_CALL."""
        self._vring_fd(Request.SET_VRING_CALL, index, fd)

    def set_vring_err(self, index: int, fd: int | None) -> None:
        """SET_VRING_ERR."""
        self._vring_fd(Request.SET_VRING_ERR, index, fd)

    def set_vring_enable(self, index: int, enable: bool) -> None:
        """SET_VRING_ENABLE."""
        self.request(Request.SET_VRING_ENABLE, codec.VringState(index, int(enable)))

    def vring_kick(self, index: int) -> None:
        """VRING_KICK (in-band notification; acknowledged with REPLY_ACK negotiated)."""
        self.request(Request.VRING_KICK, codec.VringState(index, 0))

    def send_rarp(self, mac: bytes) -> None:
        """SEND_RARP."""
        self.request(Request.SEND_RARP, codec.U64(int.from_bytes(mac.ljust(8, b"\0"), "little")))

    def net_set_mtu(self, mtu: int) -> None:
        """NET_SET_MTU."""
        self.request(Request.NET_SET_MTU, codec.U64(mtu))

    def set_log_base(self, fd: int, mmap_size: int, mmap_offset: int = 0) -> None:
        """SET_LOG_BASE (LOG_SHMFD: the back-end answers once the log is mapped)."""
        self.request(Request.SET_LOG_BASE, codec.LogArea(mmap_size, mmap_offset), [fd])

    def set_log_fd(self, fd: int) -> None:
        """SET_LOG_FD."""
        self.request(Request.SET_LOG_FD, codec.NoPayload(), [fd])

    def get_config(self, offset: int, size: int) -> bytes:
        """GET_CONFIG."""
        query = codec.ConfigSpace(offset, size, codec.ConfigType(0), bytes(size))
        reply = self.request(Request.GET_CONFIG, query)
        assert reply is not None
        if not isinstance(reply.payload, codec.ConfigSpace) or reply.payload.size != size:
            raise BackendRefusedError(f"back-end refused GET_CONFIG of {size} bytes at {offset}")
        return reply.payload.data

    def set_config(self, offset: int, data: bytes) -> None:
        """SET_CONFIG."""
        self.request(
            Request.SET_CONFIG, codec.ConfigSpace(offset, len(data), codec.ConfigType(0), data)
        )

    def get_inflight_fd(self, num_queues: int, queue_size: int) -> tuple[codec.Inflight, int]:
        """GET_INFLIGHT_FD: returns the region description and its fd (owned by the caller)."""
        reply = self.request(Request.GET_INFLIGHT_FD, codec.Inflight(0, 0, num_queues, queue_size))
        assert reply is not None and isinstance(reply.payload, codec.Inflight)
        if len(reply.fds) != 1:
            close_fds(reply.fds)
            raise RemoteProtocolError("GET_INFLIGHT_FD: reply carried no fd")
        return reply.payload, reply.fds[0]

    def set_inflight_fd(self, inflight: codec.Inflight, fd: int) -> None:
        """SET_INFLIGHT_FD."""
        self.request(Request.SET_INFLIGHT_FD, inflight, [fd])

    def iotlb_msg(self, msg: codec.IotlbMsg) -> None:
        """IOTLB_MSG (UPDATE or INVALIDATE); its reply is the back-end's status.

        Sent with NEED_REPLY, as QEMU does: DPDK answers only then.
        """
        reply = self.request(Request.IOTLB_MSG, msg, ack=True)
        assert reply is not None and isinstance(reply.payload, codec.U64)
        if reply.payload.value:
            raise BackendRefusedError(
                f"back-end refused IOTLB_MSG {msg.type.name} at {msg.iova:#x} "
                f"(status {reply.payload.value})"
            )

    def set_status(self, status: int) -> None:
        """SET_STATUS."""
        self.request(Request.SET_STATUS, codec.U64(status))

    def get_status(self) -> int:
        """GET_STATUS."""
        return self._u64(Request.GET_STATUS)

    # ------------------------------------------------------------------ back-end channel

    def open_backend_channel(self) -> None:
        """SET_BACKEND_REQ_FD: give the back-end a socket for its own requests."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.request(Request.SET_BACKEND_REQ_FD, codec.NoPayload(), [theirs.fileno()])
        finally:
            theirs.close()
        self._backend_channel = Channel(ours)
        self._backend_thread = threading.Thread(
            target=self._serve_backend, name="vhost-user-backend-req", daemon=True
        )
        self._backend_thread.start()

    def _serve_backend(self) -> None:
        channel = self._backend_channel
        assert channel is not None
        while True:
            try:
                frame = channel.recv()
            except (TransportError, RemoteProtocolError) as exc:
                if not self._closing:
                    self._backend_failed(exc)
                return
            try:
                reply = self._backend_reply(frame)
            except PyvdpaError as exc:
                self._backend_failed(exc)
                reply = codec.encode_ack_failure(frame.header.request)
            finally:
                close_fds(frame.fds)
            if frame.header.flags & HeaderFlags.NEED_REPLY:
                with contextlib.suppress(TransportError):
                    channel.send(reply)

    def _backend_reply(self, frame: Frame) -> bytes:
        """Check and serve one back-end request; return its acknowledgement."""
        message = codec.decode_backend_request(frame.header, frame.body, frame.fds)
        request = BackendRequest(message.request)
        codec.check_gate(request, self.protocol_features)
        handler = self.backend_handlers.get(request)
        if handler is None:
            log.warning("back-end request %s has no handler", request.name)
            return codec.encode_ack_failure(request)
        return codec.encode_backend_reply(request, handler(message))

    def _backend_failed(self, exc: PyvdpaError) -> None:
        log.error("back-end channel: %s", exc)
        if self.backend_error is None:
            self.backend_error = exc

    # ------------------------------------------------------------------ teardown

    def close(self) -> None:
        """Close the connection and the back-end channel."""
        self._closing = True
        self.channel.close()
        if self._backend_channel is not None:
            self._backend_channel.shutdown()
            if self._backend_thread is not None:
                self._backend_thread.join()
            self._backend_channel.close()

    def __enter__(self) -> Frontend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
