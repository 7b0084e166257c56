#!/usr/bin/env python3
"""``pyvdpa drive net`` txonly against DPDK virtio-user txonly, into the same DPDK net_vhost.

The back-end is ``dpdk-testpmd`` with ``net_vhost`` in rxonly mode (main
lcore 0, forwarding on lcore 1), started afresh for each case.  The drivers:

* DPDK's virtio-user in testpmd txonly (main lcore 1, forwarding on lcore
  0), with ``in_order=0`` (the features pyvdpa negotiates) and ``in_order=1``
  (DPDK's default); its rate is the back-end's received packets over a
  window after a one-second warm-up;
* ``pyvdpa drive net --mode txonly --cpus 0`` with ``--engine compiled``
  and, at 64 bytes, ``--engine python``; its rate is what it reports, and
  the back-end's count must equal its ``tx_packets`` (``counts_match``).

Usage: ``flock /tmp/pyvdpa-heavy.lock scripts/drive-bench.py [SECONDS]``
(default 4).  Needs what scripts/setup.sh installs.  The figures are
indicative: a machine shared with other work moves them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from peers.dpdk import net_vhost, virtio_user  # noqa: E402

DRIVERS = ("virtio-user", "virtio-user-in-order", "compiled", "python")


def _drive(sock: Path, ring: str, size: int, engine: str, seconds: float) -> dict[str, float]:
    argv = [
        sys.executable, "-m", "pyvdpa", "drive", "net", "--socket", str(sock),
        "--mode", "txonly", "--frame-size", str(size), "--duration", str(seconds),
        "--engine", engine, "--cpus", "0", "--json",
        *(["--packed"] if ring == "packed" else []),
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=True)
    figures: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return figures


def measure(ring: str, size: int, driver: str, seconds: float) -> tuple[float, bool]:
    """Packets per second into net_vhost, and whether the back-end counted what was sent."""
    sock_dir = Path(tempfile.mkdtemp(prefix="pvb-", dir="/tmp"))
    sock = sock_dir / "vh.sock"
    try:
        with net_vhost(sock, mode="rxonly") as backend:
            backend.start_forwarding()
            if driver.startswith("virtio-user"):
                with virtio_user(
                    sock,
                    packed=ring == "packed",
                    in_order=driver.endswith("in-order"),
                    mode="txonly",
                    main_lcore=1,
                    app_args=[f"--txpkts={size}"],
                ) as front:
                    front.start_forwarding()
                    time.sleep(1.0)
                    first, began = backend.port_stats()[0].rx_packets, time.monotonic()
                    time.sleep(seconds)
                    last, ended = backend.port_stats()[0].rx_packets, time.monotonic()
                    front.stop_forwarding()
                return (last - first) / (ended - began), True
            figures = _drive(sock, ring, size, driver, seconds)
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline:
                if backend.port_stats()[0].rx_packets >= figures["tx_packets"]:
                    break
                time.sleep(0.1)
            counted = backend.port_stats()[0].rx_packets
            return figures["tx_pps"], counted == figures["tx_packets"]
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


def main() -> None:
    """Measure every case and print one line each."""
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 4.0
    for ring in ("split", "packed"):
        for size in (64, 1518):
            for driver in DRIVERS:
                if driver == "python" and size != 64:
                    continue
                rate, match = measure(ring, size, driver, seconds)
                print(
                    f"{ring:6} {size:5} B  {driver:21} {rate / 1e6:7.3f} Mpps"
                    f"  counts_match={match}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
