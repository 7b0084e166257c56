"""The IOTLB: IOTLB_MSG updates and invalidations, and translations through them.

Input: a list of operations, each an opcode byte then its fields.  The
opcode's low bits choose update, invalidate, translate, view (through
:class:`~pyvdpa.memory.IotlbAddressSpace`), ``uaddr_ranges`` or clear;
bit 3 makes the fields full 64-bit values instead of small offsets (small
offsets make ranges meet, overlap and land in the mapped memory), or
builds the compiled data path's translation table
(:func:`~pyvdpa.dataplane.queues.iotlb_table`); bit 4
asks for a device write; bits 5-6 are the permission.

Verdicts: every operation returns or raises a
:class:`~pyvdpa.errors.GuestMemoryError`; the table stays sorted, without
overlaps or empty entries and coalesced; the compiled data path's table
cuts every entry into rows that cover it exactly; and it agrees with a model that
answers for one address at a time from the history of operations (the
last update or invalidation covering it wins): each entry's first and last
byte translate as the model says, translations return what the model
gives for both ends of the range, and a miss or a refused permission is
reported at an address the model agrees about.
"""

from __future__ import annotations

from fuzz_targets.reader import Reader
from pyvdpa.dataplane.queues import iotlb_table
from pyvdpa.errors import GuestMemoryError, IotlbMissError, IotlbPermissionError
from pyvdpa.memory import GuestMemory, Iotlb, IotlbAddressSpace, MemoryRegion, allocate_shared
from pyvdpa.memory.iotlb import IotlbEntry, IotlbPerm

__all__ = ["test_one_input"]

MEMORY_SIZE = 0x10_0000
"""Bytes of front-end memory a view may land in."""
#: The unit of small offsets.
_STEP = 0x10
_MAX_OPS = 64
_ADDRESS_LIMIT = 1 << 64

#: A model record: (iova, end, uaddr or None for an invalidation, permission).
Record = tuple[int, int, int | None, IotlbPerm]


class _Memory:
    """Front-end memory, one region, shared by every input of a run."""

    def __init__(self) -> None:
        self.shared = allocate_shared(MEMORY_SIZE, "fuzz-iotlb")
        self.memory = GuestMemory(1)
        region = MemoryRegion(0, MEMORY_SIZE, self.shared.address, 0)
        self.memory.add_region(region, self.shared.fd)


_memory: _Memory | None = None


def _the_memory() -> _Memory:
    global _memory
    if _memory is None:
        _memory = _Memory()
    return _memory


def _model(history: list[Record], address: int) -> tuple[int, IotlbPerm] | None:
    """(front-end address, permission) of one I/O virtual address, or None."""
    for iova, end, uaddr, perm in reversed(history):
        if iova <= address < end:
            return None if uaddr is None else (uaddr + address - iova, perm)
    return None


def _allows(perm: IotlbPerm, write: bool) -> bool:
    return bool(int(perm) & (int(IotlbPerm.WO) if write else int(IotlbPerm.RO)))


def _check_table(entries: tuple[IotlbEntry, ...], history: list[Record]) -> None:
    previous: IotlbEntry | None = None
    for entry in entries:
        assert entry.size > 0 and entry.end <= _ADDRESS_LIMIT, entry
        assert entry.perm is not IotlbPerm.NONE, entry
        if previous is not None:
            assert previous.end <= entry.iova, (previous, entry)
            mergeable = (
                previous.end == entry.iova
                and previous.uaddr + previous.size == entry.uaddr
                and previous.perm == entry.perm
            )
            assert not mergeable, (previous, entry)
        for address in (entry.iova, entry.end - 1):
            expected = (entry.uaddr + address - entry.iova, entry.perm)
            assert _model(history, address) == expected, (entry, address)
        for outside in (entry.iova - 1, entry.end):
            if 0 <= outside < _ADDRESS_LIMIT and (previous is None or outside >= previous.end):
                found = _model(history, outside)
                covered = any(e.iova <= outside < e.end for e in entries)
                assert (found is not None) == covered, (entry, outside, found)
        previous = entry


def _check_translate(
    iotlb: Iotlb, history: list[Record], iova: int, length: int, write: bool
) -> None:
    try:
        uaddr = iotlb.translate(iova, length, write=write)
    except (IotlbMissError, IotlbPermissionError) as exc:
        found = _model(history, exc.iova)
        if isinstance(exc, IotlbMissError):
            assert found is None, (iova, length, exc.iova, found)
        else:
            assert found is not None and not _allows(found[1], write), (iova, exc.iova, found)
        assert iova <= exc.iova < iova + max(length, 1), (iova, length, exc.iova)
        return
    except GuestMemoryError:
        return
    last = iova + max(length, 1) - 1
    first_found, last_found = _model(history, iova), _model(history, last)
    assert first_found is not None and first_found[0] == uaddr, (iova, uaddr, first_found)
    assert last_found is not None and last_found[0] == uaddr + last - iova, (last, last_found)
    assert _allows(first_found[1], write) and _allows(last_found[1], write)


def _check_kernel_table(space: IotlbAddressSpace) -> None:
    """The compiled data path's table of the IOTLB covers each entry exactly, in order."""
    rows = [tuple(int(v) for v in row) for row in iotlb_table(space)]
    entries = space.iotlb.snapshot()
    if not entries:
        assert rows == [(0, 0, 0, 0, 0)], rows
        return
    at = 0
    for entry in entries:
        iova = entry.iova
        while iova < entry.end:
            row_iova, row_size = rows[at][0], rows[at][1]
            assert row_iova == iova and 0 < row_size <= entry.end - iova, (entry, rows[at])
            iova += row_size
            at += 1
    assert at == len(rows), (entries, rows)


def test_one_input(data: bytes) -> None:
    """Apply the operations to an IOTLB; check it against the model after each."""
    reader = Reader(data)
    memory = _the_memory()
    iotlb = Iotlb()
    space = IotlbAddressSpace(iotlb, memory.memory)
    history: list[Record] = []
    for _ in range(_MAX_OPS):
        if reader.exhausted:
            break
        op = reader.u8()
        wide, write, perm = bool(op & 0x08), bool(op & 0x10), IotlbPerm(op >> 5 & 3)
        if wide:
            iova, size, uaddr = reader.u64(), reader.u64(), reader.u64()
        else:
            iova, size = reader.u16() * _STEP, reader.u16() * _STEP
            uaddr = memory.shared.address + reader.u16() * _STEP
        code = op & 0x07
        try:
            if code == 0:
                iotlb.update(iova, size, uaddr, perm)
                history.append((iova, iova + size, uaddr, perm))
            elif code == 1:
                iotlb.invalidate(iova, size)
                history.append((iova, iova + size, None, perm))
            elif code == 2:
                _check_translate(iotlb, history, iova, size, write)
            elif code == 3:
                view = space.view(iova, size, write=write)
                assert len(view) == size
                view.release()
            elif code == 4:
                parts = iotlb.uaddr_ranges(iova, size)
                for offset, length, start in parts:
                    assert offset >= 0 and offset + length <= size, (iova, size, parts)
                    found = _model(history, iova + offset)
                    assert found is not None and found[0] == start, (iova, parts, found)
            elif code == 5:
                iotlb.clear()
                history.append((0, _ADDRESS_LIMIT, None, perm))
            elif code == 6:
                _check_kernel_table(space)
        except GuestMemoryError:
            pass
        _check_table(iotlb.snapshot(), history)
