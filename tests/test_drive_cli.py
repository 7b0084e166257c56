"""``pyvdpa drive`` as a user runs it: a subprocess against in-process back-ends.

Exit status 0 means the traffic moved and checked out; 1 means the
back-end misbehaved (corrupted frames, impossible used lengths) or the
data did not verify.  ``--json`` prints the figures.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pyvdpa.device import Virtqueue
from pyvdpa.devices.blk import BlkDevice
from pyvdpa.devices.net import NetDevice
from pyvdpa.vhost_user.server import BackendServer
from pyvdpa.virtio.constants import NetFeature
from pyvdpa.virtio.net import net_header_size
from pyvdpa.virtio.ring import DescriptorChain, DeviceQueue


def _drive(*args: str) -> tuple[int, dict[str, Any], str]:
    proc = subprocess.run(
        [sys.executable, "-m", "pyvdpa", "drive", *args, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = proc.stdout.strip().splitlines()
    figures = json.loads(lines[-1]) if lines else {}
    return proc.returncode, figures, proc.stderr


class _LyingRxQueue:
    """A receive queue that corrupts what it delivers or misreports its length."""

    def __init__(self, queue: DeviceQueue, lie: str, header: int) -> None:
        self._queue = queue
        self._lie = lie
        self._header = header

    def __getattr__(self, name: str) -> Any:
        return getattr(self._queue, name)

    def push(self, chain: DescriptorChain, written: int) -> None:
        if self._lie == "corrupt":
            # The frame's checksum field: 14 bytes of Ethernet, 4 of magic, 8 of sequence.
            chain.write(b"\xde\xad\xbe\xef", self._header + 26)
        else:
            written = self._header - 2
        self._queue.push(chain, written)


class LyingNetDevice(NetDevice):
    """Loopback that corrupts every received frame or reports used lengths below the header."""

    def __init__(self, lie: str) -> None:
        super().__init__(mode="loopback")
        self.lie = lie

    def ring_starting(self, ring: Virtqueue) -> None:
        if ring.index % 2 == 0:
            header = net_header_size(self.negotiated)
            ring.queue = _LyingRxQueue(ring.queue, self.lie, header)  # type: ignore[assignment]
        super().ring_starting(ring)


@pytest.mark.parametrize(("lie", "counter"), [("corrupt", "rx_bad"), ("length", "errors")])
def test_misbehaving_backend_exits_1(sock_dir: Path, lie: str, counter: str) -> None:
    path = sock_dir / "liar.sock"
    with BackendServer(path, lambda: LyingNetDevice(lie)):
        code, figures, stderr = _drive(
            "net", "--socket", str(path), "--mode", "io", "--duration", "1"
        )
    assert code == 1, stderr
    assert figures[counter] > 0
    if lie == "length":
        assert "used length 10 for a 2060-byte receive buffer" in stderr


@pytest.mark.parametrize("extra", [[], ["--no-mrg-rxbuf"], ["--packed"]], ids=str)
def test_net_io_mode(sock_dir: Path, extra: list[str]) -> None:
    path = sock_dir / "net.sock"
    device = NetDevice(mode="loopback")
    with BackendServer(path, lambda: device):
        code, figures, stderr = _drive(
            "net", "--socket", str(path), "--mode", "io", "--duration", "1", *extra
        )
    assert code == 0, stderr
    assert figures["mode"] == "io"
    assert figures["rx_packets"] > 0 and figures["tx_packets"] >= figures["rx_packets"]
    assert figures["rx_bad"] == figures["errors"] == 0
    assert 0 < figures["rx_pps"] <= figures["tx_pps"] * 1.01
    assert figures["rx_bytes"] == figures["rx_packets"] * 64
    assert bool(device.negotiated & NetFeature.MRG_RXBUF) == ("--no-mrg-rxbuf" not in extra)


def test_blk_randread_with_the_backend_connecting(sock_dir: Path) -> None:
    """``drive blk --server`` listens; the back-end, in client role, connects to it."""
    path = sock_dir / "blk.sock"
    server = BackendServer(
        path, lambda: BlkDevice(size=4 << 20), client=True, reconnect_interval=0.05
    )
    with server:
        code, figures, stderr = _drive(
            "blk", "--socket", str(path), "--server", "--rw", "randread",
            "--duration", "1", "--bs", "4096", "--verify",
        )  # fmt: skip
    assert code == 0, stderr
    assert figures["rw"] == "randread" and figures["capacity"] == 4 << 20
    assert figures["ios"] > 0 and figures["bytes"] == figures["ios"] * 4096
    assert figures["iops"] > 0
    assert figures["errors"] == figures["verify_errors"] == 0
