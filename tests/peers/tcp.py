"""TCP streams between a guest and a host network namespace.

Theory of operation: :class:`StreamServer` runs a small Python server inside
a network namespace (``ip netns exec``), bound to an address there, with two
ports:

* the *sink* port reads a connection to its end (the client half-closes,
  as busybox ``nc`` does at the end of its input), then answers
  ``<md5> <bytes>`` and closes;
* the *source* port sends :attr:`StreamServer.source_size` pseudo-random
  bytes and closes.

For each connection it prints ``sink: bytes=N md5=H`` or
``source: bytes=N md5=H``, so a test compares what the guest computed with
what the host saw, byte for byte.
"""

from __future__ import annotations

import re
import signal
import sys
from dataclasses import dataclass

from peers.common import PeerProcess
from peers.netns import NetNamespace

__all__ = ["SINK_PORT", "SOURCE_PORT", "StreamServer", "Transfer"]

SINK_PORT = 5001
SOURCE_PORT = 5002

_READY_TIMEOUT = 15.0

_SERVER = r"""
import hashlib, random, socket, sys, threading

address, sink_port, source_port, size = sys.argv[1], *map(int, sys.argv[2:5])

def listen(port):
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((address, port))
    server.listen(4)
    return server

def sink(server):
    while True:
        conn, _ = server.accept()
        digest, count = hashlib.md5(), 0
        with conn:
            while chunk := conn.recv(1 << 16):
                digest.update(chunk)
                count += len(chunk)
            conn.sendall(f"{digest.hexdigest()} {count}\n".encode())
        print(f"sink: bytes={count} md5={digest.hexdigest()}", flush=True)

def source(server):
    data = random.Random(size).randbytes(size)
    while True:
        conn, _ = server.accept()
        with conn:
            conn.sendall(data)
        print(f"source: bytes={size} md5={hashlib.md5(data).hexdigest()}", flush=True)

servers = listen(sink_port), listen(source_port)
threading.Thread(target=sink, args=(servers[0],), daemon=True).start()
threading.Thread(target=source, args=(servers[1],), daemon=True).start()
print("listening", flush=True)
threading.Event().wait()
"""


@dataclass(frozen=True, slots=True)
class Transfer:
    """One connection as the server saw it."""

    kind: str
    bytes: int
    md5: str


class StreamServer(PeerProcess):
    """The sink and source server on ``address`` inside ``netns``."""

    def __init__(self, netns: NetNamespace, address: str, *, source_size: int) -> None:
        """Describe the server; :meth:`start` (or ``with``) runs it."""
        self.address = address
        self.source_size = source_size
        argv = [
            *netns.exec_prefix,
            sys.executable,
            "-u",
            "-c",
            _SERVER,
            address,
            str(SINK_PORT),
            str(SOURCE_PORT),
            str(source_size),
        ]
        super().__init__(argv, name=f"stream server {address}", program=netns.exec_prefix[0])

    def wait_transfer(self, kind: str, timeout: float = 10.0) -> Transfer:
        """Wait until a ``kind`` (``sink`` or ``source``) connection has completed."""
        found = self.wait_for(
            re.compile(f"^{kind}: bytes=(\\d+) md5=([0-9a-f]{{32}})$", re.M), timeout
        )
        return Transfer(kind, int(found[1]), found[2])

    def _wait_ready(self) -> None:
        self.wait_for("listening", _READY_TIMEOUT)

    def _request_exit(self) -> None:
        self._signal_group(signal.SIGTERM)
