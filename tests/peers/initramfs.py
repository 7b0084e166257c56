"""More files in a guest initramfs: test data and host programs.

Theory of operation: the kernel unpacks an initramfs made of several
concatenated archives, each compressed on its own, in order; a later archive
adds to what the earlier ones made (Linux
``Documentation/driver-api/early-userspace/buffer-format.rst``).  So
:func:`add_files` appends one more gzip'd ``newc`` archive to an image that
:func:`peers.guest.build_initramfs` wrote, leaving that one untouched.

The guest's userland is busybox, whose applets lack a few options (its
``blkdiscard`` has no ``-z``).  A dynamically linked host program runs in the
guest once its ELF interpreter and the shared libraries ``ldd`` names sit at
the same paths there (:func:`host_program`): host and guest run the same
Debian x86-64 userland on the same kernel ABI.
"""

from __future__ import annotations

import gzip
import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

from peers.common import PeerError

__all__ = ["add_files", "host_program"]

# "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
# "/lib64/ld-linux-x86-64.so.2 (0x...)"; the vDSO has no file.
_LDD_PATH = re.compile(r"(?:=>\s*)?(/\S+)\s+\(0x[0-9a-f]+\)")


def host_program(path: str) -> dict[str, Path]:
    """The host program at ``path`` and every library it loads, by absolute path.

    The map suits :func:`add_files`: each file lands in the guest where the
    program (and its ELF interpreter) looks for it.
    """
    program = Path(path)
    if not program.is_file():
        raise PeerError(f"{path} not found: run scripts/setup.sh")
    listing = subprocess.run(["ldd", path], capture_output=True, text=True, check=True).stdout
    files = {path: program}
    for line in listing.splitlines():
        found = _LDD_PATH.search(line)
        if found is not None:
            files[found[1]] = Path(found[1])
    return files


def add_files(initramfs: Path, files: Mapping[str, Path | bytes]) -> Path:
    """Append ``files`` to the image at ``initramfs``; return ``initramfs``.

    Keys are absolute paths in the guest; values are host files (copied with
    their mode, symbolic links followed) or contents.  Parent directories are
    created as needed.
    """
    with tempfile.TemporaryDirectory(prefix="pyvdpa-initramfs-") as staging:
        root = Path(staging)
        for guest_path, source in files.items():
            relative = PurePosixPath(guest_path).relative_to("/")
            dest = root / relative
            dest.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(source, bytes):
                dest.write_bytes(source)
            else:
                shutil.copy(source, dest)
        # Sorted, a directory precedes what it holds, as the unpacker needs.
        members = sorted(str(path.relative_to(root)) for path in root.rglob("*"))
        archive = subprocess.run(
            ["cpio", "--create", "--format=newc", "--owner=0:0", "--quiet"],
            input="\n".join(members).encode() + b"\n",
            cwd=root,
            capture_output=True,
            check=True,
        ).stdout
    with initramfs.open("ab") as image:
        image.write(gzip.compress(archive, compresslevel=1))
    return initramfs
