"""Side-by-side benchmark of pyvdpa's compiled data path and DPDK's vhost back-end.

Usage::

    python -m pyvdpa.bench [--duration 4] [--warmup 2] [--json results.json]
                           [--workloads tx,rx,loopback] [--sizes 64,1518]
                           [--rings split,packed] [--queues 1] [--engines poll,event]
                           [--in-order on|off] [--no-extras]

One run measures every case against both back-ends, prints a table and
writes the figures as JSON.  It needs ``dpdk-testpmd`` (DPDK 22.11 or
later) and at least two cores; with more, ``--cpus`` picks them.

Method
------
The driver is DPDK's own virtio driver, ``net_virtio_user`` in
``dpdk-testpmd`` (non-interactive, ``--stats-period 1``), forwarding on the
first core while its main thread sits on the second.  The back-end under
test forwards on the second core:

* DPDK: ``dpdk-testpmd`` with ``net_vhost``, forwarding on the second core
  (``rxonly`` to consume, ``txonly`` to generate, ``io`` to loop back);
* pyvdpa: ``pyvdpa run --vdev sim-net,mode=drop|gen|loopback --engine poll``,
  as a user starts it (:class:`~pyvdpa.dataplane.net.EngineNetDevice` on the
  process's engine worker), with ``--cpus`` pinning that worker to the
  second core, as testpmd pins its forwarding lcore; the control plane, idle
  while traffic runs, is left to the system like testpmd's main lcore.

Workloads: ``tx`` (virtio-user ``txonly`` → back-end consumes), ``rx``
(back-end generates → virtio-user ``rxonly``), ``loopback`` (virtio-user
``io`` forwarding after ``--tx-first``; the back-end sends every frame
back; frames are addressed to the pyvdpa device's MAC so that its
vdpa_sim_net filter accepts them).  Both back-ends see the same driver
configuration, virtio-user's default one: ``mrg_rxbuf=1`` and
``in_order=1`` (both back-ends offer ``VIRTIO_F_IN_ORDER``, so both
negotiate it; ``--in-order off`` measures without).  Every side works in
bursts of :data:`BURST` chains: testpmd's ``--burst`` on the driver and on
DPDK's back-end, and the burst of pyvdpa's engine.

The rate is read from virtio-user's port counters: packets transmitted
(``tx``) or received (``rx``, ``loopback``) between the first statistics
report after the warm-up and the last one within the measurement window,
divided by the time between them.  Gbps counts frame bytes as testpmd does
(Ethernet header and payload, no FCS, preamble or gap).

Extras (skipped with ``--no-extras``): the CPU an idle event-mode device
uses (a connected virtio-user that sends nothing), the resident memory of
one pyvdpa process serving 1 and 64 connected devices (anonymous and file
pages; the guest memory mappings are shared memory and not counted), and
the warm start time (process launch to listening socket, kernel cache
present).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyvdpa.errors import ConfigError, PyvdpaError

if TYPE_CHECKING:
    from pyvdpa.drive.session import Session

__all__ = [
    "BURST",
    "BenchConfig",
    "Case",
    "Measurement",
    "Result",
    "main",
    "run_case",
    "summarise",
]

WORKLOADS = ("tx", "rx", "loopback")
RINGS = ("split", "packed")
ENGINE_MODES = ("poll", "event", "adaptive")
DEVICE_MAC = "52:54:00:12:34:56"
BURST = 64
"""Chains every side handles per pass: pyvdpa's engine burst, given to each testpmd too."""

_USER_MODE = {"tx": "txonly", "rx": "rxonly", "loopback": "io"}
_VHOST_MODE = {"tx": "rxonly", "rx": "txonly", "loopback": "io"}
_PYVDPA_MODE = {"tx": "drop", "rx": "gen", "loopback": "loopback"}
_COUNTER = {"tx": "tx_packets", "rx": "rx_packets", "loopback": "rx_packets"}
_STATS_BLOCK = re.compile(
    r"NIC statistics for port (?P<port>\d+)\s+#+\s+"
    r"RX-packets:\s*(?P<rx_packets>\d+).*?"
    r"TX-packets:\s*(?P<tx_packets>\d+)",
    re.S,
)
_START_TIMEOUT = 60.0
_STOP_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class Case:
    """One workload configuration."""

    workload: str
    frame: int
    ring: str
    queues: int = 1
    engine: str = "poll"

    @property
    def name(self) -> str:
        """A short label: ``tx-64-split-1q``."""
        return f"{self.workload}-{self.frame}-{self.ring}-{self.queues}q"


@dataclass(frozen=True, slots=True)
class Measurement:
    """A measured rate for one case and back-end."""

    backend: str
    case: Case
    packets: int
    seconds: float

    @property
    def mpps(self) -> float:
        """Million packets per second."""
        return self.packets / self.seconds / 1e6 if self.seconds > 0 else 0.0

    @property
    def gbps(self) -> float:
        """Frame bits per second, in Gbit/s."""
        return self.mpps * self.case.frame * 8 / 1e3


@dataclass(frozen=True, slots=True)
class BenchConfig:
    """Knobs of one benchmark run."""

    duration: float = 4.0
    warmup: float = 2.0
    driver_cpu: int = 0
    backend_cpu: int = 1
    in_order: bool = True
    workdir: Path = field(default_factory=lambda: Path(tempfile.gettempdir()))


# --------------------------------------------------------------------------- processes


class _Process:
    """A child process in its own session, its merged output collected line by line."""

    def __init__(self, argv: Sequence[str], *, env: dict[str, str] | None = None) -> None:
        self.argv = list(argv)
        self.lines: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        self._proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
            text=True,
            errors="replace",
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self._proc.pid

    def _read(self) -> None:
        stream = self._proc.stdout
        assert stream is not None
        for line in stream:
            with self._cond:
                self.lines.append((time.monotonic(), line))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def snapshot(self) -> list[tuple[float, str]]:
        """The lines printed so far, each with the time it was read."""
        with self._cond:
            return list(self.lines)

    def text(self) -> str:
        """Everything printed so far."""
        return "".join(line for _, line in self.snapshot())

    def alive(self) -> bool:
        """Whether the process still runs."""
        return self._proc.poll() is None

    def stop(self) -> None:
        """SIGINT (testpmd and serve exit cleanly on it), then SIGKILL the group."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGINT)
            try:
                self._proc.wait(_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait()
        self._reader.join(_STOP_TIMEOUT)

    def tail(self, chars: int = 3000) -> str:
        """The end of the output, for error messages."""
        return self.text()[-chars:]


def _wait_for(
    what: str, ready: Callable[[], bool], process: _Process, timeout: float = _START_TIMEOUT
) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if not process.alive():
            raise PyvdpaError(f"{what} exited early:\n{process.tail()}")
        if time.monotonic() > deadline:
            raise PyvdpaError(f"{what} not ready after {timeout:.0f} s:\n{process.tail()}")
        time.sleep(0.05)


def _listening(*paths: str) -> Callable[[], bool]:
    """A readiness check: every path is a socket."""
    return lambda: all(Path(path).is_socket() for path in paths)


def _runtime_dir(prefix: str) -> Path:
    base = Path("/var/run/dpdk") if os.geteuid() == 0 else None
    if base is None:
        base = Path(os.environ.get("XDG_RUNTIME_DIR", "/tmp")) / "dpdk"
    return base / prefix


_instances = iter(range(1 << 30))


@contextlib.contextmanager
def _testpmd(
    vdev: str,
    *,
    forward: str,
    fwd_cpu: int,
    main_cpu: int,
    queues: int,
    extra: Sequence[str] = (),
) -> Iterator[_Process]:
    """``dpdk-testpmd`` forwarding with one virtual device, non-interactive."""
    prefix = f"pyvdpa-bench-{os.getpid()}-{next(_instances)}"
    argv = [
        "stdbuf", "-oL", "-eL", "dpdk-testpmd",
        "-l", f"{fwd_cpu},{main_cpu}", "--main-lcore", str(main_cpu),
        "--no-pci", "--no-huge", "-m", "1024", f"--file-prefix={prefix}",
        "--vdev", vdev, "--",
        f"--forward-mode={forward}", "--nb-cores=1", f"--rxq={queues}", f"--txq={queues}",
        "--no-mlockall", "--stats-period", "1", *extra,
    ]  # fmt: skip
    process = _Process(argv)
    try:
        yield process
    finally:
        process.stop()
        shutil.rmtree(_runtime_dir(prefix), ignore_errors=True)


def _serve_argv(
    iface: str, mode: str, *, frame: int, queues: int, engine: str, devices: int, cpu: int | None
) -> list[str]:
    """The back-end as a user starts it: ``pyvdpa run --vdev sim-net,... --engine ...``."""
    vdev = f"sim-net,mode={mode},queues={queues}" + (
        f",frame-size={frame}" if mode == "gen" else ""
    )
    argv = [sys.executable, "-m", "pyvdpa", "run", "--engine", engine, "--iface", iface]
    if cpu is not None:
        argv += ["--cpus", str(cpu)]
    for i in range(devices):
        argv += ["--vdev", f"{vdev},name=net{i}"]
    return argv


@contextlib.contextmanager
def _pyvdpa(
    iface: str,
    mode: str,
    *,
    frame: int = 64,
    queues: int = 1,
    engine: str = "poll",
    devices: int = 1,
    cpu: int | None = None,
) -> Iterator[_Process]:
    """A pyvdpa back-end process; returns once every socket listens."""
    argv = _serve_argv(
        iface, mode, frame=frame, queues=queues, engine=engine, devices=devices, cpu=cpu
    )
    process = _Process(argv)
    try:
        _wait_for("pyvdpa run", _listening(*(f"{iface}{i}" for i in range(devices))), process)
        yield process
    finally:
        process.stop()


# --------------------------------------------------------------------------- measuring


def _stats_samples(process: _Process, counter: str) -> list[tuple[float, int]]:
    """(time, counter) of every complete statistics report printed so far."""
    samples = []
    lines = process.snapshot()
    text = "".join(line for _, line in lines)
    offsets = []
    position = 0
    for stamp, line in lines:
        position += len(line)
        offsets.append((position, stamp))
    for found in _STATS_BLOCK.finditer(text):
        end = found.end()
        stamp = next(t for pos, t in offsets if pos >= end)
        samples.append((stamp, int(found[counter])))
    return samples


def _measure(driver: _Process, case: Case, config: BenchConfig) -> tuple[int, float]:
    """Packets counted by the driver over the measurement window, and its length."""
    counter = _COUNTER[case.workload]
    _wait_for(
        "virtio-user statistics",
        lambda: any(n > 0 for _, n in _stats_samples(driver, counter)),
        driver,
    )
    started = time.monotonic()
    window_start = started + config.warmup
    time.sleep(config.warmup + config.duration + 1.2)
    samples = [
        (t, n)
        for t, n in _stats_samples(driver, counter)
        if window_start <= t <= window_start + config.duration + 1.1
    ]
    if len(samples) < 2:
        raise PyvdpaError(f"{case.name}: too few statistics reports:\n{driver.tail()}")
    (t0, n0), (t1, n1) = samples[0], samples[-1]
    return n1 - n0, t1 - t0


def _driver_vdev(path: str, case: Case, in_order: bool = True) -> str:
    packed = int(case.ring == "packed")
    return (
        f"net_virtio_user0,path={path},queues={case.queues},packed_vq={packed},"
        f"mrg_rxbuf=1,in_order={int(in_order)}"
    )


def _driver_args(case: Case) -> list[str]:
    extra = [f"--txpkts={case.frame}", f"--eth-peer=0,{DEVICE_MAC}", f"--burst={BURST}"]
    if case.workload == "loopback":
        extra.append("--tx-first")
    return extra


def run_case(case: Case, backend: str, config: BenchConfig) -> Measurement:
    """Measure one case against ``backend`` (``dpdk`` or ``pyvdpa``)."""
    sock_dir = Path(tempfile.mkdtemp(prefix="pvb-", dir="/tmp"))

    def driver(path: str) -> contextlib.AbstractContextManager[_Process]:
        return _testpmd(
            _driver_vdev(path, case, config.in_order),
            forward=_USER_MODE[case.workload],
            fwd_cpu=config.driver_cpu,
            main_cpu=config.backend_cpu,
            queues=case.queues,
            extra=_driver_args(case),
        )

    try:
        if backend == "dpdk":
            path = str(sock_dir / "vhost.sock")
            vhost = f"net_vhost0,iface={path},queues={case.queues},client=0"
            with _testpmd(
                vhost,
                forward=_VHOST_MODE[case.workload],
                fwd_cpu=config.backend_cpu,
                main_cpu=config.driver_cpu,
                queues=case.queues,
                extra=[f"--txpkts={case.frame}", f"--burst={BURST}"],
            ) as server:
                _wait_for("net_vhost", _listening(path), server)
                with driver(path) as user:
                    packets, seconds = _measure(user, case, config)
        else:
            iface = str(sock_dir / "net")
            with (
                _pyvdpa(
                    iface,
                    _PYVDPA_MODE[case.workload],
                    frame=case.frame,
                    queues=case.queues,
                    engine=case.engine,
                    cpu=config.backend_cpu,
                ),
                driver(f"{iface}0") as user,
            ):
                packets, seconds = _measure(user, case, config)
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)
    label = backend if backend == "dpdk" else f"pyvdpa-{case.engine}"
    return Measurement(label, case, packets, seconds)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def _rss_kib(pid: int) -> dict[str, int]:
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
            values[key] = int(rest.split()[0])
    return values


def measure_idle_cpu(config: BenchConfig, engine: str = "event", seconds: float = 5.0) -> float:
    """Percent of one core an idle, connected device uses (virtio-user sends nothing)."""
    sock_dir = Path(tempfile.mkdtemp(prefix="pvb-", dir="/tmp"))
    case = Case("rx", 64, "split", engine=engine)
    try:
        iface = str(sock_dir / "net")
        with (
            _pyvdpa(iface, "loopback", engine=engine, cpu=config.backend_cpu) as server,
            _testpmd(
                _driver_vdev(f"{iface}0", case),
                forward="rxonly",
                fwd_cpu=config.driver_cpu,
                main_cpu=config.backend_cpu,
                queues=1,
            ) as driver,
        ):
            _wait_for("virtio-user", lambda: "NIC statistics" in driver.text(), driver)
            time.sleep(1.0)
            before = _cpu_seconds(server.pid)
            time.sleep(seconds)
            used = _cpu_seconds(server.pid) - before
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)
    return 100.0 * used / seconds


def _connect_devices(iface: str, count: int) -> list[Session]:
    # Imported here: the serve process, which imports this module, needs none of it.
    from pyvdpa.drive.session import Session
    from pyvdpa.vhost_user.frontend import Frontend
    from pyvdpa.virtio.constants import VirtioFeature

    sessions = []
    for i in range(count):
        session = Session(Frontend.connect(f"{iface}{i}"), memory_size=1 << 20)
        session.negotiate(int(VirtioFeature.VERSION_1), int(VirtioFeature.VERSION_1))
        session.setup_ring(0, 64)
        session.setup_ring(1, 64)
        session.enable_rings()
        sessions.append(session)
    return sessions


def measure_memory(config: BenchConfig, devices: int = 64) -> dict[str, float]:
    """Resident memory of one process serving 1 and ``devices`` connected devices."""
    results: dict[str, float] = {}
    for count in (1, devices):
        sock_dir = Path(tempfile.mkdtemp(prefix="pvb-", dir="/tmp"))
        try:
            iface = str(sock_dir / "net")
            with _pyvdpa(iface, "loopback", engine="event", devices=count) as server:
                sessions = _connect_devices(iface, count)
                try:
                    time.sleep(1.0)
                    rss = _rss_kib(server.pid)
                finally:
                    for session in sessions:
                        session.close()
        finally:
            shutil.rmtree(sock_dir, ignore_errors=True)
        private = rss["RssAnon"] + rss["RssFile"]
        results[f"rss_kib_{count}"] = private
        results[f"shmem_kib_{count}"] = rss["RssShmem"]
    results["per_device_kib"] = (results[f"rss_kib_{devices}"] - results["rss_kib_1"]) / (
        devices - 1
    )
    return results


def measure_start(config: BenchConfig, runs: int = 3, cold: bool = False) -> float:
    """Median seconds from launching ``serve`` to its socket listening."""
    times = []
    for _ in range(runs):
        sock_dir = Path(tempfile.mkdtemp(prefix="pvb-", dir="/tmp"))
        cache = tempfile.mkdtemp(prefix="pvb-cache-") if cold else None
        env = dict(os.environ)
        if cache is not None:
            env["NUMBA_CACHE_DIR"] = cache
        try:
            iface = str(sock_dir / "net")
            argv = _serve_argv(
                iface, "loopback", frame=64, queues=1, engine="event", devices=1, cpu=None
            )
            started = time.monotonic()
            process = _Process(argv, env=env)
            try:
                _wait_for("pyvdpa run", _listening(f"{iface}0"), process, 600)
                times.append(time.monotonic() - started)
            finally:
                process.stop()
        finally:
            shutil.rmtree(sock_dir, ignore_errors=True)
            if cache is not None:
                shutil.rmtree(cache, ignore_errors=True)
    return statistics.median(times)


# --------------------------------------------------------------------------- reporting


@dataclass(frozen=True, slots=True)
class Result:
    """Every run of one case against one back-end, summarised by the median."""

    backend: str
    case: Case
    runs: tuple[Measurement, ...]

    @property
    def mpps(self) -> float:
        """Median million packets per second."""
        return statistics.median(m.mpps for m in self.runs)

    @property
    def gbps(self) -> float:
        """Median frame Gbit/s."""
        return self.mpps * self.case.frame * 8 / 1e3

    @property
    def key(self) -> tuple[str, int, str, int]:
        """What a DPDK result and a pyvdpa result must share to be compared."""
        return (self.case.workload, self.case.frame, self.case.ring, self.case.queues)


def summarise(measurements: Sequence[Measurement]) -> list[Result]:
    """Group the runs by case and back-end, in the order first measured."""
    groups: dict[tuple[str, Case], list[Measurement]] = {}
    for m in measurements:
        groups.setdefault((m.backend, m.case), []).append(m)
    return [Result(backend, case, tuple(runs)) for (backend, case), runs in groups.items()]


def _reference(results: Sequence[Result], result: Result) -> Result | None:
    return next((r for r in results if r.backend == "dpdk" and r.key == result.key), None)


def _table(results: Sequence[Result]) -> str:
    engines = sorted({r.backend for r in results if r.backend != "dpdk"})
    header = f"{'case':<22}{'DPDK Mpps':>11}{'Gbps':>8}"
    for engine in engines:
        header += f"{engine + ' Mpps':>22}{'Gbps':>8}{'ratio':>7}"
    lines = [header, "-" * len(header)]
    keys = list(dict.fromkeys(r.key for r in results))
    for key in keys:
        row = {r.backend: r for r in results if r.key == key}
        dpdk = row.get("dpdk")
        name = Case(*key).name
        line = f"{name:<22}"
        line += f"{dpdk.mpps:>11.2f}{dpdk.gbps:>8.2f}" if dpdk else f"{'-':>11}{'-':>8}"
        for engine in engines:
            r = row.get(engine)
            if r is None:
                line += f"{'-':>22}{'-':>8}{'-':>7}"
                continue
            ratio = f"{r.mpps / dpdk.mpps:.2f}" if dpdk and dpdk.mpps else "-"
            line += f"{r.mpps:>22.2f}{r.gbps:>8.2f}{ratio:>7}"
        lines.append(line)
    return "\n".join(lines)


def _as_json(results: Sequence[Result], extras: dict[str, object]) -> dict[str, object]:
    rows = []
    for r in results:
        dpdk = _reference(results, r)
        rows.append(
            {
                "backend": r.backend,
                **asdict(r.case),
                "mpps": round(r.mpps, 3),
                "gbps": round(r.gbps, 3),
                "ratio_to_dpdk": round(r.mpps / dpdk.mpps, 3) if dpdk and dpdk.mpps else None,
                "runs_mpps": [round(m.mpps, 3) for m in r.runs],
            }
        )
    return {
        "host": {"cpus": os.cpu_count(), "machine": os.uname().machine},
        "results": rows,
        "extras": extras,
    }


# --------------------------------------------------------------------------- commands


def _csv(choices: Sequence[str] | None, cast: type = str) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        items = [cast(item) for item in text.split(",") if item]
        if choices is not None:
            bad = [item for item in items if item not in choices]
            if bad:
                raise argparse.ArgumentTypeError(f"{bad} not in {', '.join(choices)}")
        return items

    return parse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyvdpa bench", description="pyvdpa's engine against DPDK net_vhost, in one run"
    )
    parser.add_argument("--duration", type=float, default=4.0, help="seconds measured per case")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring")
    parser.add_argument("--workloads", type=_csv(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--sizes", type=_csv(None, int), default=[64, 1518], help="frame bytes")
    parser.add_argument("--rings", type=_csv(RINGS), default=list(RINGS))
    parser.add_argument("--queues", type=_csv(None, int), default=[1], help="queue pairs")
    parser.add_argument(
        "--engines",
        type=_csv(ENGINE_MODES),
        default=["poll"],
        help="pyvdpa engine modes (event/adaptive run the 64-byte split cases only)",
    )
    parser.add_argument("--cpus", type=_csv(None, int), default=[0, 1], help="driver,back-end")
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs per case and back-end (median reported)"
    )
    parser.add_argument(
        "--in-order",
        choices=("on", "off"),
        default="on",
        help="virtio-user's in_order devarg (default on, as virtio-user's own default)",
    )
    parser.add_argument("--json", metavar="FILE", help="write the results here")
    parser.add_argument("--no-extras", action="store_true", help="skip idle CPU, memory, start")
    return parser


def _cases(args: argparse.Namespace) -> list[Case]:
    cases = []
    for queues in args.queues:
        for ring in args.rings:
            for size in args.sizes:
                for workload in args.workloads:
                    cases.append(Case(workload, size, ring, queues))
    return cases


def _runs(args: argparse.Namespace, case: Case) -> list[tuple[str, str]]:
    """(back-end, engine mode) pairs to measure ``case`` with."""
    runs = [("dpdk", "poll")]
    for engine in args.engines:
        if engine == "poll" or (case.frame, case.ring) == (64, "split"):
            runs.append(("pyvdpa", engine))
    return runs


def _bench(args: argparse.Namespace) -> int:
    if shutil.which("dpdk-testpmd") is None:
        raise ConfigError("dpdk-testpmd is not installed (the benchmark's driver and reference)")
    if len(args.cpus) != 2:
        raise ConfigError("--cpus takes two cpus: the driver's and the back-end's")
    config = BenchConfig(
        duration=args.duration,
        warmup=args.warmup,
        driver_cpu=args.cpus[0],
        backend_cpu=args.cpus[1],
        in_order=args.in_order == "on",
    )
    measurements: list[Measurement] = []
    for case in _cases(args):
        for _ in range(args.repeat):
            # Alternate the back-ends, so that a change in the machine's load
            # during the run hits both alike.
            for backend, engine in _runs(args, case):
                run = Case(case.workload, case.frame, case.ring, case.queues, engine)
                m = run_case(run, backend, config)
                print(f"  {run.name:<22} {m.backend:<16} {m.mpps:8.2f} Mpps", flush=True)
                measurements.append(m)
    results = summarise(measurements)
    print()
    print(_table(results))
    extras: dict[str, object] = {}
    if not args.no_extras:
        extras["idle_cpu_percent_event"] = round(measure_idle_cpu(config), 3)
        extras["memory"] = measure_memory(config)
        extras["warm_start_seconds"] = round(measure_start(config), 3)
        print()
        print(f"idle device, event mode: {extras['idle_cpu_percent_event']:.2f} % of a core")
        memory = extras["memory"]
        assert isinstance(memory, dict)
        print(
            f"memory: {memory['rss_kib_1'] / 1024:.1f} MiB with 1 device, "
            f"{memory['rss_kib_64'] / 1024:.1f} MiB with 64, "
            f"{memory['per_device_kib']:.0f} KiB per added device"
        )
        print(f"warm start (launch to listening): {extras['warm_start_seconds']:.2f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(_as_json(results, extras), indent=2) + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: ``pyvdpa bench [...]`` or ``python -m pyvdpa.bench [...]``."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    try:
        return _bench(_parser().parse_args(arguments))
    except (ConfigError, PyvdpaError) as exc:
        print(f"pyvdpa bench: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
