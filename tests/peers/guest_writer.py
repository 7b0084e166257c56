"""Sequential O_DIRECT block writes that record each acknowledged block.

Run in the VDUSE guest (``python guest_writer.py DISK LOG COUNT``): writes
block ``i`` (4 KiB, :func:`pattern` of ``i``) for ``i`` in ``0..COUNT-1``
and appends ``i`` to LOG once the write returned; exits 1 at the first I/O
error.  While the device's process is killed and restarted the writes
block, then go on.
"""

from __future__ import annotations

import mmap
import os
import sys

BLOCK = 4096


def pattern(index: int) -> bytes:
    """Block ``index``'s content: its number, repeated."""
    return index.to_bytes(8, "little") * (BLOCK // 8)


def main(disk: str, log: str, count: int) -> int:
    fd = os.open(disk, os.O_RDWR | os.O_DIRECT)
    buf = mmap.mmap(-1, BLOCK)
    with open(log, "a", buffering=1) as acked:
        for index in range(count):
            buf.seek(0)
            buf.write(pattern(index))
            try:
                os.pwritev(fd, [buf], index * BLOCK)
            except OSError as exc:
                print(f"block {index}: {exc}", file=sys.stderr)
                return 1
            acked.write(f"{index}\n")
    os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
