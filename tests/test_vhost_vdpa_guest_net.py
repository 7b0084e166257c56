"""``pyvdpa drive`` and ``pyvdpa info`` over /dev/vhost-vdpa-N, against pyvdpa's own VDUSE devices.

One boot of the VDUSE guest (:mod:`peers.vduse_guest`, Linux 6.12 under
QEMU TCG) with vhost_vdpa loaded and virtio_vdpa not, so vhost_vdpa takes
every new vDPA device.  ``pyvdpa run`` puts a sim-net device in loopback
mode and a sim-blk RAM disk on the bus (``bus=vduse``); each becomes a
``/dev/vhost-vdpa-N``, and a second pyvdpa program is their VMM:

* ``pyvdpa info --vhost-vdpa`` reports each, field by field;
* ``drive net --mode io``: frames go round the loopback, none corrupted;
* ``drive net --mode io --iommu``: the same while mappings are remapped;
* ``drive blk --rw randwrite --verify`` on the RAM disk: no errors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from peers.vduse_guest import GUEST_MODULE_DIR, GuestResult, VduseGuest, prepare_numba_cache

pytestmark = pytest.mark.peers

GUEST_TIMEOUT = 300.0
DISK_BYTES = 16 << 20
ROOT = Path(__file__).resolve().parent.parent
SIM_MAC = "52:54:00:12:34:56"


def _modules(guest: VduseGuest) -> str:
    """insmod the vDPA modules and vhost_vdpa, leaving virtio_vdpa out."""
    names = [m for m in guest.image.module_order("vdpa") if m != "virtio_vdpa"]
    names += guest.image.module_order("vhost_vdpa")
    return (
        f"for module in {' '.join(names)}; do\n"
        "    [ -d /sys/module/$module ] ||\n"
        f'        /bin/busybox insmod {GUEST_MODULE_DIR}/$module.ko || fail "insmod $module"\n'
        "done\n"
    )


def _script(guest: VduseGuest) -> str:
    py = guest.python
    return f"""
set -u
fail() {{ echo "vhost-vdpa net test: $*" >&2; cat "$WORK/run.log" >&2; exit 1; }}
chardev_of() {{ ls -d /sys/bus/vdpa/devices/$1/vhost-vdpa-* 2>/dev/null; }}
set -x
{_modules(guest)}
cd {ROOT}
{py} -m pyvdpa -v run --vdev sim-net,name=pnet,mode=loopback,bus=vduse \\
    --vdev sim-blk,name=pblk,size=16M,bus=vduse >"$WORK/run.log" 2>&1 &
run_pid=$!
for dev in pnet pblk; do
    wait_until 150 chardev_of $dev || fail "$dev became no vhost-vdpa device"
    fact $dev.driver "$(basename "$(readlink /sys/bus/vdpa/devices/$dev/driver)")"
done
net=/dev/$(basename "$(chardev_of pnet)"); blk=/dev/$(basename "$(chardev_of pblk)")
wait_until 10 test -c $net || fail "no $net"
wait_until 10 test -c $blk || fail "no $blk"
{py} -m pyvdpa info --vhost-vdpa $net --json >"$WORK/info-net.json" 2>"$WORK/info-net.err"
fact info-net.rc $?
{py} -m pyvdpa info --vhost-vdpa $blk --json >"$WORK/info-blk.json" 2>"$WORK/info-blk.err"
fact info-blk.rc $?
timeout 90 {py} -m pyvdpa drive net --vhost-vdpa $net --mode io --duration 3 --json \\
    >"$WORK/io.json" 2>"$WORK/io.err"
fact io.rc $?
timeout 90 {py} -m pyvdpa drive net --vhost-vdpa $net --mode io --iommu --duration 3 --json \\
    >"$WORK/iommu.json" 2>"$WORK/iommu.err"
fact iommu.rc $?
timeout 90 {py} -m pyvdpa drive blk --vhost-vdpa $blk --rw randwrite --verify --size 1M \\
    --duration 3 --json >"$WORK/blk.json" 2>"$WORK/blk.err"
fact blk.rc $?
kill -INT $run_pid; wait $run_pid; fact run_exit $?
"""


@dataclass(frozen=True, slots=True)
class Run:
    """The guest's report and the work directory it left behind."""

    work: Path
    result: GuestResult

    def expect(self, name: str, value: str) -> None:
        """Fail, with the whole run attached, unless fact ``name`` is ``value``."""
        got = self.result.fact(name)
        assert got == value, f"{name}: {got!r}, expected {value!r}\n{self.result.describe()}"

    def json(self, name: str) -> dict[str, Any]:
        """The JSON object a command printed last into a file of the work directory."""
        lines = (self.work / name).read_text().strip().splitlines()
        assert lines, f"{name} is empty\n{self.result.describe()}"
        figures: dict[str, Any] = json.loads(lines[-1])
        return figures


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """Boot the guest once; the tests read its report and files."""
    work = tmp_path_factory.mktemp("vhost-vdpa-net")
    guest = VduseGuest(work)
    env = guest.numba_env(prepare_numba_cache())
    result = guest.run(_script(guest), env=env, timeout=GUEST_TIMEOUT)
    print(result.describe())
    return Run(work, result)


def test_guest_script_completes(run: Run) -> None:
    run.result.check()
    run.expect("pnet.driver", "vhost_vdpa")
    run.expect("pblk.driver", "vhost_vdpa")


def test_info_reports_sim_net(run: Run) -> None:
    run.expect("info-net.rc", "0")
    info = run.json("info-net.json")
    assert info["transport"] == "vhost-vdpa"
    assert (info["device_id"], info["device_type"]) == (1, "net")
    names = set(info["feature_names"])
    assert {"VERSION_1", "ACCESS_PLATFORM", "MAC", "STATUS", "MTU"} <= names
    assert "CTRL_VQ" not in names
    assert {"IOTLB_MSG_V2", "IOTLB_BATCH"} <= set(info["backend_feature_names"])
    assert info["queues"] == 2
    assert info["queue_size"] == 256
    config = info["config"]
    assert config["mac"] == SIM_MAC
    assert config["status"] == 1 and config["status_names"] == ["LINK_UP"]
    assert config["max_virtqueue_pairs"] == 1
    assert config["mtu"] == 1500
    assert (info["iova_first"], info["iova_last"]) == (0, (1 << 64) - 1)


def test_info_reports_sim_blk(run: Run) -> None:
    run.expect("info-blk.rc", "0")
    info = run.json("info-blk.json")
    assert (info["device_id"], info["device_type"]) == (2, "blk")
    assert {"VERSION_1", "ACCESS_PLATFORM", "FLUSH"} <= set(info["feature_names"])
    assert info["queues"] == 1
    config = info["config"]
    assert config["capacity_bytes"] == DISK_BYTES
    assert config["blk_size"] == 512
    assert config["num_queues"] == 1


def _check_io(figures: dict[str, Any]) -> None:
    assert figures["mode"] == "io"
    assert figures["rx_packets"] > 0 and figures["tx_packets"] >= figures["rx_packets"]
    assert figures["rx_bad"] == figures["errors"] == figures["rx_foreign"] == 0
    assert figures["rx_bytes"] == 64 * figures["rx_packets"]


def test_drive_net_io_through_the_loopback(run: Run) -> None:
    run.expect("io.rc", "0")
    figures = run.json("io.json")
    _check_io(figures)
    assert figures["iotlb_remaps"] == 0


def test_drive_net_io_with_remaps(run: Run) -> None:
    run.expect("iommu.rc", "0")
    figures = run.json("iommu.json")
    _check_io(figures)
    assert figures["iotlb_remaps"] >= 5


def test_drive_blk_on_sim_blk(run: Run) -> None:
    run.expect("blk.rc", "0")
    figures = run.json("blk.json")
    assert figures["capacity"] == DISK_BYTES
    assert figures["ios"] > 0 and figures["verified"] > 0
    assert figures["errors"] == figures["verify_errors"] == 0


def test_run_takes_its_devices_off_the_bus(run: Run) -> None:
    run.expect("run_exit", "0")
