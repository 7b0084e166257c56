"""A simulated virtio-blk device on the Python slow path; the control surface of every blk device.

Theory of operation (virtio 1.2, section 5.2.6; Linux ``vdpa_sim_blk``):
each request chain carries a 16-byte header (type, ioprio, sector) in its
readable part, then data, and ends with one writable status byte.  The
device checks every request against the disk before touching it: sectors
inside the capacity, data a whole number of sectors, segments of DISCARD /
WRITE_ZEROES well formed.  A malformed request is answered with IOERR or
UNSUPP; a malformed *ring* breaks only its queue.  The backing store is a
file (``path``) or anonymous memory (``size``), accessed with
``pread``/``pwrite`` so that the data on disk is only ever changed by a
valid OUT, DISCARD or WRITE_ZEROES request.

:class:`BlkControl` is what every blk data path shares: the backing store,
the feature bits and the config space.  :class:`BlkDevice` serves the queues
in Python; ``sim-blk`` runs on the compiled engine
(:class:`pyvdpa.dataplane.blk.EngineBlkDevice`), and this device is the
reference the tests hold the compiled program to, request by request.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
from pathlib import Path
from typing import Protocol

from pyvdpa.device import ThreadedDevice, UnsupportedRequestError, Virtqueue
from pyvdpa.devices.net import count_ring_error
from pyvdpa.devices.stats import QueueStats
from pyvdpa.errors import ConfigError, IotlbMissError, RingError
from pyvdpa.vhost_user.protocol import ProtocolFeature
from pyvdpa.virtio.blk import (
    BLK_CONFIG_SIZE,
    BLK_ID_BYTES,
    BLK_SEGMENT_SIZE,
    SECTOR_SIZE,
    BlkConfig,
    BlkRequestHeader,
    DiscardWriteZeroesSegment,
)
from pyvdpa.virtio.constants import BlkFeature, BlkStatus, BlkType, DeviceId, VirtioFeature
from pyvdpa.virtio.ring import DescriptorChain

__all__ = [
    "BLK_FEATURES",
    "BLK_PROTOCOL_FEATURES",
    "MAX_DISCARD_SECTORS",
    "MAX_DISCARD_SEG",
    "SEG_MAX",
    "BlkControl",
    "BlkDevice",
    "RequestCounters",
]

SEG_MAX = 126
MAX_DISCARD_SECTORS = 1 << 22
MAX_DISCARD_SEG = 1
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10

BLK_FEATURES = (
    VirtioFeature.VERSION_1
    | VirtioFeature.RING_EVENT_IDX
    | VirtioFeature.RING_INDIRECT_DESC
    | VirtioFeature.RING_PACKED
    | VirtioFeature.IN_ORDER
    | VirtioFeature.LOG_ALL
    | BlkFeature.SEG_MAX
    | BlkFeature.BLK_SIZE
    | BlkFeature.FLUSH
    | BlkFeature.TOPOLOGY
    | BlkFeature.DISCARD
    | BlkFeature.WRITE_ZEROES
)

BLK_PROTOCOL_FEATURES = (
    ProtocolFeature.MQ
    | ProtocolFeature.LOG_SHMFD
    | ProtocolFeature.REPLY_ACK
    | ProtocolFeature.BACKEND_REQ
    | ProtocolFeature.CONFIG
    | ProtocolFeature.CONFIGURE_MEM_SLOTS
    | ProtocolFeature.INFLIGHT_SHMFD
    | ProtocolFeature.RESET_DEVICE
    | ProtocolFeature.INBAND_NOTIFICATIONS
)

_HEADER_SIZE = 16


class RequestCounters(Protocol):
    """The per-queue counters a request updates (Python's or the engine's)."""

    received_desc: int
    completed_desc: int
    invalid_buffer: int
    completion_errors: int
    packets: int
    bytes: int


class _RequestError(Exception):
    def __init__(self, status: BlkStatus, why: str) -> None:
        super().__init__(why)
        self.status = status


class BlkControl:
    """The virtio-blk control surface every blk data path shares.

    Opens the backing store: the file at ``path`` (read-only with
    ``readonly``), or a RAM disk of ``size`` bytes in a memfd, so that the
    kernel reads and writes both alike.  Gives the feature bits, the
    protocol features and the read-only config space (capacity, blk_size,
    seg_max, num_queues, discard and write-zeroes limits).
    """

    #: virtio device type and config space size (the device interface's).
    device_id = DeviceId.BLOCK
    config_size = BLK_CONFIG_SIZE

    features: int
    protocol_features: ProtocolFeature
    num_queues: int

    def __init__(
        self,
        *,
        path: str | os.PathLike[str] | None = None,
        size: int | None = None,
        readonly: bool = False,
        serial: str = "pyvdpa",
        queues: int = 1,
    ) -> None:
        super().__init__()
        if (path is None) == (size is None):
            raise ConfigError("sim-blk needs exactly one of path= or size=")
        if not 1 <= queues <= 64:
            raise ConfigError(f"queues must be 1..64, not {queues}")
        try:
            serial_id = serial.encode()
        except UnicodeEncodeError:
            # A command line's undecodable bytes arrive as surrogates.
            raise ConfigError(f"serial is not valid UTF-8: {serial!r}") from None
        if len(serial_id) > BLK_ID_BYTES:
            raise ConfigError(f"serial longer than {BLK_ID_BYTES} bytes: {serial!r}")
        if path is not None:
            p = Path(path)
            if not p.is_file():
                raise ConfigError(f"disk image not found: {p}")
            flags = os.O_RDONLY if readonly else os.O_RDWR
            try:
                self.fd = os.open(p, flags | os.O_CLOEXEC)
            except OSError as exc:
                raise ConfigError(f"cannot open {p}: {os.strerror(exc.errno or 0)}") from exc
            disk_size = os.fstat(self.fd).st_size
        else:
            assert size is not None
            if size <= 0:
                raise ConfigError(f"RAM disk size must be positive, not {size}")
            self.fd = os.memfd_create("pyvdpa-ramdisk", os.MFD_CLOEXEC)
            try:
                os.ftruncate(self.fd, size)
            except (OSError, OverflowError) as exc:
                # size=99999999999999999999T: no file is that large.
                os.close(self.fd)
                raise ConfigError(f"cannot make a RAM disk that large: {exc}") from None
            disk_size = size
        self.capacity = disk_size // SECTOR_SIZE
        if self.capacity == 0:
            os.close(self.fd)
            raise ConfigError(f"disk smaller than one sector ({disk_size} bytes)")
        self.readonly = readonly
        self.serial = serial_id
        self.num_queues = queues
        self.features = BLK_FEATURES | (BlkFeature.RO if readonly else 0)
        self.features |= BlkFeature.MQ if queues > 1 else 0
        self.protocol_features = BLK_PROTOCOL_FEATURES

    def close(self) -> None:
        """Close the backing store."""
        with contextlib.suppress(OSError):
            os.close(self.fd)

    def config(self) -> BlkConfig:
        """The config space as it stands."""
        return BlkConfig(
            capacity=self.capacity,
            seg_max=SEG_MAX,
            blk_size=SECTOR_SIZE,
            num_queues=self.num_queues,
            max_discard_sectors=MAX_DISCARD_SECTORS,
            max_discard_seg=MAX_DISCARD_SEG,
            discard_sector_alignment=1,
            max_write_zeroes_sectors=MAX_DISCARD_SECTORS,
            max_write_zeroes_seg=MAX_DISCARD_SEG,
            write_zeroes_may_unmap=1,
        )

    def get_config(self, offset: int, size: int) -> bytes:
        """Read the virtio-blk config space."""
        return self.config().read(offset, size)

    def set_config(self, offset: int, data: bytes) -> None:
        """Only the writeback byte is writable, and it is not offered."""
        raise UnsupportedRequestError("virtio-blk config space is read-only")

    def serve(self, chain: DescriptorChain, stats: RequestCounters) -> int:
        """Execute the request ``chain`` carries; return the bytes written into the chain.

        The reference rules, which the compiled program follows: a chain
        without a header or a status byte is returned untouched (counted as
        an invalid buffer); otherwise the status byte says how the request
        went.  Devices on the engine serve the requests a previous back-end
        left in flight with it.
        """
        if chain.writable_len() < 1 or chain.readable_len() < _HEADER_SIZE:
            stats.invalid_buffer += 1
            return 0
        readable = chain.read_all()
        header = BlkRequestHeader.unpack(readable[:_HEADER_SIZE])
        data_out = readable[_HEADER_SIZE:]
        data_in_len = chain.writable_len() - 1
        reply = b""
        try:
            reply = self._execute(header, data_out, data_in_len)
            status = BlkStatus.OK
        except _RequestError as exc:
            status = exc.status
            stats.completion_errors += 1
        except OSError:
            status = BlkStatus.IOERR
            stats.completion_errors += 1
        written = chain.write(reply, 0) if reply else 0
        chain.write(bytes([status]), chain.writable_len() - 1)
        stats.packets += 1
        stats.bytes += len(reply) + len(data_out)
        return written + 1

    def _range(self, sector: int, length: int) -> int:
        if length % SECTOR_SIZE:
            raise _RequestError(BlkStatus.IOERR, f"length {length} not a multiple of 512")
        if sector > self.capacity or sector + length // SECTOR_SIZE > self.capacity:
            raise _RequestError(BlkStatus.IOERR, f"sector {sector} beyond capacity")
        return sector * SECTOR_SIZE

    def _execute(self, header: BlkRequestHeader, data_out: bytes, data_in_len: int) -> bytes:
        kind = header.type
        if kind == BlkType.IN:
            offset = self._range(header.sector, data_in_len)
            data = os.pread(self.fd, data_in_len, offset)
            return data.ljust(data_in_len, b"\0")
        if kind == BlkType.OUT:
            self._writable()
            offset = self._range(header.sector, len(data_out))
            view = memoryview(data_out)
            while view:
                done = os.pwrite(self.fd, view, offset)
                view, offset = view[done:], offset + done
            return b""
        if kind == BlkType.FLUSH:
            if not self.readonly:
                os.fdatasync(self.fd)
            return b""
        if kind == BlkType.GET_ID:
            return self.serial.ljust(BLK_ID_BYTES, b"\0")[: min(BLK_ID_BYTES, data_in_len)]
        if kind in (BlkType.DISCARD, BlkType.WRITE_ZEROES):
            self._writable()
            self._discard_or_zero(kind, data_out)
            return b""
        raise _RequestError(BlkStatus.UNSUPP, f"request type {kind} unsupported")

    def _writable(self) -> None:
        if self.readonly:
            raise _RequestError(BlkStatus.IOERR, "device is read-only")

    def _discard_or_zero(self, kind: int, data: bytes) -> None:
        if (
            not data
            or len(data) % BLK_SEGMENT_SIZE
            or len(data) // BLK_SEGMENT_SIZE > MAX_DISCARD_SEG
        ):
            raise _RequestError(BlkStatus.UNSUPP, "malformed discard/write-zeroes segments")
        for segment in DiscardWriteZeroesSegment.unpack_all(data):
            if segment.flags & ~1 or (kind == BlkType.DISCARD and segment.flags):
                raise _RequestError(BlkStatus.UNSUPP, f"segment flags {segment.flags:#x}")
            if segment.num_sectors > MAX_DISCARD_SECTORS:
                raise _RequestError(BlkStatus.IOERR, "segment too long")
            offset = self._range(segment.sector, segment.num_sectors * SECTOR_SIZE)
            length = segment.num_sectors * SECTOR_SIZE
            if kind == BlkType.DISCARD:
                _fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
            else:
                _zero(self.fd, offset, length)


class BlkDevice(BlkControl, ThreadedDevice):
    """A virtio-blk disk backed by a file or by memory, served by Python threads.

    The reference implementation of the request rules: the device ``sim-blk``
    runs, :class:`~pyvdpa.dataplane.blk.EngineBlkDevice`, is tested request
    by request against it, as the compiled ring walk is against
    :func:`~pyvdpa.virtio.ring.walk_chain`.  Inflight I/O is tracked, split
    and packed.  Works behind an IOMMU (``VIRTIO_F_ACCESS_PLATFORM``).
    """

    access_platform = True
    inflight_tracking = True

    def __init__(
        self,
        *,
        path: str | os.PathLike[str] | None = None,
        size: int | None = None,
        readonly: bool = False,
        serial: str = "pyvdpa",
        queues: int = 1,
    ) -> None:
        super().__init__(path=path, size=size, readonly=readonly, serial=serial, queues=queues)
        self.stats = [QueueStats() for _ in range(queues)]

    # ------------------------------------------------------------------ data path

    def process(self, vring: Virtqueue) -> None:
        """Serve every available request of ``vring``."""
        stats = self.stats[vring.index]
        pushed = False
        while True:
            try:
                chain = vring.pop()
            except RingError as exc:
                count_ring_error(stats, exc)
                raise
            except IotlbMissError:
                # Requests completed before the missing translation are
                # signalled now, not once it arrives.
                if pushed:
                    vring.notify()
                raise
            if chain is None:
                break
            stats.received_desc += 1
            written = self.serve(chain, stats)
            vring.push(chain, written)
            stats.completed_desc += 1
            pushed = True
        if pushed:
            vring.notify()


_LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _LIBC.fallocate(fd, mode, ctypes.c_long(offset), ctypes.c_long(length)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _zero(fd: int, offset: int, length: int) -> None:
    try:
        _fallocate(fd, _FALLOC_FL_ZERO_RANGE | _FALLOC_FL_KEEP_SIZE, offset, length)
    except OSError:
        chunk = bytes(min(length, 1 << 20))
        while length:
            n = os.pwrite(fd, chunk[: min(length, len(chunk))], offset)
            offset += n
            length -= n
