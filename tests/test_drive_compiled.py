"""``pyvdpa drive net`` on the compiled driver, against pyvdpa's Python device references.

The command runs as a user runs it (a subprocess); the back-end is
:class:`~pyvdpa.devices.net.NetDevice`, whose counters must match what the
driver reports, frame for frame.  Back-ends that break the ring (a used
entry naming a chain not in flight, a used length beyond the buffer) make
the driver stop with exit status 1; one that never consumes cannot keep it
past ``--duration`` and the drain that follows.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pyvdpa.dataplane.kernels import driver_row as d
from pyvdpa.dataplane.kernels.driver import run_queue
from pyvdpa.dataplane.kernels.driver_net import CORRUPT, FOREIGN, INTACT, check_frame
from pyvdpa.device import Virtqueue
from pyvdpa.devices.net import NetDevice
from pyvdpa.drive.compiled import _CRC_TABLE, DRAIN_SECONDS
from pyvdpa.drive.net import ENGINES, FrameCheck, build_frame
from pyvdpa.drive.net import check_frame as py_check_frame
from pyvdpa.vhost_user.server import BackendServer
from pyvdpa.virtio.constants import VirtioFeature
from pyvdpa.virtio.net import net_header_size
from pyvdpa.virtio.ring import DescriptorChain, DeviceQueue, Segment

FRAME = 64
RING = 256
# A subprocess start, negotiation and the kernel loaded from its cache.
START_SLACK = 20.0


def _drive(*args: str) -> tuple[int, dict[str, Any], str, float]:
    began = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pyvdpa", "drive", "net", *args, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = proc.stdout.strip().splitlines()
    figures = json.loads(lines[-1]) if lines else {}
    return proc.returncode, figures, proc.stderr, time.monotonic() - began


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["--packed"],
        ["--queues", "2"],
        ["--burst", "1"],
        ["--frame-size", "1518"],
        ["--queues", "2", "--cpus", "0"],
    ],
    ids=["split", "packed", "split-2q", "burst-1", "1518", "pinned"],
)
def test_compiled_txonly_counted_by_the_device(sock_dir: Path, extra: list[str]) -> None:
    path = sock_dir / "net.sock"
    device = NetDevice(mode="drop", queue_pairs=2)
    with BackendServer(path, lambda: device):
        code, figures, stderr, _ = _drive(
            "--socket", str(path), "--engine", "compiled", "--duration", "1", *extra
        )
        time.sleep(0.2)
        stats = device.stats
    assert code == 0, stderr
    frame = int(extra[1]) if extra[:1] == ["--frame-size"] else FRAME
    sent = sum(queue.packets for queue in stats[1::2])
    assert figures["tx_packets"] > 0 and figures["errors"] == 0
    assert sent == figures["tx_packets"]
    assert sum(queue.bytes for queue in stats[1::2]) == figures["tx_bytes"]
    assert figures["tx_bytes"] == frame * figures["tx_packets"]
    if extra[:1] == ["--queues"]:
        assert all(queue.packets > 0 for queue in stats[1::2])
    assert 0 < figures["duration"] < 1.5


@pytest.mark.parametrize("engine", ENGINES)
def test_engines_send_the_same_frames(sock_dir: Path, engine: str) -> None:
    """Both drivers' frames reach the device intact: loopback returns them to the receive ring."""
    path = sock_dir / "net.sock"
    device = NetDevice(mode="loopback")
    with BackendServer(path, lambda: device):
        code, figures, stderr, _ = _drive(
            "--socket", str(path), "--engine", engine, "--duration", "0.5"
        )
    assert code == 0, stderr
    assert figures["tx_packets"] > 0
    assert device.stats[1].packets == figures["tx_packets"]
    # The Python driver asks IN_ORDER; the compiled one reads every used entry and does not.
    assert bool(device.negotiated & VirtioFeature.IN_ORDER) == (engine == "python")


def test_default_engine_falls_back_for_inband(sock_dir: Path) -> None:
    path = sock_dir / "net.sock"
    device = NetDevice(mode="loopback")
    with BackendServer(path, lambda: device):
        code, figures, stderr, _ = _drive(
            "--socket", str(path), "--mode", "io", "--inband", "--duration", "0.5"
        )
    assert code == 0, stderr
    note = "in-band messages: running the Python driver"
    assert note in stderr
    assert figures["rx_packets"] > 0


def test_compiled_engine_refuses_inband(sock_dir: Path) -> None:
    path = sock_dir / "net.sock"
    with BackendServer(path, lambda: NetDevice(mode="loopback")):
        code, _, stderr, _ = _drive(
            "--socket", str(path), "--engine", "compiled", "--duration", "0.5", "--inband"
        )
    assert code == 2
    assert "--engine compiled: the compiled driver kicks through eventfds" in stderr


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("frame", [64, 1518])
def test_compiled_io_forwards_through_loopback(sock_dir: Path, packed: bool, frame: int) -> None:
    path = sock_dir / "net.sock"
    device = NetDevice(mode="loopback")
    with BackendServer(path, lambda: device):
        code, figures, stderr, _ = _drive(
            "--socket", str(path), "--engine", "compiled", "--mode", "io", "--duration", "1",
            "--frame-size", str(frame), *(["--packed"] if packed else []),
        )  # fmt: skip
        time.sleep(0.2)
        stats = device.stats
    assert code == 0, stderr
    assert figures["rx_bad"] == figures["rx_foreign"] == figures["errors"] == 0
    # Every frame went out, came back, and went out again; the last burst may still be on its way.
    assert stats[1].packets == figures["tx_packets"]
    assert 0 < figures["tx_packets"] - figures["rx_packets"] <= 32
    assert figures["rx_bytes"] == frame * figures["rx_packets"]
    assert figures["tx_bytes"] == frame * figures["tx_packets"]


class _CorruptingRxQueue:
    """A receive queue that flips a byte of the checksum of every tenth frame it delivers."""

    def __init__(self, queue: DeviceQueue, header: int) -> None:
        self._queue = queue
        self._header = header
        self._count = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._queue, name)

    def push(self, chain: DescriptorChain, written: int) -> None:
        self._count += 1
        if self._count % 10 == 0:
            chain.write(b"\xde", self._header + 26)
        self._queue.push(chain, written)


class CorruptingNetDevice(NetDevice):
    def __init__(self) -> None:
        super().__init__(mode="loopback")

    def ring_starting(self, ring: Virtqueue) -> None:
        if ring.index % 2 == 0:
            header = net_header_size(self.negotiated)
            ring.queue = _CorruptingRxQueue(ring.queue, header)  # type: ignore[assignment]
        super().ring_starting(ring)


def test_compiled_io_replaces_corrupted_frames(sock_dir: Path) -> None:
    path = sock_dir / "liar.sock"
    with BackendServer(path, CorruptingNetDevice):
        code, figures, stderr, _ = _drive(
            "--socket", str(path), "--engine", "compiled", "--mode", "io", "--duration", "1"
        )
    assert code == 1, stderr
    received = figures["rx_packets"]
    # Each tenth frame is corrupted once: replaced, it never comes back corrupted twice.
    assert received // 10 <= figures["rx_bad"] <= received // 10 + 1
    assert figures["rx_foreign"] == figures["errors"] == 0


class _LyingTxQueue:
    """A transmit queue that names a chain never made available, or a length beyond its buffer."""

    def __init__(self, queue: DeviceQueue, lie: str) -> None:
        self._queue = queue
        self._lie = lie
        self._pushed = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._queue, name)

    def push(self, chain: DescriptorChain, written: int) -> None:
        self._pushed += 1
        if self._pushed < 100:
            self._queue.push(chain, written)
        elif self._lie == "stranger":
            self._queue.push(dataclasses.replace(chain, id=chain.id + RING), written)
        else:
            bogus = Segment(0, 1 << 20, memoryview(b""))
            self._queue.push(dataclasses.replace(chain, writable=(bogus,)), 1 << 20)


class LyingNetDevice(NetDevice):
    """A dropping NIC whose transmit queues lie, or are never served."""

    def __init__(self, lie: str) -> None:
        super().__init__(mode="drop")
        self.lie = lie

    def ring_starting(self, ring: Virtqueue) -> None:
        if ring.index % 2 and self.lie != "silent":
            ring.queue = _LyingTxQueue(ring.queue, self.lie)  # type: ignore[assignment]
        super().ring_starting(ring)

    def process(self, vring: Virtqueue) -> None:
        if vring.index % 2 and self.lie == "silent":
            return
        super().process(vring)


@pytest.mark.parametrize(
    ("lie", "message"),
    [
        ("stranger", r"used entry names chain \d+ \(at used position 99\), which is not in flight"),
        ("length", "used length 1048576 for a chain of 76 bytes"),
    ],
)
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_lying_backend_stops_the_run(sock_dir: Path, lie: str, message: str, packed: bool) -> None:
    path = sock_dir / "liar.sock"
    with BackendServer(path, lambda: LyingNetDevice(lie)):
        code, figures, stderr, _ = _drive(
            "--socket", str(path), "--engine", "compiled", "--duration", "5",
            *(["--packed"] if packed else []),
        )  # fmt: skip
    assert code == 1, stderr
    assert figures["errors"] == 1
    # The run ends at the lie, not at the deadline.
    assert figures["duration"] < 4
    assert re.search(message, stderr), stderr


def test_silent_backend_cannot_hold_the_run(sock_dir: Path) -> None:
    path = sock_dir / "silent.sock"
    with BackendServer(path, lambda: LyingNetDevice("silent")):
        code, figures, stderr, took = _drive(
            "--socket", str(path), "--engine", "compiled", "--duration", "1"
        )
    assert code == 0, stderr
    # One ring's worth posted, none taken back; the run ends after its drain.
    assert figures["tx_packets"] == RING
    assert 0.9 <= figures["duration"] < 1.5
    assert took < 1.0 + DRAIN_SECONDS + START_SLACK
    assert f"{RING} frames still held by the device" in stderr


def test_used_index_past_the_chains_in_flight_is_an_error() -> None:
    """The kernel itself: a used index that moved with nothing in flight breaks the ring."""
    size = 8
    # Descriptor table, available ring, used ring of a split ring, and the buffers.
    memory = np.zeros(4096, dtype=np.uint8)
    base = int(memory.ctypes.data)
    desc, avail, used = base, base + 1024, base + 2048
    memory[2048 + 2] = 5  # used.idx = 5, with no chain in flight
    tables = np.zeros((2, size), dtype=np.int64)
    tables[0] = np.arange(size - 1, -1, -1)
    row = np.zeros(d.DCOLS, dtype=np.int64)
    row[d.D_SIZE] = size
    row[d.D_DESC], row[d.D_DRIVER], row[d.D_DEVICE] = desc, avail, used
    row[d.D_KICK_FD] = -1
    row[d.D_BUFFERS_DEV] = 0x1000
    row[d.D_SLOT] = row[d.D_CHAIN_LEN] = 64
    row[d.D_FRAME_LEN] = 52
    row[d.D_BURST] = 4
    row[d.D_FREE], row[d.D_BUSY] = tables[0].ctypes.data, tables[1].ctypes.data
    row[d.D_FREE_TOP] = size
    # Far enough that the first pass comes before it, however loaded the machine.
    row[d.D_DEADLINE] = time.monotonic_ns() + 60 * 10**9
    assert run_queue(row) == d.DE_USED_JUMP
    assert (row[d.D_ERROR_A], row[d.D_ERROR_B]) == (5, 0)
    assert row[d.D_PACKETS] == 0


class FeedingNetDevice(NetDevice):
    """A NIC with frames waiting for the first receive buffers: ours, corrupted and foreign."""

    def __init__(self, intact: int, corrupt: int, foreign: int) -> None:
        super().__init__(mode="loopback")
        frames = [build_frame(FRAME, seq) for seq in range(intact + corrupt)]
        for seq in range(corrupt):
            frame = bytearray(frames[seq])
            frame[-1] ^= 0xFF
            frames[seq] = bytes(frame)
        frames += [bytes(range(FRAME))] * foreign
        self.frames = frames

    def ring_starting(self, ring: Virtqueue) -> None:
        if ring.index == 0:
            self._backlog[0].extend(self.frames)
        super().ring_starting(ring)


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("corrupt", [0, 7])
def test_compiled_rxonly_checks_every_frame(sock_dir: Path, packed: bool, corrupt: int) -> None:
    path = sock_dir / "feed.sock"
    # More frames than the ring holds: the driver must repost buffers to take them all.
    intact, foreign = 3 * RING, 5
    with BackendServer(path, lambda: FeedingNetDevice(intact, corrupt, foreign)):
        code, figures, stderr, _ = _drive(
            "--socket", str(path), "--engine", "compiled", "--mode", "rxonly",
            "--duration", "1", *(["--packed"] if packed else []),
        )  # fmt: skip
    assert code == (1 if corrupt else 0), stderr
    assert figures["rx_packets"] == intact + corrupt + foreign
    assert figures["rx_bytes"] == FRAME * figures["rx_packets"]
    assert figures["rx_bad"] == corrupt
    assert figures["rx_foreign"] == foreign
    assert figures["tx_packets"] == figures["errors"] == 0


@pytest.mark.parametrize("size", [0, 29, 30, 64, 1518])
def test_frame_check_matches_the_python_driver(size: int) -> None:
    table = np.frombuffer(_CRC_TABLE.tobytes(), dtype=np.uint32)
    for seq in range(4):
        frame = bytearray(build_frame(max(size, 30), seq))[:size] if size else bytearray()
        if seq == 1 and size > 30:
            frame[-1] ^= 1
        if seq == 2 and size >= 18:
            frame[14] ^= 1
        buf = np.frombuffer(bytes(frame) + bytes(8), dtype=np.uint8)
        verdict = check_frame(int(buf.ctypes.data), size, int(table.ctypes.data))
        expected = {
            FrameCheck.INTACT: INTACT,
            FrameCheck.CORRUPT: CORRUPT,
            FrameCheck.FOREIGN: FOREIGN,
        }[py_check_frame(bytes(frame))]
        assert verdict == expected, (size, seq)


def test_compiled_engine_refuses_blk(sock_dir: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pyvdpa", "drive", "blk", "--socket", str(sock_dir / "none.sock"),
         "--engine", "compiled"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "--engine compiled: the compiled driver runs drive net only, not blk" in proc.stderr
