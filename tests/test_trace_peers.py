"""``pyvdpa trace`` between vhost-user programs written by others.

The proxy runs as the command a user starts (``pyvdpa trace --json --out``)
and everything that works without it must work through it:

* DPDK's virtio-user (testpmd, txonly) sends frames through the trace into
  DPDK's net_vhost back-end (testpmd, rxonly), which counts every one, and
  again with both in the other socket role (virtio-user ``server=1``,
  net_vhost ``client=1``, the trace ``--connect-frontend`` and
  ``--listen-backend``);
* ``pyvdpa drive blk`` writes, reads back and verifies a disk exported by
  qemu-storage-daemon through the trace;
* a Linux guest under QEMU boots with a virtio-blk disk on
  qemu-storage-daemon and a virtio-net NIC on ``pyvdpa run``, each through
  its own trace, uses both, and the traces hold QEMU's request sequence.

Each trace is read back as JSON: nothing malformed, every reply paired with
its request, and the proxy's fd count back where it was once the front-end
has gone.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from peers import PeerPool
from peers.app import PyvdpaRun
from peers.common import PeerProcess, PeerTimeoutError, check_socket_path
from peers.dpdk import net_vhost, virtio_user
from peers.guest import script_status, vhost_user_blk_args, vhost_user_net_args
from peers.qsd import StorageDaemon
from pyvdpa.drive.blk import run_blk
from pyvdpa.drive.session import Session
from pyvdpa.vhost_user.frontend import Frontend

pytestmark = pytest.mark.peers

FRAME_SIZE = 64
DISK_SIZE = 16 << 20


class TraceRun(PeerProcess):
    """``pyvdpa trace --listen FE --connect BE --json --out FILE`` as its own process.

    With ``inverted`` the roles swap: ``--connect-frontend FE --listen-backend BE``.
    """

    def __init__(self, frontend: Path, backend: Path, out: Path, *, inverted: bool = False) -> None:
        self.frontend = check_socket_path(frontend)
        self.listening = check_socket_path(backend if inverted else frontend)
        self.out = out
        argv = [sys.executable, "-u", "-m", "pyvdpa", "trace", "--json", "--out", str(out)]
        if inverted:
            argv += ["--connect-frontend", str(frontend), "--listen-backend", str(backend)]
        else:
            argv += ["--listen", str(frontend), "--connect", str(backend)]
        super().__init__(argv, name=f"pyvdpa trace {frontend.name}", program=sys.executable)

    def records(self) -> list[dict[str, Any]]:
        """Every record written so far."""
        if not self.out.exists():
            return []
        return [json.loads(line) for line in self.out.read_text().splitlines() if line]

    def messages(self, connection: int = 1) -> list[dict[str, Any]]:
        """The message records of one connection pair."""
        return [r for r in self.records() if "seq" in r and r["connection"] == connection]

    def wait_record(self, predicate: Callable[[dict[str, Any]], bool], timeout: float) -> None:
        """Wait until a record satisfies ``predicate``."""
        deadline = time.monotonic() + timeout
        while not any(predicate(r) for r in self.records()):
            if time.monotonic() > deadline:
                raise PeerTimeoutError(self._describe(f"wrote no such record in {timeout} s"))
            time.sleep(0.05)

    def wait_closed(self, connection: int, timeout: float = 20.0) -> None:
        """Wait until connection pair ``connection`` has ended."""
        self.wait_record(
            lambda r: r.get("event") == "close" and r["connection"] == connection, timeout
        )

    def fd_count(self) -> int:
        """Open fds of the proxy process."""
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 20
        while not self.listening.is_socket():
            if not self.running or time.monotonic() > deadline:
                raise PeerTimeoutError(self._describe(f"did not listen on {self.listening}"))
            time.sleep(0.05)

    def _request_exit(self) -> None:
        self._signal_group(signal.SIGTERM)


def check_paired(messages: list[dict[str, Any]]) -> None:
    """Nothing malformed, and every reply answers a request of its code."""
    by_seq = {m["seq"]: m for m in messages}
    for m in messages:
        assert "malformed" not in m, m
        if m["kind"] == "reply":
            assert by_seq[m["reply_to"]]["code"] == m["code"], m
            assert m["latency_us"] >= 0


def requests(messages: list[dict[str, Any]], channel: str = "main") -> list[dict[str, Any]]:
    """The requests on one channel, in order."""
    return [m for m in messages if m["kind"] == "request" and m["channel"] == channel]


def test_virtio_user_into_net_vhost_through_the_trace(peers: PeerPool) -> None:
    backend_sock = peers.sock_dir / "vh.sock"
    backend = peers.start(net_vhost(backend_sock, mode="rxonly"))
    trace = peers.start(
        TraceRun(peers.sock_dir / "tr.sock", backend_sock, peers.workdir / "vu.jsonl")
    )
    idle_fds = trace.fd_count()
    backend.start_forwarding()
    frontend = peers.start(
        virtio_user(trace.frontend, mode="txonly", app_args=[f"--txpkts={FRAME_SIZE}"])
    )
    frontend.start_forwarding()
    time.sleep(1.0)
    frontend.stop_forwarding()
    sent = frontend.port_stats()[0]
    deadline = time.monotonic() + 5
    while backend.port_stats()[0].rx_packets < sent.tx_packets and time.monotonic() < deadline:
        time.sleep(0.2)
    received = backend.port_stats()[0]
    frontend.stop()
    trace.wait_closed(1)

    assert sent.tx_packets > 0 and received.rx_packets == sent.tx_packets
    assert received.rx_bytes == FRAME_SIZE * sent.tx_packets
    assert trace.fd_count() == idle_fds
    messages = trace.messages()
    check_paired(messages)
    names = [m["request"] for m in requests(messages)]
    # virtio-user sets each ring up with CALL, NUM, BASE, ADDR and KICK last.
    for ring in (0, 1):
        ring_requests = [
            m["request"]
            for m in requests(messages)
            if m["request"].startswith("SET_VRING") and m["payload"].get("index") == ring
        ]
        setup = [n for n in ring_requests if n != "SET_VRING_ENABLE"][:5]
        assert setup == [
            "SET_VRING_CALL",
            "SET_VRING_NUM",
            "SET_VRING_BASE",
            "SET_VRING_ADDR",
            "SET_VRING_KICK",
        ], ring_requests
    assert names.index("SET_FEATURES") < names.index("SET_MEM_TABLE")
    table = next(m for m in requests(messages) if m["request"] == "SET_MEM_TABLE")
    regions = table["payload"]["regions"]
    # DPDK's memory is its own: guest-physical addresses are its virtual ones.
    assert regions and all(r["guest_phys_addr"] == r["userspace_addr"] for r in regions)
    assert len(table["fds"]) == len(regions)
    kicks = [m for m in requests(messages) if m["request"] == "SET_VRING_KICK"]
    assert all(m["fds"] == ["eventfd"] for m in kicks)


def test_virtio_user_server_and_net_vhost_client_through_the_inverted_trace(
    peers: PeerPool,
) -> None:
    """Both DPDK ends in the other role: the trace connects to virtio-user, net_vhost to it."""
    frontend_sock = peers.sock_dir / "vu.sock"
    backend_sock = peers.sock_dir / "tr.sock"
    frontend = peers.start(
        virtio_user(frontend_sock, server=True, mode="txonly", app_args=[f"--txpkts={FRAME_SIZE}"])
    )
    trace = peers.start(
        TraceRun(frontend_sock, backend_sock, peers.workdir / "inv.jsonl", inverted=True)
    )
    backend = peers.start(net_vhost(backend_sock, client=True, mode="rxonly"))
    frontend.wait_prompt()
    backend.start_forwarding()
    frontend.start_forwarding()
    time.sleep(1.0)
    frontend.stop_forwarding()
    sent = frontend.port_stats()[0]
    deadline = time.monotonic() + 5
    while backend.port_stats()[0].rx_packets < sent.tx_packets and time.monotonic() < deadline:
        time.sleep(0.2)

    assert sent.tx_packets > 0 and backend.port_stats()[0].rx_packets == sent.tx_packets
    records = trace.records()
    assert records[0]["event"] == "open"
    assert records[0]["detail"] == (
        f"front-end connected to {frontend_sock}, back-end accepted on {backend_sock}"
    )
    check_paired(trace.messages())
    names = [m["request"] for m in requests(trace.messages())]
    # virtio-user opens with SET_OWNER, then asks the features.
    assert names[:2] == ["SET_OWNER", "GET_FEATURES"] and "SET_MEM_TABLE" in names


def test_drive_blk_into_storage_daemon_through_the_trace(peers: PeerPool) -> None:
    disk = peers.workdir / "disk.img"
    with disk.open("wb") as image:
        image.truncate(DISK_SIZE)
    backend_sock = peers.sock_dir / "qsd.sock"
    peers.start(StorageDaemon(disk, backend_sock))
    trace = peers.start(
        TraceRun(peers.sock_dir / "tr.sock", backend_sock, peers.workdir / "blk.jsonl")
    )
    idle_fds = trace.fd_count()
    with Session(Frontend.connect(trace.frontend), memory_size=8 << 20) as session:
        result = run_blk(session, rw="randwrite", bs=4096, iodepth=8, ios=256, verify=True)
    trace.wait_closed(1)

    assert result.errors == result.verify_errors == 0 and result.verified == result.ios >= 256
    assert result.capacity == DISK_SIZE
    assert trace.fd_count() == idle_fds
    messages = trace.messages()
    check_paired(messages)
    config = next(m for m in messages if m["request"] == "GET_CONFIG" and m["kind"] == "reply")
    capacity = int.from_bytes(bytes.fromhex(config["payload"]["data"])[:8], "little")
    assert capacity * 512 == DISK_SIZE
    features = next(m for m in messages if m["request"] == "GET_FEATURES" and m["kind"] == "reply")
    # The blk-only bits tell the device type: every bit is named for blk.
    assert {"SEG_MAX", "BLK_SIZE", "FLUSH", "VERSION_1"} <= set(
        features["payload"]["features_names"]
    )
    assert not [n for n in features["payload"]["features_names"] if "/" in n]


SIM_MAC = "52:54:00:12:34:56"
GUEST_WRITE = b"traced guest write, sector 100"
#: What the guest does with its disk and NIC; each result a ``fact NAME: VALUE`` line.
GUEST_SCRIPT = f"""
fact() {{ echo "fact $1: $2"; }}
i=0
while ! [ -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
fact head "$(dd if=/dev/vda bs=512 count=8 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"
printf '{GUEST_WRITE.decode()}' > /tmp/w
dd if=/tmp/w of=/dev/vda bs=512 seek=100 conv=sync,fsync 2>/dev/null
fact write $?
ip link set eth0 up
ip address add 10.233.7.2/24 dev eth0
ping -c 3 -i 0.2 -W 1 10.233.7.1 >/dev/null 2>&1
fact tx "$(cat /sys/class/net/eth0/statistics/tx_packets)"
fact rx "$(cat /sys/class/net/eth0/statistics/rx_packets)"
"""

#: QEMU 7.2's vhost-user start (vhost_user_backend_init, vhost_dev_init) with a
#: back-end offering CONFIGURE_MEM_SLOTS: features, protocol features, queue
#: count, memory slots, back-end channel, owner, features again, then each
#: ring's call and err eventfds before the driver runs.
QEMU_OPENING = [
    "GET_FEATURES",
    "GET_PROTOCOL_FEATURES",
    "SET_PROTOCOL_FEATURES",
    "GET_QUEUE_NUM",
    "GET_MAX_MEM_SLOTS",
    "SET_BACKEND_REQ_FD",
    "SET_OWNER",
    "GET_FEATURES",
]


def _facts(console: str) -> dict[str, str]:
    facts = {}
    for line in console.splitlines():
        if line.startswith("fact "):
            name, _, value = line[5:].partition(": ")
            facts[name] = value.strip()
    return facts


def _ring_started_in_order(messages: list[dict[str, Any]], ring: int) -> None:
    """NUM, BASE, ADDR and KICK of ``ring``, in that order, after the memory is given."""
    names = [m["request"] for m in requests(messages)]
    memory = names.index("ADD_MEM_REG")
    order = [
        m["request"]
        for m in requests(messages)[memory:]
        if m["request"] in ("SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ADDR", "SET_VRING_KICK")
        and m["payload"].get("index") == ring
    ]
    assert order[:4] == ["SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ADDR", "SET_VRING_KICK"]


def test_guest_boots_on_blk_and_net_through_traces(peers: PeerPool) -> None:
    disk = peers.workdir / "disk.img"
    head = bytes(range(256)) * 16
    disk.write_bytes(head + bytes(DISK_SIZE - len(head)))
    qsd_sock = peers.sock_dir / "qsd.sock"
    peers.start(StorageDaemon(disk, qsd_sock))
    app = peers.start(PyvdpaRun([f"sim-net,name=net0,mac={SIM_MAC}"], peers.sock_dir / "vdpa"))
    blk_trace = peers.start(
        TraceRun(peers.sock_dir / "tb.sock", qsd_sock, peers.workdir / "blk.jsonl")
    )
    net_trace = peers.start(
        TraceRun(peers.sock_dir / "tn.sock", app.sockets[0], peers.workdir / "net.jsonl")
    )
    idle = (blk_trace.fd_count(), net_trace.fd_count())
    guest = peers.guest(
        GUEST_SCRIPT,
        [*vhost_user_blk_args(blk_trace.frontend), *vhost_user_net_args(net_trace.frontend)],
    )
    console = guest.wait(120)
    blk_trace.wait_closed(1)
    net_trace.wait_closed(1)

    assert script_status(console) == 0, console
    facts = _facts(console)
    assert facts["head"] == hashlib.md5(head).hexdigest(), console
    assert facts["write"] == "0"
    assert disk.read_bytes()[100 * 512 :][: len(GUEST_WRITE)] == GUEST_WRITE
    # sim-net loops the guest's ARP broadcasts back to it.
    assert int(facts["tx"]) > 0 and int(facts["rx"]) > 0, facts
    assert (blk_trace.fd_count(), net_trace.fd_count()) == idle

    for trace, rings in ((blk_trace, (0,)), (net_trace, (0, 1))):
        messages = trace.messages()
        check_paired(messages)
        names = [m["request"] for m in requests(messages)]
        opening = len(QEMU_OPENING)
        assert names[:opening] == QEMU_OPENING, names
        assert names[opening : opening + 2 * len(rings)] == [
            "SET_VRING_CALL",
            "SET_VRING_ERR",
        ] * len(rings)
        assert not requests(messages, "backend")
        handover = next(m for m in messages if m["request"] == "SET_BACKEND_REQ_FD")
        assert handover["note"] == "back-end channel interposed" and handover["fds"] == ["socket"]
        assert names.index("SET_FEATURES") < names.index("ADD_MEM_REG")
        # 512 MiB of guest RAM in one memfd, one region at guest-physical 0.
        region = next(m for m in requests(messages) if m["request"] == "ADD_MEM_REG")
        assert region["payload"]["region"]["guest_phys_addr"] == 0
        assert region["payload"]["region"]["memory_size"] == 512 << 20
        assert region["fds"] == ["memfd:memory-backend-memfd"]
        for ring in rings:
            _ring_started_in_order(messages, ring)
        # Stopping the device fetches every ring's position.
        stops = [m for m in requests(messages) if m["request"] == "GET_VRING_BASE"]
        assert set(rings) <= {m["payload"]["index"] for m in stops}
    blk_names = [m["request"] for m in requests(blk_trace.messages())]
    # vhost-user-blk reads the config space before the guest sees the disk.
    assert "GET_CONFIG" in blk_names[: blk_names.index("ADD_MEM_REG")]
    config = next(
        m for m in blk_trace.messages() if m["request"] == "GET_CONFIG" and m["kind"] == "reply"
    )
    assert (
        int.from_bytes(bytes.fromhex(config["payload"]["data"])[:8], "little") == DISK_SIZE // 512
    )
