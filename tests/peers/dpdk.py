"""DPDK testpmd as a third-party vhost-user peer.

Theory of operation: ``dpdk-testpmd`` (DPDK 22.11) runs in interactive mode
(``-i``) without PCI devices or hugepages, with one virtual device: either
``net_virtio_user`` (DPDK's virtio driver, a vhost-user front-end) or
``net_vhost`` (DPDK's vhost-user back-end). Each instance gets its own
``--file-prefix`` so that several can run side by side, and its runtime
directory is removed once it exits. Two instances share a 2-core machine by
taking opposite main lcores, each forwarding on the other core.

Commands go to testpmd's standard input; a command has completed when the
``testpmd>`` prompt comes back. testpmd writes its reports through stdio, which
would be block-buffered on a pipe and arrive after the prompt, so it runs under
``stdbuf -oL``.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from peers.common import PeerError, PeerProcess, check_socket_path

__all__ = [
    "PortStats",
    "Testpmd",
    "net_vhost",
    "virtio_user",
]

_PROMPT = re.compile(r"testpmd> ")
_SERVER_WAITING = re.compile(r"waiting for client connection")
_PORT_STATS = re.compile(
    r"NIC statistics for port (?P<port>\d+)\s+#+\s+"
    r"RX-packets:\s*(?P<rx_packets>\d+)\s+RX-missed:\s*(?P<rx_missed>\d+)\s+"
    r"RX-bytes:\s*(?P<rx_bytes>\d+)\s+RX-errors:\s*(?P<rx_errors>\d+)\s+"
    r"RX-nombuf:\s*(?P<rx_nombuf>\d+)\s+TX-packets:\s*(?P<tx_packets>\d+)\s+"
    r"TX-errors:\s*(?P<tx_errors>\d+)\s+TX-bytes:\s*(?P<tx_bytes>\d+)\n"
)
_instances = itertools.count()


@dataclass(frozen=True, slots=True)
class PortStats:
    """One port's counters from ``show port stats all``."""

    rx_packets: int
    rx_missed: int
    rx_bytes: int
    rx_errors: int
    rx_nombuf: int
    tx_packets: int
    tx_errors: int
    tx_bytes: int


class Testpmd(PeerProcess):
    """An interactive ``dpdk-testpmd`` with the given virtual devices."""

    # The name starts with "Test": keep pytest from collecting it.
    __test__ = False

    def __init__(
        self,
        vdevs: Sequence[str],
        *,
        forward_mode: str,
        main_lcore: int = 0,
        lcores: str = "0,1",
        nb_cores: int = 1,
        queues: int = 1,
        memory_mb: int = 1024,
        eal_args: Sequence[str] = (),
        app_args: Sequence[str] = (),
        listen_socket: Path | None = None,
        ready: re.Pattern[str] = _PROMPT,
        ready_timeout: float = 30.0,
    ) -> None:
        """Describe the instance; :meth:`start` (or ``with``) runs it.

        ``queues`` sets testpmd's RX and TX queue count per port; the devices'
        own ``queues`` devargs must match it. ``listen_socket`` is removed once
        testpmd has exited. :meth:`start` returns once ``ready`` appears in the
        output: by default the first prompt, but a device that waits for its
        peer during start-up prompts only after the peer came.
        """
        self.file_prefix = f"pyvdpa-{os.getpid()}-{next(_instances)}"
        self.nb_ports = len(vdevs)
        self.listen_socket = listen_socket
        self._ready = ready
        self._ready_timeout = ready_timeout
        argv = [
            "stdbuf",
            "-oL",
            "-eL",
            "dpdk-testpmd",
            "-l",
            lcores,
            "--main-lcore",
            str(main_lcore),
            "--no-pci",
            "--no-huge",
            "-m",
            str(memory_mb),
            f"--file-prefix={self.file_prefix}",
        ]
        for vdev in vdevs:
            argv += ["--vdev", vdev]
        argv += [
            *eal_args,
            "--",
            "-i",
            f"--forward-mode={forward_mode}",
            f"--nb-cores={nb_cores}",
            f"--rxq={queues}",
            f"--txq={queues}",
            "--no-mlockall",
            *app_args,
        ]
        super().__init__(argv, name=f"testpmd[{self.file_prefix}]", program="dpdk-testpmd")

    @property
    def runtime_dir(self) -> Path:
        """Where DPDK's EAL keeps this instance's runtime files."""
        return _runtime_base() / self.file_prefix

    def start(self) -> Self:
        """Start testpmd and wait until it is ready (by default, its first prompt)."""
        _remove_orphaned_runtime_dirs()
        # Left by an earlier process with our pid, it would make the EAL refuse
        # to start.
        shutil.rmtree(self.runtime_dir, ignore_errors=True)
        super().start()
        return self

    def send(self, command: str) -> None:
        """Send one command line without waiting for it to complete."""
        self.write(command + "\n")

    def wait_prompt(self, timeout: float = 30.0) -> None:
        """Wait until testpmd has finished starting and reads commands."""
        self.wait_for(_PROMPT, timeout)

    def command(self, command: str, timeout: float = 10.0) -> str:
        """Run one command and return what it printed before the next prompt."""
        self.wait_prompt(timeout)
        start = self.mark()
        self.send(command)
        prompt = self.wait_for(_PROMPT, timeout, start)
        printed = self.output(start)[: prompt.start() - start]
        # testpmd echoes the command line before running it.
        echo, _, rest = printed.partition("\n")
        return rest if echo.strip() == command else printed

    def start_forwarding(self, tx_first: bool = False) -> None:
        """Start packet forwarding; ``tx_first`` sends a first burst on every port."""
        self.command("start tx_first" if tx_first else "start")

    def stop_forwarding(self, timeout: float = 10.0) -> str:
        """Stop packet forwarding and return testpmd's forward statistics."""
        return self.command("stop", timeout)

    def port_stats(self, timeout: float = 10.0) -> dict[int, PortStats]:
        """Counters of every port, by port id, from ``show port stats all``."""
        printed = self.command("show port stats all", timeout)
        stats = {
            int(found["port"]): PortStats(
                **{key: int(value) for key, value in found.groupdict().items() if key != "port"}
            )
            for found in _PORT_STATS.finditer(printed)
        }
        if len(stats) != self.nb_ports:
            raise PeerError(
                f"{self.name}: expected statistics for {self.nb_ports} port(s), got:\n{printed}"
            )
        return stats

    def _wait_ready(self) -> None:
        self.wait_for(self._ready, self._ready_timeout)

    def _request_exit(self) -> None:
        self.send("quit")

    def _cleanup(self) -> None:
        shutil.rmtree(self.runtime_dir, ignore_errors=True)
        if self.listen_socket is not None and self.listen_socket.is_socket():
            self.listen_socket.unlink()


def _runtime_base() -> Path:
    # The EAL's own choice of runtime directory.
    if os.geteuid() == 0:
        return Path("/var/run/dpdk")
    return Path(os.environ.get("XDG_RUNTIME_DIR", "/tmp")) / "dpdk"


def _remove_orphaned_runtime_dirs() -> None:
    # A test process killed outright leaves its instances' runtime
    # directories behind; the pid in the prefix tells whether it is gone.
    for runtime_dir in _runtime_base().glob("pyvdpa-*-*"):
        owner = runtime_dir.name.split("-")[1]
        if owner.isdigit() and not Path("/proc", owner).exists():
            shutil.rmtree(runtime_dir, ignore_errors=True)


def _devarg(value: str | os.PathLike[str]) -> str:
    text = os.fspath(value)
    if "," in text:
        raise ValueError(f"DPDK devargs cannot carry a comma: {text!r}")
    return text


def virtio_user(
    path: str | os.PathLike[str],
    *,
    queues: int = 1,
    packed: bool = False,
    mrg_rxbuf: bool = True,
    in_order: bool = True,
    server: bool = False,
    mac: str | None = None,
    queue_size: int | None = None,
    mode: str = "txonly",
    main_lcore: int = 1,
    eal_args: Sequence[str] = (),
    app_args: Sequence[str] = (),
) -> Testpmd:
    """testpmd driving DPDK's virtio-user front-end on the socket at ``path``.

    As a client (the default) the back-end must already listen on ``path``.
    With ``server`` testpmd listens there itself and its start-up blocks until
    a back-end connects: ``start`` returns once it listens, and
    :meth:`Testpmd.wait_prompt` once the back-end has come.
    """
    socket = check_socket_path(path)
    devargs = [
        f"path={_devarg(socket)}",
        f"queues={queues}",
        f"packed_vq={int(packed)}",
        f"mrg_rxbuf={int(mrg_rxbuf)}",
        f"in_order={int(in_order)}",
        f"server={int(server)}",
    ]
    if mac is not None:
        devargs.append(f"mac={_devarg(mac)}")
    if queue_size is not None:
        devargs.append(f"queue_size={queue_size}")
    return Testpmd(
        [",".join(["net_virtio_user0", *devargs])],
        forward_mode=mode,
        main_lcore=main_lcore,
        queues=queues,
        eal_args=eal_args,
        app_args=app_args,
        listen_socket=socket if server else None,
        ready=_SERVER_WAITING if server else _PROMPT,
    )


def net_vhost(
    iface: str | os.PathLike[str],
    *,
    queues: int = 1,
    client: bool = False,
    iommu: bool = False,
    mode: str = "rxonly",
    main_lcore: int = 0,
    eal_args: Sequence[str] = (),
    app_args: Sequence[str] = (),
) -> Testpmd:
    """testpmd running DPDK's vhost-user back-end on the socket at ``iface``.

    As a server (the default) testpmd listens on ``iface``; with ``client`` it
    connects there and keeps retrying until a front-end listens.  ``iommu``
    turns on DPDK's IOTLB (``iommu-support=1``: ACCESS_PLATFORM offered).
    """
    socket = check_socket_path(iface)
    devargs = [
        f"iface={_devarg(socket)}",
        f"queues={queues}",
        f"client={int(client)}",
        *(["iommu-support=1"] if iommu else []),
    ]
    return Testpmd(
        [",".join(["net_vhost0", *devargs])],
        forward_mode=mode,
        main_lcore=main_lcore,
        queues=queues,
        eal_args=eal_args,
        app_args=app_args,
        listen_socket=None if client else socket,
    )
