"""Front-end <-> back-end over real unix sockets: every request, both roles."""

from __future__ import annotations

import mmap
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvdpa.devices.blk import BlkDevice
from pyvdpa.devices.net import NetDevice
from pyvdpa.drive.blk import run_blk
from pyvdpa.drive.net import run_net
from pyvdpa.drive.session import GPA_BASE, Session
from pyvdpa.errors import TransportError
from pyvdpa.memory import MemoryRegion, allocate_shared
from pyvdpa.vhost_user import codec
from pyvdpa.vhost_user.backend import MAX_MEM_SLOTS
from pyvdpa.vhost_user.frontend import BackendRefusedError, Frontend
from pyvdpa.vhost_user.protocol import BackendRequest, ProtocolFeature, Request
from pyvdpa.vhost_user.server import BackendServer
from pyvdpa.vhost_user.transport import Channel, Listener
from pyvdpa.virtio.constants import DeviceStatus, NetFeature, VirtioFeature


@pytest.fixture
def sock(tmp_path: Path) -> Path:
    return tmp_path / "vu.sock"


@pytest.fixture
def net_server(sock: Path) -> Iterator[tuple[BackendServer, NetDevice]]:
    device = NetDevice(mode="loopback", status_feature=True)
    server = BackendServer(sock, lambda: device)
    server.start()
    yield server, device
    server.stop()


def _connected_session(sock: Path) -> Session:
    return Session(Frontend.connect(sock), memory_size=8 << 20)


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("mrg", [True, False], ids=["mrg", "nomrg"])
def test_net_loopback_frames_come_back_intact(
    net_server: tuple[BackendServer, NetDevice], sock: Path, packed: bool, mrg: bool
) -> None:
    _, device = net_server
    with _connected_session(sock) as session:
        result = run_net(session, mode="io", packed=packed, mrg_rxbuf=mrg, duration=0.5)
    assert result.rx_packets > 100
    assert result.rx_bad == 0
    assert result.errors == 0
    assert device.stats[1].packets >= result.rx_packets
    assert device.stats[0].completed_desc >= result.rx_packets


def test_two_queue_pairs(sock: Path) -> None:
    device = NetDevice(mode="loopback", queue_pairs=2)
    with BackendServer(sock, lambda: device), _connected_session(sock) as session:
        result = run_net(session, mode="io", queues=2, duration=0.5)
    assert result.rx_packets > 0 and result.rx_bad == 0
    assert device.stats[1].packets > 0 and device.stats[3].packets > 0


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_blk_write_verify_ram_disk(sock: Path, packed: bool) -> None:
    device = BlkDevice(size=4 << 20)
    with BackendServer(sock, lambda: device), _connected_session(sock) as session:
        result = run_blk(
            session, rw="randwrite", verify=True, duration=0.3, size=1 << 20, packed=packed
        )
    assert result.ios > 0 and result.errors == 0 and result.verify_errors == 0
    assert result.verified == result.ios
    device.close()


def test_blk_file_backed_data_lands_in_file(sock: Path, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    device = BlkDevice(path=image)
    with BackendServer(sock, lambda: device), _connected_session(sock) as session:
        result = run_blk(session, rw="write", bs=4096, iodepth=4, size=64 << 10, ios=16)
    device.close()
    assert result.errors == 0
    data = image.read_bytes()
    from pyvdpa.drive.blk import pattern

    assert data[:4096] == pattern(0, 1, 4096)
    assert data[4096:8192] == pattern(4096, 1, 4096)


def test_every_request_over_a_socket(
    net_server: tuple[BackendServer, NetDevice], sock: Path
) -> None:
    """Requests 1..43: applied, answered, or refused with a clear failure."""
    server, device = net_server
    every_request(server, device, Frontend.connect(sock))


def every_request(server: BackendServer, device: NetDevice, fe: Frontend) -> None:
    """Send requests 1..43 on ``fe``, connected to ``server`` serving ``device``; close ``fe``.

    The device must offer STATUS, as ``net_server``'s does.
    """
    shared = allocate_shared(4 << 20)
    extra = allocate_shared(1 << 20)
    log_mem = allocate_shared(4096)
    try:
        features = fe.get_features()  # 1
        assert features & VirtioFeature.VERSION_1 and features & VirtioFeature.PROTOCOL_FEATURES
        proto = fe.get_protocol_features()  # 15
        assert proto & ProtocolFeature.REPLY_ACK and proto & ProtocolFeature.CONFIG
        fe.set_protocol_features(proto)  # 16
        assert fe.get_queue_num() == 2  # 17
        fe.set_owner()  # 3
        changes: list[codec.Message] = []
        fe.backend_handlers[BackendRequest.CONFIG_CHANGE_MSG] = lambda m: changes.append(m) or 0
        fe.open_backend_channel()  # 21
        wanted = VirtioFeature.VERSION_1 | VirtioFeature.PROTOCOL_FEATURES | NetFeature.MAC
        fe.set_features(int(wanted | VirtioFeature.LOG_ALL))  # 2
        region = MemoryRegion(GPA_BASE, shared.size, shared.address, 0)
        fe.set_mem_table([(region, shared.fd)])  # 5
        assert fe.get_max_mem_slots() == MAX_MEM_SLOTS  # 36
        extra_region = MemoryRegion(0x1_0000_0000, extra.size, extra.address, 0)
        fe.add_mem_reg(extra_region, extra.fd)  # 37
        fe.rem_mem_reg(extra_region)  # 38
        fe.set_log_base(log_mem.fd, 4096)  # 6
        log_fd = os.eventfd(0, os.EFD_CLOEXEC)
        fe.set_log_fd(log_fd)  # 7
        os.close(log_fd)
        conn = server.connections[0]
        assert conn.dirty_log is not None and conn.log_call_fd is not None
        kick = os.eventfd(0, os.EFD_CLOEXEC)
        call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        err = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        desc, avail, used = GPA_BASE, GPA_BASE + 4096, GPA_BASE + 8192
        uva = shared.address
        fe.set_vring_num(1, 256)  # 8
        fe.set_vring_base(1, 7)  # 10
        fe.set_vring_addr(  # 9
            codec.VringAddr(1, codec.VringAddrFlags(0), uva, uva + 8192, uva + 4096, 0)
        )
        fe.set_vring_call(1, call)  # 13
        fe.set_vring_err(1, err)  # 14
        fe.set_vring_kick(1, kick)  # 12
        fe.set_vring_enable(1, True)  # 18
        assert conn.vrings[1].running
        assert conn.vrings[1].ring_addrs == (desc, avail, used)
        fe.vring_kick(1)  # 35
        assert fe.get_vring_base(1) == 7  # 11: nothing was made available
        assert not conn.vrings[1].running
        fe.send_rarp(bytes.fromhex("525400aabbcc"))  # 19
        fe.net_set_mtu(9000)  # 20
        assert device.mtu == 9000
        assert fe.get_config(0, 6) == device.mac  # 24
        with pytest.raises(BackendRefusedError):
            fe.set_config(0, b"\x00" * 6)  # 25: net config is read-only
        fe.set_status(int(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER))  # 39
        assert fe.get_status() == DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER  # 40
        conn.send_backend_request(BackendRequest.CONFIG_CHANGE_MSG, codec.NoPayload())
        fe.reset_device()  # 34
        assert conn.features == 0
        fe.reset_owner()  # 4
        for fd in (kick, call, err):
            os.close(fd)
        # Requests this back-end does not implement: refused, connection kept
        # (a REPLY_ACK failure) when they have no reply of their own...
        with pytest.raises(BackendRefusedError):
            fe.request(Request.SET_VRING_ENDIAN, codec.VringState(0, 0))  # 23
        with pytest.raises(BackendRefusedError):
            fe.request(Request.GPU_SET_SOCKET, codec.NoPayload(), [log_mem.fd])  # 33
        with pytest.raises(BackendRefusedError):
            fe.request(Request.POSTCOPY_LISTEN)  # 29
        with pytest.raises(BackendRefusedError):
            fe.request(Request.CLOSE_CRYPTO_SESSION, codec.U64(1))  # 27
        assert fe.get_queue_num() == 2
        assert changes and changes[0].request == BackendRequest.CONFIG_CHANGE_MSG
    finally:
        fe.close()
        shared.close()
        extra.close()
        log_mem.close()


@pytest.mark.parametrize(
    ("request_", "body"),
    [
        (Request.CREATE_CRYPTO_SESSION, bytes(632)),
        (Request.POSTCOPY_ADVISE, b""),
        (Request.POSTCOPY_END, b""),
        (Request.GET_SHARED_OBJECT, bytes(16)),
        (Request.SET_DEVICE_STATE_FD, bytes(8)),
        (Request.CHECK_DEVICE_STATE, b""),
    ],
)
def test_unimplemented_requests_with_replies_close_only_that_connection(
    net_server: tuple[BackendServer, NetDevice], sock: Path, request_: Request, body: bytes
) -> None:
    """A request whose reply we cannot give ends that connection; the socket serves on."""
    fe = Frontend.connect(sock)
    r, w = os.pipe()
    fds = [r] if request_ is Request.SET_DEVICE_STATE_FD else []
    try:
        fe.channel.send(codec.HEADER.pack(request_, 1, len(body)) + body, fds)
        with pytest.raises(TransportError):
            fe.channel.recv()
    finally:
        fe.close()
        os.close(r)
        os.close(w)
    with Frontend.connect(sock) as again:
        assert again.get_features() & VirtioFeature.VERSION_1


def test_client_role_reconnects(tmp_path: Path) -> None:
    """Back-end in client mode: serves a listening front-end, then reconnects."""
    path = tmp_path / "client.sock"
    device = NetDevice(mode="loopback")
    server = BackendServer(path, lambda: device, client=True, reconnect_interval=0.05)
    server.start()
    try:
        for _ in range(2):
            with Session(Frontend.listen(path, timeout=10), memory_size=8 << 20) as session:
                result = run_net(session, mode="io", duration=0.3)
            assert result.rx_packets > 0 and result.rx_bad == 0
    finally:
        server.stop()


def test_server_refuses_existing_path(sock: Path) -> None:
    sock.write_text("not a socket")
    from pyvdpa.errors import ConfigError

    with pytest.raises(ConfigError, match="already exists"):
        BackendServer(sock, lambda: NetDevice()).start()


def test_stop_is_exact_under_traffic(sock: Path) -> None:
    """GET_VRING_BASE while frames flow: the base equals what the device consumed."""
    device = NetDevice(mode="drop")
    with BackendServer(sock, lambda: device), _connected_session(sock) as session:
        run_net(session, mode="txonly", duration=0.3)
        # run_net stopped the rings with GET_VRING_BASE.
        consumed = device.stats[1].completed_desc
        assert consumed > 0
        assert session.frontend.get_vring_base(1) == consumed & 0xFFFF


def test_listener_socketpair_roundtrip() -> None:
    """The transport carries a message and its fds intact."""
    a, b = Channel.pair()
    r, w = os.pipe()
    try:
        data, fds = codec.encode(codec.Message(Request.SET_VRING_KICK, codec.U64(0), fds=(r,)))
        a.send(data, fds)
        frame = b.recv()
        assert frame.header.request == Request.SET_VRING_KICK
        assert len(frame.fds) == 1
        os.write(w, b"x")
        assert os.read(frame.fds[0], 1) == b"x"
        os.close(frame.fds[0])
    finally:
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()


def test_listener_removes_only_its_own_socket(tmp_path: Path) -> None:
    path = tmp_path / "l.sock"
    listener = Listener(path)
    listener.close()
    assert not path.exists()


def test_threads_do_not_leak(net_server: tuple[BackendServer, NetDevice], sock: Path) -> None:
    before = threading.active_count()
    for _ in range(3):
        with _connected_session(sock) as session:
            run_net(session, mode="io", duration=0.1)
    deadline = 50
    while threading.active_count() > before and deadline:
        threading.Event().wait(0.05)
        deadline -= 1
    assert threading.active_count() <= before


def test_dirty_log_marks_written_pages(sock: Path) -> None:
    """With LOG_ALL, pages the device writes (RX buffers, used ring) are logged."""
    device = NetDevice(mode="loopback")
    log_mem = allocate_shared(1 << 16)
    try:
        with BackendServer(sock, lambda: device), _connected_session(sock) as session:
            fe = session.frontend
            fe.get_features()
            fe.set_protocol_features(fe.get_protocol_features())
            fe.set_owner()
            features = VirtioFeature.VERSION_1 | VirtioFeature.PROTOCOL_FEATURES
            session.features = int(features | VirtioFeature.LOG_ALL)
            fe.set_features(session.features)
            fe.set_mem_table([(session.region, session.shared.fd)])
            fe.set_log_base(log_mem.fd, 1 << 16)
            rx = session.setup_ring(0, 16)
            tx = session.setup_ring(1, 16)
            session.enable_rings()
            buf = session.alloc(2048, 4096)
            rx.queue.add([], [(buf, 2048)])
            rx.kick()
            frame = b"\xff" * 6 + b"\x02" * 6 + b"\x08\x00" + b"x" * 50
            out = session.alloc(len(frame) + 12)
            session.memory.write(out, bytes(12) + frame)
            tx.queue.add([(out, len(frame) + 12)], [])
            tx.kick()
            for _ in range(200):
                if rx.queue.get_used() is not None:
                    break
                session.wait_call(0.01)
            else:
                raise AssertionError("frame not looped back")
            bitmap = mmap.mmap(log_mem.fd, 1 << 16)
            pfn = buf >> 12
            assert bitmap[pfn >> 3] & (1 << (pfn & 7))
            bitmap.close()
    finally:
        log_mem.close()


def test_inflight_fd_requests(sock: Path) -> None:
    """GET_INFLIGHT_FD hands out a zeroed shared region; SET_INFLIGHT_FD maps one back."""
    device = BlkDevice(size=1 << 20)
    with BackendServer(sock, lambda: device) as server, Frontend.connect(sock) as fe:
        fe.get_features()
        fe.set_protocol_features(fe.get_protocol_features())
        fe.set_owner()
        info, fd = fe.get_inflight_fd(1, 128)  # 31
        try:
            assert info.mmap_size > 0 and info.num_queues == 1 and info.queue_size == 128
            assert os.fstat(fd).st_size >= info.mmap_size
            region = mmap.mmap(fd, info.mmap_size)
            # Split layout: features u64, version u16 = 0 (no ring started on it yet),
            # desc_num u16 = queue size.
            assert region[8:12] == (0).to_bytes(2, "little") + (128).to_bytes(2, "little")
            region.close()
            fe.set_inflight_fd(info, fd)  # 32
            assert server.connections[0].inflight is not None
        finally:
            os.close(fd)
    device.close()


def test_regression_qemu_packed_base_and_duplicate_add_mem_reg(
    net_server: tuple[BackendServer, NetDevice], sock: Path
) -> None:
    """QEMU 7.2: SET_VRING_BASE 0x80008000 on packed rings; ADD_MEM_REG repeated for mq=on."""
    server, _ = net_server
    shared = allocate_shared(1 << 20)
    with Frontend.connect(sock) as fe:
        fe.get_features()
        fe.set_protocol_features(
            ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIGURE_MEM_SLOTS | ProtocolFeature.MQ
        )
        fe.set_owner()
        features = VirtioFeature.VERSION_1 | VirtioFeature.PROTOCOL_FEATURES
        fe.set_features(int(features | VirtioFeature.RING_PACKED))
        region = MemoryRegion(GPA_BASE, shared.size, shared.address, 0)
        fe.add_mem_reg(region, shared.fd)
        fe.add_mem_reg(region, shared.fd)
        assert server.connections[0].memory.regions == (region,)
        fe.set_vring_num(0, 256)
        fe.set_vring_base(0, 0x80008000)
        assert server.connections[0].vrings[0].base == 0x8000
    shared.close()


def test_inflight_request_is_resubmitted_after_restart(sock: Path) -> None:
    """A request a previous back-end took and never completed is served on restart.

    The front-end plays QEMU after a back-end crash: it hands the inflight
    region back (SET_INFLIGHT_FD) with one head marked in flight and the
    avail index already past it (SET_VRING_BASE).
    """
    from pyvdpa.device.inflight import InflightRegion
    from pyvdpa.virtio.blk import BlkRequestHeader
    from pyvdpa.virtio.constants import BlkType

    device = BlkDevice(size=1 << 20, serial="resubmitted")
    with BackendServer(sock, lambda: device), _connected_session(sock) as session:
        fe = session.frontend
        session.negotiate(
            int(VirtioFeature.VERSION_1 | VirtioFeature.PROTOCOL_FEATURES),
            0,
            protocol=ProtocolFeature.REPLY_ACK | ProtocolFeature.INFLIGHT_SHMFD,
        )
        info, fd = fe.get_inflight_fd(1, 16)
        region = InflightRegion.from_fd(fd, info.mmap_size, 0, 1, 16, packed=False)
        try:
            header, data, status = session.alloc(16), session.alloc(20), session.alloc(1)
            session.memory.write(header, BlkRequestHeader(BlkType.GET_ID, 0, 0).pack())
            # Set the ring up by hand so SET_VRING_BASE can say "one consumed".
            from pyvdpa.virtio.split import SplitDriverQueue, SplitLayout

            layout = SplitLayout(16)
            desc = session.alloc(layout.desc_size, 16)
            avail = session.alloc(layout.avail_size, 2)
            used = session.alloc(layout.used_size, 4)
            queue = SplitDriverQueue(session.memory, 16, desc, avail, used, event_idx=False)
            head = queue.add([(header, 16)], [(data, 20), (status, 1)])
            region.split_queue(0).mark_inflight(head)
            fe.set_inflight_fd(info, fd)
            call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            kick = os.eventfd(0, os.EFD_CLOEXEC)
            fe.set_vring_call(0, call)
            fe.set_vring_num(0, 16)
            fe.set_vring_base(0, 1)
            fe.set_vring_addr(
                codec.VringAddr(
                    0,
                    codec.VringAddrFlags(0),
                    session.gpa_to_uva(desc),
                    session.gpa_to_uva(used),
                    session.gpa_to_uva(avail),
                    0,
                )
            )
            fe.set_vring_kick(0, kick)
            fe.set_vring_enable(0, True)
            for _ in range(300):
                done = queue.get_used()
                if done is not None:
                    break
                time.sleep(0.01)
            else:
                raise AssertionError("the in-flight request was never served")
            assert done == (head, 21)
            assert session.memory.read(status, 1) == b"\x00"
            assert session.memory.read(data, 11) == b"resubmitted"
            assert region.split_queue(0).inflight_heads() == []
            os.close(call)
            os.close(kick)
        finally:
            region.close()
            os.close(fd)
    device.close()
