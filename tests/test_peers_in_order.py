"""DPDK's virtio-user driver with VIRTIO_F_IN_ORDER through ``pyvdpa run``'s compiled sim-net.

virtio-user asks IN_ORDER by default (``in_order=1``); its in-order paths
differ from the others: transmitted buffers are reclaimed by counting
``used.idx`` on split rings, or by walking from one used descriptor to the
buffer id it names on packed rings (so a batch of chains shares one used
entry), while the split receive path reads the length of every used
element.  testpmd io-forwards frames round trip through the loopback, and
every figure is checked against the device's counters.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from peers import PeerPool
from peers.app import PyvdpaRun
from peers.dpdk import virtio_user
from pyvdpa.virtio.constants import VirtioFeature

pytestmark = pytest.mark.peers

SIM_MAC = "52:54:00:12:34:56"
FRAME_SIZE = 64
RING_ERRORS = ("bad_desc_errors", "exceed_max_chain", "invalid_buffer", "completion_errors")


def _until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


@pytest.mark.parametrize("mrg_rxbuf", [False, True], ids=["nomrg", "mrg"])
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_virtio_user_in_order_through_compiled_sim_net(
    peers: PeerPool, sock_dir: Path, packed: bool, mrg_rxbuf: bool
) -> None:
    run = peers.start(PyvdpaRun([f"sim-net,name=net0,mac={SIM_MAC}"], sock_dir / "vdpa"))
    testpmd = peers.start(
        virtio_user(
            run.sockets[0],
            packed=packed,
            mrg_rxbuf=mrg_rxbuf,
            in_order=True,
            mode="io",
            app_args=[f"--eth-peer=0,{SIM_MAC}", f"--txpkts={FRAME_SIZE}"],
        )
    )
    found = run.wait_for(re.compile(r": features (0x[0-9a-f]+) negotiated"), timeout=30)
    features = int(found.group(1), 16)
    assert features & VirtioFeature.IN_ORDER
    assert bool(features & VirtioFeature.RING_PACKED) == packed

    testpmd.start_forwarding(tx_first=True)
    time.sleep(1.0)
    testpmd.stop_forwarding()
    port = testpmd.port_stats()[0]
    _until(lambda: run.stats("net0")[1]["packets"] >= port.tx_packets)
    stats = run.stats("net0")

    assert port.rx_packets > 1000
    assert port.rx_errors == port.tx_errors == port.rx_missed == port.rx_nombuf == 0
    assert port.rx_bytes == FRAME_SIZE * port.rx_packets
    assert stats[1]["packets"] == port.tx_packets
    assert stats[1]["bytes"] == FRAME_SIZE * stats[1]["packets"]
    # Frames delivered after testpmd stopped polling stay unread.
    assert port.rx_packets <= stats[0]["packets"] <= stats[1]["packets"]
    assert stats[0]["bytes"] == FRAME_SIZE * stats[0]["packets"]
    for qid, counters in stats.items():
        assert all(counters.get(name, 0) == 0 for name in RING_ERRORS), (qid, counters)
