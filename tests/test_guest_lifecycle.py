"""A Linux guest that dies mid-traffic, and the guest that comes after it.

A guest (QEMU 7.2, TCG) with a virtio-net NIC on a ``sim-net,mode=tap``
device and a virtio-blk disk on a ``sim-blk`` device writes a first block,
then keeps pinging the TAP and reading the disk until QEMU is killed
outright.  Then:

* server role, devices served in this process through the vDPA framework,
  each with a recording ops table: the kill makes ``dev_close`` run on both
  devices and their hardware stop, and a second guest connecting to the same
  sockets gets them configured again, pings with no loss, finds the first
  block and writes a second one;
* client role, ``pyvdpa run --client`` with QEMU listening
  (``server=on,wait=off``): the application reports both ports destroyed,
  reconnects when a second QEMU listens on the same paths, and that guest
  works as above.

The TAP and the host address it answers on live in a network namespace the
test creates.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from peers import PeerPool
from peers.app import PyvdpaRun, ring_errors
from peers.guest import (
    Guest,
    GuestImage,
    build_initramfs,
    script_status,
    vhost_user_blk_args,
    vhost_user_net_args,
)
from peers.initramfs import add_files
from peers.netns import NetNamespace
from pyvdpa.dataplane.net import EngineNetDevice
from pyvdpa.devices.blk import BlkDevice
from pyvdpa.vdpa import VdpaPort, VdpaRegistry
from test_guest_blk import FACT, SHELL_FUNCTIONS, Region, md5
from test_guest_net import PING_SUMMARY
from test_vdpa_port import RecordingOps
from test_vdpa_tap import in_netns

pytestmark = pytest.mark.peers

TAP = "pyv0"
HOST_IP = "10.232.0.1"
GUEST_IP = "10.232.0.2"
GUEST_MAC = "52:54:00:aa:bb:02"
DISK_SIZE = 8 << 20
FIRST = Region("first", 2048, 8)
SECOND = Region("second", 4096, 8)
PINGS = 10
GUEST_TIMEOUT = 90.0
TRAFFIC_TIMEOUT = 60.0
CLOSE_TIMEOUT = 10.0
TRAFFIC_SAMPLE = 0.5

_PREAMBLE = f"""{SHELL_FUNCTIONS}
ip link set eth0 up
ip address add {GUEST_IP}/24 dev eth0
wait_disks vda
"""

#: Writes the first block, then pings and reads until killed.
FIRST_GUEST = f"""{_PREAMBLE}
put vda {FIRST.name} {FIRST.sector}; fact first-write $?
ping -c 3 -W 5 {HOST_IP} > /dev/null; fact first-ping $?
while :; do dd if=/dev/vda of=/dev/null bs=65536 iflag=direct 2>/dev/null; done &
echo "traffic: started"
ping -i 0.02 {HOST_IP} > /dev/null
"""

#: Pings, finds the first block, writes the second.
SECOND_GUEST = f"""{_PREAMBLE}
ping -c {PINGS} -i 0.2 -W 5 {HOST_IP}
fact first-read $(md5 vda {FIRST.sector} {FIRST.sectors})
put vda {SECOND.name} {SECOND.sector}; fact second-write $?
fact second-read $(md5 vda {SECOND.sector} {SECOND.sectors})
"""


def configurations(ops: RecordingOps, count: int) -> list[str]:
    """The ``dev_conf`` and ``dev_close`` calls ``ops`` saw, once there are ``count`` (or later)."""

    def seen() -> list[str]:
        return [str(call[0]) for call in ops.calls if call[0] in ("dev_conf", "dev_close")]

    deadline = time.monotonic() + CLOSE_TIMEOUT
    while len(seen()) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return seen()


@dataclass(frozen=True, slots=True)
class Served:
    """The devices served in this process, their ports and backing file."""

    net: RecordingOps
    blk: RecordingOps
    ports: tuple[VdpaPort, VdpaPort]
    disk: Path


def traffic(served: Served) -> tuple[int, int]:
    """Frames the NIC sent and requests the disk received so far."""
    return served.net.get_stats(1)["packets"], served.blk.get_stats(0)["received_desc"]


@pytest.fixture
def served(sock_dir: Path, tmp_path: Path) -> Iterator[Served]:
    """sim-net (TAP in a fresh namespace) and sim-blk on two ports; request before ``peers``.

    Set up before the peers, it is torn down after them: the guests leave
    before the ports close.
    """
    disk = tmp_path / "disk.img"
    disk.write_bytes(random.Random("disk").randbytes(DISK_SIZE))
    namespace = NetNamespace(f"pyvdpa-{os.getpid()}-lifecycle")
    with namespace, contextlib.ExitStack() as stack:
        net = RecordingOps(in_netns(namespace, lambda: EngineNetDevice(mode="tap", ifname=TAP)))
        stack.callback(net.close)
        namespace.add_address(TAP, f"{HOST_IP}/24")
        namespace.link_up(TAP)
        blk = RecordingOps(BlkDevice(path=disk))
        stack.callback(blk.close)
        registry = VdpaRegistry()
        ports = []
        for name, ops in (("net0", net), ("blk0", blk)):
            device = registry.register(name, ops)
            stack.callback(registry.unregister, device)
            port = VdpaPort(sock_dir / name)
            port.attach(device)
            port.start()
            stack.callback(port.close)
            ports.append(port)
        yield Served(net, blk, (ports[0], ports[1]), disk)


def boot(
    peers: PeerPool, image: GuestImage, name: str, script: str, devices: Sequence[str]
) -> Guest:
    """Start guest ``name`` running ``script``, with the blocks it writes in /data."""
    initramfs = build_initramfs(script, peers.workdir / f"initramfs-{name}.gz", image)
    add_files(initramfs, {f"/data/{region.name}": region.data for region in (FIRST, SECOND)})
    return peers.start(Guest(image, initramfs, devices))


def kill_mid_traffic(guest: Guest, sample: Callable[[], tuple[int, ...]]) -> None:
    """Wait until the guest's traffic flows (``sample`` counters grow), then SIGKILL it."""
    guest.wait_for("traffic: started", TRAFFIC_TIMEOUT)
    facts = dict(FACT.findall(guest.output()))
    assert (facts.get("first-write"), facts.get("first-ping")) == ("0", "0"), guest.output()
    before = sample()
    time.sleep(TRAFFIC_SAMPLE)
    after = sample()
    assert all(new > old for old, new in zip(before, after, strict=True)), (before, after)
    guest.kill()


def check_second_guest(console: str, disk: Path) -> None:
    """The second guest pinged with no loss, found the first block and wrote the second."""
    assert script_status(console) == 0, console
    ping = PING_SUMMARY.search(console)
    assert ping is not None, console
    assert ping.groups() == (str(PINGS), str(PINGS), "0"), console
    facts = dict(FACT.findall(console))
    assert facts.get("first-read") == md5(FIRST.data), console
    assert facts.get("second-write") == "0", console
    assert facts.get("second-read") == md5(SECOND.data), console
    stored = disk.read_bytes()
    for region in (FIRST, SECOND):
        assert stored[region.offset : region.offset + region.size] == region.data, region


def test_killed_guest_closes_the_devices_and_a_new_guest_reuses_them(
    served: Served, peers: PeerPool, guest_image: GuestImage
) -> None:
    net_sock, blk_sock = (port.path for port in served.ports)
    devices = [*vhost_user_net_args(net_sock, GUEST_MAC), *vhost_user_blk_args(blk_sock)]

    first = boot(peers, guest_image, "first", FIRST_GUEST, devices)
    kill_mid_traffic(first, lambda: traffic(served))

    for ops in (served.net, served.blk):
        assert configurations(ops, 2) == ["dev_conf", "dev_close"]
    # Closed means stopped: nothing moves on the rings any more.
    stopped = traffic(served)
    time.sleep(TRAFFIC_SAMPLE)
    assert traffic(served) == stopped

    second = boot(peers, guest_image, "second", SECOND_GUEST, devices)
    console = second.wait(GUEST_TIMEOUT)

    check_second_guest(console, served.disk)
    for ops in (served.net, served.blk):
        assert configurations(ops, 4) == ["dev_conf", "dev_close", "dev_conf", "dev_close"]
        stats = {qid: ops.get_stats(qid) for qid in range(len(ops.hardware.stats))}
        assert ring_errors(stats) == {}


def test_client_mode_reconnects_when_a_new_guest_listens(
    peers: PeerPool, guest_image: GuestImage
) -> None:
    disk = peers.workdir / "disk.img"
    disk.write_bytes(random.Random("disk").randbytes(DISK_SIZE))
    netns = peers.netns()
    app = peers.start(
        PyvdpaRun(
            [f"sim-net,name=net0,mode=tap,ifname={TAP}", f"sim-blk,name=blk0,path={disk}"],
            peers.sock_dir / "vdpa",
            client=True,
            netns=netns,
        )
    )
    netns.add_address(TAP, f"{HOST_IP}/24")
    netns.link_up(TAP)
    net_sock, blk_sock = app.sockets
    devices = [
        *vhost_user_net_args(net_sock, GUEST_MAC, server=True),
        *vhost_user_blk_args(blk_sock, server=True),
    ]

    def sample() -> tuple[int, int]:
        # Frames the NIC sent (queue 1) and requests the disk received.
        sent = app.stats("net0", 1)[1]["packets"]
        return sent, app.stats("blk0", 0)[0]["received_desc"]

    first = boot(peers, guest_image, "first", FIRST_GUEST, devices)
    for sock in app.sockets:
        app.wait_for(f"new port {sock},", GUEST_TIMEOUT)
    mark = app.mark()
    kill_mid_traffic(first, sample)

    for sock in app.sockets:
        app.wait_for(f"destroy port {sock},", CLOSE_TIMEOUT, mark)
    mark = app.mark()
    second = boot(peers, guest_image, "second", SECOND_GUEST, devices)
    console = second.wait(GUEST_TIMEOUT)

    check_second_guest(console, disk)
    for sock in app.sockets:
        app.wait_for(f"new port {sock},", CLOSE_TIMEOUT, mark)
        app.wait_for(f"destroy port {sock},", CLOSE_TIMEOUT, mark)
    for name in ("net0", "blk0"):
        assert ring_errors(app.stats(name)) == {}
