"""Side-by-side benchmark of pyvdpa's compiled data path and DPDK's vhost back-end.

Usage::

    python -m pyvdpa.bench [--duration 2] [--warmup 1] [--repeat 5] [--json results.json]
                           [--workloads tx,rx,loopback,drive] [--sizes 64,1518]
                           [--rings split,packed] [--queues 1] [--engines poll,event]
                           [--isa native,generic] [--in-order on,off] [--no-extras]

One run measures every case against both back-ends, prints a table and
writes the figures as JSON.  It needs ``dpdk-testpmd`` (DPDK 22.11 or
later) and at least two cores; with more, ``--cpus`` picks them.

Method
------
The driver is DPDK's own virtio driver, ``net_virtio_user`` in
``dpdk-testpmd`` (non-interactive, ``--stats-period 1``), in its default
configuration (``mrg_rxbuf=1``, ``in_order=1``: both back-ends offer
``VIRTIO_F_IN_ORDER``, so both negotiate it), forwarding on the first core
while its main thread sits on the second.  The back-end under test
forwards on the second core while its other threads sit on the first:

* DPDK: ``dpdk-testpmd`` with ``net_vhost`` (``rxonly`` to consume,
  ``txonly`` to generate, ``io`` to loop back), main lcore on the first core;
* pyvdpa: ``pyvdpa run --vdev sim-net,mode=drop|gen|loopback,burst=32
  --engine poll --cpus 1`` under ``taskset`` to the first core, as a user
  starts it (:class:`~pyvdpa.dataplane.net.EngineNetDevice` on the
  process's engine worker, which ``--cpus`` pins to the second core).

Every side works in bursts of :data:`BURST` chains: testpmd's ``--burst``
on the driver and on DPDK's back-end, ``burst=`` of pyvdpa's device.
pyvdpa's kernels are compiled for this CPU (``--isa native``) and, with
``--isa generic``, for a baseline x86-64 (``NUMBA_CPU_NAME=generic``, SSE2
only, in a cache directory of its own), the class of machine Debian's DPDK
is built for.  ``--in-order off`` adds the 64-byte cases with virtio-user's
``in_order=0``.

Workloads: ``tx`` (virtio-user ``txonly`` → back-end consumes), ``rx``
(back-end generates → virtio-user ``rxonly``), ``loopback`` (virtio-user
``io`` forwarding after ``--tx-first``; the back-end sends every frame
back; frames are addressed to the pyvdpa device's MAC so that its
vdpa_sim_net filter accepts them), and ``drive``: the driver is what is
compared, DPDK net_vhost ``rxonly`` the back-end of both, driven by
virtio-user ``txonly`` and by ``pyvdpa drive net --mode txonly`` (the
compiled driver, its worker pinned to the first core).

Cases are measured ``--repeat`` times, the back-ends interleaved (DPDK,
pyvdpa, generic pyvdpa, DPDK, ...), so that a change in the machine's load
hits them alike; the table gives min / median / max, the ratio of the
medians and flags (:func:`flags`).

The rate is read from testpmd's port counters: the driver's packets
transmitted (``tx``) or received (``rx``, ``loopback``), the back-end's
received (``drive``), between the first statistics report after the
warm-up and the last one within the measurement window, divided by the time
between them.  Gbps counts frame bytes as testpmd does (Ethernet header and
payload, no FCS, preamble or gap).

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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyvdpa.errors import ConfigError, PyvdpaError

if TYPE_CHECKING:
    from pyvdpa.drive.session import Session

__all__ = [
    "BURST",
    "COPIES",
    "BenchConfig",
    "Case",
    "Measurement",
    "Result",
    "flags",
    "main",
    "run_case",
    "summarise",
]

WORKLOADS = ("tx", "rx", "loopback", "drive")
RINGS = ("split", "packed")
ENGINE_MODES = ("poll", "event", "adaptive")
ISAS = ("native", "generic")
DEVICE_MAC = "52:54:00:12:34:56"
BURST = 32
"""Chains every side handles per pass: testpmd's default ``--burst``, given to pyvdpa's device."""
NOISE = 0.10
"""A side whose runs spread more than this (max / min - 1) is flagged noisy."""
GENERIC_CACHE = (
    Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pyvdpa" / "numba-generic"
)
"""Where kernels compiled for a baseline x86-64 are kept, apart from the native ones."""

COPIES: dict[str, tuple[str, str]] = {
    "tx": ("1", "1"),
    "rx": ("1+hdr", "1"),
    "loopback": ("2", "1"),
    "drive": ("hdr", "0"),
}
"""Per workload, how often (DPDK side, pyvdpa side) copy each frame; ``hdr``: headers only."""

INCLUDES: dict[str, str] = {
    "tx": "DPDK copies each frame from the guest buffer into an mbuf it allocates "
    "and frees; pyvdpa's drop reads it into the next of 64 rotating 2 KiB sink slots",
    "rx": "testpmd txonly allocates an mbuf, writes the Ethernet/IP/UDP headers "
    "into it, net_vhost copies it into the guest buffer and frees it; pyvdpa's gen "
    "copies the next of 64 template frames (2 KiB apart) into the guest buffer",
    "loopback": "DPDK copies guest buffer to mbuf, then mbuf to guest buffer; "
    "pyvdpa copies guest buffer to guest buffer (no mbuf: inherent to its design)",
    "drive": "the drivers compared, net_vhost rxonly copies each frame into an mbuf "
    "for both; virtio-user writes headers into an mbuf per frame, pyvdpa drive writes "
    "each frame once before the run",
}
"""Per workload, what each side's figure includes."""

_USER_MODE = {"tx": "txonly", "rx": "rxonly", "loopback": "io", "drive": "txonly"}
_VHOST_MODE = {"tx": "rxonly", "rx": "txonly", "loopback": "io", "drive": "rxonly"}
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
    in_order: bool = True

    @property
    def name(self) -> str:
        """A short label: ``tx-64-split-1q``, ``-io0`` appended for virtio-user's in_order=0."""
        name = f"{self.workload}-{self.frame}-{self.ring}-{self.queues}q"
        return name if self.in_order else name + "-io0"


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
    iface: str,
    mode: str,
    *,
    frame: int,
    queues: int,
    engine: str,
    devices: int,
    cpu: int | None,
    burst: int | None = None,
    main_cpu: int | None = None,
) -> list[str]:
    """The back-end as a user starts it: ``pyvdpa run --vdev sim-net,... --engine ...``.

    ``cpu`` pins the data path's worker (``--cpus``), ``main_cpu`` the
    process's other threads (``taskset``), as testpmd pins its main lcore.
    """
    vdev = f"sim-net,mode={mode},queues={queues}" + (
        f",frame-size={frame}" if mode == "gen" else ""
    )
    if burst is not None:
        vdev += f",burst={burst}"
    argv = [] if main_cpu is None else ["taskset", "-c", str(main_cpu)]
    argv += [sys.executable, "-m", "pyvdpa", "run", "--engine", engine, "--iface", iface]
    if cpu is not None:
        argv += ["--cpus", str(cpu)]
    for i in range(devices):
        argv += ["--vdev", f"{vdev},name=net{i}"]
    return argv


def isa_env(isa: str) -> dict[str, str]:
    """The environment pyvdpa runs in for ``isa``: generic kernels compile and cache apart."""
    env = dict(os.environ)
    if isa == "generic":
        GENERIC_CACHE.mkdir(parents=True, exist_ok=True)
        env["NUMBA_CPU_NAME"] = "generic"
        env["NUMBA_CACHE_DIR"] = str(GENERIC_CACHE)
    return env


def warm(isa: str) -> None:
    """Compile (or load) the kernels for ``isa`` before anything is measured."""
    code = "from pyvdpa.dataplane.engine import warm_up; warm_up(lambda line: None)"
    done = subprocess.run(
        [sys.executable, "-c", code], env=isa_env(isa), capture_output=True, text=True, timeout=900
    )
    if done.returncode != 0:
        raise PyvdpaError(f"compiling the {isa} kernels failed:\n{done.stderr[-2000:]}")


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
    burst: int | None = None,
    main_cpu: int | None = None,
    isa: str = "native",
) -> Iterator[_Process]:
    """A pyvdpa back-end process; returns once every socket listens."""
    argv = _serve_argv(
        iface,
        mode,
        frame=frame,
        queues=queues,
        engine=engine,
        devices=devices,
        cpu=cpu,
        burst=burst,
        main_cpu=main_cpu,
    )
    process = _Process(argv, env=isa_env(isa))
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


def _measure(
    counted: _Process, case: Case, config: BenchConfig, counter: str | None = None
) -> tuple[int, float]:
    """Packets ``counted`` counts over the measurement window, and the window's length."""
    counter = counter or _COUNTER[case.workload]
    _wait_for(
        "testpmd statistics",
        lambda: any(n > 0 for _, n in _stats_samples(counted, counter)),
        counted,
    )
    started = time.monotonic()
    window_start = started + config.warmup
    time.sleep(config.warmup + config.duration + 1.2)
    samples = [
        (t, n)
        for t, n in _stats_samples(counted, counter)
        if window_start <= t <= window_start + config.duration + 1.1
    ]
    if len(samples) < 2:
        raise PyvdpaError(f"{case.name}: too few statistics reports:\n{counted.tail()}")
    (t0, n0), (t1, n1) = samples[0], samples[-1]
    return n1 - n0, t1 - t0


def _driver_vdev(path: str, case: Case) -> str:
    """virtio-user's devargs: its defaults (in_order=1, mrg_rxbuf=1) but for the case's in_order."""
    vdev = (
        f"net_virtio_user0,path={path},queues={case.queues},packed_vq={int(case.ring == 'packed')}"
    )
    return vdev if case.in_order else vdev + ",in_order=0"


def _driver_args(case: Case) -> list[str]:
    extra = [f"--txpkts={case.frame}", f"--eth-peer=0,{DEVICE_MAC}", f"--burst={BURST}"]
    if case.workload == "loopback":
        extra.append("--tx-first")
    return extra


def _drive_argv(path: str, case: Case, config: BenchConfig) -> list[str]:
    """``pyvdpa drive net`` txonly as the driver: worker on the driver's core, the rest beside."""
    seconds = config.warmup + config.duration + 4.0
    return [
        "taskset", "-c", str(config.backend_cpu),
        sys.executable, "-m", "pyvdpa", "drive", "net", "--socket", path,
        "--mode", "txonly", "--engine", "compiled", "--frame-size", str(case.frame),
        "--queues", str(case.queues), "--burst", str(BURST), "--ring-size", "256",
        "--duration", str(seconds), "--cpus", str(config.driver_cpu), "--json",
        *(["--packed"] if case.ring == "packed" else []),
        *([] if case.in_order else ["--no-in-order"]),
    ]  # fmt: skip


def _run_drive(case: Case, backend: str, config: BenchConfig, path: str) -> tuple[int, float]:
    """Drive DPDK net_vhost rxonly with ``backend``'s driver; its rate as net_vhost counts it."""
    vhost = f"net_vhost0,iface={path},queues={case.queues},client=0"
    with _testpmd(
        vhost,
        forward="rxonly",
        fwd_cpu=config.backend_cpu,
        main_cpu=config.driver_cpu,
        queues=case.queues,
        extra=[f"--burst={BURST}"],
    ) as server:
        _wait_for("net_vhost", _listening(path), server)
        if backend == "dpdk":
            with _testpmd(
                _driver_vdev(path, case),
                forward="txonly",
                fwd_cpu=config.driver_cpu,
                main_cpu=config.backend_cpu,
                queues=case.queues,
                extra=_driver_args(case),
            ):
                return _measure(server, case, config, "rx_packets")
        driver = _Process(_drive_argv(path, case, config))
        try:
            return _measure(server, case, config, "rx_packets")
        finally:
            driver.stop()


def run_case(case: Case, backend: str, config: BenchConfig, isa: str = "native") -> Measurement:
    """Measure one case against ``backend`` (``dpdk`` or ``pyvdpa``, with kernels for ``isa``)."""
    sock_dir = Path(tempfile.mkdtemp(prefix="pvb-", dir="/tmp"))

    def driver(path: str) -> contextlib.AbstractContextManager[_Process]:
        return _testpmd(
            _driver_vdev(path, case),
            forward=_USER_MODE[case.workload],
            fwd_cpu=config.driver_cpu,
            main_cpu=config.backend_cpu,
            queues=case.queues,
            extra=_driver_args(case),
        )

    try:
        if case.workload == "drive":
            packets, seconds = _run_drive(case, backend, config, str(sock_dir / "vhost.sock"))
        elif backend == "dpdk":
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
                    burst=BURST,
                    main_cpu=config.driver_cpu,
                    isa=isa,
                ),
                driver(f"{iface}0") as user,
            ):
                packets, seconds = _measure(user, case, config)
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)
    label = "pyvdpa-drive" if case.workload == "drive" and backend != "dpdk" else None
    return Measurement(label or backend_label(backend, case.engine, isa), case, packets, seconds)


def backend_label(backend: str, engine: str = "poll", isa: str = "native") -> str:
    """``dpdk``, ``pyvdpa-poll``, ``pyvdpa-poll-generic``..."""
    if backend == "dpdk":
        return "dpdk"
    label = f"pyvdpa-{engine}"
    return label if isa == "native" else f"{label}-{isa}"


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
    """Every run of one case against one back-end, summarised by min, median and max."""

    backend: str
    case: Case
    runs: tuple[Measurement, ...]

    @property
    def mpps(self) -> float:
        """Median million packets per second."""
        return statistics.median(m.mpps for m in self.runs)

    @property
    def low(self) -> float:
        """Slowest run, Mpps."""
        return min(m.mpps for m in self.runs)

    @property
    def high(self) -> float:
        """Fastest run, Mpps."""
        return max(m.mpps for m in self.runs)

    @property
    def spread(self) -> float:
        """How far the fastest run is above the slowest: max / min - 1."""
        return self.high / self.low - 1.0 if self.low > 0 else float("inf")

    @property
    def gbps(self) -> float:
        """Median frame Gbit/s."""
        return self.mpps * self.case.frame * 8 / 1e3

    @property
    def key(self) -> tuple[str, int, str, int, bool]:
        """What a DPDK result and a pyvdpa result must share to be compared."""
        c = self.case
        return (c.workload, c.frame, c.ring, c.queues, c.in_order)


def summarise(measurements: Sequence[Measurement]) -> list[Result]:
    """Group the runs by case and back-end, in the order first measured."""
    groups: dict[tuple[str, Case], list[Measurement]] = {}
    for m in measurements:
        groups.setdefault((m.backend, m.case), []).append(m)
    return [Result(backend, case, tuple(runs)) for (backend, case), runs in groups.items()]


def _reference(results: Sequence[Result], result: Result) -> Result | None:
    return next((r for r in results if r.backend == "dpdk" and r.key == result.key), None)


def flags(result: Result, dpdk: Result | None) -> str:
    """``noisy`` when either side spread more than :data:`NOISE`; ``within-noise`` when the
    ratio of medians is closer to 1.0 than either side's spread, so it does not say which
    side is faster."""
    if dpdk is None or not dpdk.mpps:
        return ""
    marks = []
    spread = max(result.spread, dpdk.spread)
    if spread > NOISE:
        marks.append("noisy")
    if abs(result.mpps / dpdk.mpps - 1.0) < spread:
        marks.append("within-noise")
    return ",".join(marks)


def _span(r: Result) -> str:
    return f"{r.low:.2f}/{r.mpps:.2f}/{r.high:.2f}"


def _table(results: Sequence[Result]) -> str:
    """One row per case and pyvdpa variant: Mpps min/median/max of both sides, ratio, flags."""
    header = (
        f"{'case':<26}{'pyvdpa':<22}{'DPDK min/med/max':>20}{'pyvdpa min/med/max':>21}"
        f"{'ratio':>7}{'Gbps':>8}  {'copies':<11}flags"
    )
    lines = [header, "-" * (len(header) + 14)]
    for key in dict.fromkeys(r.key for r in results):
        row = [r for r in results if r.key == key]
        dpdk = next((r for r in row if r.backend == "dpdk"), None)
        name = Case(*key[:4], in_order=key[4]).name
        dpdk_copies, ours_copies = COPIES[key[0]]
        copies = f"{dpdk_copies} / {ours_copies}"
        dpdk_text = _span(dpdk) if dpdk else "-"
        for r in row:
            if r.backend == "dpdk":
                continue
            ratio = f"{r.mpps / dpdk.mpps:.2f}" if dpdk and dpdk.mpps else "-"
            lines.append(
                f"{name:<26}{r.backend:<22}{dpdk_text:>20}{_span(r):>21}{ratio:>7}"
                f"{r.gbps:>8.1f}  {copies:<11}{flags(r, dpdk)}"
            )
    return "\n".join(lines)


def _legend(results: Sequence[Result]) -> str:
    """What each workload's figures include."""
    workloads = dict.fromkeys(r.case.workload for r in results)
    lines = ["copies: how often each frame is copied per side, DPDK / pyvdpa"]
    lines += [f"{workload}: {INCLUDES[workload]}" for workload in workloads]
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
                "mpps_min": round(r.low, 3),
                "mpps_max": round(r.high, 3),
                "gbps": round(r.gbps, 3),
                "ratio_to_dpdk": round(r.mpps / dpdk.mpps, 3) if dpdk and dpdk.mpps else None,
                "flags": flags(r, dpdk) if r.backend != "dpdk" else "",
                "copies": COPIES[r.case.workload][0 if r.backend == "dpdk" else 1],
                "runs_mpps": [round(m.mpps, 3) for m in r.runs],
            }
        )
    return {
        "host": {
            "cpus": os.cpu_count(),
            "machine": os.uname().machine,
            "loadavg": os.getloadavg(),
        },
        "burst": BURST,
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
    parser.add_argument("--duration", type=float, default=2.0, help="seconds measured per run")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring")
    parser.add_argument(
        "--workloads", type=_csv(WORKLOADS), default=["tx", "rx", "loopback"],
        help="tx, rx, loopback (back-ends compared), drive (drivers compared)",
    )  # fmt: skip
    parser.add_argument("--sizes", type=_csv(None, int), default=[64, 1518], help="frame bytes")
    parser.add_argument("--rings", type=_csv(RINGS), default=list(RINGS))
    parser.add_argument("--queues", type=_csv(None, int), default=[1], help="queue pairs")
    parser.add_argument(
        "--engines",
        type=_csv(ENGINE_MODES),
        default=["poll"],
        help="pyvdpa engine modes (event/adaptive run the 64-byte split cases only)",
    )
    parser.add_argument(
        "--isa",
        type=_csv(ISAS),
        default=["native"],
        help="pyvdpa's kernels compiled for this CPU (native) and/or a baseline x86-64 "
        "(generic), poll mode",
    )
    parser.add_argument("--cpus", type=_csv(None, int), default=[0, 1], help="driver,back-end")
    parser.add_argument(
        "--repeat", type=int, default=5, help="runs per case and back-end, interleaved (5)"
    )
    parser.add_argument(
        "--in-order",
        type=_csv(("on", "off")),
        default=["on"],
        help="virtio-user's in_order: on (its default, the headline); off adds the "
        "64-byte cases with in_order=0",
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
                    for order in args.in_order:
                        if order == "on" or size == min(args.sizes):
                            cases.append(Case(workload, size, ring, queues, in_order=order == "on"))
    return cases


def _runs(args: argparse.Namespace, case: Case) -> list[tuple[str, str, str]]:
    """(back-end, engine mode, ISA) triples to measure ``case`` with."""
    runs = [("dpdk", "poll", "native")]
    if case.workload == "drive":
        return [*runs, ("pyvdpa", "poll", "native")]
    for engine in args.engines:
        if engine == "poll":
            runs += [("pyvdpa", engine, isa) for isa in args.isa]
        elif (case.frame, case.ring, case.in_order) == (64, "split", True):
            runs.append(("pyvdpa", engine, "native"))
    return runs


def _bench(args: argparse.Namespace) -> int:
    if shutil.which("dpdk-testpmd") is None:
        raise ConfigError("dpdk-testpmd is not installed (the benchmark's driver and reference)")
    if len(args.cpus) != 2:
        raise ConfigError("--cpus takes two cpus: the driver's and the back-end's")
    if args.repeat < 1:
        raise ConfigError(f"--repeat must be at least 1, not {args.repeat}")
    config = BenchConfig(
        duration=args.duration,
        warmup=args.warmup,
        driver_cpu=args.cpus[0],
        backend_cpu=args.cpus[1],
    )
    for isa in args.isa:
        warm(isa)
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    measurements: list[Measurement] = []
    for case in _cases(args):
        for _ in range(args.repeat):
            # Interleave the back-ends, so that a change in the machine's load
            # during the run hits them alike.
            for backend, engine, isa in _runs(args, case):
                run = replace(case, engine=engine)
                m = run_case(run, backend, config, isa)
                print(f"  {run.name:<26} {m.backend:<22} {m.mpps:8.2f} Mpps", flush=True)
                measurements.append(m)
    results = summarise(measurements)
    print()
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(_table(results))
    print()
    print(_legend(results))
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
