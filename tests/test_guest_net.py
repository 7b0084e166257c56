"""pyvdpa's sim-net under real virtio-net drivers: a Linux guest and DPDK.

* A Linux guest (QEMU 7.2, TCG) has a virtio-net NIC over vhost-user to a
  ``sim-net,mode=tap`` device of ``pyvdpa run``.  The application, its TAP and
  the host end of every connection live in a network namespace the test
  creates, so guest traffic never reaches the machine's network.  The guest
  pings the TAP's address with no loss and moves a 4 MiB TCP stream each way;
  both ends' MD5 sums must agree; the device's queue counters show no error,
  and the device was configured once for the guest's whole life.  Variants:
  the split ring; two queue pairs on two vCPUs (each stream pinned to one
  vCPU, so both pairs carry traffic); two queue pairs on one vCPU (the guest
  enables only the first pair, so the TAP must not hand the host's frames to
  the second); the packed ring, with one and two queue pairs.
* DPDK's virtio-user driver (testpmd) over a ``sim-net,mode=loopback``
  device of ``pyvdpa run``: the frames of a first burst come back intact,
  then io forwarding keeps them circulating, and testpmd's counters agree
  with the device's (read at the application's console).
* Regressions the guests found, reproduced with pyvdpa's own front-end: a
  repeated, identical SET_FEATURES must leave running rings alone, and a TAP
  must not hand frames to a queue pair that is not running.
"""

from __future__ import annotations

import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from peers import PeerPool
from peers.app import PyvdpaRun, ring_errors
from peers.dpdk import virtio_user
from peers.guest import script_status, vhost_user_net_args
from peers.netns import NetNamespace
from peers.tcp import SINK_PORT, SOURCE_PORT, StreamServer
from pyvdpa.dataplane.net import EngineNetDevice
from pyvdpa.devices.net import NetDevice
from pyvdpa.vdpa import SimDeviceOps, VdpaPort, VdpaRegistry
from test_vdpa_port import RecordingOps, connect, open_link
from test_vdpa_tap import icmp_echo, in_netns

pytestmark = pytest.mark.peers

TAP = "pyv0"
HOST_IP = "10.231.0.1"
GUEST_IP = "10.231.0.2"
GUEST_MAC = "52:54:00:aa:bb:01"
STREAM_SIZE = 4 << 20
PINGS = 10
GUEST_TIMEOUT = 90.0
CLOSE_TIMEOUT = 10.0

SIM_MAC = "52:54:00:12:34:56"
FRAME_SIZE = 64
FIRST_BURST = 32
BURST_TIMEOUT = 10.0
FORWARD_SECONDS = 1.0
GUEST = bytes.fromhex("525400aabb01")
STEERED_FLOWS = 32

PING_SUMMARY = re.compile(
    r"^(\d+) packets transmitted, (\d+) packets received, (\d+)% packet loss$", re.M
)
UPLOAD = re.compile(r"^upload: ([0-9a-f]{32}) reply: ([0-9a-f]{32}) (\d+)$", re.M)
DOWNLOAD = re.compile(r"^download: ([0-9a-f]{32}) (\d+)$", re.M)
_QUEUES = re.compile(r"^queues: (.*)$", re.M)
# testpmd's verbose dump of one received frame.
_RX_DUMP = re.compile(
    r"src=(?P<src>[0-9A-F:]{17}) - dst=(?P<dst>[0-9A-F:]{17}) - pool=\S+ - "
    r"type=(?P<type>0x[0-9a-f]{4}) - length=(?P<length>\d+) - nb_segs=(?P<segs>\d+)"
    r".*? - sw ptype: (?P<ptype>[A-Z0-9_ ]+?)\s+-"
)


@dataclass(frozen=True, slots=True)
class NetVariant:
    """One way of wiring the guest's NIC."""

    name: str
    queue_pairs: int = 1
    packed: bool = False
    vcpus: int = 1

    @property
    def pinned(self) -> bool:
        """Streams run on a vCPU each, so each uses its own transmit queue."""
        return self.vcpus > 1


VARIANTS = [
    NetVariant("split"),
    NetVariant("mq", queue_pairs=2, vcpus=2),
    NetVariant("mq-one-pair-enabled", queue_pairs=2),
    NetVariant("packed", packed=True),
    NetVariant("packed-mq", queue_pairs=2, packed=True, vcpus=2),
]


def guest_script(variant: NetVariant) -> str:
    """Configure eth0, ping the TAP, then a stream up (vCPU 0) and one down (vCPU 1)."""
    upload_cpu = "taskset 1 " if variant.pinned else ""
    download_cpu = "taskset 2 " if variant.pinned else ""
    return f"""
ip link set eth0 up
ip address add {GUEST_IP}/24 dev eth0
echo "queues: $(ls /sys/class/net/eth0/queues | tr '\\n' ' ')"
ping -c {PINGS} -i 0.2 -W 5 {HOST_IP}
dd if=/dev/urandom of=/tmp/up bs=65536 count={STREAM_SIZE // 65536} 2>/dev/null
reply=$({upload_cpu}nc {HOST_IP} {SINK_PORT} < /tmp/up)
echo "upload: $(md5sum < /tmp/up | cut -d' ' -f1) reply: $reply"
{download_cpu}nc {HOST_IP} {SOURCE_PORT} < /dev/null > /tmp/down
echo "download: $(md5sum < /tmp/down | cut -d' ' -f1) $(wc -c < /tmp/down)"
"""


@pytest.mark.parametrize("variant", VARIANTS, ids=[variant.name for variant in VARIANTS])
def test_guest_pings_and_streams_through_the_tap(peers: PeerPool, variant: NetVariant) -> None:
    netns = peers.netns()
    app = peers.start(
        PyvdpaRun(
            [f"sim-net,name=net0,mode=tap,ifname={TAP},queues={variant.queue_pairs}"],
            peers.sock_dir / "vdpa",
            netns=netns,
        )
    )
    netns.add_address(TAP, f"{HOST_IP}/24")
    netns.link_up(TAP)
    server = peers.start(StreamServer(netns, HOST_IP, source_size=STREAM_SIZE))
    nic = vhost_user_net_args(
        app.sockets[0], GUEST_MAC, queues=variant.queue_pairs, packed=variant.packed
    )

    guest = peers.guest(guest_script(variant), nic, smp=variant.vcpus)
    console = guest.wait(timeout=GUEST_TIMEOUT)

    assert script_status(console) == 0, console
    ping = PING_SUMMARY.search(console)
    assert ping is not None, console
    assert ping.groups() == (str(PINGS), str(PINGS), "0"), console
    upload = UPLOAD.search(console)
    assert upload is not None, console
    assert upload[2] == upload[1] and int(upload[3]) == STREAM_SIZE, console
    assert server.wait_transfer("sink").md5 == upload[1]
    download = DOWNLOAD.search(console)
    assert download is not None, console
    source = server.wait_transfer("source")
    assert (download[1], int(download[2])) == (source.md5, STREAM_SIZE), console

    # One configuration for the guest's whole life: QEMU starting the second
    # pair (mq=on) must not close and reconfigure the device.
    app.wait_for("destroy port", CLOSE_TIMEOUT)
    assert (app.count("new port"), app.count("destroy port")) == (1, 1), app.output()

    pairs_used = variant.vcpus if variant.queue_pairs > 1 else 1
    queues = _QUEUES.search(console)
    assert queues is not None, console
    expected = [f"rx-{pair}" for pair in range(pairs_used)]
    expected += [f"tx-{pair}" for pair in range(pairs_used)]
    assert queues[1].split() == expected
    stats = app.stats("net0")
    assert sorted(stats) == list(range(2 * variant.queue_pairs))
    assert ring_errors(stats) == {}
    for qid in range(2 * pairs_used):
        assert stats[qid]["packets"] > 0, (qid, stats)
    for qid in range(2 * pairs_used, 2 * variant.queue_pairs):
        assert stats[qid]["packets"] == 0, (qid, stats)
    received = sum(stats[qid]["bytes"] for qid in range(0, 2 * pairs_used, 2))
    sent = sum(stats[qid]["bytes"] for qid in range(1, 2 * pairs_used, 2))
    assert received >= STREAM_SIZE
    assert sent >= STREAM_SIZE


def test_virtio_user_frames_come_back_intact_through_loopback(peers: PeerPool) -> None:
    app = peers.start(PyvdpaRun([f"sim-net,name=net0,mac={SIM_MAC}"], peers.sock_dir / "vdpa"))
    # The loopback returns frames addressed to the device's MAC: make that
    # testpmd's peer, and dump the first burst as it comes back.
    testpmd = peers.start(
        virtio_user(
            app.sockets[0],
            mode="rxonly",
            app_args=[f"--eth-peer=0,{SIM_MAC}", f"--txpkts={FRAME_SIZE}"],
        )
    )
    port_mac = re.search(r"^Port 0: ((?:[0-9A-F]{2}:){5}[0-9A-F]{2})$", testpmd.output(), re.M)
    assert port_mac is not None, testpmd.output()

    testpmd.command("set verbose 1")
    # The burst comes back while testpmd prints its prompt, and the packet
    # dumps can split "testpmd> ": wait for the dumps, not for that prompt.
    testpmd.send("start tx_first")
    deadline = time.monotonic() + BURST_TIMEOUT
    while len(_RX_DUMP.findall(testpmd.output())) < FIRST_BURST and time.monotonic() < deadline:
        time.sleep(0.1)
    dump = testpmd.stop_forwarding()
    frames = list(_RX_DUMP.finditer(testpmd.output()))

    assert len(frames) == FIRST_BURST, dump
    for frame in frames:
        assert frame["src"] == port_mac[1]
        assert frame["dst"] == SIM_MAC.upper()
        assert frame["type"] == "0x0800"
        assert int(frame["length"]) == FRAME_SIZE
        assert frame["segs"] == "1"
        assert frame["ptype"].split() == ["L2_ETHER", "L3_IPV4", "L4_UDP"]

    testpmd.command("set verbose 0")
    testpmd.command("set fwd io")
    testpmd.start_forwarding(tx_first=True)
    time.sleep(FORWARD_SECONDS)
    testpmd.stop_forwarding()
    port = testpmd.port_stats()[0]
    # The last frames testpmd queued may still be on their way through the ring.
    deadline = time.monotonic() + BURST_TIMEOUT
    stats = app.stats("net0")
    while stats[1]["packets"] < port.tx_packets and time.monotonic() < deadline:
        time.sleep(0.1)
        stats = app.stats("net0")

    assert port.rx_errors == port.tx_errors == port.rx_missed == port.rx_nombuf == 0, port
    # io forwarding sent every frame it received, on top of the two bursts.
    assert port.rx_packets > 2 * FIRST_BURST
    assert port.rx_bytes == FRAME_SIZE * port.rx_packets
    assert port.tx_bytes == FRAME_SIZE * port.tx_packets
    assert ring_errors(stats) == {}
    assert stats[1]["packets"] == port.tx_packets
    assert stats[1]["bytes"] == port.tx_bytes
    # The device may have looped frames testpmd stopped polling for.
    assert port.rx_packets <= stats[0]["packets"] <= stats[1]["packets"]
    assert stats[0]["bytes"] == FRAME_SIZE * stats[0]["packets"]


# ---------------------------------------------------------------------- regressions
# Found with the guests above, reproduced here with pyvdpa's own front-end.


def test_regression_repeated_set_features_keeps_the_rings_running(sock_dir: Path) -> None:
    """QEMU (mq=on) sends SET_FEATURES again for every queue pair it starts."""
    ops = RecordingOps(NetDevice(mode="loopback"))
    registry = VdpaRegistry()
    device = registry.register("net0", ops)
    try:
        with VdpaPort(sock_dir / "net.sock") as port:
            port.attach(device)
            port.start()
            with connect(port) as session:
                link = open_link(session)
                link.roundtrip(0)
                ops.take()
                session.frontend.set_features(session.features)
                assert ops.take() == []
                link.roundtrip(1)
    finally:
        registry.unregister(device)
        ops.close()


def test_regression_tap_frames_reach_the_only_running_pair(sock_dir: Path) -> None:
    """With two pairs and only the first running, no host frame may go to the second."""
    with NetNamespace(f"pyvdpa-{os.getpid()}-steering") as netns:
        hardware = in_netns(netns, lambda: EngineNetDevice(mode="tap", ifname=TAP, queue_pairs=2))
        ops = SimDeviceOps(hardware)
        registry = VdpaRegistry()
        device = registry.register("net0", ops)
        sender = in_netns(netns, lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW))
        try:
            netns.link_up(TAP)
            sender.bind((TAP, 0))
            with VdpaPort(sock_dir / "net.sock") as port:
                port.attach(device)
                port.start()
                with connect(port) as session:
                    link = open_link(session)
                    # Flows from many sources: the kernel spreads them over
                    # every attached TAP queue.
                    frames = [
                        icmp_echo(GUEST, GUEST, f"10.234.{flow}.1", "10.234.0.2", bytes(8))
                        for flow in range(STEERED_FLOWS)
                    ]
                    for frame in frames:
                        sender.send(frame)
                    received: list[bytes] = []
                    deadline = time.monotonic() + BURST_TIMEOUT
                    while len(received) < len(frames) and time.monotonic() < deadline:
                        # The kernel's own IPv6 chatter comes through too.
                        received += [f for f in link.receive(1, timeout=0.2) if f in frames]
            assert received == frames
            assert hardware.dropped == 0
        finally:
            sender.close()
            registry.unregister(device)
            ops.close()
