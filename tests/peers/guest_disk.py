"""Block checks a guest runs on a disk: data at offsets with O_DIRECT, and random I/O speed.

Run by the host's Python inside the VDUSE guest (``python guest_disk.py
COMMAND DISK ...``); prints ``name value`` lines.

* ``regions DISK SEED N`` writes N pseudo-random regions (block, count) at
  the offsets :func:`regions` gives, reads each back with O_DIRECT and
  prints whether it matched;
* ``speed DISK COUNT`` times COUNT 4 KiB random writes, then COUNT random
  reads, with O_DIRECT, in the upper half of the disk, and prints the IOPS
  of each.
"""

from __future__ import annotations

import mmap
import os
import random
import sys
import time

BLOCK = 4096


def regions(disk_blocks: int, seed: str, count: int) -> list[tuple[int, int, bytes]]:
    """(first block, blocks, data) of ``count`` regions: block 0, the last, the rest low.

    Besides blocks 0 and the last, regions lie in the lower half of the disk.

    :func:`speed` writes only the upper half (the last block excepted).
    """
    rng = random.Random(seed)
    picks = [(0, 1), (disk_blocks - 1, 1)]
    while len(picks) < count:
        blocks = rng.choice((1, 3, 16, 64))
        start = rng.randrange(1, disk_blocks // 2 - blocks)
        if all(start + blocks <= s or s + n <= start for s, n in picks):
            picks.append((start, blocks))
    return [(s, n, rng.randbytes(n * BLOCK)) for s, n in picks]


def _aligned(size: int) -> mmap.mmap:
    return mmap.mmap(-1, size)


def check_regions(disk: str, seed: str, count: int) -> None:
    fd = os.open(disk, os.O_RDWR | os.O_DIRECT)
    blocks = os.lseek(fd, 0, os.SEEK_END) // BLOCK
    ok = True
    for start, n, data in regions(blocks, seed, count):
        buf = _aligned(n * BLOCK)
        buf.write(data)
        os.pwritev(fd, [buf], start * BLOCK)
        back = _aligned(n * BLOCK)
        os.preadv(fd, [back], start * BLOCK)
        ok = ok and back[:] == data
    os.fsync(fd)
    os.close(fd)
    print("blocks", blocks)
    print("readback", "ok" if ok else "mismatch")


def speed(disk: str, count: int) -> None:
    fd = os.open(disk, os.O_RDWR | os.O_DIRECT)
    blocks = os.lseek(fd, 0, os.SEEK_END) // BLOCK
    rng = random.Random(7)
    offsets = [rng.randrange(blocks // 2, blocks - 1) * BLOCK for _ in range(count)]
    buf = _aligned(BLOCK)
    buf.write(rng.randbytes(BLOCK))
    start = time.monotonic()
    for offset in offsets:
        os.pwritev(fd, [buf], offset)
    write_s = time.monotonic() - start
    start = time.monotonic()
    for offset in offsets:
        os.preadv(fd, [buf], offset)
    read_s = time.monotonic() - start
    os.close(fd)
    print("write_iops", round(count / write_s))
    print("read_iops", round(count / read_s))


if __name__ == "__main__":
    command, target = sys.argv[1], sys.argv[2]
    if command == "regions":
        check_regions(target, sys.argv[3], int(sys.argv[4]))
    else:
        speed(target, int(sys.argv[3]))
