"""Launchers for the third-party peers pyvdpa is tested against.

Theory of operation: each peer is a context manager that starts a real program
in its own process group and stops the whole group on exit — DPDK testpmd
(:mod:`peers.dpdk`: virtio-user front-end, net_vhost back-end),
qemu-storage-daemon (:mod:`peers.qsd`: vhost-user-blk back-end), a Linux guest
under QEMU (:mod:`peers.guest`: virtio-net and virtio-blk drivers) — plus
network namespaces (:mod:`peers.netns`) as private hosts. :class:`PeerPool`
owns many of them for one test and stops them in reverse order of start, so a
guest goes before the back-ends it uses. ``scripts/setup.sh`` installs the
programs and caches the guest kernel.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self, TypeVar

from peers.common import PeerProcess
from peers.guest import Guest, GuestImage, build_initramfs
from peers.netns import NetNamespace

__all__ = ["PeerPool"]

_Peer = TypeVar("_Peer", bound=PeerProcess | NetNamespace)
_namespaces = itertools.count()


class PeerPool:
    """Peers started for one test, all stopped by :meth:`close`.

    ``workdir`` receives built artefacts such as guest initramfs images;
    ``sock_dir`` is a directory short enough for unix socket paths.
    """

    def __init__(self, workdir: Path, sock_dir: Path, image: GuestImage | None = None) -> None:
        """Create an empty pool; the guest image is looked up on first use."""
        self.workdir = workdir
        self.sock_dir = sock_dir
        self._image = image
        self._stack = contextlib.ExitStack()
        self._guests = itertools.count()

    def start(self, peer: _Peer) -> _Peer:
        """Start ``peer`` (unless already running) and stop it on :meth:`close`."""
        peer.__enter__()
        self._stack.push(peer)
        return peer

    def guest(
        self,
        script: str,
        devices: Sequence[str] = (),
        *,
        mem: str = "512M",
        smp: int = 1,
        append: str = "",
    ) -> Guest:
        """Boot a guest that runs ``script`` with the given QEMU ``devices``."""
        if self._image is None:
            self._image = GuestImage.find()
        initramfs = build_initramfs(
            script, self.workdir / f"initramfs-{next(self._guests)}.gz", self._image
        )
        return self.start(Guest(self._image, initramfs, devices, mem=mem, smp=smp, append=append))

    def netns(self, name: str | None = None) -> NetNamespace:
        """Create a network namespace, named uniquely unless ``name`` is given."""
        if name is None:
            name = f"pyvdpa-{os.getpid()}-{next(_namespaces)}"
        return self.start(NetNamespace(name))

    def close(self) -> None:
        """Stop every peer, last started first."""
        self._stack.close()

    def __enter__(self) -> Self:
        """Return the pool itself."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop every peer."""
        self.close()
