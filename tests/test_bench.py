"""The benchmark's own machinery: reading testpmd's reports, summing up, the served back-end.

The benchmark itself needs DPDK and minutes of two quiet cores; these tests
check what it computes from what it reads, and that the back-end process it
measures starts, serves and stops.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from pyvdpa import bench
from pyvdpa.bench import Case, Measurement, Result, summarise
from pyvdpa.dataplane import kernels as k
from pyvdpa.dataplane.engine import Engine
from pyvdpa.dataplane.kernels.net import POOL_SLOT, POOL_SLOTS
from pyvdpa.dataplane.net import EngineNetDevice, generated_frame
from pyvdpa.drive.session import Session
from pyvdpa.errors import ConfigError
from pyvdpa.vdev import parse_vdev
from pyvdpa.vdpa.driver import SimNetDriver
from pyvdpa.vhost_user.frontend import Frontend
from pyvdpa.virtio.constants import VirtioFeature

REPORT = """
Port statistics ====================================
  ######################## NIC statistics for port 0  ########################
  RX-packets: {rx}          RX-missed: 0          RX-bytes:  0
  RX-errors: 0
  RX-nombuf:  0
  TX-packets: {tx}   TX-errors: 0          TX-bytes:  2115606528

  Throughput (since last show)
  Rx-pps:            0          Rx-bps:            0
  Tx-pps:     16526196          Tx-bps:   8461412456
  ############################################################################
"""


class _Printed:
    """Stands in for a testpmd process: lines with the time each was read."""

    def __init__(self, reports: list[tuple[float, int, int]]) -> None:
        self.lines: list[tuple[float, str]] = []
        for stamp, rx, tx in reports:
            for line in REPORT.format(rx=rx, tx=tx).splitlines(keepends=True):
                self.lines.append((stamp, line))

    def snapshot(self) -> list[tuple[float, str]]:
        return list(self.lines)


def test_statistics_reports_are_read_with_their_time() -> None:
    printed = _Printed([(10.0, 0, 100), (11.0, 5, 1_000_100), (12.0, 9, 2_000_100)])
    samples = bench._stats_samples(printed, "tx_packets")  # type: ignore[arg-type]
    assert samples == [(10.0, 100), (11.0, 1_000_100), (12.0, 2_000_100)]
    assert bench._stats_samples(printed, "rx_packets")[1:] == [(11.0, 5), (12.0, 9)]  # type: ignore[arg-type]


def test_rates_ratios_spread_and_flags() -> None:
    case = Case("tx", 1518, "split")
    runs = [Measurement("dpdk", case, n, 2.0) for n in (19_000_000, 21_000_000, 20_000_000)]
    engine = Case("tx", 1518, "split", engine="poll")
    ours = [Measurement("pyvdpa-poll", engine, n, 2.0) for n in (50_000_000, 52_000_000)]
    results = summarise([*runs, *ours])
    dpdk, pyvdpa = results
    assert (dpdk.backend, len(dpdk.runs)) == ("dpdk", 3)
    assert (dpdk.low, dpdk.mpps, dpdk.high) == pytest.approx((9.5, 10.0, 10.5))
    assert dpdk.gbps == pytest.approx(10.0 * 1518 * 8 / 1e3)
    assert pyvdpa.mpps == pytest.approx(25.5)
    # DPDK's runs spread 10.5 %: noisy, but far from deciding the ratio.
    assert bench.flags(pyvdpa, dpdk) == "noisy"
    table = bench._table(results)
    assert "tx-1518-split-1q" in table and "2.55" in table and "9.50/10.00/10.50" in table
    assert "1 / 1" in table
    row = bench._as_json(results, {})["results"][1]  # type: ignore[index]
    assert row["ratio_to_dpdk"] == 2.55 and row["runs_mpps"] == [25.0, 26.0]
    assert (row["mpps_min"], row["mpps_max"], row["flags"]) == (25.0, 26.0, "noisy")


def test_a_ratio_closer_to_one_than_the_spread_decides_nothing() -> None:
    case = Case("loopback", 64, "packed")
    dpdk = Result("dpdk", case, tuple(Measurement("dpdk", case, n, 1.0) for n in (100, 104)))
    ours = Result("pyvdpa-poll", case, tuple(Measurement("x", case, n, 1.0) for n in (101, 103)))
    assert bench.flags(ours, dpdk) == "within-noise"
    assert bench.flags(ours, None) == ""


def test_every_workload_says_what_its_figures_include() -> None:
    assert set(bench.COPIES) == set(bench.INCLUDES) == set(bench.WORKLOADS)
    case = Case("loopback", 64, "split")
    legend = bench._legend([Result("dpdk", case, (Measurement("dpdk", case, 1, 1.0),))])
    assert "loopback:" in legend and "tx:" not in legend


def test_event_modes_run_only_the_small_split_cases() -> None:
    args = bench._parser().parse_args(
        ["--engines", "poll,event", "--sizes", "64,1518", "--isa", "native,generic"]
    )
    cases = bench._cases(args)
    assert len(cases) == 3 * 2 * 2
    assert bench._runs(args, Case("rx", 64, "split")) == [
        ("dpdk", "poll", "native"),
        ("pyvdpa", "poll", "native"),
        ("pyvdpa", "poll", "generic"),
        ("pyvdpa", "event", "native"),
    ]
    assert bench._runs(args, Case("rx", 1518, "packed")) == [
        ("dpdk", "poll", "native"),
        ("pyvdpa", "poll", "native"),
        ("pyvdpa", "poll", "generic"),
    ]
    assert bench._runs(args, Case("drive", 64, "split")) == [
        ("dpdk", "poll", "native"),
        ("pyvdpa", "poll", "native"),
    ]


def test_in_order_off_adds_the_smallest_frames_only() -> None:
    args = bench._parser().parse_args(["--in-order", "on,off", "--workloads", "tx"])
    names = [case.name for case in bench._cases(args)]
    assert names == [
        "tx-64-split-1q",
        "tx-64-split-1q-io0",
        "tx-1518-split-1q",
        "tx-64-packed-1q",
        "tx-64-packed-1q-io0",
        "tx-1518-packed-1q",
    ]


def test_generic_isa_compiles_apart_from_the_native_kernels() -> None:
    assert "NUMBA_CPU_NAME" not in bench.isa_env("native") or "NUMBA_CPU_NAME" in os.environ
    env = bench.isa_env("generic")
    assert env["NUMBA_CPU_NAME"] == "generic"
    assert env["NUMBA_CACHE_DIR"] == str(bench.GENERIC_CACHE)
    assert env["NUMBA_CACHE_DIR"] != os.environ.get("NUMBA_CACHE_DIR")


def test_backend_labels() -> None:
    assert bench.backend_label("dpdk", "poll", "generic") == "dpdk"
    assert bench.backend_label("pyvdpa", "poll") == "pyvdpa-poll"
    assert bench.backend_label("pyvdpa", "poll", "generic") == "pyvdpa-poll-generic"


def test_drive_runs_the_compiled_driver_pinned_beside_virtio_user() -> None:
    config = bench.BenchConfig()
    argv = bench._drive_argv("/tmp/x.sock", Case("drive", 1518, "packed"), config)
    assert argv[:3] == ["taskset", "-c", str(config.backend_cpu)]
    assert argv[argv.index("--cpus") + 1] == str(config.driver_cpu)
    assert argv[argv.index("--burst") + 1] == str(bench.BURST)
    assert argv[argv.index("--engine") + 1] == "compiled"
    assert "--packed" in argv and "--frame-size" in argv


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(SystemExit):
        bench._parser().parse_args(["--rings", "spiral"])


def test_backend_is_pyvdpa_run_answering_then_stopping_on_sigint(sock_dir: Path) -> None:
    """The benchmark measures ``pyvdpa run`` as a user starts it."""
    iface = sock_dir / "net"
    argv = bench._serve_argv(
        str(iface), "gen", frame=128, queues=1, engine="poll", devices=2, cpu=0, burst=32,
        main_cpu=0,
    )  # fmt: skip
    # The worker pinned as testpmd pins its forwarding lcore, the rest as its main lcore.
    assert argv[:3] == ["taskset", "-c", "0"]
    assert argv[4:8] == ["-m", "pyvdpa", "run", "--engine"]
    assert argv[argv.index("--cpus") + 1] == "0"
    assert "sim-net,mode=gen,queues=1,frame-size=128,burst=32,name=net1" in argv
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not all(Path(f"{iface}{i}").exists() for i in range(2)):
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.05)
        for i in range(2):
            with Session(Frontend.connect(f"{iface}{i}"), memory_size=1 << 20) as session:
                version = int(VirtioFeature.VERSION_1)
                assert session.negotiate(version, version) & version
        process.send_signal(signal.SIGINT)
        assert process.wait(10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_result_key_ignores_the_engine() -> None:
    result = Result("pyvdpa-event", Case("rx", 64, "split", 2, "event"), ())
    assert result.key == ("rx", 64, "split", 2, True)


def test_start_time_is_measured_to_the_listening_socket() -> None:
    started = time.monotonic()
    seconds = bench.measure_start(bench.BenchConfig(), runs=1)
    assert 0 < seconds < time.monotonic() - started


def test_every_side_uses_one_burst_and_virtio_user_its_defaults() -> None:
    assert bench.BURST == 32
    case = bench.Case("loopback", 64, "packed")
    vdev = bench._driver_vdev("/tmp/x", case)
    assert "in_order" not in vdev and "mrg_rxbuf" not in vdev and "packed_vq=1" in vdev
    assert "in_order=0" in bench._driver_vdev("/tmp/x", replace(case, in_order=False))
    assert f"--burst={bench.BURST}" in bench._driver_args(case)
    argv = bench._serve_argv("/tmp/n", "drop", frame=64, queues=1, engine="poll", devices=1,
                             cpu=1, burst=bench.BURST)  # fmt: skip
    assert f"sim-net,mode=drop,queues=1,burst={bench.BURST},name=net0" in argv


def test_a_device_burst_reaches_its_units_and_is_bounded() -> None:
    with Engine("event") as engine:
        device = EngineNetDevice(mode="gen", engine=engine, burst=7, frame_size=1518)
        try:
            assert device.burst == 7 and device.frame_size == 1518
            # gen copies from a pool of templates, one per 2 KiB slot.
            frame = np.frombuffer(generated_frame(1518, device.mac), dtype=np.uint8)
            assert device._frame.shape == (POOL_SLOTS, POOL_SLOT)
            assert all((row[:1518] == frame).all() for row in device._frame)
            assert int(device._port(0).unit[k.U_BURST]) == 7
        finally:
            device.close()
        assert EngineNetDevice(mode="drop", engine=engine)._frame.shape[0] == 1
        for bad in (0, k.MAX_BURST + 1):
            with pytest.raises(ConfigError, match="burst"):
                EngineNetDevice(mode="drop", engine=engine, burst=bad)
    with pytest.raises(ConfigError, match="burst"):
        SimNetDriver().build(parse_vdev("sim-net,mode=drop,burst=0"))
