"""Devices added to a running ``pyvdpa run`` over its control socket, used by real peers.

DPDK 22.11 testpmd's virtio-user attaches to a sim-net device added at
runtime and forwards through it while pyvdpa's own front-end verifies a
sim-blk disk added beside it; the config and vstats outputs are checked
against what testpmd negotiated and sent, the OpenMetrics endpoint against
vstats; then the net device is deleted under testpmd while the disk serves
on, and ``available_instances`` follows.
"""

from __future__ import annotations

import re
import socket
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from peers import PeerPool
from peers.dpdk import virtio_user
from pyvdpa.drive.blk import run_blk
from pyvdpa.drive.session import Session
from pyvdpa.vhost_user.frontend import Frontend
from test_manage import Running

pytestmark = pytest.mark.peers

MAC = "52:54:00:12:34:56"
FRAME_SIZE = 64
COUNTERS = ("received_desc", "completed_desc", "packets", "bytes")
_SAMPLE = re.compile(
    r'^pyvdpa_queue_(\w+)_total\{device="([^"]+)",mgmtdev="[^"]+",queue="(\d+)",'
    r'queue_type="\w+"\} (\d+)$',
    re.M,
)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.1)


def _available(run: Running) -> int:
    shown = run.call("mgmtdev_show", name="sim-net")
    assert isinstance(shown, dict)
    free: int = shown["sim-net"]["supported_types"]["sim-net"]["available_instances"]
    return free


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_virtio_user_on_a_device_added_at_runtime(
    sock_dir: Path, peers: PeerPool, packed: bool
) -> None:
    port = _free_port()
    run = Running(sock_dir, "--metrics", f"127.0.0.1:{port}")
    try:
        free = _available(run)
        net_sock, blk_sock = sock_dir / "net0.sock", sock_dir / "blk0.sock"
        code, _, err = run.cli(
            "dev", "add", "name", "net0", "mgmtdev", "sim-net", "max_vqp", "2", "mac", MAC,
            "mtu", "1500", "socket", str(net_sock),
        )  # fmt: skip
        assert code == 0, err
        code, _, err = run.cli(
            "dev", "add", "name", "blk0", "mgmtdev", "sim-blk", "size", "4M",
            "socket", str(blk_sock),
        )  # fmt: skip
        assert code == 0, err
        assert _available(run) == free - 2

        testpmd = peers.start(
            virtio_user(
                net_sock,
                queues=2,
                packed=packed,
                mode="io",
                app_args=[f"--eth-peer=0,{MAC}", f"--txpkts={FRAME_SIZE}"],
            )
        )
        shown = run.call("dev_show", name="net0")
        assert shown["net0"]["connected"] is True  # type: ignore[index]
        testpmd.start_forwarding(tx_first=True)
        time.sleep(1.0)
        testpmd.stop_forwarding()
        stats = testpmd.port_stats()[0]
        assert stats.tx_packets > 0 and stats.rx_packets > 0

        def vstats(qidx: int) -> dict[str, int]:
            result = run.call("dev_vstats_show", name="net0", qidx=qidx)
            assert isinstance(result, dict)
            queue: dict[str, int] = result["net0"]
            return queue

        _until(lambda: vstats(1)["packets"] + vstats(3)["packets"] >= stats.tx_packets)
        queues = {qidx: vstats(qidx) for qidx in range(4)}
        assert [queues[q]["queue_type"] for q in range(4)] == ["rx", "tx", "rx", "tx"]
        assert queues[1]["packets"] + queues[3]["packets"] == stats.tx_packets
        assert queues[1]["bytes"] + queues[3]["bytes"] == FRAME_SIZE * stats.tx_packets
        assert stats.rx_packets <= queues[0]["packets"] + queues[2]["packets"]
        assert all(queues[q]["packets"] > 0 for q in range(4)), queues
        for queue in queues.values():
            for error in ("bad_desc_errors", "exceed_max_chain", "invalid_buffer"):
                assert queue[error] == 0, queues

        config = run.call("dev_config_show", name="net0")["net0"]  # type: ignore[index]
        assert config["mac"] == MAC and config["max_vq_pairs"] == 2 and config["link"] == "up"
        negotiated = set(config["negotiated_features"])
        # What virtio-user asks for (queues=2, mrg_rxbuf=1, in_order=1, packed_vq).
        assert {"VERSION_1", "MQ", "MRG_RXBUF"} <= negotiated
        assert ("RING_PACKED" in negotiated) == packed
        assert "IN_ORDER" in negotiated  # sim-net offers it, virtio-user asks it

        # The metrics endpoint carries the same counters as vstats.
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            assert reply.headers["Content-Type"].startswith("application/openmetrics-text")
            text = reply.read().decode()
        assert text.endswith("# EOF\n")
        scraped = {(m[2], int(m[3]), m[1]): int(m[4]) for m in _SAMPLE.finditer(text)}
        for qidx, queue in queues.items():
            for counter in COUNTERS:
                assert scraped[("net0", qidx, counter)] == queue[counter], (qidx, counter)
        assert scraped[("blk0", 0, "completed_desc")] == 0
        assert "pyvdpa_devices 2\n" in text

        # net0 deleted under testpmd; blk0 keeps serving; testpmd lives on.
        with Session(Frontend.connect(blk_sock), memory_size=8 << 20) as blk:
            first = run_blk(blk, rw="randwrite", bs=4096, iodepth=8, verify=True, ios=256)
            assert first.errors == first.verify_errors == 0
            code, _, err = run.cli("dev", "del", "net0")
            assert code == 0, err
            assert not net_sock.exists()
            assert _available(run) == free - 1
            again = run_blk(blk, rw="randread", bs=4096, iodepth=8, verify=True, ios=256)
            assert again.errors == again.verify_errors == 0
        # testpmd saw its back-end go away: the port's link is down, testpmd runs on.
        info = testpmd.command("show port info 0")
        assert "Link status: down" in info
        assert "virtio_user_dev_delayed_disconnect_handler" in testpmd.output()
        vstats_blk = run.call("dev_vstats_show", name="blk0", qidx=0)["blk0"]  # type: ignore[index]
        assert vstats_blk["completed_desc"] >= 512
        run.cli("dev", "del", "blk0")
        assert _available(run) == free
    finally:
        run.stop()
