"""pyvdpa on the kernel's vDPA bus: config changes, and a hostile driver breaking one queue.

One boot of the VDUSE guest (:mod:`peers.vduse_guest`, Linux 6.12 under
QEMU TCG), one ``pyvdpa -v run -i`` serving three VDUSE devices, its
console fed through a fifo:

* ``cnet``, sim-net loopback bound to virtio_vdpa: ``link cnet down`` at the
  console becomes VDUSE_DEV_SET_CONFIG and a config interrupt, and the
  guest's netdev loses its carrier (``/sys/class/net/IF/carrier`` reads 0,
  ``ip link`` says NO-CARRIER, ``vdpa dev config show`` says link down);
  ``link cnet up`` brings it back.  ``link`` on the disk is one line of
  refusal;
* ``hnet``, sim-net loopback moved to vhost_vdpa: a driver on
  ``/dev/vhost-vdpa-N`` (pyvdpa's own :class:`~pyvdpa.drive.vhost_vdpa.VdpaSession`)
  sets up both rings and posts a chain on the TX ring whose descriptor
  links beyond the ring.  pyvdpa logs that vring broken, once; the process
  lives on; the config interrupt of ``link hnet down`` still reaches that
  driver's config eventfd, and it reads the link down;
* ``hblk``, sim-blk on a file bound to virtio_vdpa, served by the same
  process: O_DIRECT writes read back before and after the hostile ring,
  and land in the host file; ``stats`` counts the error on hnet's TX
  queue only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from peers.vduse_guest import GuestResult, VduseGuest, vdpa_tool

pytestmark = pytest.mark.peers

DISK_BYTES = 8 << 20
DATA_BYTES = 1 << 20
RING = 64
GUEST_TIMEOUT = 200.0
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: The hostile driver: both rings set up on /dev/vhost-vdpa-N, then a TX
#: chain whose first descriptor links to index RING + 7; then it waits for
#: the config interrupt and reads the link status.
HOSTILE = f"""
import os, select, struct, sys
from pyvdpa.drive.vhost_vdpa import VdpaSession
from pyvdpa.vhost_vdpa.device import VhostVdpaDevice
from pyvdpa.virtio.constants import DeviceId, NetFeature, VirtioFeature
from pyvdpa.virtio.ring import DescFlag

RING = {RING}
with VdpaSession(VhostVdpaDevice.open(sys.argv[1]), memory_size=4 << 20) as session:
    session.negotiate(VirtioFeature.VERSION_1 | NetFeature.STATUS, 0, device=DeviceId.NET)
    session.setup_ring(0, RING)
    tx = session.setup_ring(1, RING)
    session.enable_rings()
    print("status", int.from_bytes(session.read_config(6, 2), "little"), flush=True)
    buf = session.alloc(64)
    struct.pack_into("<QIHH", tx.queue._desc, 0, buf, 64, DescFlag.NEXT, RING + 7)
    struct.pack_into("<H", tx.queue._avail, 4, 0)
    struct.pack_into("<H", tx.queue._avail, 2, 1)
    os.eventfd_write(tx.kick_fd, 1)
    print("posted", flush=True)
    ready, _, _ = select.select([session._config_call], [], [], 60)
    print("config_irq", int(bool(ready)), flush=True)
    print("status", int.from_bytes(session.read_config(6, 2), "little"), flush=True)
"""


def _script(guest: VduseGuest) -> str:
    py = guest.python
    vdpa = vdpa_tool()
    return f"""
set -u
fail() {{ echo "vduse test: $*" >&2; cat "$WORK"/*.log >&2; exit 1; }}
disk_of() {{ ls -d /sys/bus/vdpa/devices/$1/virtio*/block/* 2>/dev/null; }}
net_of() {{ ls /sys/bus/vdpa/devices/$1/virtio*/net/ 2>/dev/null; }}
chardev_of() {{ ls -d /sys/bus/vdpa/devices/$1/vhost-vdpa-* 2>/dev/null; }}
on_bus() {{ test -e /sys/bus/vdpa/devices/$1/driver; }}
carrier() {{ cat /sys/class/net/$1/carrier 2>/dev/null; }}
carrier_is() {{ test "$(carrier $1)" = "$2"; }}
logged() {{ grep -q "$1" "$WORK/run.log"; }}
roundtrip() {{
    head -c {DATA_BYTES} /dev/urandom >"$WORK/$2.bin"
    dd if="$WORK/$2.bin" of=$1 bs=64k oflag=direct status=none || return 1
    dd if=$1 of=/tmp/back bs=64k count={DATA_BYTES // 65536} iflag=direct status=none || return 1
    cmp -s "$WORK/$2.bin" /tmp/back
}}
set -x
{guest.load_modules(vhost_vdpa=True)}
cd {ROOT}
mkfifo /tmp/console
{py} -m pyvdpa -v run -i \\
    --vdev sim-net,name=cnet,mode=loopback,bus=vduse \\
    --vdev sim-net,name=hnet,mode=loopback,mac=52:54:00:12:34:57,bus=vduse \\
    --vdev sim-blk,name=hblk,path=$WORK/disk.img,bus=vduse </tmp/console >"$WORK/run.log" 2>&1 &
run_pid=$!
exec 7>/tmp/console
for dev in cnet hnet hblk; do
    wait_until 150 on_bus $dev || fail "$dev not on the bus"
done
# Link changes through virtio_vdpa.
wait_until 30 net_of cnet || fail "cnet is no netdev"
netdev=$(net_of cnet)
ip link set "$netdev" up
wait_until 10 carrier_is "$netdev" 1
fact link.initial "$(carrier "$netdev")"
echo "link cnet down" >&7
wait_until 10 carrier_is "$netdev" 0
fact link.down "$(carrier "$netdev")"
fact link.down.ip "$(ip link show "$netdev" | head -1)"
fact link.down.vdpa "$(timeout 10 {vdpa} dev config show cnet | tr '\\n' ' ')"
echo "link cnet up" >&7
wait_until 10 carrier_is "$netdev" 1
fact link.up "$(carrier "$netdev")"
fact link.up.ip "$(ip link show "$netdev" | head -1)"
echo "link hblk down" >&7
# The disk, before.
wait_until 30 disk_of hblk || fail "hblk is no disk"
disk=/dev/$(basename "$(disk_of hblk)")
roundtrip $disk before; fact blk.before $?
# A hostile driver on hnet through vhost_vdpa.
echo hnet >/sys/bus/vdpa/drivers/virtio_vdpa/unbind || fail "unbind"
echo vhost_vdpa >/sys/bus/vdpa/devices/hnet/driver_override
echo hnet >/sys/bus/vdpa/drivers/vhost_vdpa/bind || fail "bind"
wait_until 10 chardev_of hnet || fail "no vhost-vdpa device"
node=/dev/$(basename "$(chardev_of hnet)")
wait_until 10 test -c $node || fail "no $node"
fact hnet.driver "$(basename "$(readlink /sys/bus/vdpa/devices/hnet/driver)")"
{py} "$WORK/hostile.py" $node >"$WORK/hostile.log" 2>&1 &
hostile_pid=$!
wait_until 60 grep -q posted "$WORK/hostile.log" || fail "the hostile chain was not posted"
wait_until 20 logged "vring 1 broken"; fact hostile.logged $?
echo "link hnet down" >&7
wait $hostile_pid; fact hostile.exit $?
kill -0 $run_pid; fact run.alive $?
# The disk, after; the other net device still has its carrier.
roundtrip $disk after; fact blk.after $?
fact link.after "$(carrier "$netdev")"
printf 'stats hnet 0xFFFF\\nstats hblk 0\\nquit\\n' >&7
wait $run_pid; fact run.exit $?
"""


@dataclass(frozen=True, slots=True)
class Run:
    """The guest's report and the work directory."""

    work: Path
    result: GuestResult

    def fact(self, name: str) -> str:
        """One reported value (a missing one fails with the whole run)."""
        return self.result.fact(name)

    def text(self, name: str) -> str:
        """A file the guest left in the work directory."""
        return (self.work / name).read_text()

    def expect(self, name: str, value: str) -> None:
        """Fail with the whole run attached unless fact ``name`` is ``value``."""
        got = self.fact(name)
        assert got == value, f"{name}: {got!r}, expected {value!r}\n{self.result.describe()}"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """Boot once; the tests read the report and the files left behind."""
    work = tmp_path_factory.mktemp("vduse-config")
    with (work / "disk.img").open("wb") as file:
        file.truncate(DISK_BYTES)
    (work / "hostile.py").write_text(HOSTILE)
    guest = VduseGuest(work, smp=2, timeout=GUEST_TIMEOUT)
    result = guest.run(_script(guest), env=guest.numba_env(), timeout=GUEST_TIMEOUT)
    print(result.describe())
    for name in ("run.log", "hostile.log"):
        path = work / name
        print(f"--- {name} ---\n{path.read_text() if path.exists() else 'missing'}")
    return Run(work, result)


_HOSTILE_WORDS = ("status", "posted", "config_irq")


def _stats(log: str, device: str) -> dict[int, dict[str, int]]:
    """The ``stats`` report of ``device`` in the console's output: {queue: {counter: value}}."""
    text = log.split(f"\nDevice {device}:\n", 1)[1].split("\nDevice ", 1)[0]
    queues: dict[int, dict[str, int]] = {}
    current: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith("\tVirtq "):
            current = queues.setdefault(int(line.split()[1].rstrip(":")), {})
        elif match := re.match(r"^\t\t(\w+) +(\d+)$", line):
            current[match[1]] = int(match[2])
    return queues


def test_guest_script_completes(run: Run) -> None:
    run.result.check()


def test_link_down_and_up_reach_the_guest_netdev(run: Run) -> None:
    run.expect("link.initial", "1")
    run.expect("link.down", "0")
    assert "NO-CARRIER" in run.fact("link.down.ip")
    assert re.search(r"\blink down\b", run.fact("link.down.vdpa")), run.fact("link.down.vdpa")
    run.expect("link.up", "1")
    assert "NO-CARRIER" not in run.fact("link.up.ip")
    assert "LOWER_UP" in run.fact("link.up.ip")
    log = run.text("run.log")
    assert "Device cnet: link down." in log
    assert "Device cnet: link up." in log
    assert "cnet: config changed, config interrupt injected" in log


def test_link_on_a_disk_is_one_line_of_refusal(run: Run) -> None:
    assert "Device hblk is a block device: link applies to net devices." in run.text("run.log")


def test_a_hostile_ring_is_logged_once_and_the_process_lives_on(run: Run) -> None:
    run.expect("hnet.driver", "vhost_vdpa")
    run.expect("hostile.logged", "0")
    broken = re.findall(r"vduse:hnet: vring 1 broken: .*", run.text("run.log"))
    assert len(broken) == 1, broken
    assert "Traceback" not in run.text("run.log")
    run.expect("run.alive", "0")
    run.expect("run.exit", "0")


def test_the_config_interrupt_still_reaches_the_vhost_vdpa_driver(run: Run) -> None:
    run.expect("hostile.exit", "0")
    log = run.text("hostile.log")
    lines = [line for line in log.splitlines() if line.split(" ")[0] in _HOSTILE_WORDS]
    assert lines == ["status 1", "posted", "config_irq 1", "status 0"], log


def test_the_disk_of_the_same_process_keeps_working(run: Run) -> None:
    run.expect("blk.before", "0")
    run.expect("blk.after", "0")
    image = (run.work / "disk.img").read_bytes()
    assert image[:DATA_BYTES] == (run.work / "after.bin").read_bytes()
    run.expect("link.after", "1")


def test_stats_count_the_error_on_that_queue_only(run: Run) -> None:
    log = run.text("run.log")
    hnet = _stats(log, "hnet")
    assert set(hnet) == {0, 1}, hnet
    assert hnet[1]["bad_desc_errors"] == 1, hnet
    assert hnet[0]["bad_desc_errors"] == 0, hnet
    hblk = _stats(log, "hblk")
    assert hblk[0]["bad_desc_errors"] == 0, hblk
    assert hblk[0]["received_desc"] > 0, hblk
