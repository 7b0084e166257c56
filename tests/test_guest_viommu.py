"""sim-blk and sim-net under a Linux guest behind QEMU's emulated Intel IOMMU.

One guest (QEMU 7.2, TCG, q35) boots with ``intel_iommu=on`` and two
vhost-user-blk disks served by ``pyvdpa run``, one on a split ring and one on
a packed ring, each with ``iommu_platform=on,ats=on`` behind a PCIe root
port: the guest then gives the devices I/O virtual addresses, QEMU answers
pyvdpa's IOTLB misses from the guest's page tables, and every buffer the
guest unmaps reaches pyvdpa as an IOTLB INVALIDATE (QEMU forwards device-TLB
invalidations, which the guest sends only for a device with ATS enabled,
and a virtio device has ATS only as a PCI Express device, behind a root
port).  The guest reuses I/O virtual addresses for other pages all the time,
so a translation pyvdpa kept after its invalidation would land device writes
on pages that are no longer buffers: the guest's memory would be corrupted
(QEMU 7.2 leaves the permission byte of its INVALIDATE messages
uninitialised, and pyvdpa once refused them for it: a reading process then
crashed on a corrupt page table).

The guest reads each whole disk several times (``O_DIRECT`` and through the
page cache), writes a region with ``O_DIRECT`` and reads it back; the tests
check every digest against the host files, the written region on the host,
and that no ring broke.  A second and third guest ping a TAP through a
sim-net NIC behind the IOMMU (split, then packed) and move a 4 MiB TCP
stream each way, checksummed at both ends, as ``test_guest_net`` does
without an IOMMU.
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
from peers.guest import (
    Guest,
    GuestImage,
    build_initramfs,
    script_status,
    vhost_user_blk_args,
    vhost_user_net_args,
)
from peers.initramfs import add_files
from peers.tcp import StreamServer
from test_guest_net import (
    DOWNLOAD,
    GUEST_MAC,
    HOST_IP,
    PING_SUMMARY,
    PINGS,
    STREAM_SIZE,
    TAP,
    UPLOAD,
    NetVariant,
)
from test_guest_net import guest_script as net_script

pytestmark = pytest.mark.peers

DISK_SIZE = 8 << 20
WRITE_OFFSET = 1 << 20
WRITE_SIZE = 1 << 20
ROUNDS = 3
GUEST_TIMEOUT = 240.0
DISKS = ("split", "packed")
FACT = re.compile(r"^fact ([\w.-]+): (.*)$", re.M)

IOMMU_MACHINE = [
    "-machine",
    "q35",
    "-device",
    "intel-iommu,intremap=off,device-iotlb=on",
]


def image(name: str) -> bytes:
    """The initial contents of disk ``name``."""
    return random.Random(f"viommu-{name}").randbytes(DISK_SIZE)


def written() -> bytes:
    """What the guest writes at :data:`WRITE_OFFSET` of each disk."""
    return random.Random("viommu-write").randbytes(WRITE_SIZE)


def md5(data: bytes) -> str:
    """Hex MD5 of ``data``."""
    return hashlib.md5(data).hexdigest()


def behind_iommu(args: list[str], port: int) -> list[str]:
    """A device's QEMU arguments (its ``-device`` last) behind the IOMMU, on root port ``port``.

    ATS, which makes the guest send device-TLB invalidations, needs a PCI
    Express device: one behind a root port.
    """
    device = f"{args[-1]},iommu_platform=on,ats=on,disable-legacy=on,bus=rp{port}"
    root_port = ["-device", f"pcie-root-port,id=rp{port},bus=pcie.0,chassis={port + 1}"]
    return [*root_port, *args[:-1], device]


def iommu_disk_args(sock: Path, name: str, port: int, *, packed: bool) -> list[str]:
    """A vhost-user-blk disk behind the IOMMU, on its own PCIe root port."""
    args = vhost_user_blk_args(sock, name=name)
    if packed:
        args[-1] += ",packed=on"
    return behind_iommu(args, port)


def guest_script() -> str:
    """Find each disk by serial, read it whole, write and read back a region."""
    chunk = 64 << 10
    blocks, count = WRITE_OFFSET // chunk, WRITE_SIZE // chunk
    return f"""
fact() {{ echo "fact $1: $2"; }}
digest() {{ dd "$@" 2>/dev/null | md5sum | cut -d' ' -f1; }}
i=0; while ! [ -b /dev/vdb ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i + 1)); done
fact iommu "$(ls /sys/class/iommu | head -1)"
for dev in /sys/block/vd*; do
    name=$(cat $dev/serial); disk=/dev/${{dev##*/}}
    for round in $(seq {ROUNDS}); do
        fact $name.direct.$round $(digest if=$disk bs=64k iflag=direct)
        echo 3 > /proc/sys/vm/drop_caches
        fact $name.cached.$round $(digest if=$disk bs=4k)
    done
    dd if=/data/write of=$disk bs=64k seek={blocks} oflag=direct conv=notrunc 2>/dev/null
    fact $name.write $?
    fact $name.readback $(digest if=$disk bs=64k skip={blocks} count={count} iflag=direct)
done
"""


@dataclass(frozen=True, slots=True)
class IommuRun:
    """What the guest reported and what the disks hold afterwards."""

    console: str
    facts: dict[str, str]
    files: dict[str, bytes]
    stats: dict[str, dict[int, dict[str, int]]]

    def fact(self, name: str) -> str:
        """One reported fact (the console attached when it is missing)."""
        assert name in self.facts, f"no fact {name!r}:\n{self.console[-3000:]}"
        return self.facts[name]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, guest_image: GuestImage) -> Iterator[IommuRun]:
    """Boot the guest once, both disks behind the IOMMU."""
    workdir = tmp_path_factory.mktemp("guest-viommu")
    sock_dir = Path(tempfile.mkdtemp(prefix="pv-", dir="/tmp"))
    paths = {name: workdir / f"{name}.img" for name in DISKS}
    for name, path in paths.items():
        path.write_bytes(image(name))
    try:
        with PeerPool(workdir, sock_dir, guest_image) as pool:
            app = pool.start(
                PyvdpaRun(
                    [f"sim-blk,name={n},path={paths[n]},serial={n}" for n in DISKS],
                    sock_dir / "vdpa",
                )
            )
            initramfs = build_initramfs(guest_script(), workdir / "initramfs.gz", guest_image)
            add_files(initramfs, {"/data/write": written()})
            devices = [*IOMMU_MACHINE]
            for port, name in enumerate(DISKS):
                devices += iommu_disk_args(app.sockets[port], name, port, packed=name == "packed")
            guest = pool.start(Guest(guest_image, initramfs, devices, append="intel_iommu=on"))
            console = guest.wait(timeout=GUEST_TIMEOUT)
            stats = {name: app.stats(name) for name in DISKS}
        assert script_status(console) == 0, console
        yield IommuRun(
            console=console,
            facts=dict(FACT.findall(console)),
            files={name: path.read_bytes() for name, path in paths.items()},
            stats=stats,
        )
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


def test_the_guest_translates_through_the_iommu(run: IommuRun) -> None:
    assert run.fact("iommu") == "dmar0"


@pytest.mark.parametrize("disk", DISKS)
def test_every_read_through_the_iommu_matches_the_host_file(run: IommuRun, disk: str) -> None:
    expected = md5(image(disk))
    for round_ in range(1, ROUNDS + 1):
        assert run.fact(f"{disk}.direct.{round_}") == expected, round_
        assert run.fact(f"{disk}.cached.{round_}") == expected, round_


@pytest.mark.parametrize("disk", DISKS)
def test_a_write_through_the_iommu_lands_where_the_guest_put_it(run: IommuRun, disk: str) -> None:
    assert run.fact(f"{disk}.write") == "0"
    assert run.fact(f"{disk}.readback") == md5(written())
    expected = bytearray(image(disk))
    expected[WRITE_OFFSET : WRITE_OFFSET + WRITE_SIZE] = written()
    assert run.files[disk] == bytes(expected)


@pytest.mark.parametrize("disk", DISKS)
def test_no_ring_broke(run: IommuRun, disk: str) -> None:
    assert ring_errors(run.stats[disk]) == {}
    assert sum(queue["completed_desc"] for queue in run.stats[disk].values()) > 0


# sim-net (tap) behind the IOMMU: the guest script and checks of test_guest_net.
NET_VARIANTS = [NetVariant("split"), NetVariant("packed", packed=True)]


@pytest.mark.parametrize("variant", NET_VARIANTS, ids=[v.name for v in NET_VARIANTS])
def test_net_pings_and_streams_through_the_iommu(peers: PeerPool, variant: NetVariant) -> None:
    netns = peers.netns()
    app = peers.start(
        PyvdpaRun(
            [f"sim-net,name=net0,mode=tap,ifname={TAP}"], peers.sock_dir / "vdpa", netns=netns
        )
    )
    netns.add_address(TAP, f"{HOST_IP}/24")
    netns.link_up(TAP)
    server = peers.start(StreamServer(netns, HOST_IP, source_size=STREAM_SIZE))
    nic = behind_iommu(vhost_user_net_args(app.sockets[0], GUEST_MAC, packed=variant.packed), 0)
    guest = peers.guest(
        net_script(variant),
        [*IOMMU_MACHINE, *nic],
        append="intel_iommu=on",
    )
    console = guest.wait(timeout=GUEST_TIMEOUT)

    assert script_status(console) == 0, console
    ping = PING_SUMMARY.search(console)
    assert ping is not None and ping.groups() == (str(PINGS), str(PINGS), "0"), console
    upload = UPLOAD.search(console)
    assert upload is not None, console
    assert upload[2] == upload[1] and int(upload[3]) == STREAM_SIZE, console
    assert server.wait_transfer("sink").md5 == upload[1]
    download = DOWNLOAD.search(console)
    assert download is not None, console
    source = server.wait_transfer("source")
    assert (download[1], int(download[2])) == (source.md5, STREAM_SIZE), console
    stats = app.stats("net0")
    assert ring_errors(stats) == {}
    assert stats[0]["bytes"] >= STREAM_SIZE and stats[1]["bytes"] >= STREAM_SIZE
