"""pyvdpa devices on the Linux kernel's vDPA bus, through VDUSE, used by the kernel itself.

One boot of the VDUSE guest (:mod:`peers.vduse_guest`, Linux 6.12 under
QEMU TCG) runs ``pyvdpa run`` with four devices on the bus
(``bus=vduse``), bound to virtio_vdpa, so the guest kernel's own virtio
drivers use them, and qemu-storage-daemon's ``vduse-blk`` export beside
them for comparison:

* a sim-blk disk on a file: pseudo-random regions written and read back
  with O_DIRECT in the guest (the same checks on the qemu-storage-daemon
  disk), and found in the host files afterwards;
* a read-only sim-blk disk the kernel refuses to write;
* a sim-blk disk with an ext4 filesystem: files with checksums survive an
  unmount and a mount;
* a sim-net device in tap mode: the guest's virtio-net netdev, moved into a
  network namespace, pings the TAP and streams TCP to it with matching
  checksums;
* 4 KiB random O_DIRECT writes and reads timed on the pyvdpa disk and on the
  qemu-storage-daemon disk, one after the other.

``pyvdpa run`` runs with its console: ``list`` marks the VDUSE devices,
``stats`` counts their queues' work, and ``quit`` takes the devices off the
bus.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from peers.guest_disk import BLOCK, regions
from peers.vduse_guest import GuestResult, VduseGuest, vdpa_tool

pytestmark = pytest.mark.peers

DISK_BYTES = 16 << 20
FS_BYTES = 64 << 20
REGIONS = 8
SPEED_COUNT = 400
STREAM_BYTES = 2 << 20
GUEST_TIMEOUT = 280.0
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

TCP = r"""
import hashlib, random, socket, sys
role, address, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
if role == "server":
    server = socket.create_server((address, 5001))
    print("ready", flush=True)
    conn, _ = server.accept()
    digest, total = hashlib.md5(), 0
    while chunk := conn.recv(65536):
        digest.update(chunk)
        total += len(chunk)
    print(total, digest.hexdigest(), flush=True)
else:
    data = random.Random(5).randbytes(size)
    with socket.create_connection((address, 5001), timeout=30) as conn:
        conn.sendall(data)
    print(len(data), hashlib.md5(data).hexdigest(), flush=True)
"""


def _script(guest: VduseGuest) -> str:
    vdpa = vdpa_tool()
    py = guest.python
    disk_py = HERE / "peers" / "guest_disk.py"
    return f"""
set -u
fail() {{ echo "vduse test: $*" >&2; cat "$WORK/run.log" >&2; exit 1; }}
disk_of() {{ ls -d /sys/bus/vdpa/devices/$1/virtio*/block/* 2>/dev/null; }}
net_of() {{ ls /sys/bus/vdpa/devices/$1/virtio*/net/ 2>/dev/null; }}
set -x
{guest.load_modules()}
cd {ROOT}
mkfifo /tmp/console
{py} -m pyvdpa -v run -i \\
    --vdev sim-blk,name=pblk,path=$WORK/pyv.img,bus=vduse \\
    --vdev sim-blk,name=pro,path=$WORK/ro.img,readonly=on,bus=vduse \\
    --vdev sim-blk,name=pfs,path=$WORK/fs.img,bus=vduse \\
    --vdev sim-net,name=pnet,mode=tap,ifname=pyv0,bus=vduse </tmp/console >"$WORK/run.log" 2>&1 &
run_pid=$!
exec 7>/tmp/console
for dev in pblk pro pfs pnet; do
    wait_until 150 test -e /sys/bus/vdpa/devices/$dev/driver || fail "$dev not on the bus"
done
fact pblk.driver "$(basename "$(readlink /sys/bus/vdpa/devices/pblk/driver)")"
wait_until 30 disk_of pblk || fail "pblk is no disk"
wait_until 30 disk_of pro || fail "pro is no disk"
wait_until 30 disk_of pfs || fail "pfs is no disk"
pblk=/dev/$(basename "$(disk_of pblk)"); pro=/dev/$(basename "$(disk_of pro)")
pfs=/dev/$(basename "$(disk_of pfs)")
fact pblk.sectors "$(cat /sys/class/block/${{pblk#/dev/}}/size)"
{py} {disk_py} regions $pblk pyv {REGIONS} | while read k v; do fact pblk.$k "$v"; done
# qemu-storage-daemon's VDUSE disk, the same checks.
qemu-storage-daemon --blockdev driver=file,node-name=f,filename=$WORK/qsd.img \\
    --export type=vduse-blk,id=e,node-name=f,name=qsd0,writable=on \\
    --pidfile /tmp/qsd0.pid >"$WORK/qsd.log" 2>&1 &
qsd_pid=$!
wait_until 30 test -s /tmp/qsd0.pid || fail "qemu-storage-daemon did not export"
timeout 60 {vdpa} dev add name qsd0 mgmtdev vduse || fail "vdpa dev add qsd0"
wait_until 30 disk_of qsd0 || fail "qsd0 is no disk"
qsd=/dev/$(basename "$(disk_of qsd0)")
fact qsd.sectors "$(cat /sys/class/block/${{qsd#/dev/}}/size)"
{py} {disk_py} regions $qsd qsd {REGIONS} | while read k v; do fact qsd.$k "$v"; done
# The read-only disk.
fact pro.getro "$(blockdev --getro $pro)"
dd if=/dev/zero of=$pro bs=4096 count=1 oflag=direct status=none 2>/dev/null; fact pro.write $?
dd if=$pro of=/dev/null bs=4096 count=1 iflag=direct status=none; fact pro.read $?
# A filesystem across an unmount.
mkfs.ext4 -q -F -E nodiscard $pfs; fact fs.mkfs $?
mkdir -p /tmp/mnt && mount $pfs /tmp/mnt; fact fs.mount $?
for i in 1 2 3; do head -c $((i * 300000)) /dev/urandom >/tmp/mnt/file$i; done
(cd /tmp/mnt && md5sum file1 file2 file3) >/tmp/sums
umount /tmp/mnt; fact fs.umount $?
mount $pfs /tmp/mnt; fact fs.remount $?
(cd /tmp/mnt && md5sum -c --quiet /tmp/sums); fact fs.sums $?
umount /tmp/mnt
# Speed: the pyvdpa disk, then the qemu-storage-daemon disk.
{py} {disk_py} speed $pblk {SPEED_COUNT} | while read k v; do fact speed.pyvdpa.$k "$v"; done
{py} {disk_py} speed $qsd {SPEED_COUNT} | while read k v; do fact speed.qsd.$k "$v"; done
timeout 60 {vdpa} dev del qsd0; fact qsd.del $?
kill $qsd_pid; wait $qsd_pid
# The net device: its netdev in a namespace, the TAP outside.
wait_until 30 net_of pnet || fail "pnet is no netdev"
netdev=$(net_of pnet)
fact pnet.netdev "$netdev"
ip netns add g || fail "netns"
ip link set "$netdev" netns g
ip netns exec g ip addr add 10.99.0.2/24 dev "$netdev"
ip netns exec g ip link set "$netdev" up
ip netns exec g ip link set lo up
ip addr add 10.99.0.1/24 dev pyv0 && ip link set pyv0 up
ip netns exec g busybox ping -c 5 -W 5 10.99.0.1 >"$WORK/ping.log" 2>&1; fact net.ping $?
{py} "$WORK/tcp.py" server 10.99.0.1 0 >"$WORK/tcp-server.log" 2>&1 &
tcp_pid=$!
wait_until 10 grep -q ready "$WORK/tcp-server.log"
fact net.sent "$(ip netns exec g {py} "$WORK/tcp.py" client 10.99.0.1 {STREAM_BYTES})"
wait $tcp_pid
fact net.received "$(tail -1 "$WORK/tcp-server.log")"
printf 'list\\nstats pblk 0\\nstats pnet 0xFFFF\\nquit\\n' >&7
wait $run_pid; fact run.exit $?
fact bus.after "$(ls /sys/bus/vdpa/devices | tr '\\n' ' ')"
"""


@dataclass(frozen=True, slots=True)
class VduseRun:
    """The guest's report and the work directory."""

    work: Path
    result: GuestResult

    def fact(self, name: str) -> str:
        """One reported value (a missing one fails with the whole run)."""
        return self.result.fact(name)

    def expect(self, name: str, value: str) -> None:
        """Fail with the whole run attached unless fact ``name`` is ``value``."""
        got = self.fact(name)
        assert got == value, f"{name}: {got!r}, expected {value!r}\n{self.result.describe()}"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> VduseRun:
    """Boot once; the tests read the report and the files left behind."""
    work = tmp_path_factory.mktemp("vduse-pyvdpa")
    for name, size in (("pyv", DISK_BYTES), ("qsd", DISK_BYTES), ("ro", DISK_BYTES)):
        with (work / f"{name}.img").open("wb") as file:
            file.truncate(size)
    with (work / "fs.img").open("wb") as file:
        file.truncate(FS_BYTES)
    (work / "tcp.py").write_text(TCP)
    guest = VduseGuest(work, smp=2, timeout=GUEST_TIMEOUT)
    result = guest.run(_script(guest), env=guest.numba_env(), timeout=GUEST_TIMEOUT)
    print(result.describe())
    print((work / "run.log").read_text() if (work / "run.log").exists() else "no run.log")
    return VduseRun(work, result)


def test_guest_script_completes(run: VduseRun) -> None:
    run.result.check()


def test_the_kernel_binds_virtio_vdpa_and_sees_the_disk_size(run: VduseRun) -> None:
    run.expect("pblk.driver", "virtio_vdpa")
    run.expect("pblk.sectors", str(DISK_BYTES // 512))


@pytest.mark.parametrize("disk", ["pyv", "qsd"])
def test_data_reads_back_in_the_guest_and_is_in_the_host_file(run: VduseRun, disk: str) -> None:
    prefix = "pblk" if disk == "pyv" else "qsd"
    run.expect(f"{prefix}.readback", "ok")
    run.expect(f"{prefix}.blocks", str(DISK_BYTES // BLOCK))
    image = (run.work / f"{disk}.img").read_bytes()
    for start, count, data in regions(DISK_BYTES // BLOCK, disk, REGIONS):
        assert image[start * BLOCK : (start + count) * BLOCK] == data, (disk, start, count)


def test_pyvdpa_and_qemu_storage_daemon_give_the_kernel_the_same_results(run: VduseRun) -> None:
    for fact in ("readback", "blocks"):
        assert run.fact(f"pblk.{fact}") == run.fact(f"qsd.{fact}")
    assert run.fact("pblk.sectors") == run.fact("qsd.sectors")


def test_a_read_only_disk_refuses_writes(run: VduseRun) -> None:
    run.expect("pro.getro", "1")
    assert run.fact("pro.write") != "0"
    run.expect("pro.read", "0")
    assert (run.work / "ro.img").read_bytes() == bytes(DISK_BYTES)


def test_a_filesystem_survives_an_unmount(run: VduseRun) -> None:
    for step in ("mkfs", "mount", "umount", "remount", "sums"):
        run.expect(f"fs.{step}", "0")


def test_the_guest_pings_and_streams_tcp_to_the_tap(run: VduseRun) -> None:
    run.expect("net.ping", "0")
    sent = run.fact("net.sent").split()
    received = run.fact("net.received").split()
    assert sent == received and sent[0] == str(STREAM_BYTES)


def test_speed_is_measured_on_both_disks(run: VduseRun) -> None:
    for side in ("pyvdpa", "qsd"):
        for op in ("write_iops", "read_iops"):
            assert int(run.fact(f"speed.{side}.{op}")) > 0


def test_the_console_lists_and_counts_the_vduse_devices(run: VduseRun) -> None:
    log = (run.work / "run.log").read_text()
    for name in ("pblk", "pro", "pfs", "pnet"):
        assert re.search(rf"^{name}\t.*\tvduse$", log, re.M), log
    blk = log.split("Device pblk:", 1)[1].split("Device pnet:", 1)[0]
    received = int(re.search(r"received_desc\s+(\d+)", blk).group(1))  # type: ignore[union-attr]
    assert received > 100, blk
    net = log.split("Device pnet:", 1)[1]
    packets = [int(n) for n in re.findall(r"packets\s+(\d+)", net)]
    assert len(packets) == 2 and min(packets) > 0, net


def test_pyvdpa_takes_its_devices_off_the_bus_on_quit(run: VduseRun) -> None:
    run.expect("run.exit", "0")
    for name in ("pblk", "pro", "pfs", "pnet"):
        assert name not in run.fact("bus.after").split()
