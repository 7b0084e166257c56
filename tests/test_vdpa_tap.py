"""sim-net in tap mode, inside a network namespace the test creates.

The TAP and every address live in a private namespace (``ip netns add``), so
no frame reaches the machine's own network.  In-process devices are created
from a thread that entered the namespace with setns(2); the end-to-end test
runs ``pyvdpa run`` under ``ip netns exec``.
"""

from __future__ import annotations

import ctypes
import ipaddress
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from peers.netns import NetNamespace
from pyvdpa.dataplane.net import EngineNetDevice
from pyvdpa.devices.net import rarp_frame
from pyvdpa.drive.net import FrameCheck, build_frame, check_frame
from pyvdpa.drive.session import Session
from pyvdpa.errors import ConfigError
from pyvdpa.vdev import parse_vdev
from pyvdpa.vdpa import SimNetDriver, VdpaPort, VdpaRegistry
from pyvdpa.vhost_user.frontend import Frontend
from test_vdpa_port import NetLink, open_link, wait_for

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or not os.path.exists("/dev/net/tun"),
    reason="needs root, iproute2 and /dev/net/tun",
)

T = TypeVar("T")

_CLONE_NEWNET = 0x40000000
_LIBC = ctypes.CDLL(None, use_errno=True)

GUEST_MAC = bytes.fromhex("020000000002")
TAP_IP = "10.213.0.1"
GUEST_IP = "10.213.0.2"
ETH_P_ARP = 0x0806
ETH_P_IP = 0x0800
ETH_P_RARP = 0x8035
_ETH = struct.Struct("!6s6sH")
_ARP = struct.Struct("!HHBBH6s4s6s4s")
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_ICMP = struct.Struct("!BBHHH")


@pytest.fixture
def netns() -> Iterator[NetNamespace]:
    with NetNamespace(f"pyv-{uuid.uuid4().hex[:10]}") as ns:
        yield ns


def in_netns(ns: NetNamespace, fn: Callable[[], T]) -> T:
    """Run ``fn`` on a thread that entered ``ns`` (what it creates lives there)."""
    result: list[T] = []
    errors: list[BaseException] = []

    def body() -> None:
        fd = os.open(f"/run/netns/{ns.name}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if _LIBC.setns(fd, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
            result.append(fn())
        except BaseException as exc:
            errors.append(exc)
        finally:
            os.close(fd)

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return result[0]


def link_exists(ns: NetNamespace, name: str) -> bool:
    return ns.run(["ip", "link", "show", name], check=False).returncode == 0


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = int(sum(struct.unpack(f"!{len(data) // 2}H", data)))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def arp_request(sender_mac: bytes, sender_ip: str, target_ip: str) -> bytes:
    arp = _ARP.pack(1, ETH_P_IP, 6, 4, 1, sender_mac, _ip(sender_ip), bytes(6), _ip(target_ip))
    return (_ETH.pack(b"\xff" * 6, sender_mac, ETH_P_ARP) + arp).ljust(60, b"\0")


def icmp_echo(src_mac: bytes, dst_mac: bytes, src: str, dst: str, payload: bytes) -> bytes:
    icmp = _ICMP.pack(8, 0, 0, 0x77, 1) + payload
    icmp = icmp[:2] + struct.pack("!H", _checksum(icmp)) + icmp[4:]
    header = _IPV4.pack(0x45, 0, 20 + len(icmp), 1, 0x4000, 64, 1, 0, _ip(src), _ip(dst))
    header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
    return _ETH.pack(dst_mac, src_mac, ETH_P_IP) + header + icmp


def _ip(text: str) -> bytes:
    return ipaddress.IPv4Address(text).packed


def wait_frame(link: NetLink, match: Callable[[bytes], bool], timeout: float = 5.0) -> bytes:
    """The first received frame ``match`` accepts (the kernel sends IPv6 chatter too)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for frame in link.receive(1, timeout=0.2):
            if match(frame):
                return frame
    raise AssertionError("expected frame not received")


# ---------------------------------------------------------------------- the TAP itself


def test_tap_lives_in_the_namespace_while_the_device_does(netns: NetNamespace) -> None:
    device = in_netns(netns, lambda: EngineNetDevice(mode="tap", ifname="pv0"))
    try:
        assert device.tap is not None and device.tap.name == "pv0"
        assert link_exists(netns, "pv0")
        assert "tap" in netns.run(["ip", "-d", "link", "show", "pv0"]).stdout
    finally:
        device.close()
    assert not link_exists(netns, "pv0")
    device.close()  # closing twice is harmless


def test_tap_name_template_and_one_queue_per_pair(netns: NetNamespace) -> None:
    device = in_netns(netns, lambda: EngineNetDevice(mode="tap", queue_pairs=2))
    try:
        assert device.tap is not None
        name = device.tap.name
        assert name.startswith("pyvdpa") and name[6:].isdigit()
        assert len(device.tap.fds) == 2
        assert "multi_queue" in netns.run(["ip", "-d", "link", "show", name]).stdout
    finally:
        device.close()


def test_tap_that_cannot_be_created_is_a_config_error(netns: NetNamespace) -> None:
    netns.run(["ip", "link", "add", "pvveth", "type", "veth", "peer", "name", "pvpeer"])
    with pytest.raises(ConfigError, match="cannot create TAP 'pvveth'"):
        in_netns(netns, lambda: EngineNetDevice(mode="tap", ifname="pvveth"))
    first = in_netns(netns, lambda: EngineNetDevice(mode="tap", ifname="pvbusy"))
    try:
        with pytest.raises(ConfigError, match="cannot create TAP 'pvbusy'"):
            in_netns(netns, lambda: EngineNetDevice(mode="tap", ifname="pvbusy"))
    finally:
        first.close()
    with pytest.raises(ConfigError, match="invalid TAP interface name"):
        EngineNetDevice(mode="tap", ifname="a/b")


def test_rarp_is_announced_on_the_tap(netns: NetNamespace) -> None:
    device = in_netns(netns, lambda: EngineNetDevice(mode="tap", ifname="pv1"))
    try:
        netns.link_up("pv1")

        def capture() -> socket.socket:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_RARP))
            sock.bind(("pv1", 0))
            sock.settimeout(5)
            return sock

        sock = in_netns(netns, capture)
        with sock:
            device.send_rarp(GUEST_MAC)
            frame = sock.recv(2048)
        assert frame[:60] == rarp_frame(GUEST_MAC)
    finally:
        device.close()


def test_frames_sent_to_the_tap_all_reach_the_ring_in_order(
    netns: NetNamespace, sock_dir: Path
) -> None:
    """Many times what the receive ring holds: they wait in the TAP until buffers come."""
    count = 400
    registry = VdpaRegistry()
    driver = SimNetDriver()
    device = in_netns(
        netns, lambda: driver.probe(parse_vdev("sim-net,name=t0,mode=tap,ifname=pv2"), registry)
    )
    netns.link_up("pv2")

    def sender() -> socket.socket:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        sock.bind(("pv2", 0))
        return sock

    inject = in_netns(netns, sender)
    try:
        with VdpaPort(sock_dir / "tap.sock") as port:
            port.attach(device)
            port.start()
            with Session(Frontend.connect(port.path), memory_size=8 << 20) as session:
                link = open_link(session)
                frames = [build_frame(100, seq, dst=GUEST_MAC) for seq in range(count)]
                for frame in frames:
                    inject.send(frame)
                received: list[bytes] = []
                deadline = time.monotonic() + 10
                while len(received) < count and time.monotonic() < deadline:
                    batch = link.receive(count - len(received), timeout=0.5)
                    received += [f for f in batch if check_frame(f) is FrameCheck.INTACT]
        assert received == frames
        stats = device.get_stats(0)
        assert stats["packets"] >= count and stats["bad_desc_errors"] == 0
    finally:
        inject.close()
        driver.remove(device, registry)
    assert not link_exists(netns, "pv2")


# ---------------------------------------------------------------------- end to end


def test_app_in_tap_mode_moves_frames_between_ring_and_tap(
    netns: NetNamespace, sock_dir: Path
) -> None:
    prefix = sock_dir / "vdpa"
    proc = netns.popen(
        [
            sys.executable, "-m", "pyvdpa", "run",
            "--vdev", "sim-net,name=tap0,mode=tap,ifname=pv0",
            "--iface", str(prefix),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    sock = Path(f"{prefix}0")
    try:
        wait_for(lambda: sock.exists() or proc.poll() is not None, timeout=60)
        assert proc.poll() is None, proc.communicate()
        netns.add_address("pv0", f"{TAP_IP}/24")
        netns.link_up("pv0")
        address = netns.run(["cat", "/sys/class/net/pv0/address"]).stdout.strip()
        tap_mac = bytes.fromhex(address.replace(":", ""))
        with Session(Frontend.connect(sock), memory_size=4 << 20) as session:
            link = open_link(session)
            link.send(arp_request(GUEST_MAC, GUEST_IP, TAP_IP))
            reply = wait_frame(link, lambda f: _ETH.unpack_from(f)[2] == ETH_P_ARP)
            fields = _ARP.unpack_from(reply, _ETH.size)
            assert fields[4] == 2  # ARP reply
            assert fields[5] == tap_mac and fields[6] == _ip(TAP_IP)
            assert reply[:6] == GUEST_MAC
            for seq in range(3):
                payload = bytes(range(seq, seq + 56))
                link.send(icmp_echo(GUEST_MAC, tap_mac, GUEST_IP, TAP_IP, payload))
                echo = wait_frame(
                    link,
                    lambda f: _ETH.unpack_from(f)[2] == ETH_P_IP and f[23] == 1,
                )
                icmp = echo[_ETH.size + 20 :]
                assert icmp[0] == 0  # echo reply
                assert icmp[_ICMP.size :] == payload
        stats = json.loads(netns.run(["ip", "-j", "-s", "link", "show", "pv0"]).stdout)[0]
        # The TAP received the ARP request and the echoes the guest sent.
        assert stats["stats64"]["rx"]["packets"] >= 4
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err
        assert "Signal 15 received" in out
        assert not sock.exists()
        assert not link_exists(netns, "pv0")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
