"""The back-end core without sockets: frames in, replies and back-end messages out.

A :class:`BackendConnection` is fed frames built with the codec; a recording
:class:`~pyvdpa.vhost_user.link.BackendLink` stands for the I/O layer's
back-end channel; a device that only records its rings stands for the data
path.  :class:`BackendChannel` itself is tested over a socketpair.  Every
test checks that the process's fd count returns to where it was.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator

import pytest

from pyvdpa.device import Device, RingPosition, RingSpec, Signal
from pyvdpa.errors import ProtocolError, RemoteProtocolError
from pyvdpa.memory import MemoryRegion, allocate_shared
from pyvdpa.vhost_user import codec
from pyvdpa.vhost_user.backend import BackendConnection
from pyvdpa.vhost_user.channel import BackendChannel
from pyvdpa.vhost_user.dispatch import ROUTES
from pyvdpa.vhost_user.link import BackendMessage, Covered, NoBackendChannel, Reply
from pyvdpa.vhost_user.protocol import (
    VRING_NOFD_MASK,
    BackendRequest,
    HeaderFlags,
    IotlbPerm,
    IotlbType,
    ProtocolFeature,
    Request,
)
from pyvdpa.vhost_user.states import Phase, RingState
from pyvdpa.vhost_user.transport import Channel, Frame
from pyvdpa.virtio.constants import DeviceStatus, VirtioFeature

pytestmark = pytest.mark.usefixtures("no_fd_leak")

PF = ProtocolFeature
FEATURES = int(VirtioFeature.VERSION_1 | VirtioFeature.PROTOCOL_FEATURES)
NEED_REPLY = HeaderFlags.VERSION | HeaderFlags.NEED_REPLY


class RecordingDevice(Device):
    """Two queues; remembers the rings it runs."""

    features = FEATURES
    protocol_features = PF.MQ | PF.REPLY_ACK | PF.BACKEND_REQ | PF.INBAND_NOTIFICATIONS | PF.STATUS
    num_queues = 2

    def __init__(self) -> None:
        self.running: dict[int, RingSpec] = {}

    def start_queue(self, spec: RingSpec) -> None:
        self.running[spec.index] = spec

    def stop_queue(self, index: int) -> RingPosition:
        return self.running.pop(index).position


class RecordingLink(NoBackendChannel):
    """A back-end channel that keeps what the core hands it."""

    def __init__(self) -> None:
        self.attached: list[int] = []
        self.sent: list[BackendMessage] = []
        self.misses: list[tuple[int, bool]] = []
        self.refuse_attach = False

    def attach(self, fd: int) -> None:
        if self.refuse_attach:
            raise RemoteProtocolError("SET_BACKEND_REQ_FD: not wanted")
        self.attached.append(fd)

    def send(self, message: BackendMessage) -> int:
        self.sent.append(message)
        return 0

    def request_translation(self, iova: int, write: bool, covered: Covered) -> None:
        self.misses.append((iova, write))

    def close(self) -> None:
        for fd in self.attached:
            os.close(fd)


def frame(
    request: Request, payload: codec.Payload, fds: tuple[int, ...] = (), *, ack: bool = True
) -> Frame:
    flags = NEED_REPLY if ack else HeaderFlags.VERSION
    data, _ = codec.encode(codec.Message(request, payload, HeaderFlags(flags), fds))
    return Frame(codec.decode_header(data[:12]), data[12:], list(fds))


def acked(replies: list[Reply]) -> int:
    """The value of the one REPLY_ACK in ``replies``."""
    (reply,) = replies
    assert not reply.fds
    return int.from_bytes(reply.data[12:], "little")


@pytest.fixture
def link() -> Iterator[RecordingLink]:
    link = RecordingLink()
    yield link
    link.close()


@pytest.fixture
def conn(link: RecordingLink) -> Iterator[BackendConnection]:
    connection = BackendConnection(RecordingDevice(), name="test", backend=link)
    yield connection
    connection.close()


def negotiate(conn: BackendConnection, protocol: PF = PF.REPLY_ACK | PF.MQ) -> None:
    assert (
        conn.handle(frame(Request.SET_PROTOCOL_FEATURES, codec.U64(int(protocol)), ack=False)) == []
    )
    assert acked(conn.handle(frame(Request.SET_OWNER, codec.NoPayload()))) == 0
    assert acked(conn.handle(frame(Request.SET_FEATURES, codec.U64(FEATURES)))) == 0


def test_routes_cover_what_the_back_end_implements() -> None:
    """One route per implemented request, no more: the rest are refused by name."""
    assert len(ROUTES) == 33
    for request, route in ROUTES.items():
        assert codec.REQUESTS[request].payloads == (route.payload,)


def test_every_request_with_a_reply_gets_one(conn: BackendConnection) -> None:
    negotiate(conn, PF.REPLY_ACK | PF.MQ | PF.STATUS | PF.BACKEND_REQ)
    for request, payload in [
        (Request.GET_FEATURES, codec.NoPayload()),
        (Request.GET_PROTOCOL_FEATURES, codec.NoPayload()),
        (Request.GET_QUEUE_NUM, codec.NoPayload()),
        (Request.GET_STATUS, codec.NoPayload()),
        (Request.GET_VRING_BASE, codec.VringState(0, 0)),
    ]:
        (reply,) = conn.handle(frame(request, payload, ack=False))
        header = codec.decode_header(reply.data[:12])
        message = codec.decode_reply(request, header, reply.data[12:], [])
        assert message.request is request


def test_get_features_reply(conn: BackendConnection) -> None:
    (reply,) = conn.handle(frame(Request.GET_FEATURES, codec.NoPayload(), ack=False))
    assert reply == Reply(
        codec.encode_reply(Request.GET_FEATURES, codec.U64(conn.offered_features))
    )


def test_owner_before_the_rest(conn: BackendConnection) -> None:
    protocol = codec.U64(int(PF.REPLY_ACK | PF.MQ))
    assert conn.handle(frame(Request.SET_PROTOCOL_FEATURES, protocol, ack=False)) == []
    assert acked(conn.handle(frame(Request.SET_FEATURES, codec.U64(FEATURES)))) == 1
    assert not conn.features_set
    # A request that must be answered cannot be refused: the connection drops.
    with pytest.raises(RemoteProtocolError, match="GET_VRING_BASE before SET_OWNER") as info:
        conn.handle(frame(Request.GET_VRING_BASE, codec.VringState(0, 0)))
    assert info.value.drop_connection
    assert conn.phase is Phase.AWAITING_OWNER
    assert acked(conn.handle(frame(Request.SET_OWNER, codec.NoPayload()))) == 0
    assert acked(conn.handle(frame(Request.SET_OWNER, codec.NoPayload()))) == 0
    assert acked(conn.handle(frame(Request.SET_FEATURES, codec.U64(FEATURES)))) == 0
    assert conn.phase is Phase.OWNED and conn.features_set
    # A reset keeps the session owned.
    assert acked(conn.handle(frame(Request.RESET_OWNER, codec.NoPayload()))) == 0
    assert acked(conn.handle(frame(Request.SET_FEATURES, codec.U64(FEATURES)))) == 0


def test_fds_of_a_refused_request_are_closed(conn: BackendConnection) -> None:
    shared = allocate_shared(1 << 20)
    try:
        fd = os.dup(shared.fd)
        region = MemoryRegion(0, shared.size, shared.address, 0)
        # Refused before SET_OWNER: the dispatcher closes the fd it was given.
        replies = conn.handle(
            frame(Request.SET_MEM_TABLE, codec.MemTable((region,)), (fd,), ack=False)
        )
        assert replies == []
        with pytest.raises(OSError):
            os.fstat(fd)
    finally:
        shared.close()


def _kick(conn: BackendConnection, index: int, fd: int | None) -> list[Reply]:
    value = index | (VRING_NOFD_MASK if fd is None else 0)
    fds = () if fd is None else (fd,)
    return conn.handle(frame(Request.SET_VRING_KICK, codec.U64(value), fds))


def test_kept_fd_stays_open_refused_fd_is_closed(conn: BackendConnection) -> None:
    negotiate(conn)
    kick = os.eventfd(0)
    assert acked(_kick(conn, 0, kick)) == 0
    assert conn.vrings[0].notifiers.kick_fd == kick
    os.fstat(kick)
    assert conn.vrings[0].state is RingState.STARTED_DISABLED
    # An index out of range: refused, and the fd given with it closed.
    other = os.eventfd(0)
    assert acked(_kick(conn, 5, other)) == 1
    with pytest.raises(OSError):
        os.fstat(other)


def test_size_and_base_of_a_started_ring_are_refused(conn: BackendConnection) -> None:
    negotiate(conn)
    assert acked(conn.handle(frame(Request.SET_VRING_NUM, codec.VringState(0, 64)))) == 0
    assert acked(_kick(conn, 0, None)) == 0
    assert acked(conn.handle(frame(Request.SET_VRING_NUM, codec.VringState(0, 128)))) == 1
    assert acked(conn.handle(frame(Request.SET_VRING_BASE, codec.VringState(0, 3)))) == 1
    assert (conn.vrings[0].num, conn.vrings[0].base) == (64, 0)
    # Stopped by GET_VRING_BASE, it may be described again.
    conn.handle(frame(Request.GET_VRING_BASE, codec.VringState(0, 0)))
    assert acked(conn.handle(frame(Request.SET_VRING_NUM, codec.VringState(0, 128)))) == 0
    assert acked(conn.handle(frame(Request.SET_VRING_BASE, codec.VringState(0, 3)))) == 0
    # Enabling before the ring is configured or started is legal.
    enable = codec.VringState(1, 1)
    assert acked(conn.handle(frame(Request.SET_VRING_ENABLE, enable))) == 0
    assert conn.vrings[1].state is RingState.STOPPED_ENABLED


def test_status_table_through_the_dispatcher(link: RecordingLink) -> None:
    conn = BackendConnection(RecordingDevice(), backend=link)
    try:
        protocol = codec.U64(int(PF.REPLY_ACK | PF.STATUS))
        conn.handle(frame(Request.SET_PROTOCOL_FEATURES, protocol, ack=False))
        conn.handle(frame(Request.SET_OWNER, codec.NoPayload(), ack=False))
        ack_drv = int(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER)
        assert acked(conn.handle(frame(Request.SET_STATUS, codec.U64(ack_drv)))) == 0
        # Clearing a bit is refused; the status stays.
        ack = int(DeviceStatus.ACKNOWLEDGE)
        assert acked(conn.handle(frame(Request.SET_STATUS, codec.U64(ack)))) == 1
        assert conn.status == ack_drv
        assert acked(conn.handle(frame(Request.SET_STATUS, codec.U64(0)))) == 0
        assert conn.status == 0
    finally:
        conn.close()


def test_backend_channel_fd_goes_to_the_link(conn: BackendConnection, link: RecordingLink) -> None:
    negotiate(conn, PF.REPLY_ACK | PF.BACKEND_REQ)
    a, b = socket.socketpair()
    b.close()
    fd = a.detach()
    assert acked(conn.handle(frame(Request.SET_BACKEND_REQ_FD, codec.NoPayload(), (fd,)))) == 0
    assert link.attached == [fd]
    os.fstat(fd)
    # Refused by the link: the dispatcher closes the fd.
    link.refuse_attach = True
    c, d = socket.socketpair()
    d.close()
    other = c.detach()
    assert acked(conn.handle(frame(Request.SET_BACKEND_REQ_FD, codec.NoPayload(), (other,)))) == 1
    with pytest.raises(OSError):
        os.fstat(other)


def test_backend_requests_are_values_handed_to_the_link(
    conn: BackendConnection, link: RecordingLink
) -> None:
    negotiate(conn, PF.REPLY_ACK | PF.BACKEND_REQ | PF.INBAND_NOTIFICATIONS)
    assert conn.send_backend_request(BackendRequest.CONFIG_CHANGE_MSG, codec.NoPayload()) == 0
    assert link.sent == [BackendMessage(BackendRequest.CONFIG_CHANGE_MSG, codec.NoPayload())]
    # In-band signals go to the link's signal, which sends VRING_CALL with NEED_REPLY.
    conn.vrings[1].notifiers.signal_call()
    assert link.sent[-1] == BackendMessage(
        BackendRequest.VRING_CALL, codec.VringState(1, 0), need_reply=True
    )
    conn.vrings[0].notifiers.request_translation(0x1000, True)
    assert link.misses == [(0x1000, True)]


def test_unknown_and_unimplemented_requests_are_refused(conn: BackendConnection) -> None:
    negotiate(conn)
    data = codec.HEADER.pack(99, NEED_REPLY, 0)
    replies = conn.handle(Frame(codec.decode_header(data), b"", []))
    assert replies == [Reply(codec.encode_ack_failure(99))]
    endian = frame(Request.SET_VRING_ENDIAN, codec.VringState(0, 0))
    assert acked(conn.handle(endian)) == 1  # gated: CROSS_ENDIAN not negotiated
    # Known to the codec, not implemented here: refused by name, its fd closed.
    fd = os.eventfd(0)
    gpu = frame(Request.GPU_SET_SOCKET, codec.NoPayload(), (fd,))
    assert acked(conn.handle(gpu)) == 1
    with pytest.raises(OSError):
        os.fstat(fd)
    # A request with a reply that cannot be given drops the connection.
    with pytest.raises(RemoteProtocolError, match="must be answered") as info:
        conn.handle(frame(Request.CHECK_DEVICE_STATE, codec.NoPayload()))
    assert info.value.drop_connection


# ---------------------------------------------------------------------- BackendChannel


@pytest.fixture
def channel_pair() -> Iterator[tuple[BackendChannel, Channel]]:
    ours, theirs = socket.socketpair()
    backend = BackendChannel("test")
    backend.attach(ours.detach())
    front = Channel(theirs)
    yield backend, front
    backend.shutdown()
    backend.close()
    front.close()


def _answer(front: Channel, value: int) -> threading.Thread:
    def serve() -> None:
        frame = front.recv()
        front.send(codec.encode_backend_reply(BackendRequest(frame.header.request), value))

    thread = threading.Thread(target=serve)
    thread.start()
    return thread


def test_channel_refuses_what_is_not_a_unix_socket() -> None:
    backend = BackendChannel()
    fd = os.eventfd(0)
    with pytest.raises(RemoteProtocolError, match="not a socket"):
        backend.attach(fd)
    os.close(fd)  # left to the caller
    inet = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with pytest.raises(RemoteProtocolError, match="not a unix socket"):
        backend.attach(inet.fileno())
    inet.close()
    with pytest.raises(ProtocolError, match="no back-end channel"):
        backend.send(BackendMessage(BackendRequest.CONFIG_CHANGE_MSG, codec.NoPayload()))


def test_channel_signal_waits_for_the_acknowledgement(
    channel_pair: tuple[BackendChannel, Channel],
) -> None:
    backend, front = channel_pair
    thread = _answer(front, 0)
    backend.signal(Signal.CALL, 1)
    thread.join()
    thread = _answer(front, 3)
    with pytest.raises(RemoteProtocolError, match="answered VRING_ERR with 3"):
        backend.signal(Signal.ERR, 0)
    thread.join()


def test_channel_sends_one_miss_per_outstanding_address(
    channel_pair: tuple[BackendChannel, Channel],
) -> None:
    backend, front = channel_pair
    covered: set[int] = set()
    backend.request_translation(0x1000, False, covered.__contains__)
    backend.request_translation(0x1000, True, covered.__contains__)
    backend.request_translation(0x2000, True, covered.__contains__)
    sent = [
        codec.decode_backend_request(f.header, f.body, f.fds) for f in (front.recv(), front.recv())
    ]
    assert [m.payload for m in sent] == [
        codec.IotlbMsg(0x1000, 0, 0, IotlbPerm.RO, IotlbType.MISS),
        codec.IotlbMsg(0x2000, 0, 0, IotlbPerm.WO, IotlbType.MISS),
    ]
    # Covered now: nothing to ask; the UPDATE answered the miss.
    covered.add(0x1000)
    backend.request_translation(0x1000, False, covered.__contains__)
    backend.translations_added(covered.__contains__)
    # Invalidated again: a new miss goes out.
    covered.clear()
    backend.request_translation(0x1000, False, covered.__contains__)
    # 0x2000 is still outstanding until a reset.
    backend.request_translation(0x2000, True, covered.__contains__)
    backend.forget_translations()
    backend.request_translation(0x2000, True, covered.__contains__)
    again = [
        codec.decode_backend_request(f.header, f.body, f.fds) for f in (front.recv(), front.recv())
    ]
    assert [m.payload.iova for m in again if isinstance(m.payload, codec.IotlbMsg)] == [
        0x1000,
        0x2000,
    ]
