"""Shared memory for the front-end role.

Theory of operation (vhost-user spec, "Memory access"): a front-end shares
guest memory with a back-end by sending a file descriptor with each region
of its memory table.  :func:`allocate_shared` creates a memfd mapping
(:class:`SharedMemory`) and reports its virtual address, which is what a
front-end sends as ``userspace_addr``.
"""

from __future__ import annotations

import os
from types import TracebackType
from typing import Self

from pyvdpa.errors import GuestMemoryError
from pyvdpa.memory.regions import FdMapping

__all__ = ["SharedMemory", "allocate_shared"]


class SharedMemory:
    """Anonymous shared memory (a memfd) mapped read/write in this process.

    This is what a front-end shares with a back-end: send :attr:`fd` with a
    region whose ``userspace_addr`` is :attr:`address`.  The object owns the
    fd and closes it in :meth:`close`.
    """

    __slots__ = ("_mapping", "address", "fd", "size")

    def __init__(self, fd: int, size: int) -> None:
        self._mapping = FdMapping(fd, size)
        self.fd = fd
        self.size = size
        self.address = self._mapping.address

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def buf(self) -> memoryview:
        """A writable view of the whole memory, released by :meth:`close`."""
        return self._mapping.view(0, self.size)

    def close(self) -> None:
        """Unmap and close the fd.  Safe to call repeatedly.

        A view still exported elsewhere keeps the memory mapped until the
        garbage collector drops it.
        """
        self._mapping.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def allocate_shared(size: int, name: str = "pyvdpa") -> SharedMemory:
    """Create ``size`` bytes of zeroed shared memory backed by a close-on-exec memfd.

    Raises :class:`GuestMemoryError` if ``size`` is not positive or the
    memfd cannot be created or mapped.
    """
    if size <= 0:
        raise GuestMemoryError(f"cannot allocate {size} bytes of shared memory")
    try:
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
    except OSError as exc:
        raise GuestMemoryError(f"memfd_create failed: {exc.strerror}") from exc
    try:
        os.ftruncate(fd, size)
        return SharedMemory(fd, size)
    except OSError as exc:
        os.close(fd)
        raise GuestMemoryError(f"cannot size a memfd to {size} bytes: {exc.strerror}") from exc
    except GuestMemoryError:
        os.close(fd)
        raise
