"""pyvdpa on the kernel's vDPA bus, second part: vhost_vdpa, refusals, crash and restart.

One boot of the VDUSE guest (:mod:`peers.vduse_guest`, Linux 6.12 under
QEMU TCG, two vCPUs):

* a sim-net loopback device on VDUSE, moved to vhost_vdpa, becomes
  ``/dev/vhost-vdpa-N``; DPDK testpmd's virtio-user driver (a driver
  written by others) forwards frames through it and gets them back;
* what the kernel or the process refuses is one clear line and a non-zero
  exit: a device name another ``pyvdpa run`` serves, a process that may not
  open ``/dev/vduse/control`` (not root), a net device with more than one
  queue pair;
* a sim-blk disk whose ``pyvdpa run`` is killed with SIGKILL three times
  while the guest writes to it, and restarted each time: the new process
  takes the device over, the writer sees no I/O error, and every write the
  kernel acknowledged is in the host file; the file then grows while no
  process serves it, and the next process tells the guest the new capacity.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from peers.guest_writer import BLOCK, pattern
from peers.vduse_guest import GuestResult, VduseGuest

pytestmark = pytest.mark.peers

CRASH_BLOCKS = 6000
#: The disk file's size once grown between two processes (it starts at half).
GROWN_SIZE = CRASH_BLOCKS * BLOCK * 3
KILLS = 3
GUEST_TIMEOUT = 280.0
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MAC = "52:54:00:12:34:56"


def _script(guest: VduseGuest) -> str:
    py = guest.python
    writer = HERE / "peers" / "guest_writer.py"
    run = f"{py} -m pyvdpa -v run"
    return f"""
set -u
fail() {{ echo "vduse test: $*" >&2; cat "$WORK"/*.log >&2; exit 1; }}
disk_of() {{ ls -d /sys/bus/vdpa/devices/$1/virtio*/block/* 2>/dev/null; }}
chardev_of() {{ ls -d /sys/bus/vdpa/devices/$1/vhost-vdpa-* 2>/dev/null; }}
on_bus() {{ test -e /sys/bus/vdpa/devices/$1/driver; }}
set -x
{guest.load_modules(vhost_vdpa=True)}
cd {ROOT}
# vhost_vdpa: DPDK's virtio-user through sim-net loopback.
{run} --vdev sim-net,name=lnet,mode=loopback,bus=vduse >"$WORK/net.log" 2>&1 &
net_pid=$!
wait_until 150 on_bus lnet || fail "lnet not on the bus"
echo lnet >/sys/bus/vdpa/drivers/virtio_vdpa/unbind || fail "unbind"
echo vhost_vdpa >/sys/bus/vdpa/devices/lnet/driver_override
echo lnet >/sys/bus/vdpa/drivers/vhost_vdpa/bind || fail "bind"
wait_until 10 chardev_of lnet || fail "no vhost-vdpa device"
node=/dev/$(basename "$(chardev_of lnet)")
wait_until 10 test -c $node || fail "no $node"
fact lnet.driver "$(basename "$(readlink /sys/bus/vdpa/devices/lnet/driver)")"
(echo "start tx_first"; sleep 6; echo "stop"; sleep 1; echo "show port stats all"; echo quit) |
    timeout 60 dpdk-testpmd -l 0,1 --no-pci --no-huge -m 512 --file-prefix=vv \\
    --vdev net_virtio_user0,path=$node,queue_size=256 -- -i --forward-mode=io \\
    --port-topology=loop --disable-link-check --total-num-mbufs=2048 \\
    --eth-peer=0,{MAC} >"$WORK/testpmd.log" 2>&1
fact testpmd.exit $?
# Refusals.
{run} --vdev sim-net,name=lnet,mode=loopback,bus=vduse >"$WORK/busy.out" 2>"$WORK/busy.err"
fact busy.exit $?
# Not root: the control node belongs to another user, and the process runs
# without the capabilities that would override that (what a plain user meets).
chown 65534:65534 /dev/vduse/control
setpriv --bounding-set=-all --inh-caps=-all \\
    {run} --vdev sim-blk,name=nobody,size=1M,bus=vduse >"$WORK/user.out" 2>"$WORK/user.err"
fact user.exit $?
chown 0:0 /dev/vduse/control
{run} --vdev sim-net,name=mq,queues=2,bus=vduse >"$WORK/mq.out" 2>"$WORK/mq.err"
fact mq.exit $?
kill -INT $net_pid; wait $net_pid; fact net.exit $?
# Crash and restart under a writer.
start_blk() {{
    {run} --vdev sim-blk,name=cblk,path=$WORK/crash.img,bus=vduse >>"$WORK/blk.log" 2>&1 &
    blk_pid=$!
}}
start_blk
wait_until 150 on_bus cblk || fail "cblk not on the bus"
wait_until 30 disk_of cblk || fail "cblk is no disk"
disk=/dev/$(basename "$(disk_of cblk)")
{py} {writer} $disk "$WORK/acked" {CRASH_BLOCKS} 2>"$WORK/writer.err" &
writer_pid=$!
acked() {{ wc -l <"$WORK/acked" 2>/dev/null || echo 0; }}
beyond() {{ test "$(acked)" -gt $1; }}
for i in $(seq {KILLS}); do
    # Kill once the device has served writes since the last restart.
    before=$(acked)
    wait_until 90 beyond $((before + 100)) || fail "no progress before kill $i"
    sleep 0.$((RANDOM % 9 + 1))
    fact kill$i.acked "$(acked)"
    kill -9 $blk_pid; wait $blk_pid 2>/dev/null
    sleep 1
    start_blk
done
wait $writer_pid; fact writer.exit $?
fact acked "$(wc -l <"$WORK/acked")"
# Grown while no process serves it: the next one tells the driver.
kill -9 $blk_pid; wait $blk_pid 2>/dev/null
truncate -s {GROWN_SIZE} $WORK/crash.img
start_blk
grown() {{ test "$(cat /sys/block/${{disk#/dev/}}/size)" -eq {GROWN_SIZE // 512}; }}
wait_until 60 grown; fact grown $?
fact grown.size "$(cat /sys/block/${{disk#/dev/}}/size)"
kill -INT $blk_pid; wait $blk_pid; fact blk.exit $?
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


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """Boot once; the tests read the report and the files left behind."""
    work = tmp_path_factory.mktemp("vduse-vhost")
    with (work / "crash.img").open("wb") as file:
        file.truncate(CRASH_BLOCKS * BLOCK * 2)
    guest = VduseGuest(work, smp=2, timeout=GUEST_TIMEOUT)
    result = guest.run(_script(guest), env=guest.numba_env(), timeout=GUEST_TIMEOUT)
    print(result.describe())
    return Run(work, result)


def test_guest_script_completes(run: Run) -> None:
    run.result.check()


def _port_stat(log: str, name: str) -> int:
    match = re.search(rf"{name}:\s+(\d+)", log)
    assert match, f"no {name} in testpmd's output:\n{log}"
    return int(match.group(1))


def test_dpdk_virtio_user_gets_its_frames_back_through_vhost_vdpa(run: Run) -> None:
    assert run.fact("lnet.driver") == "vhost_vdpa"
    assert run.fact("testpmd.exit") == "0", run.text("testpmd.log")
    log = run.text("testpmd.log")
    sent, received = _port_stat(log, "TX-packets"), _port_stat(log, "RX-packets")
    assert received > 100, log
    # io forwarding returns what it receives: the device looped back what was sent.
    assert sent - received <= 512, log
    assert _port_stat(log, "RX-errors") == 0, log


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("busy", "served by another process"),
        ("user", "root"),
        ("mq", "one queue pair"),
    ],
)
def test_refusals_are_one_clear_line(run: Run, case: str, words: str) -> None:
    assert run.fact(f"{case}.exit") != "0"
    err = run.text(f"{case}.err").strip().splitlines()
    errors = [line for line in err if line.startswith("pyvdpa: error:")]
    assert len(errors) == 1 and words in errors[0], err
    assert "Traceback" not in run.text(f"{case}.err")


def test_the_net_device_leaves_cleanly(run: Run) -> None:
    assert run.fact("net.exit") == "0"


def test_kills_lose_no_acknowledged_write(run: Run) -> None:
    assert run.fact("writer.exit") == "0", run.text("writer.err")
    acked = [int(line) for line in run.text("acked").split()]
    assert acked == list(range(CRASH_BLOCKS))
    kills = [int(run.fact(f"kill{i}.acked")) for i in range(1, KILLS + 1)]
    # Each kill hit the writer mid-run.
    assert kills[0] > 0 and kills[-1] < CRASH_BLOCKS, kills
    image = (run.work / "crash.img").read_bytes()
    for index in acked:
        assert image[index * BLOCK : (index + 1) * BLOCK] == pattern(index), index
    assert run.fact("blk.exit") == "0"


def test_a_restart_tells_the_driver_the_config_it_serves(run: Run) -> None:
    # The file grew while no process served the disk: the process taking
    # the device over pushes its config space and a config interrupt, and
    # the guest's virtio_blk sees the new capacity.
    assert (run.fact("grown"), run.fact("grown.size")) == ("0", str(GROWN_SIZE // 512))
