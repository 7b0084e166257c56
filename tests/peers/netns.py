"""Network namespaces as private test hosts.

Theory of operation: ``ip netns add`` creates a named network namespace with
only a loopback device, and ``ip netns exec NAME CMD`` runs CMD inside it
(iproute2, ip-netns(8)). Devices made there (TAP, veth ends) and the traffic
between them never touch the machine's own network. Deleting the namespace
destroys its devices; processes started in it are stopped first, since a
running process would keep the namespace alive after its name is gone.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Self

__all__ = ["NetNamespace"]

_STOP_TIMEOUT = 5.0


class NetNamespace:
    """A named network namespace, created on :meth:`create` (or ``with``)."""

    def __init__(self, name: str) -> None:
        """Describe the namespace; nothing is created yet."""
        self.name = name
        self._created = False
        self._processes: list[subprocess.Popen[Any]] = []

    @property
    def exec_prefix(self) -> tuple[str, ...]:
        """Argument prefix that runs a command inside the namespace."""
        return ("ip", "netns", "exec", self.name)

    def create(self) -> Self:
        """Create the namespace and bring its loopback device up."""
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True)
        self._created = True
        try:
            self.run(["ip", "link", "set", "lo", "up"])
        except BaseException:
            self.delete()
            raise
        return self

    def run(
        self, cmd: Sequence[str], *, check: bool = True, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside the namespace to completion, capturing its output.

        With ``check``, a non-zero exit raises CalledProcessError, whose
        ``stderr`` tells why.
        """
        return subprocess.run(
            [*self.exec_prefix, *cmd],
            check=check,
            timeout=timeout,
            capture_output=True,
            text=True,
        )

    def popen(self, cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``cmd`` inside the namespace; :meth:`delete` stops it.

        It runs in its own process group and is killed if the creating thread
        dies; ``kwargs`` go to :class:`subprocess.Popen`.
        """
        proc: subprocess.Popen[Any] = subprocess.Popen(
            ["setpriv", "--pdeathsig", "KILL", *self.exec_prefix, *cmd],
            start_new_session=True,
            **kwargs,
        )
        self._processes.append(proc)
        return proc

    def link_up(self, dev: str) -> None:
        """Bring device ``dev`` up."""
        self.run(["ip", "link", "set", dev, "up"])

    def add_address(self, dev: str, cidr: str) -> None:
        """Give ``dev`` the address ``cidr`` (such as ``10.0.0.1/24``)."""
        self.run(["ip", "address", "add", cidr, "dev", dev])

    def add_tap(self, dev: str) -> None:
        """Create a persistent TAP device ``dev``, for a back-end to attach to."""
        self.run(["ip", "tuntap", "add", "dev", dev, "mode", "tap"])

    def add_veth(self, dev: str, peer: NetNamespace, peer_dev: str) -> None:
        """Create a veth pair: ``dev`` here, ``peer_dev`` in ``peer``; both up."""
        self.run(["ip", "link", "add", dev, "type", "veth", "peer", "name", peer_dev])
        self.run(["ip", "link", "set", peer_dev, "netns", peer.name])
        self.link_up(dev)
        peer.link_up(peer_dev)

    def delete(self) -> None:
        """Stop the processes started with :meth:`popen`, then delete the namespace."""
        for proc in self._processes:
            _stop_group(proc)
        self._processes.clear()
        if self._created:
            subprocess.run(["ip", "netns", "delete", self.name], check=True, capture_output=True)
            self._created = False

    def __enter__(self) -> Self:
        """Create the namespace unless it exists."""
        if not self._created:
            self.create()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Delete the namespace whatever happened in the block."""
        self.delete()


def _stop_group(proc: subprocess.Popen[Any]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(_STOP_TIMEOUT)
            return
        except subprocess.TimeoutExpired:
            continue
