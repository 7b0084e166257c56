"""``pyvdpa check`` against back-ends written by others, and pyvdpa's own.

The real command runs as a program of its own against DPDK 22.11's
net_vhost (testpmd forwarding every frame back on its one port),
qemu-storage-daemon 7.2's vhost-user-blk export and ``pyvdpa run``'s
sim-net and sim-blk devices.  What each does with the cases is checked
where it is known and stable: what they offer decides which cases apply,
the rules each is known to follow pass, and the ones each breaks fail with
the reason, never a traceback.
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
from pyvdpa.check.cases import case_ids

pytestmark = pytest.mark.peers


def _check(sock: Path, *options: str) -> tuple[dict[str, Any], dict[str, tuple[str, str]]]:
    proc = subprocess.run(
        [sys.executable, "-m", "pyvdpa", "check", "--socket", str(sock), "--json", *options],
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert proc.returncode in (0, 1), proc.stderr
    assert "Traceback" not in proc.stderr
    progress = [line for line in proc.stderr.splitlines() if line.startswith("[")]
    # One progress line per case, as it ends: "[ 3/56] neg.protocol  pass ...".
    assert [line.split("]", 1)[1].split()[0] for line in progress] == case_ids()
    report: dict[str, Any] = json.loads(proc.stdout)
    results = {r["id"]: (r["verdict"], r["detail"]) for r in report["results"]}
    assert list(results) == case_ids()
    return report, results


def _verdicts(results: dict[str, tuple[str, str]], verdict: str) -> set[str]:
    return {case for case, (found, _) in results.items() if found == verdict}


def test_dpdk_net_vhost(peers: PeerPool) -> None:
    sock = peers.sock_dir / "vh.sock"
    backend = peers.start(net_vhost(sock, mode="io", app_args=["--port-topology=loop"]))
    backend.start_forwarding()

    report, results = _check(sock)

    assert report["device"] == "net" and report["gone_after"] is None
    assert _verdicts(results, "n/a") == {
        "mem.max-slots",
        "mem.add-rem",
        "reset.device",
        "iotlb.miss",
        "config.read",
    }
    assert results["neg.status"][0] == "pass"
    # The data path with every layout and option DPDK offers, frames coming back.
    for case in ("data.packed", "data.indirect-packed", "data.in-order", "data.mrg-rxbuf"):
        assert results[case][0] == "pass", results[case]
    assert results["log.dirty"][0] == "pass"
    assert results["ring.base"] == ("pass", "vring 1: 13 after 13 chains")
    # DPDK processes no ring until the device is ready (every ring enabled).
    assert results["ring.disabled-tx"][0] == "fail"
    # It reads SET_FEATURES' payload without checking its size, and takes any version.
    assert results["bad.short"] == ("fail", "accepted (REPLY_ACK 0)")
    assert results["bad.version"] == ("fail", "accepted (REPLY_ACK 0)")
    assert _verdicts(results, "fail") == {"ring.disabled-tx", "bad.short", "bad.version"}


def test_qemu_storage_daemon_vhost_user_blk(peers: PeerPool) -> None:
    disk = peers.workdir / "disk.img"
    with disk.open("wb") as image:
        image.truncate(16 << 20)
    sock = peers.sock_dir / "blk.sock"
    daemon = peers.start(StorageDaemon(disk, sock))

    report, results = _check(sock)

    assert report["device"] == "blk"
    for case in ("data.split", "data.indirect", "data.event-idx", "mem.add-rem", "log.dirty"):
        assert results[case][0] == "pass", results[case]
    verdict, detail = results["config.read"]
    assert verdict == "pass" and "capacity=32768" in detail
    assert results["data.packed"] == ("n/a", "RING_PACKED not offered")
    # libvhost-user answers REPLY_ACK 0 whatever the request did.
    assert results["neg.reply-ack-fail"][0] == "fail"
    assert results["region.pipe"] == ("fail", "accepted (REPLY_ACK 0)")
    # SET_VRING_NUM for vring 1024 takes the daemon down (it runs last).
    verdict, detail = results["bad.vring-index"]
    assert verdict == "fail" and "back-end no longer serving" in detail
    assert report["gone_after"] == "bad.vring-index"
    assert not daemon.running


def test_pyvdpa_run_devices(peers: PeerPool) -> None:
    app = peers.start(
        PyvdpaRun(
            ["sim-net,name=n0,mode=loopback", "sim-blk,name=b0,size=8M"],
            peers.sock_dir / "pv",
        )
    )
    net, blk = app.sockets

    net_report, net_results = _check(net, "--type", "net")
    blk_report, blk_results = _check(blk)

    # The one rule pyvdpa breaks: a started but disabled TX ring is left alone.
    assert _verdicts(net_results, "fail") == {"ring.disabled-tx"}
    assert _verdicts(net_results, "n/a") == {"neg.status"}
    assert net_results["data.in-order"][0] == "pass"  # sim-net offers VIRTIO_F_IN_ORDER
    assert _verdicts(blk_results, "fail") == set()
    assert blk_report["device"] == "blk" and net_report["gone_after"] is None
    for results in (net_results, blk_results):
        assert results["iotlb.miss"][0] == "pass"
        assert results["reset.device"][0] == "pass"
