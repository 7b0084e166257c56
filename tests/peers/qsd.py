"""qemu-storage-daemon as a third-party vhost-user-blk back-end.

Theory of operation: ``qemu-storage-daemon`` (QEMU 7.2) opens a raw image with
the ``file`` block driver and exports it as a vhost-user-blk device on a unix
socket it listens on (QEMU ``docs/tools/qemu-storage-daemon.rst``, export type
``vhost-user-blk``). The daemon is usable once that socket exists; SIGTERM
makes it close its exports and exit.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Self

from peers.common import PeerError, PeerProcess, PeerTimeoutError, check_socket_path, qemu_opt

__all__ = ["StorageDaemon"]

_POLL_INTERVAL = 0.02


class StorageDaemon(PeerProcess):
    """A qemu-storage-daemon exporting one raw image over vhost-user-blk."""

    def __init__(
        self,
        image_path: str | os.PathLike[str],
        socket_path: str | os.PathLike[str],
        *,
        writable: bool = True,
        num_queues: int = 1,
        ready_timeout: float = 10.0,
    ) -> None:
        """Describe the daemon; :meth:`start` (or ``with``) runs it."""
        self.socket_path = check_socket_path(socket_path)
        self._ready_timeout = ready_timeout
        blockdev = f"driver=file,node-name=disk,filename={qemu_opt(image_path)}"
        export = ",".join(
            [
                "type=vhost-user-blk",
                "id=export0",
                "node-name=disk",
                "addr.type=unix",
                f"addr.path={qemu_opt(self.socket_path)}",
                f"writable={'on' if writable else 'off'}",
                f"num-queues={num_queues}",
            ]
        )
        super().__init__(
            ["qemu-storage-daemon", "--blockdev", blockdev, "--export", export],
            name=f"qemu-storage-daemon[{self.socket_path.name}]",
        )

    def start(self) -> Self:
        """Start the daemon and wait until its export socket exists."""
        # Readiness is judged by the socket's presence: a stale one must go.
        self._remove_socket()
        super().start()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self._ready_timeout
        while not self.socket_path.is_socket():
            if not self.running:
                raise PeerError(self._describe(f"exited before creating {self.socket_path}"))
            if time.monotonic() >= deadline:
                raise PeerTimeoutError(
                    self._describe(f"did not create {self.socket_path} in {self._ready_timeout} s")
                )
            time.sleep(_POLL_INTERVAL)

    def _request_exit(self) -> None:
        self._signal_group(signal.SIGTERM)

    def _cleanup(self) -> None:
        self._remove_socket()

    def _remove_socket(self) -> None:
        if self.socket_path.is_socket():
            self.socket_path.unlink()
