"""pyvdpa's sim-blk under a real virtio-blk driver: a Linux guest.

One guest (QEMU 7.2, TCG) boots with two vhost-user-blk disks served by
``pyvdpa run``: a writable one and a ``readonly=on`` one, each backed by a
16 MiB file of pseudo-random bytes and told apart by serial.  Its script
reports, and the tests below check one property each:

* the capacity and serial (GET_ID) the guest sees, and that the guest kernel
  uses FLUSH (write-back cache), DISCARD and WRITE_ZEROES for real;
* data written at several offsets (aligned, unaligned, large, the last
  sector) reads back identical in the guest (``O_DIRECT``, past the page
  cache) and in the host file;
* data the host put in the file reads back in the guest;
* discard (``blkdiscard``) and write-zeroes (util-linux ``blkdiscard -z``,
  ``BLKZEROOUT``; busybox's lacks ``-z``) leave zeros, in the guest and in
  the file;
* on the read-only disk writes, discard and write-zeroes fail while reads
  work;
* after failing requests (past the end of the disk, and on the read-only
  disk) the disk keeps working, and both files hold exactly what the guest
  wrote and nothing else.
"""

from __future__ import annotations

import hashlib
import random
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from peers import PeerPool
from peers.app import PyvdpaRun, ring_errors
from peers.guest import Guest, GuestImage, build_initramfs, script_status, vhost_user_blk_args
from peers.initramfs import add_files, host_program

pytestmark = pytest.mark.peers

SECTOR = 512
DISK_SECTORS = 32768
RW_SERIAL = "pyvdpa-rw-0001"
RO_SERIAL = "pyvdpa-ro-0002"
BLKDISCARD = "/usr/sbin/blkdiscard"
GUEST_TIMEOUT = 90.0


@dataclass(frozen=True, slots=True)
class Region:
    """A run of sectors the guest touches, and the data it writes there."""

    name: str
    sector: int
    sectors: int

    @property
    def offset(self) -> int:
        """Byte offset in the disk."""
        return self.sector * SECTOR

    @property
    def size(self) -> int:
        """Length in bytes."""
        return self.sectors * SECTOR

    @property
    def data(self) -> bytes:
        """What the guest writes here (pseudo-random, the same on every run)."""
        return random.Random(self.name).randbytes(self.size)


WRITES = (
    Region("w-first-block", 0, 8),
    Region("w-unaligned", 2049, 3),
    Region("w-large", 10240, 512),
    Region("w-last-sector", DISK_SECTORS - 1, 1),
)
WRITE_AFTER_FAILURES = Region("w-after-failures", 3000, 16)
HOST_WRITTEN = Region("host", 4096, 128)
DISCARDED = Region("discard", 16384, 256)
ZEROED = Region("write-zeroes", 20481, 255)
RO_READ = Region("ro-read", 100, 128)


def image(seed: str) -> bytes:
    """The initial contents of a disk."""
    return random.Random(seed).randbytes(DISK_SECTORS * SECTOR)


def md5(data: bytes) -> str:
    """Hex MD5 of ``data``."""
    return hashlib.md5(data).hexdigest()


#: Shell functions for guest scripts: ``fact NAME VALUE`` reports a value,
#: ``md5 DISK SECTOR COUNT`` hashes sectors as the device returns them
#: (O_DIRECT, past the page cache), ``put DISK DATA SECTOR`` writes
#: ``/data/DATA`` there and waits for the device, ``wait_disks DISK...``
#: waits for the disks to appear.
SHELL_FUNCTIONS = """
fact() { echo "fact $1: $2"; }
md5() { dd if=/dev/$1 bs=512 skip=$2 count=$3 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1; }
put() { dd if=/data/$2 of=/dev/$1 bs=512 seek=$3 conv=notrunc,fsync 2>/dev/null; }
wait_disks() {
    i=0
    for disk in "$@"; do
        while ! [ -b /dev/$disk ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
    done
}
"""

#: ``fact NAME: VALUE`` lines of a console.
FACT = re.compile(r"^fact ([\w.-]+): (.*)$", re.M)


def guest_script() -> str:
    """The checks, each reported as ``fact NAME: VALUE``."""
    lines = [
        SHELL_FUNCTIONS,
        "wait_disks vda vdb",
        "for dev in /sys/block/vd*; do",
        f"    case $(cat $dev/serial) in {RW_SERIAL}) rw=${{dev##*/}};; "
        f"{RO_SERIAL}) ro=${{dev##*/}};; esac",
        "done",
        "for role in rw ro; do",
        "    eval disk=/sys/block/\\$$role",
        '    fact $role.serial "$(cat $disk/serial)"',
        '    fact $role.size "$(cat $disk/size)"',
        '    fact $role.ro "$(cat $disk/ro)"',
        '    fact $role.write_cache "$(cat $disk/queue/write_cache)"',
        '    fact $role.discard_max_bytes "$(cat $disk/queue/discard_max_bytes)"',
        '    fact $role.write_zeroes_max_bytes "$(cat $disk/queue/write_zeroes_max_bytes)"',
        "done",
    ]
    for region in WRITES:
        lines.append(f"put $rw {region.name} {region.sector}; fact write.{region.name} $?")
    lines += [
        "sync; blockdev --flushbufs /dev/$rw; fact flush $?",
        f"{BLKDISCARD} -f -o {DISCARDED.offset} -l {DISCARDED.size} /dev/$rw; fact discard $?",
        f"{BLKDISCARD} -f -z -o {ZEROED.offset} -l {ZEROED.size} /dev/$rw; fact write-zeroes $?",
    ]
    for region in (*WRITES, HOST_WRITTEN, DISCARDED, ZEROED):
        lines.append(f"fact read.{region.name} $(md5 $rw {region.sector} {region.sectors})")
    lines += [
        f"put $ro {WRITES[0].name} {RO_READ.sector}; fact ro.write $?",
        f"{BLKDISCARD} -f -o 0 -l {RO_READ.size} /dev/$ro; fact ro.discard $?",
        f"{BLKDISCARD} -f -z -o 0 -l {RO_READ.size} /dev/$ro; fact ro.write-zeroes $?",
        f"fact ro.read $(md5 $ro {RO_READ.sector} {RO_READ.sectors})",
        "end=$(cat /sys/block/$rw/size)",
        "fact past-end.read-bytes $(dd if=/dev/$rw bs=512 skip=$end count=1 2>/dev/null | wc -c)",
        f"put $rw {WRITES[-1].name} $end; fact past-end.write $?",
        f"put $rw {WRITE_AFTER_FAILURES.name} {WRITE_AFTER_FAILURES.sector}",
        f"fact write.{WRITE_AFTER_FAILURES.name} $?",
        f"fact read.{WRITE_AFTER_FAILURES.name} $(md5 $rw {WRITE_AFTER_FAILURES.sector}"
        f" {WRITE_AFTER_FAILURES.sectors})",
        f"fact reread.{WRITES[0].name} $(md5 $rw {WRITES[0].sector} {WRITES[0].sectors})",
    ]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True, slots=True)
class BlkRun:
    """What one guest boot reported, and what the disks hold afterwards."""

    console: str
    facts: dict[str, str]
    rw_file: bytes
    ro_file: bytes
    stats: dict[str, dict[int, dict[str, int]]]

    def fact(self, name: str) -> str:
        """One reported value; a missing one fails with the console attached."""
        assert name in self.facts, f"guest did not report {name}:\n{self.console}"
        return self.facts[name]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, guest_image: GuestImage) -> Iterator[BlkRun]:
    """Boot the guest once, with both disks; the tests read its report."""
    workdir = tmp_path_factory.mktemp("guest-blk")
    sock_dir = Path(tempfile.mkdtemp(prefix="pv-", dir="/tmp"))
    rw_path, ro_path = workdir / "rw.img", workdir / "ro.img"
    rw_path.write_bytes(image("rw"))
    ro_path.write_bytes(image("ro"))
    try:
        with PeerPool(workdir, sock_dir, guest_image) as pool:
            app = pool.start(
                PyvdpaRun(
                    [
                        f"sim-blk,name=blk0,path={rw_path},serial={RW_SERIAL}",
                        f"sim-blk,name=blk1,path={ro_path},readonly=on,serial={RO_SERIAL}",
                    ],
                    sock_dir / "vdpa",
                )
            )
            initramfs = build_initramfs(guest_script(), workdir / "initramfs.gz", guest_image)
            data = {f"/data/{region.name}": region.data for region in WRITES}
            data[f"/data/{WRITE_AFTER_FAILURES.name}"] = WRITE_AFTER_FAILURES.data
            add_files(initramfs, {**data, **host_program(BLKDISCARD)})
            disks = [
                *vhost_user_blk_args(app.sockets[0], name="blk0"),
                *vhost_user_blk_args(app.sockets[1], name="blk1"),
            ]
            guest = pool.start(Guest(guest_image, initramfs, disks))
            console = guest.wait(timeout=GUEST_TIMEOUT)
            stats = {name: app.stats(name) for name in ("blk0", "blk1")}
        assert script_status(console) == 0, console
        yield BlkRun(
            console=console,
            facts=dict(FACT.findall(console)),
            rw_file=rw_path.read_bytes(),
            ro_file=ro_path.read_bytes(),
            stats=stats,
        )
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


def expected_rw_file() -> bytes:
    """The writable disk after the guest's writes, discard and write-zeroes."""
    disk = bytearray(image("rw"))
    for region in (*WRITES, WRITE_AFTER_FAILURES):
        disk[region.offset : region.offset + region.size] = region.data
    for region in (DISCARDED, ZEROED):
        disk[region.offset : region.offset + region.size] = bytes(region.size)
    return bytes(disk)


def test_capacity_matches_the_backing_files(run: BlkRun) -> None:
    assert run.fact("rw.size") == str(DISK_SECTORS)
    assert run.fact("ro.size") == str(DISK_SECTORS)


def test_serial_comes_from_get_id(run: BlkRun) -> None:
    assert run.fact("rw.serial") == RW_SERIAL
    assert run.fact("ro.serial") == RO_SERIAL


def test_guest_uses_flush_discard_and_write_zeroes(run: BlkRun) -> None:
    # A write-back cache makes the guest send FLUSH; non-zero limits make it
    # send DISCARD and WRITE_ZEROES rather than emulate them.
    assert run.fact("rw.write_cache") == "write back"
    assert int(run.fact("rw.discard_max_bytes")) > 0
    assert int(run.fact("rw.write_zeroes_max_bytes")) > 0


def test_guest_writes_read_back_in_the_guest_and_the_file(run: BlkRun) -> None:
    for region in WRITES:
        assert run.fact(f"write.{region.name}") == "0", run.console
        assert run.fact(f"read.{region.name}") == md5(region.data), region
        stored = run.rw_file[region.offset : region.offset + region.size]
        assert stored == region.data, region


def test_guest_reads_what_the_host_wrote(run: BlkRun) -> None:
    host = image("rw")[HOST_WRITTEN.offset : HOST_WRITTEN.offset + HOST_WRITTEN.size]
    assert run.fact(f"read.{HOST_WRITTEN.name}") == md5(host)


def test_flush_succeeds(run: BlkRun) -> None:
    assert run.fact("flush") == "0", run.console


def test_discard_and_write_zeroes_leave_zeros(run: BlkRun) -> None:
    assert run.fact("discard") == "0", run.console
    assert run.fact("write-zeroes") == "0", run.console
    for region in (DISCARDED, ZEROED):
        assert run.fact(f"read.{region.name}") == md5(bytes(region.size)), region
        stored = run.rw_file[region.offset : region.offset + region.size]
        assert stored == bytes(region.size), region
    # The neighbours of the zeroed ranges kept their data.
    original = image("rw")
    for region in (DISCARDED, ZEROED):
        before, after = region.offset - SECTOR, region.offset + region.size
        assert run.rw_file[before : region.offset] == original[before : region.offset]
        assert run.rw_file[after : after + SECTOR] == original[after : after + SECTOR]


def test_readonly_disk_refuses_writes_and_serves_reads(run: BlkRun) -> None:
    assert run.fact("ro.ro") == "1"
    assert run.fact("rw.ro") == "0"
    assert run.fact("ro.write") != "0"
    assert run.fact("ro.discard") != "0"
    assert run.fact("ro.write-zeroes") != "0"
    original = image("ro")[RO_READ.offset : RO_READ.offset + RO_READ.size]
    assert run.fact("ro.read") == md5(original)
    assert run.ro_file == image("ro")


def test_failed_requests_leave_the_disk_working_and_the_file_intact(run: BlkRun) -> None:
    assert run.fact("past-end.read-bytes") == "0"
    assert run.fact("past-end.write") != "0"
    region = WRITE_AFTER_FAILURES
    assert run.fact(f"write.{region.name}") == "0", run.console
    assert run.fact(f"read.{region.name}") == md5(region.data)
    assert run.fact(f"reread.{WRITES[0].name}") == md5(WRITES[0].data)
    # Byte for byte: what the guest wrote, zeros where it discarded, the
    # original everywhere else.
    assert run.rw_file == expected_rw_file()
    assert run.ro_file == image("ro")


def test_devices_counted_no_errors(run: BlkRun) -> None:
    for name, stats in run.stats.items():
        assert sorted(stats) == [0], name
        assert ring_errors(stats) == {}, name
        assert stats[0]["completed_desc"] == stats[0]["received_desc"] > 0, name
