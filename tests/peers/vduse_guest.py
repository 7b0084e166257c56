"""A Linux guest with the kernel's vDPA bus: VDUSE, virtio_vdpa and vhost_vdpa.

Theory of operation: QEMU 7.2 (TCG, ``-cpu max``, 1 GiB) boots Debian
trixie's generic 6.12 kernel, whose ``vduse``, ``virtio_vdpa`` and
``vhost_vdpa`` modules Debian 12's kernel lacks, with a busybox initramfs
that ``scripts/setup.sh`` (``scripts/vduse-guest/prepare.sh``) builds once
into the project cache. Its ``/init`` mounts the host's root file system
read-only over 9p and a per-test work directory read-write at its host path,
chroots into the host's root and runs a bash script there as root: the guest
runs the host's own programs (Python with pyvdpa, qemu-storage-daemon,
iproute2's ``vdpa``). The script's standard output, error and exit status
land in files in the work directory, where the host reads them once QEMU has
exited; the guest then powers off.

Inside the guest everything outside the work directory, /tmp, /run and /dev
is read-only; /tmp is the guest's own, not the host's. The vDPA modules sit
in :data:`GUEST_MODULE_DIR` and are loaded by the script
(:meth:`VduseGuest.load_modules`): ``virtio_vdpa`` before ``vhost_vdpa``,
because the first vdpa bus driver registered takes every new device.

numba keys its on-disk cache on the CPU, and the TCG CPU is not the host's:
compiling the data-path kernels inside the guest takes many minutes. So they
are compiled on the host for a CPU both sides share (``NUMBA_CPU_NAME=generic``)
into a cache of their own (:func:`prepare_numba_cache`, once per session),
which :meth:`VduseGuest.numba_env` copies into the work directory, where the
guest may write it.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from peers.common import PeerError, PeerProcess, PeerTimeoutError, qemu_opt
from peers.guest import cache_dir

__all__ = [
    "DEFAULT_TIMEOUT",
    "GUEST_MODULE_DIR",
    "NUMBA_CPU_NAME",
    "PYTHON",
    "GuestResult",
    "GuestScriptError",
    "VduseGuest",
    "VduseGuestImage",
    "prepare_numba_cache",
    "vdpa_tool",
    "vduse_numba_cache",
    "warm_up_data_path",
]

DEFAULT_TIMEOUT = 120.0
"""Seconds a guest may run, from QEMU's start to its exit."""

GUEST_MODULE_DIR = "/run/vduse-guest/modules"
"""Where the guest's /init puts the vDPA modules (decompressed .ko files)."""

PYTHON = sys.executable
"""The interpreter running the tests, by full path: in the guest PATH has
/usr/bin first, and only this one imports the same pyvdpa."""

NUMBA_CPU_NAME = "generic"
"""The CPU numba compiles for on both sides (numba then assumes no CPU features)."""

_SETUP_HINT = "run scripts/setup.sh"
_RECIPE_DIR = Path(__file__).resolve().parents[2] / "scripts" / "vduse-guest"
_RECIPE_FILES = ("init", "modules.py", "prepare.sh")
_CACHE_SUBDIR = "vduse-guest"
_NUMBA_SUBDIR = "numba-generic"
_GUEST_NUMBA_DIR = "numba-cache"
# The device's programs, and the driver's kernels `pyvdpa drive net` runs in the guest.
_WARM_UP = (
    "from pyvdpa.dataplane.engine import warm_up; warm_up(print); "
    "from pyvdpa.drive import compiled; compiled.load()"
)
_WARM_UP_TIMEOUT = 900.0
_EXIT_LINE = re.compile(r"vduse-guest: script exit status (\d+)")
_FACT = re.compile(r"^fact ([\w.-]+): (.*)$", re.M)
_TAIL_CHARS = 6000

#: Defined at the top of every guest script: ``fact NAME VALUE`` reports a
#: value (:attr:`GuestResult.facts`); ``wait_until SECONDS COMMAND...`` runs
#: COMMAND (output discarded) every 0.1 s until it succeeds, failing after
#: SECONDS.
_PRELUDE = """\
fact() { echo "fact $1: $2"; }
wait_until() {
    local tries=$(( $1 * 10 )); shift
    until "$@" >/dev/null; do
        tries=$(( tries - 1 ))
        [ "$tries" -gt 0 ] || return 1
        sleep 0.1
    done
}
cd "$WORK"
"""


class GuestScriptError(PeerError):
    """The guest script failed, or the guest never reported how it ended."""


@dataclass(frozen=True, slots=True)
class VduseGuestImage:
    """The kernel, initramfs and module lists ``scripts/setup.sh`` cached."""

    directory: Path

    @property
    def kernel(self) -> Path:
        """The kernel image (bzImage)."""
        return self.directory / "vmlinuz"

    @property
    def initrd(self) -> Path:
        """The busybox initramfs (scripts/vduse-guest/init as /init)."""
        return self.directory / "initrd.gz"

    @property
    def kernel_package(self) -> str:
        """The Debian package the kernel came from."""
        return (self.directory / "kernel-package").read_text().strip()

    def module_order(self, group: str) -> tuple[str, ...]:
        """Module names of ``group`` (``vdpa``, ``vhost_vdpa``) in load order.

        ``vhost_vdpa`` lists only what ``vdpa`` does not already load.
        """
        return tuple((self.directory / "modules" / f"{group}.order").read_text().split())

    @classmethod
    def find(cls, cache: Path | None = None) -> VduseGuestImage:
        """Locate the cached guest in ``cache`` (default: the project cache).

        Raises :class:`PeerError` naming ``scripts/setup.sh`` when anything is
        missing or was built by other scripts/vduse-guest files than the
        current ones: a test that needs the guest fails rather than skips.
        """
        directory = (cache_dir() if cache is None else cache) / _CACHE_SUBDIR
        image = cls(directory)
        wanted = [
            directory / "recipe",
            directory / "kernel-package",
            image.kernel,
            image.initrd,
            *(directory / "modules" / f"{group}.order" for group in ("vdpa", "vhost_vdpa")),
        ]
        missing = [path for path in wanted if not path.is_file()]
        if missing:
            raise PeerError(
                f"VDUSE guest kernel missing in {directory} ({missing[0].name} first): "
                f"{_SETUP_HINT}"
            )
        if (directory / "recipe").read_text().strip() != _recipe():
            raise PeerError(
                f"the VDUSE guest in {directory} was built by other scripts/vduse-guest files "
                f"than these: {_SETUP_HINT}"
            )
        return image


def _recipe() -> str:
    """What scripts/vduse-guest/prepare.sh writes to ``recipe``."""
    digest = hashlib.sha256()
    for name in _RECIPE_FILES:
        digest.update((_RECIPE_DIR / name).read_bytes())
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class GuestResult:
    """How one guest run ended: the script's exit status and everything printed."""

    status: int
    stdout: str
    stderr: str
    console: str
    dmesg: str
    seconds: float

    @property
    def facts(self) -> dict[str, str]:
        """Values the script reported with ``fact NAME VALUE``; a later one wins."""
        return dict(_FACT.findall(self.stdout))

    def fact(self, name: str) -> str:
        """One reported value; a missing one fails the test with the whole run attached."""
        facts = self.facts
        if name not in facts:
            raise GuestScriptError(f"the guest script did not report {name!r}\n{self.describe()}")
        return facts[name]

    def check(self) -> GuestResult:
        """Return ``self``, or raise :class:`GuestScriptError` if the script failed."""
        if self.status != 0:
            raise GuestScriptError(
                f"the guest script exited with status {self.status}\n{self.describe()}"
            )
        return self

    def describe(self) -> str:
        """The run's outputs (their ends), to explain a failure."""
        return _describe(
            f"exit status {self.status} after {self.seconds:.1f} s",
            stdout=self.stdout,
            stderr=self.stderr,
            dmesg=self.dmesg,
            console=self.console,
        )


def _describe(headline: str, **outputs: str) -> str:
    parts = [f"guest: {headline}"]
    for name, text in outputs.items():
        tail = text[-_TAIL_CHARS:]
        cut = " (end)" if len(text) > len(tail) else ""
        parts.append(f"--- guest {name}{cut} ---\n{tail.rstrip()}")
    return "\n".join(parts)


class _Qemu(PeerProcess):
    """The QEMU process of one guest run; its output is the serial console."""


def vdpa_tool() -> str:
    """Full path of iproute2's ``vdpa`` (in sbin, which a non-root PATH may lack)."""
    found = shutil.which("vdpa", path="/usr/sbin:/sbin:/usr/bin:/bin")
    if found is None:
        raise PeerError(f"iproute2's vdpa tool not found: {_SETUP_HINT}")
    return found


class VduseGuest:
    """Boots the VDUSE guest on a work directory and runs scripts in it.

    ``work`` is shared read-write with the guest at the same path (use a
    fresh directory per test, such as pytest's ``tmp_path``); each
    :meth:`run` is one boot. ``smp`` > 1 uses single-threaded TCG, since
    multi-threaded TCG has crashed the guest kernel at boot.
    """

    python = PYTHON
    """The host's interpreter by full path (:data:`PYTHON`)."""

    def __init__(
        self,
        work: Path,
        image: VduseGuestImage | None = None,
        *,
        smp: int = 1,
        mem_mib: int = 1024,
        timeout: float = DEFAULT_TIMEOUT,
        qemu_args: Sequence[str] = (),
    ) -> None:
        """Describe the machine; nothing runs until :meth:`run`."""
        self.work = Path(work).resolve()
        if re.search(r"\s", str(self.work)):
            raise ValueError(f"the work directory goes on the kernel command line: {self.work}")
        self.image = VduseGuestImage.find() if image is None else image
        self.smp = smp
        self.mem_mib = mem_mib
        self.timeout = timeout
        self.qemu_args = tuple(qemu_args)

    def load_modules(self, *, vhost_vdpa: bool = False) -> str:
        """Shell text that loads the vDPA modules, or fails the script.

        Loads vduse, virtio_vdpa, virtio_blk, virtio_net and what they need;
        with ``vhost_vdpa`` then vhost_vdpa too (after virtio_vdpa, so that
        virtio_vdpa still takes new devices). Modules already loaded are
        skipped, so the text may run again, e.g. to add vhost_vdpa later.
        """
        names = list(self.image.module_order("vdpa"))
        if vhost_vdpa:
            names += self.image.module_order("vhost_vdpa")
        return (
            f"for module in {' '.join(names)}; do\n"
            "    [ -d /sys/module/$module ] ||\n"
            f"        /bin/busybox insmod {GUEST_MODULE_DIR}/$module.ko ||\n"
            '        { echo "vduse-guest: cannot load $module" >&2; exit 1; }\n'
            "done\n"
        )

    def numba_env(self, cache: Path | None = None) -> dict[str, str]:
        """Environment for pyvdpa's data path in the guest, with a warm kernel cache.

        Copies ``cache`` (default :func:`prepare_numba_cache`) into the work
        directory and returns the variables pointing numba at that copy for
        the shared CPU target; pass them as :meth:`run`'s ``env``.
        """
        source = prepare_numba_cache() if cache is None else cache
        target = self.work / _GUEST_NUMBA_DIR
        shutil.copytree(source, target, dirs_exist_ok=True)
        return {"NUMBA_CPU_NAME": NUMBA_CPU_NAME, "NUMBA_CACHE_DIR": str(target)}

    def run(
        self,
        script: str,
        *,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> GuestResult:
        """Boot, run ``script`` (bash, as root, in the work directory), power off.

        ``env`` is exported before the script starts; the script also sees
        ``WORK`` and the shell functions ``fact`` and ``wait_until``. Returns
        once the guest has powered off, whatever the script's exit status
        (see :meth:`GuestResult.check`). Raises :class:`PeerTimeoutError`
        when the guest still runs after ``timeout`` seconds (default: the
        guest's) and :class:`GuestScriptError` when it stopped without
        reporting the script's status; both carry the console.
        """
        limit = self.timeout if timeout is None else timeout
        run_dir = self._new_run_dir()
        exports = "".join(
            f"export {name}={_shell_quote(value)}\n" for name, value in (env or {}).items()
        )
        (run_dir / "script.sh").write_text(_PRELUDE + exports + script)
        started = time.monotonic()
        qemu = _Qemu(self._argv(run_dir), name=f"vduse-guest[{run_dir.name}]")
        with qemu:
            try:
                qemu.wait_exit(limit)
            except PeerTimeoutError:
                raise PeerTimeoutError(
                    _describe(
                        f"still running after {limit} s, killed",
                        stdout=_read(run_dir / "stdout"),
                        stderr=_read(run_dir / "stderr"),
                        console=qemu.output(),
                    )
                ) from None
        console = qemu.output()
        status_text = _read(run_dir / "status").strip()
        if not status_text.isdigit():
            # The console line is written after the file; prefer the file.
            found = _EXIT_LINE.search(console)
            if found is None:
                raise GuestScriptError(
                    _describe(
                        f"stopped (QEMU status {qemu.returncode}) without the script's status",
                        stdout=_read(run_dir / "stdout"),
                        stderr=_read(run_dir / "stderr"),
                        console=console,
                    )
                )
            status_text = found[1]
        return GuestResult(
            status=int(status_text),
            stdout=_read(run_dir / "stdout"),
            stderr=_read(run_dir / "stderr"),
            console=console,
            dmesg=_read(run_dir / "dmesg"),
            seconds=time.monotonic() - started,
        )

    def _new_run_dir(self) -> Path:
        """A fresh ``.guest-N`` directory in the work directory for one run's files."""
        self.work.mkdir(parents=True, exist_ok=True)
        for number in itertools.count():
            run_dir = self.work / f".guest-{number}"
            try:
                run_dir.mkdir()
            except FileExistsError:
                continue
            return run_dir
        raise AssertionError("unreachable")

    def _argv(self, run_dir: Path) -> list[str]:
        accel = "tcg" if self.smp == 1 else "tcg,thread=single"
        cmdline = f"console=ttyS0 quiet panic=-1 WORK={self.work} GUEST_DIR={run_dir}"
        return [
            "qemu-system-x86_64",
            "-accel",
            accel,
            # The default qemu64 CPU lacks instructions numpy and DPDK use.
            "-cpu",
            "max",
            "-m",
            str(self.mem_mib),
            "-smp",
            str(self.smp),
            "-nodefaults",
            "-display",
            "none",
            "-serial",
            "stdio",
            "-no-reboot",
            "-kernel",
            str(self.image.kernel),
            "-initrd",
            str(self.image.initrd),
            "-append",
            cmdline,
            "-virtfs",
            "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
            "-virtfs",
            f"local,path={qemu_opt(self.work)},mount_tag=work,security_model=none,multidevs=remap",
            *self.qemu_args,
        ]


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _shell_quote(value: str) -> str:
    return "'" + value.replace("'", "'\\''") + "'"


def warm_up_data_path(cache: Path) -> None:
    """Compile (or load) the data-path kernels on the host into ``cache`` for the guest.

    Runs pyvdpa's warm-up in a fresh interpreter with numba targeting
    :data:`NUMBA_CPU_NAME` and caching in ``cache``, which is created.
    """
    cache.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "NUMBA_CPU_NAME": NUMBA_CPU_NAME,
        "NUMBA_CACHE_DIR": str(cache),
    }
    env.pop("NUMBA_CPU_FEATURES", None)
    try:
        done = subprocess.run(
            [PYTHON, "-c", _WARM_UP],
            env=env,
            capture_output=True,
            text=True,
            timeout=_WARM_UP_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise PeerError(f"compiling the data-path kernels took over {exc.timeout} s") from None
    if done.returncode != 0:
        raise PeerError(
            f"compiling the data-path kernels for the guest failed (status {done.returncode}):\n"
            f"{done.stdout}{done.stderr}"
        )


@functools.cache
def prepare_numba_cache() -> Path:
    """The host's numba cache for the guest, brought up to date once per session.

    It lives in the project cache (``numba-generic``), so only the first
    session, and the first after the kernels' source changes, compiles.
    """
    cache = cache_dir() / _NUMBA_SUBDIR
    warm_up_data_path(cache)
    return cache


@pytest.fixture(scope="session")
def vduse_numba_cache() -> Path:
    """:func:`prepare_numba_cache` as a session fixture.

    A test module uses it by binding it to a module-level name:
    ``vduse_numba_cache = vduse_guest.vduse_numba_cache``.
    """
    return prepare_numba_cache()
