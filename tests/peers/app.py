"""``pyvdpa run`` as a program of its own, next to the peers it serves.

Theory of operation: the vDPA example application (:mod:`pyvdpa.app`) runs
as a separate process, exactly as a user starts it, optionally inside a
network namespace (``ip netns exec``) so that the TAP of a ``sim-net,mode=tap``
device is created there.  It runs with ``-i``: its console reads commands on
standard input and answers each one before printing the next ``vdpa> ``
prompt, so :meth:`PyvdpaRun.command` returns exactly what a command printed.
The messages ports print on their own (``new port``, ``destroy port``) also
land in the output and can be awaited with :meth:`PyvdpaRun.wait_for`.
Closing its standard input ends the console, which stops every port and
removes its sockets and TAPs.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from peers.common import PeerError, PeerProcess, check_socket_path
from peers.netns import NetNamespace
from pyvdpa.app import QUEUE_ALL

__all__ = ["RING_ERRORS", "PyvdpaRun", "parse_stats", "ring_errors"]

_PROMPT = re.compile(re.escape("vdpa> "))
_READY_TIMEOUT = 30.0

#: The error counters of a queue, as ``stats`` names them.
RING_ERRORS = ("bad_desc_errors", "exceed_max_chain", "invalid_buffer", "completion_errors")


_VIRTQ = re.compile(r"^\tVirtq (\d+):$")
_COUNTER = re.compile(r"^\t\t(\w+) +(\d+)$")


def parse_stats(text: str) -> dict[int, dict[str, int]]:
    """``stats`` output as ``{queue: {counter: value}}``."""
    queues: dict[int, dict[str, int]] = {}
    counters: dict[str, int] = {}
    for line in text.splitlines():
        if virtq := _VIRTQ.match(line):
            counters = queues.setdefault(int(virtq[1]), {})
        elif counter := _COUNTER.match(line):
            counters[counter[1]] = int(counter[2])
    return queues


def ring_errors(stats: Mapping[int, Mapping[str, int]]) -> dict[int, dict[str, int]]:
    """The non-zero error counters in parsed ``stats`` output, by queue."""
    found = {
        qid: {name: counters[name] for name in RING_ERRORS if counters[name]}
        for qid, counters in stats.items()
    }
    return {qid: errors for qid, errors in found.items() if errors}


class PyvdpaRun(PeerProcess):
    """``pyvdpa -v run -i --vdev ... --iface PREFIX``, one socket per device.

    Device ``i`` (in ``vdevs`` order) is served on :attr:`sockets` ``[i]``,
    ``PREFIX0``, ``PREFIX1``…; with ``client`` the application connects to
    those paths instead of listening on them.  With ``netns`` it runs inside
    that namespace.
    """

    def __init__(
        self,
        vdevs: Sequence[str],
        prefix: Path,
        *,
        client: bool = False,
        netns: NetNamespace | None = None,
    ) -> None:
        """Describe the application; :meth:`start` (or ``with``) runs it."""
        self.sockets = tuple(check_socket_path(f"{prefix}{index}") for index in range(len(vdevs)))
        argv = [sys.executable, "-u", "-m", "pyvdpa", "-v", "run", "-i", "--iface", str(prefix)]
        for vdev in vdevs:
            argv += ["--vdev", vdev]
        if client:
            argv.append("--client")
        program = sys.executable
        if netns is not None:
            argv = [*netns.exec_prefix, *argv]
            program = argv[0]
        super().__init__(argv, name=f"pyvdpa run {prefix.name}", program=program)
        self._console_at = 0

    def command(self, line: str, timeout: float = 10.0) -> str:
        """Run one console command; return what it printed before the next prompt."""
        prompt = self.wait_for(_PROMPT, timeout, self._console_at)
        start = prompt.end()
        self.write(line + "\n")
        answer = self.wait_for(_PROMPT, timeout, start)
        self._console_at = answer.start()
        return self.output(start)[: answer.start() - start]

    def stats(self, device: str, qid: int = QUEUE_ALL) -> dict[int, dict[str, int]]:
        """The ``stats`` counters of queue ``qid`` of ``device`` (default: every queue)."""
        return parse_stats(self.command(f"stats {device} {qid:#x}"))

    def count(self, text: str, start: int = 0) -> int:
        """How many times ``text`` appears in the output from offset ``start``."""
        return self.output(start).count(text)

    def _wait_ready(self) -> None:
        # Every port prints its socket line before the console's first prompt.
        self.wait_for(_PROMPT, _READY_TIMEOUT)
        for path in self.sockets:
            if f"({path}) vhost-user" not in self.output():
                raise PeerError(self._describe(f"created no port on {path}"))
