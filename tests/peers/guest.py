"""A Linux guest under QEMU as a third-party virtio driver.

Theory of operation: QEMU 7.2 (``qemu-system-x86_64``, TCG, since nested KVM
is unavailable) boots Debian's cloud kernel with a busybox initramfs built per
test. The initramfs ``/init`` mounts the pseudo file systems, loads the virtio
modules (modular in that kernel) in dependency order, runs the test's shell
script, prints :data:`END_MARKER` with the script's exit status and powers the
machine off, which ends QEMU (``-no-reboot`` turns a panic into an exit too).

Guest memory is a shared memfd (``memory-backend-memfd,share=on``) so that a
vhost-user back-end can map it (vhost-user spec, "Memory regions"). QEMU 7.2
under TCG crashes when a vhost-user device uses MSI-X, so the device helpers
set ``vectors=0`` and the guest falls back to INTx.

The kernel and modules come from the cache that ``scripts/setup.sh`` fills.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from peers.common import PeerError, PeerProcess, check_socket_path, qemu_opt

__all__ = [
    "END_MARKER",
    "GUEST_MODULES",
    "Guest",
    "GuestImage",
    "build_initramfs",
    "cache_dir",
    "script_status",
    "vhost_user_blk_args",
    "vhost_user_net_args",
]

GUEST_MODULES: tuple[str, ...] = (
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_blk",
)
"""Modules the guest loads, each after those it depends on; scripts/setup.sh caches them."""

END_MARKER = "pyvdpa-guest: end status="
"""Printed on the guest console, followed by the script's exit status."""

_END_STATUS = re.compile(re.escape(END_MARKER) + r"(\d+)")
_BUSYBOX = Path("/bin/busybox")
_KERNEL_STAMP = "kernel-package"

_INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for module in {modules}; do
    insmod /lib/modules/$module.ko || echo "pyvdpa-guest: insmod $module failed"
done
sh /script.sh
echo "{end_marker}$?"
sync
poweroff -f
"""


def cache_dir() -> Path:
    """The cache ``scripts/setup.sh`` fills: $PYVDPA_CACHE, else the XDG cache."""
    override = os.environ.get("PYVDPA_CACHE")
    if override:
        return Path(override)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "pyvdpa"


@dataclass(frozen=True, slots=True)
class GuestImage:
    """The cached guest kernel and the directory holding its virtio modules."""

    kernel: Path
    module_dir: Path

    @property
    def modules(self) -> tuple[Path, ...]:
        """Module files in load order."""
        return tuple(self.module_dir / f"{name}.ko" for name in GUEST_MODULES)

    @classmethod
    def find(cls, cache: Path | None = None) -> GuestImage:
        """Locate the artefacts in ``cache`` (default :func:`cache_dir`).

        Raises :class:`PeerError` naming ``scripts/setup.sh`` when any is missing.
        """
        guest_dir = (cache_dir() if cache is None else cache) / "guest"
        image = cls(kernel=guest_dir / "vmlinuz", module_dir=guest_dir / "modules")
        wanted = (guest_dir / _KERNEL_STAMP, image.kernel, *image.modules)
        missing = [path for path in wanted if not path.is_file()]
        if missing:
            raise PeerError(
                f"guest kernel artefacts missing in {guest_dir} ({missing[0].name} first): "
                "run scripts/setup.sh"
            )
        return image


def build_initramfs(script: str, dest: Path, image: GuestImage | None = None) -> Path:
    """Write a gzip'd newc initramfs to ``dest`` whose /init runs ``script``.

    ``script`` is a busybox ``sh`` script; its output reaches the serial
    console. Returns ``dest``.
    """
    if image is None:
        image = GuestImage.find()
    if not _BUSYBOX.is_file():
        raise PeerError(f"{_BUSYBOX} missing: run scripts/setup.sh (installs busybox-static)")
    with tempfile.TemporaryDirectory(prefix="pyvdpa-initramfs-") as staging:
        root = Path(staging)
        for directory in ("bin", "dev", "proc", "sys", "tmp", "mnt", "lib/modules"):
            (root / directory).mkdir(parents=True)
        shutil.copy2(_BUSYBOX, root / "bin" / "busybox")
        for module in image.modules:
            shutil.copy2(module, root / "lib" / "modules" / module.name)
        init = _INIT.format(modules=" ".join(GUEST_MODULES), end_marker=END_MARKER)
        (root / "init").write_text(init)
        (root / "init").chmod(0o755)
        (root / "script.sh").write_text(script)
        members = sorted(str(path.relative_to(root)) for path in root.rglob("*") if path != root)
        archive = subprocess.run(
            ["cpio", "--create", "--format=newc", "--owner=0:0", "--quiet"],
            input="\n".join(members).encode() + b"\n",
            cwd=root,
            capture_output=True,
            check=True,
        ).stdout
    dest.write_bytes(gzip.compress(archive, compresslevel=1))
    return dest


def script_status(console: str) -> int:
    """The exit status of the guest script, read from the console output."""
    found = _END_STATUS.search(console)
    if found is None:
        raise PeerError(f"guest console lacks {END_MARKER!r}:\n{console[-4000:]}")
    return int(found[1])


def vhost_user_net_args(
    sock: str | os.PathLike[str],
    mac: str = "52:54:00:12:34:56",
    *,
    queues: int = 1,
    packed: bool = False,
    server: bool = False,
    reconnect: int | None = None,
    name: str = "net0",
) -> list[str]:
    """QEMU arguments for a virtio-net-pci NIC backed by vhost-user at ``sock``.

    QEMU connects to ``sock`` unless ``server`` (then it listens without
    waiting); ``reconnect`` is the client's retry period in seconds. ``name``
    tells several devices of one guest apart.
    """
    chardev = [f"socket,id=chr-{name},path={qemu_opt(check_socket_path(sock))}"]
    if server:
        chardev.append("server=on,wait=off")
    if reconnect is not None:
        chardev.append(f"reconnect={reconnect}")
    device = [f"virtio-net-pci,netdev={name},mac={mac},vectors=0"]
    if queues > 1:
        device.append("mq=on")
    if packed:
        device.append("packed=on")
    return [
        "-chardev",
        ",".join(chardev),
        "-netdev",
        f"vhost-user,id={name},chardev=chr-{name},queues={queues}",
        "-device",
        ",".join(device),
    ]


def vhost_user_blk_args(
    sock: str | os.PathLike[str],
    *,
    num_queues: int = 1,
    name: str = "blk0",
    server: bool = False,
    reconnect: int | None = None,
) -> list[str]:
    """QEMU arguments for a vhost-user-blk-pci disk backed by vhost-user at ``sock``.

    QEMU connects to the back-end listening at ``sock`` unless ``server``
    (then QEMU listens there and the back-end connects); ``reconnect`` is
    the client's retry period in seconds.
    """
    chardev = f"socket,id=chr-{name},path={qemu_opt(check_socket_path(sock))}"
    if server:
        chardev += ",server=on,wait=off"
    if reconnect is not None:
        chardev += f",reconnect={reconnect}"
    return [
        "-chardev",
        chardev,
        "-device",
        f"vhost-user-blk-pci,id={name},chardev=chr-{name},num-queues={num_queues},vectors=0",
    ]


class Guest(PeerProcess):
    """A QEMU virtual machine booting the cached kernel with a test initramfs.

    The serial console is the process's standard input and output: read it
    with :meth:`wait_for` or :meth:`wait`, type into it with :meth:`write`.
    """

    def __init__(
        self,
        image: GuestImage,
        initramfs: Path,
        devices: Sequence[str] = (),
        *,
        mem: str = "512M",
        smp: int = 1,
        append: str = "",
    ) -> None:
        """Describe the machine; :meth:`start` (or ``with``) runs it.

        ``devices`` are extra QEMU arguments, such as those built by
        :func:`vhost_user_net_args` and :func:`vhost_user_blk_args`; ``append``
        adds to the kernel command line.
        """
        cmdline = " ".join(filter(None, ["console=ttyS0 quiet panic=-1", append]))
        argv = [
            "qemu-system-x86_64",
            "-accel",
            "tcg",
            "-m",
            mem,
            "-smp",
            str(smp),
            # No default NIC, monitor or display: the guest sees only what the
            # test gives it.
            "-nodefaults",
            "-display",
            "none",
            "-serial",
            "stdio",
            "-no-reboot",
            "-kernel",
            str(image.kernel),
            "-initrd",
            str(initramfs),
            "-append",
            cmdline,
            "-object",
            f"memory-backend-memfd,id=mem,size={mem},share=on",
            "-numa",
            "node,memdev=mem",
            *devices,
        ]
        super().__init__(argv, name=f"guest[{initramfs.name}]")

    def wait(self, timeout: float = 60.0) -> str:
        """Wait for the guest to power off and return its console output.

        On timeout the guest is killed and :class:`PeerTimeoutError` raised.
        """
        self.wait_exit(timeout)
        return self.output()

    def _request_exit(self) -> None:
        self._signal_group(signal.SIGTERM)
