"""The peer harness drives real third-party programs correctly.

Each test pairs two programs written by others (or one of them with a guest
kernel) and checks that work crossed between them, so a failure here points at
the harness or the machine, never at pyvdpa.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from peers import PeerPool
from peers.common import PeerTimeoutError
from peers.dpdk import Testpmd, net_vhost, virtio_user
from peers.guest import (
    Guest,
    GuestImage,
    build_initramfs,
    script_status,
    vhost_user_blk_args,
    vhost_user_net_args,
)
from peers.qsd import StorageDaemon

pytestmark = pytest.mark.peers

_DISK_SIZE = 8 << 20
_SECTOR = 512
_GUEST_WRITE_OFFSET = 1 << 20
_HOST_WRITE_OFFSET = 2 << 20
_GUEST_PATTERN = b"pyvdpa-guest-wrote-this"
_HOST_PATTERN = b"pyvdpa-host-wrote-this"
_WAIT_FOR_DISK = """
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
"""


def _wait_rx(backend: Testpmd, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        received = backend.port_stats()[0].rx_packets
        if received > 0 or time.monotonic() >= deadline:
            return received
        time.sleep(0.2)


def test_virtio_user_txonly_reaches_net_vhost_rxonly(peers: PeerPool) -> None:
    sock = peers.sock_dir / "vhost-net.sock"
    backend = peers.start(net_vhost(sock, mode="rxonly"))
    assert sock.is_socket()
    frontend = peers.start(virtio_user(sock, mode="txonly"))
    backend.start_forwarding()
    frontend.start_forwarding()

    received = _wait_rx(backend, timeout=10.0)
    frontend.stop_forwarding()

    assert received > 0
    assert frontend.port_stats()[0].tx_packets > 0
    assert backend.port_stats()[0].rx_errors == 0


def test_guest_boots_and_reports_end_marker(peers: PeerPool, guest_image: GuestImage) -> None:
    initramfs = build_initramfs(
        "echo pyvdpa-guest-says-hello\nexit 3\n", peers.workdir / "hello.gz", guest_image
    )
    started = time.monotonic()
    guest = peers.start(Guest(guest_image, initramfs))

    console = guest.wait(timeout=60.0)

    assert time.monotonic() - started < 60.0
    assert "pyvdpa-guest-says-hello" in console
    assert script_status(console) == 3


def test_guest_disk_through_storage_daemon(peers: PeerPool) -> None:
    disk = peers.workdir / "disk.img"
    with disk.open("wb") as image:
        image.truncate(_DISK_SIZE)
        image.seek(_HOST_WRITE_OFFSET)
        image.write(_HOST_PATTERN)
    sock = peers.sock_dir / "vhost-blk.sock"
    peers.start(StorageDaemon(disk, sock))
    assert sock.is_socket()
    script = f"""set -e
{_WAIT_FOR_DISK}
printf '%s' '{_GUEST_PATTERN.decode()}' |
    dd of=/dev/vda bs={_SECTOR} seek={_GUEST_WRITE_OFFSET // _SECTOR} conv=fsync 2>/dev/null
echo "read: $(dd if=/dev/vda bs={_SECTOR} skip={_HOST_WRITE_OFFSET // _SECTOR} count=1 \\
    2>/dev/null | head -c {len(_HOST_PATTERN)})"
"""
    guest = peers.guest(script, vhost_user_blk_args(sock))

    console = guest.wait(timeout=60.0)

    assert script_status(console) == 0, console
    assert f"read: {_HOST_PATTERN.decode()}" in console
    with disk.open("rb") as image:
        image.seek(_GUEST_WRITE_OFFSET)
        assert image.read(len(_GUEST_PATTERN)) == _GUEST_PATTERN


def test_guest_nic_sends_to_net_vhost(peers: PeerPool) -> None:
    sock = peers.sock_dir / "vhost-net.sock"
    backend = peers.start(net_vhost(sock, mode="rxonly"))
    backend.start_forwarding()
    # Nothing answers: the ping first broadcasts an ARP request, which is what
    # the back-end counts.
    script = """ip link set eth0 up
ip address add 10.99.0.1/24 dev eth0
ping -c 1 -W 1 10.99.0.2 || true
"""
    guest = peers.guest(script, vhost_user_net_args(sock, "52:54:00:12:34:56"))

    console = guest.wait(timeout=60.0)

    assert script_status(console) == 0, console
    assert backend.port_stats()[0].rx_packets > 0


def test_namespaces_reach_each_other_over_veth(peers: PeerPool) -> None:
    left = peers.netns()
    right = peers.netns()
    left.add_veth("pv-left", right, "pv-right")
    left.add_address("pv-left", "10.98.0.1/24")
    right.add_address("pv-right", "10.98.0.2/24")

    assert "UP" in left.run(["ip", "-brief", "link", "show", "lo"]).stdout
    left.run(["busybox", "ping", "-c", "1", "-W", "2", "10.98.0.2"])


def test_pool_close_stops_peers_and_removes_their_files(tmp_path: Path, sock_dir: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(_DISK_SIZE))
    with PeerPool(tmp_path, sock_dir) as pool:
        daemon = pool.start(StorageDaemon(disk, sock_dir / "blk.sock"))
        backend = pool.start(net_vhost(sock_dir / "net.sock"))
        namespace = pool.netns()
        sleeper = namespace.popen(["sleep", "600"])
        assert backend.runtime_dir.is_dir()

    assert not daemon.running
    assert not backend.running
    assert sleeper.poll() is not None
    assert not backend.runtime_dir.exists()
    assert list(sock_dir.iterdir()) == []
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert namespace.name not in namespaces.split()


def test_guest_past_its_timeout_is_killed(peers: PeerPool) -> None:
    guest = peers.guest("sleep 600\n")

    with pytest.raises(PeerTimeoutError):
        guest.wait(timeout=0.5)

    assert not guest.running
