#!/usr/bin/env bash
# Set up a fresh machine, then show pyvdpa serving a real Linux guest:
#   * `pyvdpa run` serves a sim-net device in tap mode and a sim-blk disk on
#     vhost-user sockets, inside a network namespace made for the demo (its
#     TAP and the host side of every connection live there; the namespace is
#     deleted at the end);
#   * QEMU (TCG) boots Debian's kernel with a busybox initramfs; the guest's
#     virtio-net and virtio-blk drivers use the two devices;
#   * the guest pings the TAP, moves a 4 MiB TCP stream each way, and checks
#     the disk's capacity, serial and data; the host checks the image file.
# Prints one line per check and exits non-zero if any fails.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
echo
PYTHONPATH=tests exec python3 - <<'PY'
"""The guest demo: one boot, every result printed."""

import hashlib
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from peers import PeerPool
from peers.app import PyvdpaRun, ring_errors
from peers.common import PeerError
from peers.guest import (
    Guest,
    GuestImage,
    build_initramfs,
    cache_dir,
    script_status,
    vhost_user_blk_args,
    vhost_user_net_args,
)
from peers.initramfs import add_files
from peers.tcp import SINK_PORT, SOURCE_PORT, StreamServer

TAP, HOST_IP, GUEST_IP, GUEST_MAC = "pyvdemo0", "10.233.0.1", "10.233.0.2", "52:54:00:de:00:01"
SERIAL = "pyvdpa-demo-disk"
DISK_SECTORS, STREAM_SIZE, PINGS = 65536, 4 << 20, 10
# (first sector, sectors): blocks the guest writes, and one the host wrote.
GUEST_BLOCKS = ((0, 8), (2049, 3), (DISK_SECTORS - 1, 1))
HOST_BLOCK = (4096, 128)

GUEST_SCRIPT = f"""
fact() {{ echo "fact $1: $2"; }}
md5() {{
    dd if=/dev/vda bs=512 skip=$1 count=$2 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1
}}
ip link set eth0 up
ip address add {GUEST_IP}/24 dev eth0
ping -c {PINGS} -i 0.2 -W 5 {HOST_IP} > /tmp/ping
fact ping "$(grep 'packets transmitted' /tmp/ping)"
dd if=/dev/urandom of=/tmp/up bs=65536 count={STREAM_SIZE // 65536} 2>/dev/null
fact upload "$(md5sum < /tmp/up | cut -d' ' -f1) $(nc {HOST_IP} {SINK_PORT} < /tmp/up)"
nc {HOST_IP} {SOURCE_PORT} < /dev/null > /tmp/down
fact download "$(md5sum < /tmp/down | cut -d' ' -f1) $(wc -c < /tmp/down)"
i=0; while ! [ -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
fact size "$(cat /sys/block/vda/size)"
fact serial "$(cat /sys/block/vda/serial)"
for data in /data/*; do
    set -- $(basename $data | tr - ' ')
    dd if=$data of=/dev/vda bs=512 seek=$1 conv=notrunc,fsync 2>/dev/null
    fact "read-$1" "$(md5 $1 $2)"
done
blockdev --flushbufs /dev/vda; fact flush $?
fact "read-{HOST_BLOCK[0]}" "$(md5 {HOST_BLOCK[0]} {HOST_BLOCK[1]})"
"""

failures = 0


def say(text: str) -> None:
    print(f"demo: {text}", flush=True)


def check(ok: bool, what: str) -> None:
    global failures
    failures += not ok
    print(f"  [{'ok' if ok else 'FAILED'}] {what}", flush=True)


def block(sector: int, sectors: int) -> bytes:
    """The data of a test block (pseudo-random, the same on every run)."""
    return random.Random(f"{sector}-{sectors}").randbytes(sectors * 512)


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def region(disk: bytes, sector: int, sectors: int) -> bytes:
    return disk[sector * 512 : (sector + sectors) * 512]


def main() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="pyvdpa-demo-"))
    sock_dir = Path(tempfile.mkdtemp(prefix="pv-", dir="/tmp"))
    try:
        run(workdir, sock_dir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(sock_dir, ignore_errors=True)


def run(workdir: Path, sock_dir: Path) -> None:
    image = GuestImage.find()
    kernel = (cache_dir() / "guest" / "kernel-package").read_text().strip()
    disk = workdir / "disk.img"
    original = bytearray(DISK_SECTORS * 512)
    original[HOST_BLOCK[0] * 512 : sum(HOST_BLOCK) * 512] = block(*HOST_BLOCK)
    disk.write_bytes(original)
    vdevs = [
        f"sim-net,name=net0,mode=tap,ifname={TAP}",
        f"sim-blk,name=blk0,path={disk},serial={SERIAL}",
    ]
    with PeerPool(workdir, sock_dir, image) as pool:
        netns = pool.netns()
        say(f"network namespace {netns.name} created")
        app = pool.start(PyvdpaRun(vdevs, sock_dir / "vdpa", netns=netns))
        say(f"pyvdpa run --vdev {vdevs[0]} --vdev {vdevs[1]} --iface {sock_dir / 'vdpa'}")
        netns.add_address(TAP, f"{HOST_IP}/24")
        netns.link_up(TAP)
        server = pool.start(StreamServer(netns, HOST_IP, source_size=STREAM_SIZE))
        say(f"TAP {TAP} is {HOST_IP}/24 in the namespace, a TCP server listens there")
        initramfs = build_initramfs(GUEST_SCRIPT, workdir / "initramfs.gz", image)
        add_files(initramfs, {f"/data/{s}-{n}": block(s, n) for s, n in GUEST_BLOCKS})
        say(f"booting {kernel} under QEMU (TCG), virtio-net and virtio-blk over vhost-user")
        started = time.monotonic()
        devices = [
            *vhost_user_net_args(app.sockets[0], GUEST_MAC),
            *vhost_user_blk_args(app.sockets[1]),
        ]
        console = pool.start(Guest(image, initramfs, devices)).wait(timeout=120.0)
        say(f"the guest ran its checks and powered off after {time.monotonic() - started:.1f} s")
        if script_status(console) != 0:
            raise PeerError(f"the guest script failed:\n{console}")
        facts = dict(re.findall(r"^fact ([\w-]+): (.*)$", console, re.M))

        print("network: sim-net in tap mode")
        ping = facts.get("ping", "no ping summary")
        check(
            ping == f"{PINGS} packets transmitted, {PINGS} packets received, 0% packet loss",
            f"ping {HOST_IP}: {ping}",
        )
        sent, echoed, count = (facts.get("upload", "").split() + ["?"] * 3)[:3]
        sink = server.wait_transfer("sink")
        check(
            sent == echoed == sink.md5 and count == str(sink.bytes) == str(STREAM_SIZE),
            f"TCP guest -> host, {sink.bytes} bytes: md5 {sent} sent, {sink.md5} received",
        )
        got, count = (facts.get("download", "").split() + ["?"] * 2)[:2]
        source = server.wait_transfer("source")
        check(
            got == source.md5 and count == str(STREAM_SIZE),
            f"TCP host -> guest, {count} bytes: md5 {source.md5} sent, {got} received",
        )

        print("disk: sim-blk on a file")
        check(
            facts.get("size") == str(DISK_SECTORS),
            f"capacity {facts.get('size')} sectors, the file holds {DISK_SECTORS}",
        )
        check(facts.get("serial") == SERIAL, f"serial (GET_ID) {facts.get('serial')!r}")
        stored = disk.read_bytes()
        for sector, sectors in GUEST_BLOCKS:
            data = block(sector, sectors)
            check(
                facts.get(f"read-{sector}") == md5(data) == md5(region(stored, sector, sectors)),
                f"{sectors * 512} bytes written at sector {sector}: "
                "read back identical by the guest and in the host file",
            )
        check(facts.get("flush") == "0", "flush (blockdev --flushbufs)")
        check(
            facts.get(f"read-{HOST_BLOCK[0]}") == md5(block(*HOST_BLOCK)),
            f"{HOST_BLOCK[1] * 512} bytes the host wrote at sector {HOST_BLOCK[0]}: "
            "read by the guest",
        )

        print("device statistics: the pyvdpa run console")
        for name in ("net0", "blk0"):
            stats = app.stats(name)
            for qid, counters in stats.items():
                shown = ", ".join(f"{key} {value}" for key, value in counters.items() if value)
                print(f"  {name} queue {qid}: {shown or 'idle'}")
            errors = ring_errors(stats)
            check(not errors, f"{name}: no queue errors {errors or ''}".rstrip())
    say(f"pyvdpa stopped, namespace {netns.name} deleted")


try:
    main()
except PeerError as exc:
    print(f"demo: {exc}", file=sys.stderr)
    failures += 1
print()
print("demo: all checks passed" if not failures else f"demo: FAILED ({failures})")
sys.exit(1 if failures else 0)
PY
