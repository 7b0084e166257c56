"""Live migration of a QEMU guest between two QEMU processes on this machine.

Theory of operation (QEMU ``docs/devel/migration.rst``, the QMP reference):
the destination QEMU starts with the same machine and devices as the source
plus ``-incoming defer``; its vhost-user back-ends must already listen, since
the devices connect while QEMU starts.  ``migrate-incoming`` makes it listen
on a unix socket; ``migrate`` on the source copies the guest's RAM there
while the guest runs (pre-copy), again and again for the pages dirtied
meanwhile, and stops the guest once what is left fits in the downtime limit.
A vhost-user back-end takes part through the dirty log: QEMU sets LOG_ALL and
hands it SET_LOG_BASE's shared bitmap, where the device marks each page it
writes, and reads the bitmap at every sync (vhost-user spec, "Migration").
After the switch the destination announces the guest's MAC: QEMU sends
SEND_RARP to a net back-end that negotiated the RARP protocol feature, and the
back-end broadcasts the RARP frame for it.

:class:`Qmp` is a minimal QMP client on the unix socket QEMU serves with
``-qmp unix:PATH,server=on,wait=off``; :func:`qemu_migration_args` adds that
socket (and ``-incoming defer`` to a destination) to a guest's arguments;
:func:`migrate` runs one migration end to end and returns QEMU's figures;
:class:`RarpSniffer` records the RARP frames that reach any interface of a
network namespace.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from peers.common import PeerError, PeerProcess, PeerTimeoutError, check_socket_path, qemu_opt
from peers.netns import NetNamespace

__all__ = [
    "MigrationResult",
    "MigrationSettings",
    "Qmp",
    "QmpError",
    "RarpSniffer",
    "migrate",
    "qemu_migration_args",
]

_CONNECT_TIMEOUT = 30.0
_POLL = 0.2


class QmpError(PeerError):
    """QEMU answered a QMP command with an error, or the monitor went away."""


class Qmp:
    """A QMP client: ``execute(command, **arguments)`` returns the ``return`` value.

    Events QEMU sends between answers are kept in :attr:`events`.
    """

    def __init__(self, path: str | Path, timeout: float = _CONNECT_TIMEOUT) -> None:
        """Connect to QEMU's monitor at ``path`` (retrying until it listens) and negotiate."""
        self.path = check_socket_path(path)
        self.events: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self.path))
                break
            except OSError as exc:
                sock.close()
                if time.monotonic() > deadline:
                    raise QmpError(f"QMP {self.path}: {exc}") from exc
                time.sleep(_POLL)
        sock.settimeout(timeout)
        self._sock = sock
        self._reader = sock.makefile("rb")
        greeting = self._receive()
        if "QMP" not in greeting:
            raise QmpError(f"QMP {self.path}: not a QMP greeting: {greeting}")
        self.execute("qmp_capabilities")

    def execute(self, command: str, **arguments: Any) -> Any:
        """Run ``command``; raise :class:`QmpError` with QEMU's description if it fails."""
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self._sock.sendall(json.dumps(request).encode() + b"\n")
        while True:
            answer = self._receive()
            if "event" in answer:
                self.events.append(answer)
                continue
            if "error" in answer:
                error = answer["error"]
                raise QmpError(f"{command}: {error.get('class')}: {error.get('desc')}")
            return answer.get("return")

    def close(self) -> None:
        """Close the connection (QEMU keeps running)."""
        self._reader.close()
        self._sock.close()

    def __enter__(self) -> Self:
        """Return the client itself."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the connection."""
        self.close()

    def _receive(self) -> dict[str, Any]:
        try:
            line = self._reader.readline()
        except OSError as exc:
            raise QmpError(f"QMP {self.path}: {exc}") from exc
        if not line:
            raise QmpError(f"QMP {self.path}: QEMU closed the monitor")
        message: dict[str, Any] = json.loads(line)
        return message


def qemu_migration_args(qmp: str | Path, *, incoming: bool) -> list[str]:
    """QEMU arguments for a monitor at ``qmp`` and, on a destination, ``-incoming defer``."""
    args = ["-qmp", f"unix:{qemu_opt(check_socket_path(qmp))},server=on,wait=off"]
    if incoming:
        args += ["-incoming", "defer"]
    return args


@dataclass(frozen=True, slots=True)
class MigrationSettings:
    """How fast the RAM copy may go and how long the guest may be stopped.

    ``max_bandwidth`` (bytes/s) keeps the first pass over RAM long enough
    for the device to write into pages already sent; ``downtime_limit``
    (ms) is what QEMU aims the final stop-and-copy at, large enough for a
    TCG guest that dirties pages fast to converge.
    """

    max_bandwidth: int = 64 << 20
    downtime_limit: int = 3000
    timeout: float = 90.0


@dataclass(frozen=True, slots=True)
class MigrationResult:
    """QEMU's figures for a completed migration (``query-migrate``)."""

    total_time_ms: int
    downtime_ms: int
    ram_transferred: int
    dirty_sync_count: int
    dirty_pages_rate: int

    @classmethod
    def from_query(cls, info: dict[str, Any]) -> MigrationResult:
        """Read a completed ``query-migrate`` answer."""
        ram = info.get("ram", {})
        return cls(
            total_time_ms=int(info.get("total-time", 0)),
            downtime_ms=int(info.get("downtime", 0)),
            ram_transferred=int(ram.get("transferred", 0)),
            dirty_sync_count=int(ram.get("dirty-sync-count", 0)),
            dirty_pages_rate=int(ram.get("dirty-pages-rate", 0)),
        )


def migrate(
    source: Qmp, destination: Qmp, uri: str, settings: MigrationSettings = MigrationSettings()
) -> MigrationResult:
    """Migrate the guest of ``source`` to ``destination`` (started with ``-incoming defer``).

    Returns once the destination runs the guest; the source is left paused
    (``postmigrate``).  A failed or cancelled migration, or one that does not
    finish within the settings' timeout, raises :class:`QmpError`.
    """
    destination.execute("migrate-incoming", uri=uri)
    source.execute(
        "migrate-set-parameters",
        **{"max-bandwidth": settings.max_bandwidth, "downtime-limit": settings.downtime_limit},
    )
    source.execute("migrate", uri=uri)
    deadline = time.monotonic() + settings.timeout
    while True:
        info = source.execute("query-migrate")
        status = info.get("status")
        if status == "completed":
            break
        if status in ("failed", "cancelled"):
            raise QmpError(f"migration {status}: {info.get('error-desc', info)}")
        if time.monotonic() > deadline:
            with contextlib.suppress(QmpError):
                source.execute("migrate_cancel")
            raise QmpError(f"migration not completed within {settings.timeout} s: {info}")
        time.sleep(_POLL)
    # The destination runs the guest once it has loaded the final state.
    while destination.execute("query-status").get("status") != "running":
        if time.monotonic() > deadline:
            raise QmpError("the destination did not start the guest")
        time.sleep(_POLL)
    return MigrationResult.from_query(info)


# Every frame (ETH_P_ALL) as it enters each interface, before a bridge port
# hands it to its bridge, kept by a classic BPF filter only when its
# ethertype is RARP's: ldh [12]; jeq #0x8035; ret #0xffff; ret #0.
_SNIFFER = r"""
import ctypes, socket, struct
ETH_P_ALL, ETH_P_RARP, SO_ATTACH_FILTER = 0x0003, 0x8035, 26
program = [(0x28, 0, 0, 12), (0x15, 0, 1, ETH_P_RARP), (0x06, 0, 0, 0xFFFF), (0x06, 0, 0, 0)]
code = b"".join(struct.pack("HBBI", *insn) for insn in program)
insns = ctypes.create_string_buffer(code)
fprog = struct.pack("HL", len(program), ctypes.addressof(insns))
sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
print("listening", flush=True)
while True:
    frame, (ifname, _proto, _type, _hatype, _addr) = sock.recvfrom(2048)
    if frame[12:14] == b"\x80\x35":
        print(f"rarp {ifname} {frame[6:12].hex(':')}", flush=True)
"""

_RARP = re.compile(r"^rarp (\S+) ([0-9a-f:]{17})$", re.M)


class RarpSniffer(PeerProcess):
    """Prints ``rarp IFNAME MAC`` for each RARP frame any interface of ``netns`` sees."""

    def __init__(self, netns: NetNamespace) -> None:
        """Describe the sniffer; :meth:`start` (or ``with``) runs it."""
        argv = [*netns.exec_prefix, sys.executable, "-u", "-c", _SNIFFER]
        super().__init__(argv, name=f"rarp sniffer {netns.name}", program=netns.exec_prefix[0])

    def frames(self, start: int = 0) -> list[tuple[str, str]]:
        """(interface, source MAC) of each RARP frame seen from output offset ``start``."""
        return [(found[1], found[2]) for found in _RARP.finditer(self.output(start))]

    def wait_frame(self, ifname: str, mac: str, timeout: float, start: int = 0) -> None:
        """Wait for a RARP frame from ``mac`` on ``ifname``; raise PeerTimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        while (ifname, mac) not in self.frames(start):
            if time.monotonic() > deadline:
                raise PeerTimeoutError(
                    f"no RARP from {mac} on {ifname} within {timeout} s: {self.frames(start)}"
                )
            time.sleep(_POLL)

    def _wait_ready(self) -> None:
        self.wait_for("listening", _CONNECT_TIMEOUT)
