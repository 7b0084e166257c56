"""The benchmark's own machinery: reading testpmd's reports, summing up, the served back-end.

The benchmark itself needs DPDK and minutes of two quiet cores; these tests
check what it computes from what it reads, and that the back-end process it
measures starts, serves and stops.
"""

from __future__ import annotations

import inspect
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pyvdpa import bench
from pyvdpa.bench import Case, Measurement, Result, summarise
from pyvdpa.dataplane.engine import Engine
from pyvdpa.drive.session import Session
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


def test_rates_and_ratios() -> None:
    case = Case("tx", 1518, "split")
    runs = [Measurement("dpdk", case, n, 2.0) for n in (10_000_000, 30_000_000, 20_000_000)]
    engine = Case("tx", 1518, "split", engine="poll")
    ours = Measurement("pyvdpa-poll", engine, 50_000_000, 2.0)
    results = summarise([*runs, ours])
    dpdk, pyvdpa = results
    assert (dpdk.backend, len(dpdk.runs)) == ("dpdk", 3)
    assert dpdk.mpps == pytest.approx(10.0)
    assert dpdk.gbps == pytest.approx(10.0 * 1518 * 8 / 1e3)
    assert pyvdpa.mpps == pytest.approx(25.0)
    table = bench._table(results)
    assert "tx-1518-split-1q" in table and "2.50" in table
    row = bench._as_json(results, {})["results"][1]  # type: ignore[index]
    assert row["ratio_to_dpdk"] == 2.5 and row["runs_mpps"] == [25.0]


def test_event_modes_run_only_the_small_split_cases() -> None:
    args = bench._parser().parse_args(["--engines", "poll,event", "--sizes", "64,1518"])
    cases = bench._cases(args)
    assert len(cases) == 3 * 2 * 2
    assert bench._runs(args, Case("rx", 64, "split")) == [
        ("dpdk", "poll"),
        ("pyvdpa", "poll"),
        ("pyvdpa", "event"),
    ]
    assert bench._runs(args, Case("rx", 1518, "packed")) == [("dpdk", "poll"), ("pyvdpa", "poll")]


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(SystemExit):
        bench._parser().parse_args(["--rings", "spiral"])


def test_backend_is_pyvdpa_run_answering_then_stopping_on_sigint(sock_dir: Path) -> None:
    """The benchmark measures ``pyvdpa run`` as a user starts it."""
    iface = sock_dir / "net"
    argv = bench._serve_argv(
        str(iface), "gen", frame=128, queues=1, engine="poll", devices=2, cpu=0
    )
    assert argv[1:5] == ["-m", "pyvdpa", "run", "--engine"]
    # Only the worker is pinned, as testpmd pins its forwarding lcore.
    assert argv[argv.index("--cpus") + 1] == "0"
    assert "sim-net,mode=gen,queues=1,frame-size=128,name=net1" in argv
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
    assert result.key == ("rx", 64, "split", 2)


def test_start_time_is_measured_to_the_listening_socket() -> None:
    started = time.monotonic()
    seconds = bench.measure_start(bench.BenchConfig(), runs=1)
    assert 0 < seconds < time.monotonic() - started


def test_every_side_uses_the_engine_burst_and_virtio_user_in_order() -> None:
    engine_burst = inspect.signature(Engine).parameters["burst"].default
    assert engine_burst == bench.BURST
    case = bench.Case("loopback", 64, "packed")
    assert "in_order=1" in bench._driver_vdev("/tmp/x", case)
    assert "in_order=0" in bench._driver_vdev("/tmp/x", case, in_order=False)
    assert f"--burst={engine_burst}" in bench._driver_args(case)
