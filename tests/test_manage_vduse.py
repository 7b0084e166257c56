"""``pyvdpa dev add ... bus vduse``: a device put on the kernel's vDPA bus at runtime.

One boot of the VDUSE guest (:mod:`peers.vduse_guest`, Linux 6.12 under
QEMU TCG): ``pyvdpa run --control`` starts with no device; ``pyvdpa dev add
name vblk mgmtdev sim-blk path disk.img bus vduse`` creates the VDUSE device
and adds it to the vDPA bus, virtio_vdpa binds it, an O_DIRECT round trip
on the disk lands in the host file; ``dev show`` and ``dev config show``
describe it (with the features virtio_blk negotiated), ``dev del`` takes it
off the bus and the process serves on until SIGINT.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peers.vduse_guest import VduseGuest
from pyvdpa.drive.info import feature_list
from pyvdpa.virtio.constants import DeviceId

pytestmark = pytest.mark.peers

DISK_BYTES = 8 << 20
DATA_BYTES = 1 << 20
GUEST_TIMEOUT = 240.0
ROOT = Path(__file__).resolve().parent.parent


def _script(guest: VduseGuest) -> str:
    py = guest.python
    # The work directory is 9p, where no socket can be made: the guest's own /tmp.
    ctl = "/tmp/ctl.sock"
    return f"""
set -u
fail() {{ echo "vduse test: $*" >&2; cat "$WORK"/*.log >&2; exit 1; }}
disk_of() {{ ls -d /sys/bus/vdpa/devices/$1/virtio*/block/* 2>/dev/null; }}
on_bus() {{ test -e /sys/bus/vdpa/devices/$1; }}
off_bus() {{ ! test -e /sys/bus/vdpa/devices/$1; }}
set -x
{guest.load_modules()}
cd {ROOT}
{py} -m pyvdpa -v run --control {ctl} >"$WORK/run.log" 2>&1 &
run_pid=$!
wait_until 120 test -S {ctl} || fail "no control socket"
{py} -m pyvdpa dev add name vblk mgmtdev sim-blk path $WORK/disk.img bus vduse \\
    --control {ctl} 2>"$WORK/add.log"; fact add.exit $?
wait_until 60 disk_of vblk || fail "vblk is no disk"
disk=/dev/$(basename "$(disk_of vblk)")
head -c {DATA_BYTES} /dev/urandom >"$WORK/data.bin"
dd if="$WORK/data.bin" of=$disk bs=64k oflag=direct status=none; fact write $?
dd if=$disk of=/tmp/back bs=64k count={DATA_BYTES // 65536} iflag=direct status=none
cmp -s "$WORK/data.bin" /tmp/back; fact read $?
fact show "$({py} -m pyvdpa dev show vblk --control {ctl})"
fact config "$({py} -m pyvdpa -j dev config show vblk --control {ctl})"
fact driver "$(cat /sys/bus/vdpa/devices/vblk/virtio*/features)"
{py} -m pyvdpa dev del vblk --control {ctl}; fact del.exit $?
wait_until 30 off_bus vblk; fact off_bus $?
fact list "$({py} -m pyvdpa -j dev show --control {ctl})"
kill -INT $run_pid
wait $run_pid; fact run.exit $?
"""


def test_dev_add_on_the_vdpa_bus(tmp_path: Path) -> None:
    with (tmp_path / "disk.img").open("wb") as file:
        file.truncate(DISK_BYTES)
    guest = VduseGuest(tmp_path, timeout=GUEST_TIMEOUT)
    result = guest.run(_script(guest), env=guest.numba_env(), timeout=GUEST_TIMEOUT)
    print(result.describe())
    for name in ("run.log", "add.log"):
        path = tmp_path / name
        print(f"--- {name} ---\n{path.read_text() if path.exists() else 'missing'}")
    result.check()
    facts = result.facts
    for name in ("add.exit", "write", "read", "del.exit", "off_bus", "run.exit"):
        assert facts[name] == "0", (name, result.describe())
    assert facts["show"] == (
        "vblk: type block mgmtdev sim-blk vendor_id 0 max_vqs 1 max_vq_size 32768 bus vduse"
    )
    assert facts["list"] == '{"dev": {}}'
    config = json.loads(facts["config"])["config"]["vblk"]
    assert (config["capacity"], config["read_only"]) == (DISK_BYTES // 512, False)
    # sysfs gives the features virtio_blk accepted as 0/1, bit 0 first.
    driver = sum(1 << bit for bit, flag in enumerate(facts["driver"]) if flag == "1")
    assert config["negotiated_features"] == feature_list(driver, DeviceId.BLOCK)
    data = (tmp_path / "data.bin").read_bytes()
    assert (tmp_path / "disk.img").read_bytes()[:DATA_BYTES] == data
    run_log = (tmp_path / "run.log").read_text()
    assert "VDUSE: device vblk added to the vDPA bus" in run_log
    assert "device vblk deleted" in run_log
