"""Shared fixtures: short socket directories, the fd leak check and third-party peer launchers."""

from __future__ import annotations

import gc
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from fds import fd_count, settled_fd_count
from peers import PeerPool
from peers.guest import GuestImage

__all__ = ["guest_image", "no_fd_leak", "peers", "sock_dir"]

#: Seconds a test's fds may take to close after it (threads close theirs late).
FD_SETTLE = 1.0


@pytest.fixture
def no_fd_leak() -> Iterator[None]:
    """Fail the test if it leaves more or fewer fds open than it found.

    Modules opt in with ``pytestmark = pytest.mark.usefixtures("no_fd_leak")``.
    """
    gc.collect()
    before = fd_count()
    yield
    gc.collect()
    assert settled_fd_count(before, FD_SETTLE) == before


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
