"""A Linux guest on disks added to a running ``pyvdpa run`` over its control socket.

``pyvdpa run`` starts with no device; ``pyvdpa dev add`` creates a sim-blk
disk on a file and a second one; QEMU 7.2 (TCG) boots with a
vhost-user-blk disk on the first.  While the guest's virtio-blk driver
works, ``dev config show`` reports the capacity the guest sees and exactly
the device feature bits its driver negotiated (read from sysfs in the
guest), ``dev vstats show`` counts at least the requests it sent and no
error, the second disk is deleted, and the guest's writes after that land
in the host file as before.
"""

from __future__ import annotations

import hashlib
import random
import re
from pathlib import Path

import pytest

from peers import PeerPool
from peers.guest import Guest, GuestImage, build_initramfs, script_status, vhost_user_blk_args
from peers.initramfs import add_files
from pyvdpa.drive.info import feature_list
from pyvdpa.virtio.constants import DeviceId
from test_guest_blk import FACT, SHELL_FUNCTIONS
from test_manage import Running

pytestmark = pytest.mark.peers

SECTOR = 512
DISK_BYTES = 4 << 20
CHUNK = 64 * 1024
SECOND_AT = 2048
GUEST_TIMEOUT = 90.0
#: Device-specific feature bits (virtio 1.2: 0 to 23).
DEVICE_BITS = 24

SCRIPT = (
    SHELL_FUNCTIONS
    + f"""
wait_disks vda
fact size "$(cat /sys/block/vda/size)"
fact features "$(cat /sys/block/vda/device/features)"
put vda w1 0; fact write1 $?
fact read1 $(md5 vda 0 {CHUNK // SECTOR})
echo phase1-done
sleep 8
put vda w2 {SECOND_AT}; fact write2 $?
fact read2 $(md5 vda {SECOND_AT} {CHUNK // SECTOR})
"""
)


def test_guest_on_a_disk_added_at_runtime(
    sock_dir: Path, tmp_path: Path, guest_image: GuestImage
) -> None:
    rng = random.Random(14)
    first, second = rng.randbytes(CHUNK), rng.randbytes(CHUNK)
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(DISK_BYTES))
    run = Running(sock_dir)
    try:
        blk_sock = sock_dir / "blk0.sock"
        code, _, err = run.cli(
            "dev", "add", "name", "blk0", "mgmtdev", "sim-blk", "path", str(disk),
            "socket", str(blk_sock), "serial", "added-at-runtime",
        )  # fmt: skip
        assert code == 0, err
        code, _, err = run.cli("dev", "add", "name", "spare", "mgmtdev", "sim-blk", "size", "1M")
        assert code == 0, err
        assert (sock_dir / "spare.sock").exists()  # beside the control socket

        initramfs = build_initramfs(SCRIPT, tmp_path / "initramfs.gz", guest_image)
        add_files(initramfs, {"/data/w1": first, "/data/w2": second})
        with PeerPool(tmp_path, sock_dir, guest_image) as pool:
            guest = pool.start(
                Guest(guest_image, initramfs, vhost_user_blk_args(blk_sock, name="blk0"))
            )
            guest.wait_for(re.compile(r"^phase1-done", re.M), GUEST_TIMEOUT)
            facts = dict(FACT.findall(guest.output()))
            shown = run.call("dev_show", name="blk0")
            config = run.call("dev_config_show", name="blk0")
            vstats = run.call("dev_vstats_show", name="blk0", qidx=0)
            code, _, err = run.cli("dev", "del", "spare")
            assert code == 0, err
            console = guest.wait(timeout=GUEST_TIMEOUT)
        assert script_status(console) == 0, console
        facts.update(FACT.findall(console))
    finally:
        run.stop()

    assert shown["blk0"]["connected"] is True  # type: ignore[index]
    blk = config["blk0"]  # type: ignore[index]
    assert blk["capacity"] == int(facts["size"]) == DISK_BYTES // SECTOR
    assert (blk["blk_size"], blk["read_only"], blk["num_queues"]) == (512, False, 1)
    # sysfs gives the driver's features as a string of 0/1, bit 0 first.
    driver = sum(1 << bit for bit, flag in enumerate(facts["features"]) if flag == "1")
    mask = (1 << DEVICE_BITS) - 1
    device_names = set(feature_list(driver & mask, DeviceId.BLOCK))
    negotiated = set(blk["negotiated_features"])
    assert device_names and device_names == negotiated & set(feature_list(mask, DeviceId.BLOCK)), (
        device_names,
        negotiated,
    )
    assert "VERSION_1" in negotiated
    queue = vstats["blk0"]  # type: ignore[index]
    assert queue["queue_type"] == "request"
    # At least the guest's write (flushed) and read, probe reads besides.
    assert queue["completed_desc"] == queue["received_desc"] >= 2
    assert queue["bad_desc_errors"] == queue["invalid_buffer"] == queue["completion_errors"] == 0
    assert facts["write1"] == facts["write2"] == "0"
    assert facts["read1"] == hashlib.md5(first).hexdigest()
    assert facts["read2"] == hashlib.md5(second).hexdigest()
    data = disk.read_bytes()
    assert data[:CHUNK] == first
    assert data[SECOND_AT * SECTOR : SECOND_AT * SECTOR + CHUNK] == second
