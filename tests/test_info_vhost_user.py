"""``pyvdpa info --socket``: what vhost-user back-ends written by others, and pyvdpa's, offer.

The real command, run as a program of its own, asks qemu-storage-daemon's
vhost-user-blk export, DPDK's net_vhost and ``pyvdpa run``'s sim-net and
sim-blk devices; each report is checked field by field against what the
back-end was started with.  vhost-user does not carry the device type:
``info`` infers it from device-specific feature bits, or takes ``--type``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from peers import PeerPool
from peers.app import PyvdpaRun
from peers.dpdk import net_vhost
from peers.qsd import StorageDaemon

pytestmark = pytest.mark.peers

DISK_SIZE = 16 << 20


def _info(sock: Path, *options: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "pyvdpa", "info", "--socket", str(sock), "--json", *options],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    report: dict[str, Any] = json.loads(proc.stdout)
    return report


def test_storage_daemon_vhost_user_blk(peers: PeerPool) -> None:
    disk = peers.workdir / "disk.img"
    with disk.open("wb") as image:
        image.truncate(DISK_SIZE)
    sock = peers.sock_dir / "blk.sock"
    peers.start(StorageDaemon(disk, sock, num_queues=2))

    info = _info(sock)

    assert info["transport"] == "vhost-user" and info["path"] == str(sock)
    assert (info["device_id"], info["device_type"]) == (2, "blk")
    assert info["device_type_source"] == "features"
    names = info["feature_names"]
    assert {"SEG_MAX", "BLK_SIZE", "FLUSH", "MQ", "VERSION_1", "PROTOCOL_FEATURES"} <= set(names)
    assert "RO" not in names
    protocol = set(info["backend_feature_names"])
    assert {"MQ", "CONFIG", "REPLY_ACK", "CONFIGURE_MEM_SLOTS"} <= protocol
    assert info["queues"] == 2
    assert info["queue_size"] is None and info["iova_first"] is None
    config = info["config"]
    assert config["capacity"] == DISK_SIZE // 512 and config["capacity_bytes"] == DISK_SIZE
    assert config["blk_size"] == 512
    assert config["seg_max"] > 0
    assert config["num_queues"] == 2
    assert info["extra"]["max_mem_slots"] > 0


def test_dpdk_net_vhost(peers: PeerPool) -> None:
    sock = peers.sock_dir / "vh.sock"
    peers.start(net_vhost(sock, queues=2))

    info = _info(sock)
    given = _info(sock, "--type", "net")

    assert (info["device_id"], info["device_type"]) == (1, "net")
    assert info["device_type_source"] == "features"
    assert given["device_type_source"] == "given" and given["device_type"] == "net"
    names = set(info["feature_names"])
    assert {"MRG_RXBUF", "MQ", "CTRL_VQ", "VERSION_1", "PROTOCOL_FEATURES"} <= names
    assert "MQ" in info["backend_feature_names"]
    # DPDK answers GET_QUEUE_NUM with the queue pairs it can serve at most.
    assert info["queues"] >= 2
    # net_vhost offers no CONFIG protocol feature: no config space over vhost-user.
    assert "CONFIG" not in info["backend_feature_names"]
    assert info["config"] is None


def test_pyvdpa_run_devices(peers: PeerPool) -> None:
    app = peers.start(
        PyvdpaRun(
            [
                "sim-net,name=n0,mode=loopback,queues=2,mac=02:00:00:aa:bb:cc,mtu=9000",
                "sim-blk,name=b0,size=8M,queues=2,readonly=on",
            ],
            peers.sock_dir / "pv",
        )
    )
    net, blk = app.sockets

    net_info = _info(net)
    blk_info = _info(blk)

    assert (net_info["device_type"], net_info["device_type_source"]) == ("net", "features")
    assert {"MAC", "MTU", "STATUS", "MQ", "ACCESS_PLATFORM"} <= set(net_info["feature_names"])
    assert net_info["queues"] == 4
    assert net_info["config"] == {
        "mac": "02:00:00:aa:bb:cc",
        "status": 1,
        "max_virtqueue_pairs": 2,
        "mtu": 9000,
        "status_names": ["LINK_UP"],
    }
    assert (blk_info["device_type"], blk_info["device_type_source"]) == ("blk", "features")
    assert {"RO", "FLUSH", "MQ"} <= set(blk_info["feature_names"])
    assert blk_info["queues"] == 2
    config = blk_info["config"]
    assert config["capacity_bytes"] == 8 << 20
    assert config["num_queues"] == 2
    assert config["blk_size"] == 512


def test_text_output_names_every_field(peers: PeerPool) -> None:
    app = peers.start(PyvdpaRun(["sim-blk,name=b0,size=4M"], peers.sock_dir / "pv"))
    proc = subprocess.run(
        [sys.executable, "-m", "pyvdpa", "info", "--socket", str(app.sockets[0])],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"vhost-user {app.sockets[0]}"
    fields = {line.split()[0]: line.split(None, 1)[1] for line in lines[1:]}
    assert fields["device_type"] == "blk"
    assert fields["queues"] == "1"
    assert "capacity=8192" in fields["config"] and "capacity_bytes=4194304" in fields["config"]
    assert fields["queue_size"] == "-"


def test_no_backend_is_one_line_error(sock_dir: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pyvdpa", "info", "--socket", str(sock_dir / "none.sock")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyvdpa: error: "), lines
