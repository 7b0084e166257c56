"""Config changes a device makes, told to its driver by whichever control plane serves it.

A sim-net device's ``set_link`` flips VIRTIO_NET_S_LINK_UP in its config
space and calls the config listener its control plane set: the VDUSE
back-end then writes the new bytes to the kernel (VDUSE_DEV_SET_CONFIG) and,
after DRIVER_OK only, injects the config interrupt; the vhost-user back-end
sends CONFIG_CHANGE_MSG when the front-end negotiated CONFIG and opened the
back-end channel.  ``pyvdpa run``'s console has ``link <device> up|down``,
refused for a blk device.  Host only: the VDUSE kernel is a fake recording
the ioctls (the guest test, tests/test_vduse_guest_config.py, has the real one).
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvdpa.app import HELP, PROMPT, Console, VdpaApp
from pyvdpa.dataplane.net import EngineNetDevice
from pyvdpa.device import Device
from pyvdpa.devices.net import NetControl, NetDevice
from pyvdpa.vdpa import VdpaError
from pyvdpa.vduse import backend as vduse_backend
from pyvdpa.vduse.backend import VduseBackend
from pyvdpa.vduse.kernel import VduseKernelError
from pyvdpa.vduse.uapi import DeviceConfig, IotlbEntry, SetStatusRequest, SplitState, VqInfo
from pyvdpa.vhost_user import codec
from pyvdpa.vhost_user.frontend import Frontend
from pyvdpa.vhost_user.protocol import BackendRequest, ProtocolFeature
from pyvdpa.vhost_user.server import BackendServer
from pyvdpa.virtio.constants import DeviceStatus, NetStatus, VirtioFeature
from test_vdpa_port import wait_for

STATUS_OFFSET = 6  # virtio-net config: mac[6], then status (u16)
DRIVER_OK = (
    DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK
    | DeviceStatus.DRIVER_OK
)  # fmt: skip


def link_status(config: bytes) -> int:
    return int.from_bytes(config[STATUS_OFFSET : STATUS_OFFSET + 2], "little")


# ---------------------------------------------------------------------- the device


@pytest.fixture(params=["python", "engine"])
def net(request: pytest.FixtureRequest) -> Iterator[NetControl]:
    device: NetControl = NetDevice() if request.param == "python" else EngineNetDevice(mode="drop")
    yield device
    assert isinstance(device, NetDevice | EngineNetDevice)
    device.close()


def test_set_link_changes_the_config_status_and_calls_the_listener(net: NetControl) -> None:
    calls: list[int] = []
    net.config_listener = lambda: calls.append(link_status(net.get_config(0, net.config_size)))
    assert link_status(net.get_config(0, net.config_size)) == NetStatus.LINK_UP
    net.set_link(False)
    assert net.get_config(STATUS_OFFSET, 2) == bytes(2)
    net.set_link(True)
    assert net.get_config(STATUS_OFFSET, 2) == bytes([NetStatus.LINK_UP, 0])
    # The listener sees the new bytes, once per change.
    assert calls == [0, NetStatus.LINK_UP]
    # Only the status moved.
    before = net.get_config(0, net.config_size)
    net.set_link(False)
    after = net.get_config(0, net.config_size)
    assert before[:STATUS_OFFSET] == after[:STATUS_OFFSET]
    assert before[STATUS_OFFSET + 2 :] == after[STATUS_OFFSET + 2 :]


def test_without_a_listener_a_change_is_only_in_the_config_space() -> None:
    device = NetDevice()
    assert device.config_listener is None
    device.set_link(False)
    assert link_status(device.get_config(0, device.config_size)) == 0


def test_a_listener_error_reaches_the_caller_and_the_config_space_changed() -> None:
    device = NetDevice()

    def refuse() -> None:
        raise VduseKernelError("refused")

    device.config_listener = refuse
    with pytest.raises(VduseKernelError, match="refused"):
        device.set_link(False)
    assert link_status(device.get_config(0, device.config_size)) == 0


def test_the_listener_is_declared_on_the_device_interface() -> None:
    assert "config_listener" in Device.__annotations__
    assert Device.config_listener is None


# ---------------------------------------------------------------------- VDUSE


class FakeControl:
    """``/dev/vduse/control`` that creates and destroys without a kernel."""

    def __init__(self) -> None:
        self.created: list[DeviceConfig] = []

    def create_device(self, config: DeviceConfig) -> None:
        self.created.append(config)

    def destroy_device(self, name: str) -> None:
        pass

    def close(self) -> None:
        pass


class FakeKernel:
    """``/dev/vduse/NAME``: records the config ioctls; no ring is ever ready."""

    def __init__(self, name: str, *, vq_num: int) -> None:
        self.calls: list[tuple[object, ...]] = []
        self._r, self._w = os.pipe2(os.O_CLOEXEC)
        self.refuse_irq = False

    def fileno(self) -> int:
        return self._r

    def setup_vq(self, index: int, max_size: int) -> None:
        pass

    def get_features(self) -> int:
        return int(VirtioFeature.VERSION_1 | VirtioFeature.ACCESS_PLATFORM)

    def iotlb_get_fd(self, start: int, last: int) -> tuple[int, IotlbEntry]:
        raise VduseKernelError("no IOTLB region")

    def vq_info(self, index: int, *, packed: bool | None = None) -> VqInfo:
        return VqInfo(index, 0, 0, 0, 0, SplitState(0), False)

    def set_kickfd(self, index: int, fd: int | None) -> None:
        pass

    def set_config(self, offset: int, data: bytes) -> None:
        self.calls.append(("set_config", offset, data))

    def inject_config_irq(self) -> None:
        if self.refuse_irq:
            raise VduseKernelError("VDUSE_DEV_INJECT_CONFIG_IRQ: EINVAL")
        self.calls.append(("inject_config_irq",))

    def close(self) -> None:
        os.close(self._r)
        os.close(self._w)


def start_vduse(monkeypatch: pytest.MonkeyPatch) -> tuple[VduseBackend, NetDevice, FakeKernel]:
    """A started back-end over the fake kernel."""
    kernels: list[FakeKernel] = []

    def open_kernel(name: str, *, vq_num: int) -> FakeKernel:
        kernels.append(FakeKernel(name, vq_num=vq_num))
        return kernels[-1]

    monkeypatch.setattr(vduse_backend, "VduseControl", FakeControl)
    monkeypatch.setattr(vduse_backend, "VduseDevice", open_kernel)
    device = NetDevice()
    backend = VduseBackend(device, "vn0")
    backend.start()
    return backend, device, kernels[0]


@pytest.fixture
def vduse(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[VduseBackend, NetDevice, FakeKernel]]:
    backend, device, kernel = start_vduse(monkeypatch)
    try:
        yield backend, device, kernel
    finally:
        backend.close()


def test_vduse_sets_the_config_and_injects_the_interrupt_after_driver_ok(
    vduse: tuple[VduseBackend, NetDevice, FakeKernel],
) -> None:
    backend, device, kernel = vduse
    assert device.config_listener == backend.config_changed
    # No driver yet: the kernel's copy changes, no interrupt (the kernel refuses one).
    device.set_link(False)
    config = device.get_config(0, device.config_size)
    assert link_status(config) == 0
    assert kernel.calls == [("set_config", 0, config)]
    kernel.calls.clear()
    backend.handle(SetStatusRequest(1, DRIVER_OK))
    device.set_link(True)
    config = device.get_config(0, device.config_size)
    assert link_status(config) == NetStatus.LINK_UP
    assert kernel.calls == [("set_config", 0, config), ("inject_config_irq",)]
    kernel.calls.clear()
    # A reset: no interrupt again until the next DRIVER_OK; the status stays.
    backend.handle(SetStatusRequest(2, DeviceStatus(0)))
    device.set_link(False)
    assert kernel.calls == [("set_config", 0, device.get_config(0, device.config_size))]


def test_vduse_kernel_refusal_reaches_the_caller(
    vduse: tuple[VduseBackend, NetDevice, FakeKernel],
) -> None:
    backend, device, kernel = vduse
    backend.handle(SetStatusRequest(1, DRIVER_OK))
    kernel.refuse_irq = True
    with pytest.raises(VduseKernelError, match="INJECT_CONFIG_IRQ"):
        device.set_link(False)


def test_vduse_close_stops_listening(monkeypatch: pytest.MonkeyPatch) -> None:
    backend, device, kernel = start_vduse(monkeypatch)
    backend.close()
    assert device.config_listener is None
    device.set_link(False)
    assert kernel.calls == []


# ---------------------------------------------------------------------- vhost-user


@pytest.fixture
def served(sock_dir: Path) -> Iterator[tuple[BackendServer, NetDevice, Path]]:
    device = NetDevice()
    path = sock_dir / "vu.sock"
    with BackendServer(path, lambda: device) as server:
        yield server, device, path


def _connect(path: Path, protocol: ProtocolFeature, changes: list[codec.Message]) -> Frontend:
    fe = Frontend.connect(path)
    fe.set_owner()
    fe.get_features()
    fe.set_features(int(VirtioFeature.VERSION_1 | VirtioFeature.PROTOCOL_FEATURES))
    fe.set_protocol_features(fe.get_protocol_features() & protocol)

    def on_change(message: codec.Message) -> int:
        changes.append(message)
        return 0

    fe.backend_handlers[BackendRequest.CONFIG_CHANGE_MSG] = on_change
    return fe


def test_vhost_user_front_end_gets_config_change_msg(
    served: tuple[BackendServer, NetDevice, Path],
) -> None:
    _, device, path = served
    changes: list[codec.Message] = []
    wanted = ProtocolFeature.CONFIG | ProtocolFeature.BACKEND_REQ | ProtocolFeature.REPLY_ACK
    with _connect(path, wanted, changes) as fe:
        fe.open_backend_channel()
        # Acknowledged (REPLY_ACK): once set_link returns the front-end has it.
        device.set_link(False)
        assert [m.request for m in changes] == [BackendRequest.CONFIG_CHANGE_MSG]
        assert fe.get_config(STATUS_OFFSET, 2) == bytes(2)
        device.set_link(True)
        assert len(changes) == 2
        assert fe.get_config(STATUS_OFFSET, 2) == bytes([NetStatus.LINK_UP, 0])
        assert fe.backend_error is None


def test_vhost_user_without_reply_ack_the_message_is_sent_unacknowledged(
    served: tuple[BackendServer, NetDevice, Path],
) -> None:
    _, device, path = served
    changes: list[codec.Message] = []
    with _connect(path, ProtocolFeature.CONFIG | ProtocolFeature.BACKEND_REQ, changes) as fe:
        fe.open_backend_channel()
        # Unacknowledged, SET_BACKEND_REQ_FD may still be on its way: a round
        # trip makes sure the back-end holds the channel before the change.
        fe.get_features()
        device.set_link(False)
        wait_for(lambda: len(changes) == 1, timeout=5)
        assert fe.backend_error is None


@pytest.mark.parametrize(
    ("protocol", "channel"),
    [
        (ProtocolFeature.BACKEND_REQ | ProtocolFeature.REPLY_ACK, True),  # no CONFIG
        (ProtocolFeature.CONFIG | ProtocolFeature.BACKEND_REQ, False),  # no channel
        (ProtocolFeature(0), False),
    ],
    ids=["no-config", "no-channel", "nothing"],
)
def test_vhost_user_front_end_that_cannot_take_it_gets_nothing(
    served: tuple[BackendServer, NetDevice, Path], protocol: ProtocolFeature, channel: bool
) -> None:
    _, device, path = served
    changes: list[codec.Message] = []
    with _connect(path, protocol, changes) as fe:
        if channel:
            fe.open_backend_channel()
        device.set_link(False)
        if protocol & ProtocolFeature.CONFIG:
            # The front-end reads the new status when it asks.
            assert fe.get_config(STATUS_OFFSET, 2) == bytes(2)
        assert fe.get_features() & VirtioFeature.VERSION_1  # the connection goes on
        assert changes == []
        assert fe.backend_error is None


def test_a_closed_connection_stops_listening(
    served: tuple[BackendServer, NetDevice, Path],
) -> None:
    _, device, path = served
    changes: list[codec.Message] = []
    fe = _connect(path, ProtocolFeature.CONFIG | ProtocolFeature.BACKEND_REQ, changes)
    wait_for(lambda: device.config_listener is not None, timeout=5)
    fe.close()
    wait_for(lambda: device.config_listener is None, timeout=5)
    device.set_link(False)


# ---------------------------------------------------------------------- pyvdpa run


@pytest.fixture
def app(sock_dir: Path) -> Iterator[VdpaApp]:
    application = VdpaApp(out=io.StringIO())
    application.probe(["sim-net,name=net0", "sim-blk,name=blk0,size=1M"])
    yield application
    application.close()


def run_console(app: VdpaApp, *lines: str) -> list[str]:
    assert isinstance(app.out, io.StringIO)
    start = app.out.tell()
    Console(app, io.StringIO("".join(f"{line}\n" for line in lines))).run()
    app.out.seek(start)
    return [chunk.strip() for chunk in app.out.read().split(PROMPT)[1:-1]]


def test_help_lists_link() -> None:
    assert "link <device name> up|down" in HELP


def test_console_link_command(app: VdpaApp) -> None:
    device = app.registry.find("net0")
    assert device is not None
    hardware = app.drivers["sim-net"].hardware(device)
    assert isinstance(hardware, NetControl)
    outputs = run_console(
        app,
        "link net0 down",
        "link net0",
        "link net0 sideways",
        "link net0 up down",
        "link nope up",
        "link blk0 down",
    )
    assert outputs == [
        "Device net0: link down.",
        "Bad arguments",
        "Bad arguments",
        "Bad arguments",
        "Invalid device: nope.",
        "Device blk0 is a block device: link applies to net devices.",
    ]
    assert not hardware.link_up
    assert run_console(app, "link net0 up") == ["Device net0: link up."]
    assert hardware.link_up


def test_link_is_refused_for_a_blk_device(app: VdpaApp) -> None:
    with pytest.raises(VdpaError, match="blk0 is a block device: link applies to net devices"):
        app.set_link("blk0", False)


def test_console_link_reaches_a_vhost_user_front_end_of_pyvdpa_run(
    app: VdpaApp, sock_dir: Path
) -> None:
    path = sock_dir / "net0.sock"
    app.create(str(path), "net0")
    changes: list[codec.Message] = []
    arrived = threading.Event()

    def on_change(message: codec.Message) -> int:
        changes.append(message)
        arrived.set()
        return 0

    wanted = ProtocolFeature.CONFIG | ProtocolFeature.BACKEND_REQ | ProtocolFeature.REPLY_ACK
    with _connect(path, wanted, []) as fe:
        fe.backend_handlers[BackendRequest.CONFIG_CHANGE_MSG] = on_change
        fe.open_backend_channel()
        assert run_console(app, "link net0 down") == ["Device net0: link down."]
        assert arrived.wait(5)
        assert fe.get_config(STATUS_OFFSET, 2) == bytes(2)
        assert run_console(app, "link net0 up") == ["Device net0: link up."]
        assert len(changes) == 2
        assert fe.get_config(STATUS_OFFSET, 2) == bytes([NetStatus.LINK_UP, 0])
