#!/usr/bin/env python3
"""What an added device costs a running ``pyvdpa run``: memory, and CPU while idle.

For each engine mode (``event``, ``adaptive``, ``poll``) the script starts
``pyvdpa run --engine MODE`` with a control socket of its own and no
device, then:

* adds one sim-net device (the first one loads the compiled programs and
  starts the worker: a one-time cost), then N more, half sim-net
  (loopback) and half sim-blk (a 1 MiB RAM disk, its pages untouched),
  through the control socket (``dev_add``), and reports the resident set
  size (VmRSS) growth per added device after the first;
* connects a driver to one sim-net device (rings set up and enabled, no
  traffic) and reports the process's CPU time over a window, as a share
  of one core: what an idle device with a driver attached costs.

A poll-mode worker spins by design (it owns its core); its figure is
reported, not judged.  Usage: ``scripts/footprint.py [DEVICES] [SECONDS]``
(defaults 32 and 10).  Prints a Markdown table and a JSON object.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pyvdpa.drive.session import Session
from pyvdpa.manage.client import ControlClient
from pyvdpa.vhost_user.frontend import Frontend
from pyvdpa.virtio.constants import DeviceId, VirtioFeature

MODES = ("event", "adaptive", "poll")
TICKS = os.sysconf("SC_CLK_TCK")


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def _wait_for(path: Path, proc: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"pyvdpa run did not serve {path}")
        time.sleep(0.1)


def measure(mode: str, devices: int, seconds: float) -> dict[str, float]:
    """One engine mode's figures."""
    work = Path(tempfile.mkdtemp(prefix="pvfp-", dir="/tmp"))
    control = work / "control.sock"
    argv = [sys.executable, "-m", "pyvdpa", "run", "--engine", mode, "--control", str(control)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(control, proc)
        with ControlClient(control) as client:
            client.call("dev_add", {"name": "net0", "mgmtdev": "sim-net"})
            time.sleep(1.0)
            base = _rss_kib(proc.pid)
            for number in range(1, devices + 1):
                if number % 2:
                    client.call("dev_add", {"name": f"net{number}", "mgmtdev": "sim-net"})
                else:
                    params = {"name": f"blk{number}", "mgmtdev": "sim-blk", "size": "1M"}
                    client.call("dev_add", params)
            time.sleep(1.0)
            per_device = (_rss_kib(proc.pid) - base) / devices
        with Session(Frontend.connect(work / "net0.sock"), memory_size=4 << 20) as session:
            session.negotiate(VirtioFeature.VERSION_1, 0, device=DeviceId.NET)
            for index in range(2):
                session.setup_ring(index, 256)
            session.enable_rings()
            time.sleep(1.0)
            before = _cpu_seconds(proc.pid)
            time.sleep(seconds)
            idle = (_cpu_seconds(proc.pid) - before) / seconds
        return {"rss_kib_per_device": round(per_device, 1), "idle_core_share": round(idle, 4)}
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> int:
    devices = int(sys.argv[1]) if len(sys.argv) > 1 else 32
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 10.0
    results = {mode: measure(mode, devices, seconds) for mode in MODES}
    print(f"| engine | RSS per added device ({devices} added) | CPU with one idle device |")
    print("| --- | --- | --- |")
    for mode, figures in results.items():
        rss = figures["rss_kib_per_device"] / 1024
        print(f"| {mode} | {rss:.2f} MiB | {figures['idle_core_share'] * 100:.2f} % of a core |")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
