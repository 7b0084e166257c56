"""Shared fixtures: short socket directories and third-party peer launchers."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from peers import PeerPool
from peers.guest import GuestImage

__all__ = ["guest_image", "peers", "sock_dir"]


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A fresh directory for unix sockets, removed after the test.

    It sits directly in /tmp: pytest's own temporary paths, or a long $TMPDIR,
    can push socket paths past the 107 bytes sockaddr_un allows.
    """
    path = Path(tempfile.mkdtemp(prefix="pv-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    """The cached guest kernel and modules; fails naming scripts/setup.sh if absent."""
    return GuestImage.find()


@pytest.fixture
def peers(tmp_path: Path, sock_dir: Path) -> Iterator[PeerPool]:
    """A pool of third-party peers for the test, all stopped at teardown.

    Torn down before ``sock_dir``, so peers never see their sockets vanish.
    """
    with PeerPool(tmp_path, sock_dir) as pool:
        yield pool
