"""The kernel's vDPA bus with a third-party VDUSE device: qemu-storage-daemon.

The VDUSE guest (:mod:`peers.vduse_guest`, a Linux 6.12 guest under QEMU,
TCG) boots once and runs qemu-storage-daemon 7.2, which exports a raw image
in the work directory as a VDUSE block device (``--export type=vduse-blk``).
Its script reports, and the tests below check one property each:

* iproute2's ``vdpa mgmtdev show`` lists the ``vduse`` management device;
* ``vdpa dev add`` puts the device on the vDPA bus, where virtio_vdpa takes
  it and virtio_blk makes it a disk of the image's size;
* data written at several offsets with ``O_DIRECT`` reads back identical in
  the guest, and is in the host's image file at those offsets, with nothing
  else written;
* ``vdpa dev del`` takes the device off the bus, and the daemon exits
  cleanly;
* a second such device, moved from virtio_vdpa to vhost_vdpa through sysfs
  (unbind, ``driver_override``, bind), becomes a ``/dev/vhost-vdpa-N``
  character device that reports a block device (device ID 2) with
  VERSION_1 and ACCESS_PLATFORM.

Order matters on the way (see :mod:`peers.vduse_guest`): the daemon has set
up its queues when its pid file exists, and only then may ``vdpa dev add``
run, since adding blocks until the daemon answers the driver.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import pytest

from peers.vduse_guest import GuestResult, VduseGuest, vdpa_tool

pytestmark = pytest.mark.peers

BLOCK = 4096
DISK_BLOCKS = 4096
GUEST_TIMEOUT = 120.0
VIRTIO_ID_BLOCK = 2
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33
# linux/vhost.h: _IOR(VHOST_VIRTIO, 0x70, __u32) and _IOR(VHOST_VIRTIO, 0x00, __u64).
VHOST_VDPA_GET_DEVICE_ID = 0x8004AF70
VHOST_GET_FEATURES = 0x8008AF00


@dataclass(frozen=True, slots=True)
class Region:
    """A run of 4 KiB blocks the guest writes, and what it writes there."""

    name: str
    block: int
    blocks: int

    @property
    def offset(self) -> int:
        """Byte offset in the disk."""
        return self.block * BLOCK

    @property
    def size(self) -> int:
        """Length in bytes."""
        return self.blocks * BLOCK

    @property
    def data(self) -> bytes:
        """Pseudo-random bytes, distinct per region, the same on every run."""
        return random.Random(f"vduse-qsd-{self.name}").randbytes(self.size)


REGIONS = (
    Region("first", 0, 1),
    Region("odd", 777, 3),
    Region("large", 2048, 256),
    Region("last", DISK_BLOCKS - 1, 1),
)

# Run by the host's Python in the guest: what the vhost-vdpa device says it is.
VHOST_QUERY = f"""\
import fcntl, os, struct, sys
fd = os.open(sys.argv[1], os.O_RDWR)
device_id, features = bytearray(4), bytearray(8)
fcntl.ioctl(fd, {VHOST_VDPA_GET_DEVICE_ID:#x}, device_id)
fcntl.ioctl(fd, {VHOST_GET_FEATURES:#x}, features)
os.close(fd)
print(struct.unpack("=I", device_id)[0], hex(struct.unpack("=Q", features)[0]))
"""


def guest_script(guest: VduseGuest) -> str:
    """Both checks in one boot, each result reported as a fact."""
    vdpa = vdpa_tool()
    lines = [
        "set -u",
        "fail() {",
        '    echo "qsd test: $*" >&2',
        '    for log in "$WORK"/qsd-*.log; do echo "--- $log" >&2; cat "$log" >&2; done',
        "    exit 1",
        "}",
        # start_qsd NAME IMAGE: export IMAGE as VDUSE device NAME. The pid
        # file appears once the export exists, its queues set up.
        "start_qsd() {",
        "    qemu-storage-daemon --blockdev driver=file,node-name=f,filename=$2 \\",
        "        --export type=vduse-blk,id=e,node-name=f,name=$1,writable=on \\",
        '        --pidfile /tmp/$1.pid >"$WORK/qsd-$1.log" 2>&1 &',
        "    qsd_pid=$!",
        '    wait_until 30 test -s /tmp/$1.pid || fail "qemu-storage-daemon did not export $1"',
        "}",
        'stop_qsd() { kill "$qsd_pid"; wait "$qsd_pid"; fact $1.qsd_exit $?; }',
        "disk_of() { ls -d /sys/bus/vdpa/devices/$1/virtio*/block/* 2>/dev/null; }",
        "chardev_of() { ls -d /sys/bus/vdpa/devices/$1/vhost-vdpa-* 2>/dev/null; }",
        'driver_of() { basename "$(readlink /sys/bus/vdpa/devices/$1/driver)"; }',
        "set -x",
        guest.load_modules(),
        f'{vdpa} -j mgmtdev show >"$WORK/mgmtdev.json" || fail "vdpa mgmtdev show"',
        # A disk through virtio_vdpa.
        'start_qsd qsd0 "$WORK/disk0.img"',
        f'timeout 60 {vdpa} dev add name qsd0 mgmtdev vduse || fail "vdpa dev add qsd0"',
        'wait_until 30 disk_of qsd0 || fail "qsd0 became no disk"',
        'disk=/dev/$(basename "$(disk_of qsd0)")',
        'wait_until 10 test -b "$disk" || fail "no $disk"',
        'fact qsd0.driver "$(driver_of qsd0)"',
        'fact qsd0.sectors "$(cat /sys/class/block/${disk#/dev/}/size)"',
    ]
    for region in REGIONS:
        lines.append(
            f'dd if="$WORK/pattern-{region.name}" of="$disk" bs={BLOCK} seek={region.block} '
            f"oflag=direct conv=fsync status=none; fact write.{region.name} $?"
        )
    for region in REGIONS:
        lines.append(
            f'dd if="$disk" of="$WORK/readback-{region.name}" bs={BLOCK} skip={region.block} '
            f"count={region.blocks} iflag=direct status=none; fact read.{region.name} $?"
        )
    lines += [
        f"timeout 60 {vdpa} dev del qsd0; fact qsd0.del $?",
        "fact qsd0.on_bus $(test -e /sys/bus/vdpa/devices/qsd0 && echo yes || echo no)",
        "stop_qsd qsd0",
        # The same kind of device moved to vhost_vdpa.
        guest.load_modules(vhost_vdpa=True),
        'start_qsd qsd1 "$WORK/disk1.img"',
        f'timeout 60 {vdpa} dev add name qsd1 mgmtdev vduse || fail "vdpa dev add qsd1"',
        'wait_until 30 test -e /sys/bus/vdpa/devices/qsd1/driver || fail "qsd1 has no driver"',
        'fact qsd1.first_driver "$(driver_of qsd1)"',
        'echo qsd1 >/sys/bus/vdpa/drivers/virtio_vdpa/unbind || fail "unbind qsd1"',
        'echo vhost_vdpa >/sys/bus/vdpa/devices/qsd1/driver_override || fail "override qsd1"',
        'echo qsd1 >/sys/bus/vdpa/drivers/vhost_vdpa/bind || fail "bind qsd1"',
        'fact qsd1.driver "$(driver_of qsd1)"',
        'wait_until 10 chardev_of qsd1 || fail "qsd1 became no vhost-vdpa device"',
        'node=/dev/$(basename "$(chardev_of qsd1)")',
        'wait_until 10 test -c "$node" || fail "no $node"',
        'fact qsd1.chardev "$node"',
        f'fact qsd1.identity "$({guest.python} "$WORK/vhost_query.py" "$node")"',
        f"timeout 60 {vdpa} dev del qsd1; fact qsd1.del $?",
        "stop_qsd qsd1",
    ]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True, slots=True)
class QsdRun:
    """The guest's report and the work directory it left behind."""

    work: Path
    result: GuestResult

    def fact(self, name: str) -> str:
        """One reported value; a missing one fails with the whole run attached."""
        return self.result.fact(name)

    def expect(self, name: str, value: str) -> None:
        """Fail, with the whole run attached, unless fact ``name`` is ``value``."""
        got = self.fact(name)
        assert got == value, f"{name}: {got!r}, expected {value!r}\n{self.result.describe()}"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> QsdRun:
    """Boot the guest once; the tests read its report and files."""
    work = tmp_path_factory.mktemp("vduse-qsd")
    for region in REGIONS:
        (work / f"pattern-{region.name}").write_bytes(region.data)
    (work / "vhost_query.py").write_text(VHOST_QUERY)
    for image in ("disk0.img", "disk1.img"):
        with (work / image).open("wb") as file:
            file.truncate(DISK_BLOCKS * BLOCK)
    guest = VduseGuest(work)
    result = guest.run(guest_script(guest), timeout=GUEST_TIMEOUT)
    # Shown by pytest with any failure below.
    print(result.describe())
    return QsdRun(work, result)


def test_guest_script_completes(run: QsdRun) -> None:
    run.result.check()


def test_vdpa_lists_vduse_management_device(run: QsdRun) -> None:
    listing = json.loads((run.work / "mgmtdev.json").read_text())
    assert "vduse" in listing["mgmtdev"], listing


def test_qsd_device_becomes_virtio_vdpa_disk(run: QsdRun) -> None:
    run.expect("qsd0.driver", "virtio_vdpa")
    run.expect("qsd0.sectors", str(DISK_BLOCKS * BLOCK // 512))


@pytest.mark.parametrize("region", REGIONS, ids=lambda region: region.name)
def test_guest_reads_back_what_it_wrote(run: QsdRun, region: Region) -> None:
    run.expect(f"write.{region.name}", "0")
    run.expect(f"read.{region.name}", "0")
    assert (run.work / f"readback-{region.name}").read_bytes() == region.data


def test_writes_reach_host_image_and_nothing_else(run: QsdRun) -> None:
    for region in REGIONS:
        run.expect(f"write.{region.name}", "0")
    expected = bytearray(DISK_BLOCKS * BLOCK)
    for region in REGIONS:
        expected[region.offset : region.offset + region.size] = region.data
    image = (run.work / "disk0.img").read_bytes()
    assert len(image) == len(expected)
    for region in REGIONS:
        at = image[region.offset : region.offset + region.size]
        assert at == region.data, f"region {region.name} differs in the host file"
    assert image == expected, "the host file changed outside the written regions"


def test_vdpa_dev_del_removes_device(run: QsdRun) -> None:
    run.expect("qsd0.del", "0")
    run.expect("qsd0.on_bus", "no")
    run.expect("qsd0.qsd_exit", "0")


def test_qsd_device_rebound_to_vhost_vdpa(run: QsdRun) -> None:
    run.expect("qsd1.first_driver", "virtio_vdpa")
    run.expect("qsd1.driver", "vhost_vdpa")
    assert run.fact("qsd1.chardev").startswith("/dev/vhost-vdpa-")
    device_id, features = run.fact("qsd1.identity").split()
    assert int(device_id) == VIRTIO_ID_BLOCK
    assert int(features, 16) >> VIRTIO_F_VERSION_1 & 1
    assert int(features, 16) >> VIRTIO_F_ACCESS_PLATFORM & 1
    run.expect("qsd1.del", "0")
    run.expect("qsd1.qsd_exit", "0")
