"""vDPA ports over real sockets: attach rules, DPDK's op sequence, reconnects, refusals."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pyvdpa.dataplane.net import EngineNetDevice
from pyvdpa.devices.blk import BlkDevice
from pyvdpa.devices.net import NetDevice
from pyvdpa.drive.blk import run_blk
from pyvdpa.drive.net import FrameCheck, build_frame, check_frame, run_net
from pyvdpa.drive.session import DriverRing, Session
from pyvdpa.errors import ConfigError, PyvdpaError
from pyvdpa.vdpa import SimDeviceOps, VdpaDevice, VdpaError, VdpaPort, VdpaRegistry, VhostDevice
from pyvdpa.vhost_user.frontend import Frontend
from pyvdpa.vhost_user.protocol import ProtocolFeature
from pyvdpa.virtio.constants import NetFeature, VirtioFeature
from pyvdpa.virtio.net import NetConfig, net_header_size

NET_FEATURES = VirtioFeature.VERSION_1 | NetFeature.MAC | NetFeature.MRG_RXBUF
PROTOCOL = ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIG
RX_BUFFER = 2048


class RecordingOps(SimDeviceOps):
    """Simulated device ops that record every control-path call, then do it."""

    def __init__(self, hardware: NetDevice | EngineNetDevice | BlkDevice) -> None:
        super().__init__(hardware)
        self.calls: list[tuple[object, ...]] = []

    def set_features(self, vhost: VhostDevice) -> None:
        self.calls.append(("set_features", vhost.negotiated_features))
        super().set_features(vhost)

    def set_vring_state(self, vhost: VhostDevice, qid: int, enable: bool) -> None:
        self.calls.append(("set_vring_state", qid, enable))
        super().set_vring_state(vhost, qid, enable)

    def dev_conf(self, vhost: VhostDevice) -> None:
        self.calls.append(("dev_conf",))
        super().dev_conf(vhost)

    def dev_close(self, vhost: VhostDevice) -> None:
        self.calls.append(("dev_close",))
        super().dev_close(vhost)

    def migration_done(self, vhost: VhostDevice) -> None:
        self.calls.append(("migration_done", vhost.rarp_mac))
        super().migration_done(vhost)

    def take(self) -> list[tuple[object, ...]]:
        """The calls so far, forgetting them."""
        calls, self.calls = self.calls, []
        return calls


UP = [("set_vring_state", 0, True), ("set_vring_state", 1, True), ("dev_conf",)]
DOWN = [("dev_close",), ("set_vring_state", 0, False), ("set_vring_state", 1, False)]


class NetLink:
    """The driver side of queue pair 0: RX buffers posted, frames sent and received."""

    def __init__(self, session: Session, rx: DriverRing, tx: DriverRing) -> None:
        self.session = session
        self.rx = rx
        self.tx = tx
        self.hdr = net_header_size(session.features)
        self.rx_bufs: dict[int, int] = {}
        for _ in range(16):
            addr = session.alloc(RX_BUFFER)
            self.rx_bufs[rx.queue.add([], [(addr, RX_BUFFER)])] = addr
        rx.kick()

    def send(self, frame: bytes) -> None:
        """Transmit one frame."""
        addr = self.session.alloc(self.hdr + len(frame))
        self.session.memory.write(addr, bytes(self.hdr) + frame)
        self.tx.queue.add([(addr, self.hdr + len(frame))], [])
        self.tx.kick()

    def receive(self, count: int = 1, timeout: float = 5.0) -> list[bytes]:
        """Wait for ``count`` received frames (fewer on timeout); repost their buffers."""
        frames: list[bytes] = []
        deadline = time.monotonic() + timeout
        while len(frames) < count and time.monotonic() < deadline:
            used = self.rx.queue.get_used()
            if used is None:
                self.session.wait_call(0.05)
                continue
            head, length = used
            addr = self.rx_bufs.pop(head)
            frames.append(self.session.memory.read(addr + self.hdr, length - self.hdr))
            self.rx_bufs[self.rx.queue.add([], [(addr, RX_BUFFER)])] = addr
            self.rx.kick()
        return frames

    def roundtrip(self, seq: int) -> None:
        """A broadcast frame sent comes back intact (loopback)."""
        frame = build_frame(80, seq)
        self.send(frame)
        assert self.receive() == [frame]
        assert check_frame(frame) is FrameCheck.INTACT


def negotiate(session: Session, protocol: ProtocolFeature = PROTOCOL) -> int:
    """The start-up handshake, with the protocol features asked for."""
    fe = session.frontend
    offered = fe.get_features()
    proto = fe.get_protocol_features() & protocol
    fe.set_protocol_features(proto)
    session.protocol_features = proto
    fe.set_owner()
    session.features = offered & (NET_FEATURES | VirtioFeature.PROTOCOL_FEATURES)
    fe.set_features(session.features)
    fe.set_mem_table([(session.region, session.shared.fd)])
    return session.features


def open_link(session: Session, *, enable_first: bool = False) -> NetLink:
    """Negotiate and start pair 0, enabling the rings after (DPDK) or before (QEMU) setup."""
    negotiate(session)
    if enable_first:
        session.frontend.set_vring_enable(0, True)
        session.frontend.set_vring_enable(1, True)
    rx = session.setup_ring(0, 64)
    tx = session.setup_ring(1, 64)
    if not enable_first:
        session.enable_rings()
    return NetLink(session, rx, tx)


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def connect(port: VdpaPort) -> Session:
    return Session(Frontend.connect(port.path), memory_size=4 << 20)


@pytest.fixture
def registry() -> VdpaRegistry:
    return VdpaRegistry()


@pytest.fixture
def recorded(registry: VdpaRegistry) -> Iterator[tuple[VdpaDevice, RecordingOps]]:
    ops = RecordingOps(NetDevice(mode="loopback"))
    device = registry.register("net0", ops)
    yield device, ops
    ops.close()


@pytest.fixture
def port(sock_dir: Path, recorded: tuple[VdpaDevice, RecordingOps]) -> Iterator[VdpaPort]:
    events: list[str] = []
    p = VdpaPort(
        sock_dir / "vdpa.sock",
        new_device=lambda v: events.append(f"new {v.device.name}"),
        destroy_device=lambda v: events.append(f"destroy {v.device.name}"),
        handover_timeout=0.3,
    )
    p.attach(recorded[0])
    p.start()
    p.events = events  # type: ignore[attr-defined]
    yield p
    p.close()


# ---------------------------------------------------------------------- attach rules


def test_port_attach_detach_start_rules(sock_dir: Path, registry: VdpaRegistry) -> None:
    ops_a = SimDeviceOps(NetDevice())
    ops_b = SimDeviceOps(NetDevice())
    a = registry.register("a", ops_a)
    b = registry.register("b", ops_b)
    one = VdpaPort(sock_dir / "one")
    two = VdpaPort(sock_dir / "two")
    with pytest.raises(VdpaError, match="attach a vDPA device before starting"):
        one.start()
    one.attach(a)
    one.attach(a)  # idempotent
    with pytest.raises(VdpaError, match=f"a: already attached to {one.path}"):
        two.attach(a)
    with pytest.raises(VdpaError, match="a is attached; detach it first"):
        one.attach(b)
    one.start()
    assert one.started and (sock_dir / "one").is_socket()
    with pytest.raises(VdpaError, match="already started"):
        one.start()
    with pytest.raises(VdpaError, match="stop the port before detaching"):
        one.detach()
    one.stop()
    assert not (sock_dir / "one").exists()
    one.start()  # a stopped port starts again
    one.close()
    assert one.device is None and a.port is None
    two.attach(a)
    assert a.port is two
    two.detach()
    ops_a.close()
    ops_b.close()


def test_server_port_refuses_an_existing_path(
    sock_dir: Path, recorded: tuple[VdpaDevice, RecordingOps]
) -> None:
    path = sock_dir / "taken"
    path.write_text("")
    port = VdpaPort(path)
    port.attach(recorded[0])
    with pytest.raises(ConfigError, match="already exists"):
        port.start()
    assert not port.started
    assert path.read_text() == ""
    port.detach()


def test_offer_is_device_intersected_with_port(sock_dir: Path, registry: VdpaRegistry) -> None:
    ops = SimDeviceOps(NetDevice(queue_pairs=4))
    device = registry.register("mq", ops)
    port = VdpaPort(
        sock_dir / "s",
        features=~int(NetFeature.MRG_RXBUF),
        protocol_features=ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK,
        queue_num=2,
    )
    port.attach(device)
    port.start()
    try:
        with Session(Frontend.connect(port.path)) as session:
            fe = session.frontend
            features = fe.get_features()
            assert features & VirtioFeature.VERSION_1
            assert not features & NetFeature.MRG_RXBUF
            proto = fe.get_protocol_features()
            # The back-end itself adds LOG_SHMFD, which LOG_ALL needs.
            assert (
                proto & ~ProtocolFeature.LOG_SHMFD == ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK
            )
            fe.set_protocol_features(ProtocolFeature.MQ)
            assert fe.get_queue_num() == 4  # two pairs: four virtqueues
    finally:
        port.close()
        ops.close()


# ---------------------------------------------------------------------- op sequence


def test_op_sequence_of_a_session(
    port: VdpaPort, recorded: tuple[VdpaDevice, RecordingOps]
) -> None:
    device, ops = recorded
    with connect(port) as session:
        features = negotiate(session)
        assert ops.take() == [("set_features", features)]
        rx = session.setup_ring(0, 64)
        tx = session.setup_ring(1, 64)
        assert ops.take() == []  # configured but not enabled: nothing is ready
        session.enable_rings()
        assert ops.take() == UP
        assert port.vhost is not None and port.vhost.configured
        link = NetLink(session, rx, tx)
        for seq in range(5):
            link.roundtrip(seq)
        session.stop()  # GET_VRING_BASE 0, then 1
        assert ops.take() == DOWN
    wait_for(lambda: port.vhost is None)
    assert ops.take() == []
    assert port.events == ["new net0", "destroy net0"]  # type: ignore[attr-defined]
    stats = device.get_stats(1)
    assert stats["received_desc"] == stats["completed_desc"] == stats["packets"] == 5
    assert device.get_stats(0)["packets"] == 5


def test_op_sequence_with_rings_enabled_before_setup(
    port: VdpaPort, recorded: tuple[VdpaDevice, RecordingOps]
) -> None:
    _, ops = recorded
    with connect(port) as session:
        link = open_link(session, enable_first=True)
        calls = ops.take()
        assert calls[0][0] == "set_features"
        assert calls[1:] == UP  # a ring is ready once its kick fd arrives
        link.roundtrip(0)


def test_disconnect_closes_device_and_device_is_reusable(
    port: VdpaPort, recorded: tuple[VdpaDevice, RecordingOps]
) -> None:
    _, ops = recorded
    session = connect(port)
    link = open_link(session)
    link.roundtrip(0)
    ops.take()
    link.send(build_frame(64, 1))
    session.close()  # the front-end dies mid-traffic, no GET_VRING_BASE
    wait_for(lambda: port.vhost is None)
    assert ops.take() == DOWN
    with connect(port) as again:
        link = open_link(again)
        assert ops.take()[1:] == UP
        link.roundtrip(2)
    wait_for(lambda: port.vhost is None)
    assert ops.take() == DOWN
    assert port.events == ["new net0", "destroy net0"] * 2  # type: ignore[attr-defined]


def test_new_memory_table_closes_then_reconfigures(
    port: VdpaPort, recorded: tuple[VdpaDevice, RecordingOps]
) -> None:
    _, ops = recorded
    with connect(port) as session:
        link = open_link(session)
        link.roundtrip(0)
        ops.take()
        session.frontend.set_mem_table([(session.region, session.shared.fd)])
        assert ops.take() == DOWN + UP
        link.roundtrip(1)


def test_reset_owner_closes_device(
    port: VdpaPort, recorded: tuple[VdpaDevice, RecordingOps]
) -> None:
    _, ops = recorded
    with connect(port) as session:
        open_link(session).roundtrip(0)
        ops.take()
        session.frontend.reset_owner()
        session.frontend.get_features()  # RESET_OWNER has no reply: wait for it
        assert ops.take() == DOWN
        assert port.vhost is not None and not port.vhost.configured


def test_disable_only_changes_the_vring_state(
    port: VdpaPort, recorded: tuple[VdpaDevice, RecordingOps]
) -> None:
    _, ops = recorded
    with connect(port) as session:
        link = open_link(session)
        ops.take()
        session.frontend.set_vring_enable(0, False)
        assert ops.take() == [("set_vring_state", 0, False)]
        session.frontend.set_vring_enable(0, True)
        assert ops.take() == [("set_vring_state", 0, True)]  # still configured: no dev_conf
        link.roundtrip(0)


def test_send_rarp_is_migration_done(
    port: VdpaPort, recorded: tuple[VdpaDevice, RecordingOps]
) -> None:
    _, ops = recorded
    mac = bytes.fromhex("525400abcdef")
    with connect(port) as session:
        negotiate(session, PROTOCOL | ProtocolFeature.RARP)
        ops.take()
        session.frontend.send_rarp(mac)
        assert ops.take() == [("migration_done", mac)]


def test_config_space_through_the_device(port: VdpaPort) -> None:
    with connect(port) as session:
        negotiate(session)
        raw = session.frontend.get_config(0, NetConfig.SIZE)
    config = NetConfig.decode(raw)
    assert config.mac == bytes.fromhex("525400123456")
    assert config.max_virtqueue_pairs == 1


# ---------------------------------------------------------------------- one front-end


def test_second_front_end_is_refused_and_first_goes_on(port: VdpaPort) -> None:
    with connect(port) as session:
        link = open_link(session)
        link.roundtrip(0)
        intruder = Frontend.connect(port.path)
        with pytest.raises(PyvdpaError):
            intruder.get_features()
        intruder.close()
        link.roundtrip(1)
        assert port.vhost is not None and port.vhost.configured


def test_reconnect_right_after_disconnect_is_served(port: VdpaPort) -> None:
    for seq in range(3):
        with connect(port) as session:
            open_link(session).roundtrip(seq)


def test_client_mode_reconnects(sock_dir: Path, registry: VdpaRegistry) -> None:
    ops = RecordingOps(NetDevice())
    device = registry.register("c0", ops)
    port = VdpaPort(sock_dir / "client.sock", client=True, reconnect_interval=0.05)
    port.attach(device)
    port.start()
    try:
        for round_ in range(2):
            frontend = Frontend.listen(port.path, timeout=5)
            with Session(frontend, memory_size=4 << 20) as session:
                result = run_net(session, mode="io", duration=0.2)
            assert result.rx_packets > 0 and result.rx_bad == 0, round_
            wait_for(lambda: port.vhost is None or not port.vhost.configured)
        assert ops.calls.count(("dev_conf",)) == 2
        assert ops.calls.count(("dev_close",)) == 2
    finally:
        port.close()
        ops.close()


def test_blk_device_over_a_port(sock_dir: Path, registry: VdpaRegistry) -> None:
    ops = RecordingOps(BlkDevice(size=4 << 20, serial="disk7"))
    device = registry.register("blk0", ops)
    with VdpaPort(sock_dir / "blk.sock") as port:
        port.attach(device)
        port.start()
        with Session(Frontend.connect(port.path), memory_size=8 << 20) as session:
            result = run_blk(session, rw="randwrite", verify=True, duration=0.3, iodepth=4)
        assert result.ios > 0 and result.errors == 0 and result.verify_errors == 0
        wait_for(lambda: port.vhost is None)
    assert [c[0] for c in ops.calls].count("dev_conf") == 1
    assert [c[0] for c in ops.calls].count("dev_close") == 1
    stats = device.get_stats(0)
    assert stats["completed_desc"] == stats["received_desc"] > 0
    assert set(stats) == {
        "received_desc",
        "completed_desc",
        "bad_desc_errors",
        "exceed_max_chain",
        "invalid_buffer",
        "completion_errors",
    }
    ops.close()
