"""``examples/echo_net.py``, a device written against ``pyvdpa``'s public names only.

* the public surface itself: ``import pyvdpa`` loads neither numba nor the
  compiled data path;
* in this process, through pyvdpa's own front-end: the config space holds
  the MAC, and a frame comes back byte for byte with its MACs swapped;
* the example run as a program, as a user starts it: it lends its device to
  one front-end at a time and stops cleanly on SIGINT, and DPDK testpmd's
  virtio-user forwards frames through it, every figure checked against the
  counters the example prints when it stops.
"""

from __future__ import annotations

import importlib.util
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

import pyvdpa
from peers import PeerPool
from peers.common import PeerProcess
from peers.dpdk import virtio_user
from pyvdpa.drive.session import Session
from pyvdpa.errors import PyvdpaError
from pyvdpa.vhost_user.frontend import Frontend
from test_vdpa_port import wait_for

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "echo_net.py"
HEADER_SIZE = 12
FRAME_SIZE = 64
TRAFFIC_SECONDS = 1.0
#: Time the example gets to take what testpmd left in its transmit ring.
SETTLE_SECONDS = 0.5
#: Frames testpmd's ``start tx_first`` sends; io forwarding keeps that many in flight.
BURST = 32
_COUNTERS = re.compile(r"^received (\d+) dropped (\d+) echoed (\d+)$", re.M)


def _load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("echo_net", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


echo_net = _load_example()
MAC: bytes = echo_net.MAC


class EchoNetExample(PeerProcess):
    """``python3 examples/echo_net.py SOCKET``, run as a program of its own."""

    def __init__(self, path: Path) -> None:
        """Describe the program; :meth:`start` (or ``with``) runs it."""
        self.path = path
        super().__init__(
            [sys.executable, "-u", str(EXAMPLE), str(path)], name="echo_net", program=sys.executable
        )

    def counters(self) -> tuple[int, int, int]:
        """Frames received, dropped and echoed, as printed once the program stopped."""
        found = _COUNTERS.findall(self.output())
        assert len(found) == 1, self.output()
        received, dropped, echoed = map(int, found[0])
        return received, dropped, echoed

    def _wait_ready(self) -> None:
        self.wait_for(f"echo NIC {MAC.hex(':')} on {re.escape(str(self.path))}\n", 30.0)

    def _request_exit(self) -> None:
        self._signal_group(signal.SIGINT)


@pytest.fixture
def served(sock_dir: Path) -> Iterator[tuple[Path, pyvdpa.Device]]:
    """The example's device served in this process."""
    device = echo_net.EchoNet()
    path = sock_dir / "echo.sock"
    with pyvdpa.BackendServer(path, lambda: device):
        yield path, device


def swapped(frame: bytes) -> bytes:
    """``frame`` with its destination and source MACs exchanged."""
    return frame[6:12] + frame[:6] + frame[12:]


def test_import_pyvdpa_loads_no_compiled_data_path() -> None:
    heavy = ("numba", "llvmlite", "pyvdpa.dataplane")
    code = f"import sys, pyvdpa; print(sorted(m for m in sys.modules if m.startswith({heavy})))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "[]"
    assert "serve" in pyvdpa.__all__ and "ThreadedDevice" in pyvdpa.__all__
    assert all(hasattr(pyvdpa, name) for name in pyvdpa.__all__)


@pytest.mark.usefixtures("no_fd_leak")
def test_get_config_answers_the_mac(served: tuple[Path, pyvdpa.Device]) -> None:
    path, _ = served
    with Frontend.connect(path) as frontend:
        features = frontend.get_features()
        assert features & pyvdpa.VirtioFeature.VERSION_1
        assert features & pyvdpa.NetFeature.MAC
        offered = frontend.get_protocol_features()
        assert offered & pyvdpa.ProtocolFeature.CONFIG
        frontend.set_protocol_features(offered)
        assert frontend.get_config(0, 6) == MAC
        assert frontend.get_config(2, 8) == MAC[2:] + bytes(4)


@pytest.mark.usefixtures("no_fd_leak")
def test_frame_comes_back_with_its_macs_swapped(served: tuple[Path, pyvdpa.Device]) -> None:
    path, device = served
    assert isinstance(device, echo_net.EchoNet)
    frame = bytes.fromhex("0200000000aa 0200000000bb 88b5") + bytes(range(50))
    with Session(Frontend.connect(path), memory_size=1 << 20) as session:
        session.negotiate(wanted=0, required=pyvdpa.VirtioFeature.VERSION_1)
        rx, tx = session.setup_ring(0, 16), session.setup_ring(1, 16)
        session.enable_rings()
        rx_buffers = [session.alloc(2048) for _ in range(2)]
        for addr in rx_buffers:
            rx.queue.add([], [(addr, 2048)])
        rx.kick()
        for sent in (frame, frame[:10]):
            addr = session.alloc(HEADER_SIZE + len(sent))
            session.memory.write(addr, bytes(HEADER_SIZE) + sent)
            tx.queue.add([(addr, HEADER_SIZE + len(sent))], [])
        tx.kick()

        wait_for(lambda: device.received == 2 and device.echoed == 1)
        assert tx.queue.get_used() is not None and tx.queue.get_used() is not None
        used = rx.queue.get_used()
        assert used is not None and rx.queue.get_used() is None
        echoed = session.memory.read(rx_buffers[0], used[1])
    # virtio_net_hdr: no offload, num_buffers 1; then the frame, MACs swapped.
    assert echoed[:HEADER_SIZE] == bytes(10) + b"\x01\x00"
    assert echoed[HEADER_SIZE:] == swapped(frame)
    # The 10-byte frame has no Ethernet header: dropped, its buffer returned.
    assert device.dropped == 1


def test_example_lends_its_device_to_one_front_end_at_a_time(sock_dir: Path) -> None:
    path = sock_dir / "echo.sock"
    with EchoNetExample(path) as example:
        with Frontend.connect(path) as first:
            assert first.get_features() & pyvdpa.NetFeature.MAC
            with Frontend.connect(path) as second, pytest.raises(PyvdpaError):
                second.get_features()

        def served_again() -> bool:
            try:
                with Frontend.connect(path) as again:
                    return bool(again.get_features() & pyvdpa.NetFeature.MAC)
            except PyvdpaError:
                return False

        wait_for(served_again)
        example.stop()
        assert example.returncode == 0, example.output()
    assert example.counters() == (0, 0, 0)
    assert not path.exists()
    assert "Traceback" not in example.output()


@pytest.mark.peers
def test_testpmd_forwards_through_the_example(sock_dir: Path, peers: PeerPool) -> None:
    path = sock_dir / "echo.sock"
    example = peers.start(EchoNetExample(path))
    testpmd = peers.start(
        virtio_user(path, mac=MAC.hex(":"), mode="io", app_args=[f"--txpkts={FRAME_SIZE}"])
    )
    assert f"Port 0: {MAC.hex(':').upper()}" in testpmd.output()

    testpmd.start_forwarding(tx_first=True)
    time.sleep(TRAFFIC_SECONDS)
    testpmd.stop_forwarding()
    port = testpmd.port_stats()[0]
    time.sleep(SETTLE_SECONDS)
    testpmd.stop()
    example.stop()
    assert example.returncode == 0, example.output()
    received, dropped, echoed = example.counters()

    assert port.rx_packets > 0
    assert port.rx_errors == port.tx_errors == port.rx_missed == port.rx_nombuf == 0
    assert port.rx_bytes == FRAME_SIZE * port.rx_packets
    # Every frame testpmd sent reached the device; io forwarding keeps the
    # first burst in flight, so nothing overflows and nothing is dropped.
    assert received == port.tx_packets
    assert dropped == 0
    # Frames echoed after testpmd stopped polling stay unread in its ring.
    assert port.rx_packets <= echoed <= received
    assert echoed - port.rx_packets <= BURST
    assert not path.exists()
