"""``pyvdpa run`` killed with SIGKILL under a Linux guest, and restarted on the same sockets.

A guest (QEMU 7.2, TCG) has a virtio-blk disk on ``sim-blk`` (a file) and a
virtio-net NIC on ``sim-net,mode=tap``.  Four writers in the guest write
4 KiB blocks with O_DIRECT, each over its own 16 blocks, round after
round, every block stamped with its number and round; each writer notes
the last write acknowledged.  A ping to the host runs all along, so the
guest receives on sim-net.  The test kills ``pyvdpa run`` with SIGKILL at
random points, five times, each time once disk and NIC traffic flow on the
new process, and starts it again on the same sockets:

* server role: QEMU connects with ``reconnect=1`` and comes back by itself
  (the test removes the dead process's socket files, as a supervisor must);
* client role: QEMU listens (``server=on``), ``pyvdpa run --client``
  connects again.

Then the guest stops its writers and pings five times.  Every acknowledged
write must be on disk (the block holds the last round its writer saw
acknowledged), the guest must have seen no I/O error, each restart must
have moved disk and NIC traffic, and the last pings must all come back.

The disk's I/O pool completes requests out of order (four threads); with
``PYVDPA_TEST_BLK_DELAY`` (test only) every other request is held back
50 ms, which reorders completions further.  QEMU rewinds a ring to its used index
when the back-end dies; only the inflight records make that restart exact.
With ``PYVDPA_TEST_NO_INFLIGHT=1`` (test only: the device offers the
region but records nothing) the same run must go wrong — the test that
checks so keeps the others from silently losing their teeth.
"""

from __future__ import annotations

import contextlib
import random
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from peers import PeerPool
from peers.app import PyvdpaRun, ring_errors
from peers.common import PeerError
from peers.guest import Guest, GuestImage, build_initramfs, vhost_user_blk_args, vhost_user_net_args
from peers.netns import NetNamespace
from test_guest_blk import SHELL_FUNCTIONS
from test_guest_net import PING_SUMMARY

pytestmark = pytest.mark.peers

TAP = "pyvcr0"
HOST_IP = "10.235.0.1"
GUEST_IP = "10.235.0.2"
GUEST_MAC = "52:54:00:aa:cc:02"
HOST_MAC = "52:54:00:aa:cc:01"
DISK_SIZE = 4 << 20
BLOCK = 4096
WRITERS = 4
BLOCKS = 16
"""Blocks each writer writes, round after round."""
STAMP = "pyvdpa b={:06d} g={:06d}\n"
KILLS = 5
FINAL_PINGS = 5
BOOT_TIMEOUT = 60.0
RESUME_TIMEOUT = 20.0
"""Longest wait for disk and NIC traffic on a restarted process."""
END_TIMEOUT = 40.0
KILL_AFTER = (0.2, 1.5)
"""A kill comes this many seconds (uniformly random) after traffic flowed."""
DELAY_SWITCH = "PYVDPA_TEST_BLK_DELAY"
NO_INFLIGHT_SWITCH = "PYVDPA_TEST_NO_INFLIGHT"
OUT_OF_ORDER = "50,2"
"""Every other request of a queue held back 50 ms."""

GUEST_SCRIPT = f"""{SHELL_FUNCTIONS}
ip link set eth0 up
ip address add {GUEST_IP}/24 dev eth0
wait_disks vda
writer() {{
    w=$1; g=0
    while [ ! -e /tmp/stop ]; do
        i=0
        while [ $i -lt {BLOCKS} ] && [ ! -e /tmp/stop ]; do
            b=$((w * {BLOCKS} + i))
            {{ printf 'pyvdpa b=%06d g=%06d\\n' $b $g; head -c {BLOCK - len(STAMP.format(0, 0))} /dev/zero; }} > /tmp/block$w
            if dd if=/tmp/block$w of=/dev/vda bs={BLOCK} seek=$b count=1 oflag=direct conv=notrunc 2>/dev/null; then
                echo "$b $g" > /tmp/acked$w
            else
                echo "ioerror w=$w b=$b g=$g"
            fi
            i=$((i + 1))
        done
        g=$((g + 1))
    done
}}
pids=""
for w in $(seq 0 {WRITERS - 1}); do writer $w & pids="$pids $!"; done
ping -i 0.1 {HOST_IP} > /dev/null &
pinger=$!
echo "crash: writing"
read line
touch /tmp/stop
wait $pids
kill $pinger
for w in $(seq 0 {WRITERS - 1}); do echo "last w=$w $(cat /tmp/acked$w 2>/dev/null)"; done
ping -c {FINAL_PINGS} -i 0.2 -W 3 {HOST_IP}
"""  # noqa: E501

_LAST = re.compile(r"^last w=(\d+) (\d+) (\d+)$", re.M)
_GUEST_IO_ERROR = re.compile(r"ioerror|I/O error|is not a head|virtio_blk.*error", re.I)


@dataclass
class Rig:
    """The namespace, the disk and how the devices are wired to QEMU."""

    peers: PeerPool
    netns: NetNamespace
    disk: Path
    client: bool
    prefix: Path
    apps: list[PyvdpaRun] = field(default_factory=list)

    def start_app(self) -> PyvdpaRun:
        """Start ``pyvdpa run`` on the rig's sockets (after the previous one died)."""
        if not self.client:
            # A dead server leaves its socket files; a supervisor removes them.
            for index in range(2):
                with contextlib.suppress(FileNotFoundError):
                    Path(f"{self.prefix}{index}").unlink()
        app = self.peers.start(
            PyvdpaRun(
                [f"sim-blk,name=blk0,path={self.disk}", f"sim-net,name=net0,mode=tap,ifname={TAP}"],
                self.prefix,
                client=self.client,
                netns=self.netns,
            )
        )
        # The TAP went with the dead process: the new one gets the same MAC (the
        # guest's ARP entry stays right) and address again.
        self.netns.run(["ip", "link", "set", TAP, "address", HOST_MAC])
        self.netns.add_address(TAP, f"{HOST_IP}/24")
        self.netns.link_up(TAP)
        self.apps.append(app)
        return app

    def devices(self) -> list[str]:
        blk_sock, net_sock = (f"{self.prefix}{index}" for index in range(2))
        if self.client:
            return [
                *vhost_user_blk_args(blk_sock, server=True),
                *vhost_user_net_args(net_sock, GUEST_MAC, server=True),
            ]
        return [
            *vhost_user_blk_args(blk_sock, reconnect=1),
            *vhost_user_net_args(net_sock, GUEST_MAC, reconnect=1),
        ]


@dataclass
class Outcome:
    """What one run of kills and restarts left."""

    console: str
    resumed: list[bool]
    blocks: dict[int, tuple[int, int]]
    """Per block, the (block, round) stamp an acknowledged write left last; absent: never."""
    disk: bytes

    def lost_writes(self) -> list[int]:
        """Blocks whose content is not the last acknowledged write."""
        lost = []
        for block in range(WRITERS * BLOCKS):
            at = block * BLOCK
            stored = self.disk[at : at + BLOCK]
            stamp = self.blocks.get(block)
            if stamp is None:
                expected = bytes(BLOCK)
            else:
                head = STAMP.format(*stamp).encode()
                expected = head + bytes(BLOCK - len(head))
            if stored != expected:
                lost.append(block)
        return lost

    def io_errors(self) -> list[str]:
        return _GUEST_IO_ERROR.findall(self.console)


def expected_blocks(console: str) -> dict[int, tuple[int, int]]:
    """From each writer's last acknowledged (block, round), the last round of every block."""
    blocks: dict[int, tuple[int, int]] = {}
    for writer, last_block, last_round in (tuple(map(int, m)) for m in _LAST.findall(console)):
        for i in range(BLOCKS):
            block = writer * BLOCKS + i
            if block <= last_block:
                blocks[block] = (block, last_round)
            elif last_round > 0:
                blocks[block] = (block, last_round - 1)
    return blocks


def flowing(app: PyvdpaRun, deadline: float) -> bool:
    """Wait until the process completes disk requests and delivers frames to the guest."""
    while time.monotonic() < deadline:
        try:
            blk = app.stats("blk0", 0)[0]["completed_desc"]
            received = app.stats("net0", 0)[0]["packets"]
        except (PeerError, KeyError):
            blk = received = 0
        if blk > 20 and received > 2:
            return True
        time.sleep(0.2)
    return False


def crash_and_restart(rig: Rig, image: GuestImage, rng: random.Random) -> Outcome:
    """Boot the guest, kill ``pyvdpa run`` :data:`KILLS` times, stop the guest; what it left."""
    app = rig.start_app()
    initramfs = build_initramfs(GUEST_SCRIPT, rig.peers.workdir / "initramfs-crash.gz", image)
    guest = rig.peers.start(Guest(image, initramfs, rig.devices()))
    guest.wait_for("crash: writing", BOOT_TIMEOUT)
    resumed: list[bool] = []
    for _ in range(KILLS):
        if not flowing(app, time.monotonic() + RESUME_TIMEOUT):
            resumed.append(False)
            break
        time.sleep(rng.uniform(*KILL_AFTER))
        app.kill()
        app = rig.start_app()
        resumed.append(True)
    else:
        resumed.append(flowing(app, time.monotonic() + RESUME_TIMEOUT))
    console = ""
    if all(resumed):
        guest.write("stop\n")
        with contextlib.suppress(PeerError):
            console = guest.wait(END_TIMEOUT)
    if not console:
        guest.kill()
        console = guest.output()
    stats = {name: app.stats(name) for name in ("blk0", "net0")} if app.running else {}
    for name, queues in stats.items():
        assert ring_errors(queues) == {}, (name, queues)
    return Outcome(console, resumed, expected_blocks(console), rig.disk.read_bytes())


@pytest.fixture
def rig_factory(peers: PeerPool, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Rig]]:
    def make(*, client: bool, delay: str | None, inflight: bool = True) -> Rig:
        if delay is not None:
            monkeypatch.setenv(DELAY_SWITCH, delay)
        if not inflight:
            monkeypatch.setenv(NO_INFLIGHT_SWITCH, "1")
        disk = peers.workdir / "disk.img"
        disk.write_bytes(bytes(DISK_SIZE))
        return Rig(peers, peers.netns(), disk, client, peers.sock_dir / "cr")

    yield make


def check_clean(outcome: Outcome) -> None:
    """Every restart resumed, no I/O error, every acknowledged write on disk, pings back."""
    console = outcome.console
    assert outcome.resumed == [True] * (KILLS + 1), console[-3000:]
    assert outcome.io_errors() == [], console[-3000:]
    assert len(_LAST.findall(console)) == WRITERS, console[-3000:]
    rounds = [int(m[2]) for m in _LAST.findall(console)]
    assert min(rounds) >= 1, rounds
    assert outcome.lost_writes() == []
    ping = PING_SUMMARY.search(console)
    assert ping is not None, console[-3000:]
    assert ping.groups() == (str(FINAL_PINGS), str(FINAL_PINGS), "0"), console[-3000:]


@pytest.mark.parametrize(
    ("client", "delay"),
    [(False, None), (True, OUT_OF_ORDER)],
    ids=["server-reconnect", "client-out-of-order"],
)
def test_sigkilled_backend_loses_no_acknowledged_write(
    rig_factory: Callable[..., Rig], guest_image: GuestImage, client: bool, delay: str | None
) -> None:
    seed = random.randrange(1 << 32)
    rig = rig_factory(client=client, delay=delay)
    outcome = crash_and_restart(rig, guest_image, random.Random(seed))
    check_clean(outcome)
    if delay is not None:
        assert f"{DELAY_SWITCH}={delay}" in rig.apps[0].output()


def test_server_role_with_out_of_order_completions(
    rig_factory: Callable[..., Rig], guest_image: GuestImage
) -> None:
    rig = rig_factory(client=False, delay=OUT_OF_ORDER)
    check_clean(crash_and_restart(rig, guest_image, random.Random()))


def test_without_inflight_records_a_restart_loses_requests(
    rig_factory: Callable[..., Rig], guest_image: GuestImage
) -> None:
    """The negative case: nothing recorded, completions out of order — the run must go wrong.

    QEMU's rewind to the used index then serves again requests completed out
    of order (the guest sees a used id that is not in flight and fails the
    disk's I/O) and forgets those taken before them.
    """
    rig = rig_factory(client=False, delay=OUT_OF_ORDER, inflight=False)
    outcome = crash_and_restart(rig, guest_image, random.Random())
    assert f"{NO_INFLIGHT_SWITCH}=1" in rig.apps[0].output()
    broken = (
        not all(outcome.resumed)
        or outcome.io_errors()
        or len(_LAST.findall(outcome.console)) < WRITERS
        or outcome.lost_writes()
    )
    assert broken, "five restarts without inflight records went unnoticed"
