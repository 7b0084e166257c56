"""``pyvdpa drive blk`` and ``pyvdpa info`` over /dev/vhost-vdpa-N, against qemu-storage-daemon.

One boot of the VDUSE guest (:mod:`peers.vduse_guest`, Linux 6.12 under
QEMU TCG): qemu-storage-daemon exports a raw image in the work directory as
a VDUSE block device, which is added to the vDPA bus and moved to
vhost_vdpa (unbind, ``driver_override``, bind).  pyvdpa, the host's own
program run in the guest, is then the VMM of that device:

* ``pyvdpa info --vhost-vdpa`` reports it field by field;
* ``drive blk --rw randwrite --verify``: no errors, and every block written
  is in the daemon's image file with its offset and last generation;
* ``drive blk --rw randread --verify``: no errors;
* ``drive blk --iommu``: mappings remapped while the I/O runs, no errors;
* a probe (the library, no command): a buffer whose mapping was withdrawn
  is never reached by the device (the request does not complete with
  data, the bytes stay as they were), and an IOTLB update the kernel
  refuses is a one-line error;
* the errors a user meets: the device held by another process (busy), and
  ``drive net`` on a block device.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from peers.vduse_guest import GuestResult, VduseGuest, vdpa_tool
from pyvdpa.drive.blk import pattern

pytestmark = pytest.mark.peers

BLOCK = 4096
DISK_BYTES = 16 << 20
AREA = 1 << 20
GUEST_TIMEOUT = 300.0
ROOT = Path(__file__).resolve().parent.parent
_TAG = struct.Struct("<QQ")

PROBE = r"""
import json, sys, time
from pyvdpa.drive.blk import BLK_WANTED
from pyvdpa.drive.vhost_vdpa import REMAP_CHUNK, VdpaSession
from pyvdpa.vhost_vdpa.device import IotlbUpdateError, VhostVdpaDevice
from pyvdpa.vhost_vdpa.uapi import IotlbPerm
from pyvdpa.virtio.blk import BlkRequestHeader
from pyvdpa.virtio.constants import BlkType, DeviceId, VirtioFeature

out = {}
with VdpaSession(VhostVdpaDevice.open(sys.argv[1]), memory_size=8 << 20, iommu=True) as s:
    s.negotiate(BLK_WANTED, VirtioFeature.VERSION_1, device=DeviceId.BLOCK)
    ring = s.setup_ring(0, 64)
    s.enable_rings()
    out["dma_base"] = s.dma_base
    hdr, status = s.alloc(16, 16), s.alloc(1, 1)
    mapped = s.alloc(4096, 4096)
    hole = s.alloc(REMAP_CHUNK, REMAP_CHUNK)

    def read_into(buf):
        s.memory.write(hdr, BlkRequestHeader(BlkType.IN, 0, 0).pack())
        s.memory.write(status, b"\xee")
        s.memory.write(buf, b"\xa5" * 4096)
        ring.queue.add([(hdr, 16)], [(buf, 4096), (status, 1)])
        ring.kick()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            used = ring.queue.get_used()
            if used is not None:
                return {"completed": True, "written": used[1],
                        "status": s.memory.read(status, 1)[0],
                        "untouched": s.memory.read(buf, 4096) == b"\xa5" * 4096}
            s.wait_call(0.1)
        return {"completed": False, "status": s.memory.read(status, 1)[0],
                "untouched": s.memory.read(buf, 4096) == b"\xa5" * 4096}

    out["mapped"] = read_into(mapped)
    s.unmap(hole, REMAP_CHUNK)
    out["hole_mapped"] = any(a <= hole < a + n for a, n in s.mappings.items())
    out["unmapped"] = read_into(hole)
    try:
        s.device.iotlb_update(s.dma_base, 4096, s.shared.address, IotlbPerm.RW)
    except IotlbUpdateError as exc:
        out["iotlb_refused"] = str(exc)
print(json.dumps(out), flush=True)
"""

HOLD = r"""
import os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
open(sys.argv[2], "w").close()
time.sleep(60)
"""


def _script(guest: VduseGuest) -> str:
    vdpa = vdpa_tool()
    py = guest.python
    drive = f"{py} -m pyvdpa drive blk --vhost-vdpa $node --bs {BLOCK} --size {AREA} --json"
    return f"""
set -u
fail() {{ echo "vhost-vdpa blk test: $*" >&2; cat "$WORK/qsd.log" >&2; exit 1; }}
chardev_of() {{ ls -d /sys/bus/vdpa/devices/$1/vhost-vdpa-* 2>/dev/null; }}
set -x
{guest.load_modules(vhost_vdpa=True)}
qemu-storage-daemon --blockdev driver=file,node-name=f,filename=$WORK/disk.img \\
    --export type=vduse-blk,id=e,node-name=f,name=qsd0,writable=on \\
    --pidfile /tmp/qsd0.pid >"$WORK/qsd.log" 2>&1 &
qsd_pid=$!
wait_until 30 test -s /tmp/qsd0.pid || fail "qemu-storage-daemon did not export qsd0"
timeout 60 {vdpa} dev add name qsd0 mgmtdev vduse || fail "vdpa dev add"
wait_until 30 test -e /sys/bus/vdpa/devices/qsd0/driver || fail "qsd0 has no driver"
echo qsd0 >/sys/bus/vdpa/drivers/virtio_vdpa/unbind || fail "unbind"
echo vhost_vdpa >/sys/bus/vdpa/devices/qsd0/driver_override || fail "override"
echo qsd0 >/sys/bus/vdpa/drivers/vhost_vdpa/bind || fail "bind"
wait_until 10 chardev_of qsd0 || fail "no vhost-vdpa device"
node=/dev/$(basename "$(chardev_of qsd0)")
wait_until 10 test -c "$node" || fail "no $node"
fact node "$node"
cd {ROOT}
{py} -m pyvdpa info --vhost-vdpa $node --json >"$WORK/info.json" 2>"$WORK/info.err"
fact info.rc $?
timeout 90 {drive} --rw randwrite --verify --duration 3 \\
    >"$WORK/randwrite.json" 2>"$WORK/randwrite.err"
fact randwrite.rc $?
cp "$WORK/disk.img" "$WORK/after-randwrite.img"
timeout 90 {drive} --rw randread --verify --duration 3 \\
    >"$WORK/randread.json" 2>"$WORK/randread.err"
fact randread.rc $?
timeout 90 {drive} --rw randwrite --verify --iommu --remap-idle --duration 3 \\
    >"$WORK/iommu.json" 2>"$WORK/iommu.err"
fact iommu.rc $?
{py} -m pyvdpa drive net --vhost-vdpa $node --duration 1 2>"$WORK/mismatch.err"
fact mismatch.rc $?
{py} "$WORK/hold.py" $node "$WORK/held" 2>"$WORK/hold.err" &
holder=$!
wait_until 30 test -e "$WORK/held" || fail "the holder did not open $node"
{py} -m pyvdpa info --vhost-vdpa $node 2>"$WORK/busy.err"
fact busy.rc $?
kill $holder; wait $holder
timeout 60 {py} "$WORK/probe.py" $node >"$WORK/probe.json" 2>"$WORK/probe.err"
fact probe.rc $?
timeout 60 {vdpa} dev del qsd0; fact del $?
kill $qsd_pid; wait $qsd_pid; fact qsd_exit $?
"""


@dataclass(frozen=True, slots=True)
class Run:
    """The guest's report and the work directory it left behind."""

    work: Path
    result: GuestResult

    def expect(self, name: str, value: str, *files: str) -> None:
        """Fail, with the whole run and ``files`` attached, unless fact ``name`` is ``value``."""
        got = self.result.fact(name)
        if got != value:
            attached = "".join(
                f"--- {f} ---\n{(self.work / f).read_text(errors='replace')[-4000:]}\n"
                for f in files
                if (self.work / f).exists()
            )
            raise AssertionError(
                f"{name}: {got!r}, expected {value!r}\n{attached}{self.result.describe()}"
            )

    def json(self, name: str) -> dict[str, Any]:
        """A JSON object a command left in the work directory."""
        text = (self.work / name).read_text()
        lines = text.strip().splitlines()
        assert lines, f"{name} is empty\n{self.result.describe()}"
        figures: dict[str, Any] = json.loads(lines[-1])
        return figures

    def text(self, name: str) -> str:
        """A file the script wrote, as text."""
        return (self.work / name).read_text()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """Boot the guest once; the tests read its report and files."""
    work = tmp_path_factory.mktemp("vhost-vdpa-blk")
    with (work / "disk.img").open("wb") as image:
        image.truncate(DISK_BYTES)
    (work / "probe.py").write_text(PROBE)
    (work / "hold.py").write_text(HOLD)
    guest = VduseGuest(work)
    result = guest.run(_script(guest), timeout=GUEST_TIMEOUT)
    print(result.describe())
    return Run(work, result)


def test_guest_script_completes(run: Run) -> None:
    run.result.check()
    assert run.result.fact("node").startswith("/dev/vhost-vdpa-")


def test_info_reports_the_storage_daemon_disk(run: Run) -> None:
    run.expect("info.rc", "0")
    info = run.json("info.json")
    assert info["transport"] == "vhost-vdpa"
    assert info["device_id"] == 2 and info["device_type"] == "blk"
    assert info["device_type_source"] == "device"
    names = info["feature_names"]
    assert "VERSION_1" in names and "ACCESS_PLATFORM" in names
    assert info["features"] >> 32 & 1 and info["features"] >> 33 & 1
    assert {"IOTLB_MSG_V2", "IOTLB_BATCH"} <= set(info["backend_feature_names"])
    assert info["queues"] == 1
    assert info["queue_size"] >= 128
    assert info["config_size"] >= 36
    config = info["config"]
    assert config["capacity"] == DISK_BYTES // 512
    assert config["capacity_bytes"] == DISK_BYTES
    assert config["blk_size"] == 512
    assert config["num_queues"] == 1
    assert config["seg_max"] > 0 and "SEG_MAX" in names
    assert (info["iova_first"], info["iova_last"]) == (0, (1 << 64) - 1)


def test_randwrite_verify_lands_in_the_image(run: Run) -> None:
    run.expect("randwrite.rc", "0")
    figures = run.json("randwrite.json")
    assert figures["rw"] == "randwrite" and figures["capacity"] == DISK_BYTES
    assert figures["ios"] > 0 and figures["verified"] > 0
    assert figures["errors"] == figures["verify_errors"] == 0
    image = (run.work / "after-randwrite.img").read_bytes()
    generations = 0
    for offset in range(0, AREA, BLOCK):
        block = image[offset : offset + BLOCK]
        if block == bytes(BLOCK):
            continue
        tagged, generation = _TAG.unpack_from(block)
        assert tagged == offset, f"block at {offset} carries offset {tagged}"
        assert block == pattern(offset, generation, BLOCK), offset
        generations += generation
    # Each write raises its block's generation by one: the image holds them all.
    assert generations == figures["ios"]
    assert image[AREA:] == bytes(DISK_BYTES - AREA)


def test_randread_verify(run: Run) -> None:
    run.expect("randread.rc", "0")
    figures = run.json("randread.json")
    assert figures["rw"] == "randread"
    assert figures["ios"] > 0 and figures["verified"] > 0
    assert figures["errors"] == figures["verify_errors"] == 0


def test_iommu_remaps_while_io_runs(run: Run) -> None:
    run.expect("iommu.rc", "0", "iommu.err", "iommu.json", "qsd.log")
    figures = run.json("iommu.json")
    assert figures["ios"] > 0 and figures["verified"] > 0
    assert figures["errors"] == figures["verify_errors"] == 0
    assert figures["iotlb_remaps"] >= 5


def test_device_cannot_reach_an_unmapped_buffer(run: Run) -> None:
    run.expect("probe.rc", "0")
    probe = run.json("probe.json")
    assert probe["dma_base"] != 0x4000_0000
    mapped = probe["mapped"]
    assert mapped["completed"] and mapped["status"] == 0 and not mapped["untouched"]
    assert probe["hole_mapped"] is False
    unmapped = probe["unmapped"]
    assert unmapped["untouched"], unmapped
    assert not unmapped["completed"] or unmapped["status"] != 0, unmapped
    # The daemon asked the kernel for the buffer's translation and got none.
    assert "invalid address for buffers" in run.text("qsd.log")


def test_refused_iotlb_update_is_one_line(run: Run) -> None:
    message = run.json("probe.json")["iotlb_refused"]
    assert "IOTLB UPDATE" in message and "refused by /dev/vhost-vdpa-" in message
    assert "\n" not in message


def test_busy_device_is_one_line_error(run: Run) -> None:
    run.expect("busy.rc", "1")
    lines = run.text("busy.err").strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyvdpa: error: /dev/vhost-vdpa-"), lines
    assert "is busy: another process holds it open" in lines[0]


def test_drive_net_on_a_block_device_is_refused(run: Run) -> None:
    run.expect("mismatch.rc", "2")
    lines = run.text("mismatch.err").strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].endswith("is a virtio blk device, not net"), lines


def test_device_leaves_the_bus(run: Run) -> None:
    run.expect("del", "0")
    run.expect("qsd_exit", "0")
