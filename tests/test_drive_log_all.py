"""``pyvdpa drive net --log-all``: a front-end that checks a back-end's dirty log.

The driver negotiates VHOST_F_LOG_ALL, shares a bitmap (SET_LOG_BASE with
LOG_SHMFD) and logs every ring, as QEMU does while it migrates a guest;
after the run it requires the bit of every page the back-end wrote.  Checked
against DPDK 22.11's net_vhost (io forwarding back into the driver's receive
rings) and ``pyvdpa run``'s compiled sim-net, split and packed; with
pyvdpa's logging switched off (the test-only switch the migration test
uses) the check must fail.  The page rules themselves are tested on
hand-made memory.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from peers import PeerPool
from peers.app import PyvdpaRun
from peers.dpdk import net_vhost
from pyvdpa.cli import main
from pyvdpa.devices.net import NetDevice
from pyvdpa.drive.dirtylog import coverage, device_written_pages
from pyvdpa.drive.net import run_net
from pyvdpa.drive.session import Session
from pyvdpa.errors import ConfigError
from pyvdpa.memory.dirty import LOG_PAGE_SIZE, log_size, page_logged
from pyvdpa.vhost_user.frontend import Frontend
from pyvdpa.vhost_user.server import BackendServer
from pyvdpa.virtio.ring import DescFlag
from test_peers_vhost_user import PyvdpaCommand

PAGE = LOG_PAGE_SIZE
NO_DIRTY_LOG_SWITCH = "PYVDPA_TEST_NO_DIRTY_LOG"
DRIVE = ("--mode", "io", "--log-all", "--duration", "1.5", "--json")


class Memory:
    """Guest memory as a byte array, for the page rules."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)

    def read(self, gpa: int, size: int) -> bytes:
        assert 0 <= gpa <= gpa + size <= len(self.data), (gpa, size)
        return bytes(self.data[gpa : gpa + size])


def _bitmap(*pages: int, size: int = 16) -> bytes:
    bits = bytearray(size)
    for page in pages:
        bits[page >> 3] |= 1 << (page & 7)
    return bytes(bits)


def test_log_size_covers_the_last_page_in_whole_words() -> None:
    assert log_size(1) == 8
    assert log_size(64 * PAGE) == 8
    assert log_size(64 * PAGE + 1) == 16
    assert log_size(0x4000_0000 + (64 << 20)) == (0x4000_0000 + (64 << 20)) // PAGE // 8


def test_page_logged_reads_one_bit_per_page_and_nothing_past_the_end() -> None:
    bitmap = _bitmap(0, 9, size=2)
    assert page_logged(bitmap, 0) and page_logged(bitmap, PAGE - 1)
    assert not page_logged(bitmap, PAGE)
    assert page_logged(bitmap, 9 * PAGE + 5)
    assert not page_logged(bitmap, 16 * PAGE)  # past the end: not logged, no error


def test_only_pages_holding_device_bytes_are_counted() -> None:
    memory = Memory(8 * PAGE)
    # An area from the middle of page 1 to the middle of page 4; the device wrote in pages 1 and 3.
    memory.data[PAGE + 2048] = 1
    memory.data[3 * PAGE + 7] = 0xFF
    # A driver write in page 4 outside the area does not count.
    memory.data[4 * PAGE + 3000] = 9
    pages = device_written_pages(memory.read, [(PAGE + 2048, 3 * PAGE)], [])
    assert pages == {1, 3}
    assert coverage(_bitmap(1, 3), pages).missing == ()
    missing = coverage(_bitmap(1), pages)
    assert missing.written == 2 and missing.missing == (3 * PAGE,)


def test_packed_descriptors_the_device_wrote_last() -> None:
    desc = struct.Struct("<QIHH")
    memory = Memory(4 * PAGE)
    ring = PAGE - 2 * desc.size  # slots 0-1 in page 0, slots 2-3 in page 1
    avail, used = int(DescFlag.AVAIL), int(DescFlag.USED)
    slots = [
        (0x1000, 64, 1, avail),  # made available by the driver, not used yet
        (0, 0, 0, 0),  # never written
        (0x2000, 64, 2, avail | used),  # used by the device (wrap 1)
        (0, 0, 0, 0),
    ]
    for number, slot in enumerate(slots):
        memory.data[ring + number * desc.size : ring + (number + 1) * desc.size] = desc.pack(*slot)
    assert device_written_pages(memory.read, [], [(ring, 4)]) == {1}
    # Used on the second lap: both flags clear, the descriptor not all zero.
    memory.data[ring : ring + desc.size] = desc.pack(0, 64, 1, 0)
    assert device_written_pages(memory.read, [], [(ring, 4)]) == {0, 1}


def test_log_all_applies_to_vhost_user_only(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["drive", "net", "--log-all", "--vhost-vdpa", "/dev/null"]) != 0
    assert "--log-all applies to vhost-user only" in capsys.readouterr().err


@pytest.fixture
def python_backend(sock_dir: Path) -> Iterator[Path]:
    """pyvdpa's Python sim-net device, looping frames back."""
    path = sock_dir / "be.sock"
    with BackendServer(path, lambda: NetDevice(mode="loopback")):
        yield path


def test_python_device_logs_every_page_it_writes(python_backend: Path) -> None:
    with Session(Frontend.connect(python_backend), log_all=True) as session:
        result = run_net(session, mode="io", duration=0.5)
        logged = session.log_coverage()
    assert result.rx_packets and result.errors == result.rx_bad == 0
    assert logged.written >= 256 * 2060 // PAGE and logged.missing == ()


def test_log_all_refusals(python_backend: Path) -> None:
    with (
        Frontend.connect(python_backend) as frontend,
        pytest.raises(ConfigError, match="--log-all with --iommu is not supported"),
    ):
        Session(frontend, log_all=True, iommu=True)
    with (
        Session(Frontend.connect(python_backend), log_all=True) as session,
        pytest.raises(ConfigError, match="--engine compiled: the dirty-log check"),
    ):
        run_net(session, mode="io", engine="compiled")
    with (
        Session(Frontend.connect(python_backend)) as session,
        pytest.raises(ConfigError, match="shares no dirty log"),
    ):
        session.log_coverage()


# --- real back-ends ---------------------------------------------------------------------------


def _drive(peers: PeerPool, sock: Path, packed: bool) -> tuple[int, dict[str, object], str]:
    drive = peers.start(
        PyvdpaCommand("drive", "net", "--socket", str(sock), *DRIVE, *(["--packed"] * packed))
    )
    status = drive.wait_exit(30.0)
    return status, drive.figures(), drive.output()


@pytest.mark.peers
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_dpdk_net_vhost_logs_every_page_it_writes(peers: PeerPool, packed: bool) -> None:
    sock = peers.sock_dir / "net-vhost.sock"
    backend = peers.start(net_vhost(sock, mode="io", app_args=["--port-topology=loop"]))
    backend.start_forwarding()
    status, figures, output = _drive(peers, sock, packed)
    assert status == 0, output
    assert figures["rx_packets"] and figures["rx_bad"] == figures["errors"] == 0, figures
    # Every receive buffer (256 x 2060 bytes) came back at least once, and the used ring.
    assert figures["log_pages_written"] >= 256 * 2060 // PAGE, figures  # type: ignore[operator]
    assert figures["log_pages_missing"] == 0, figures


@pytest.mark.peers
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_sim_net_logs_every_page_it_writes(peers: PeerPool, packed: bool) -> None:
    app = peers.start(PyvdpaRun(["sim-net,mode=loopback"], peers.sock_dir / "net"))
    status, figures, output = _drive(peers, app.sockets[0], packed)
    assert status == 0, output
    assert figures["log_pages_written"] >= 256 * 2060 // PAGE, figures  # type: ignore[operator]
    assert figures["log_pages_missing"] == 0, figures


@pytest.mark.peers
def test_the_check_fails_a_back_end_that_does_not_log(
    peers: PeerPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(NO_DIRTY_LOG_SWITCH, "1")
    app = peers.start(PyvdpaRun(["sim-net,mode=loopback"], peers.sock_dir / "net"))
    status, figures, output = _drive(peers, app.sockets[0], False)
    assert status == 1, output
    assert figures["log_pages_missing"] == figures["log_pages_written"] > 0, figures
    assert "pages written but not logged: 0x" in output
