"""VIRTIO_F_IN_ORDER: the device side (Python and compiled) against the driver side.

Every case runs four times: split and packed rings, each with the Python
reference queue and with the compiled queue, over the same memfd-backed
guest memory.  The driver side uses descriptors in ring order and takes
batched used entries apart; the device side must fold chains used
completely into the next entry of a batch, write every entry of chains
used in part, and refuse chains out of ring order as a broken ring.
"""

from __future__ import annotations

import os
import random
import select
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from peers.app import PyvdpaRun
from pyvdpa.dataplane.queues import CompiledQueue
from pyvdpa.devices.blk import BlkDevice
from pyvdpa.devices.net import NetDevice
from pyvdpa.drive.blk import run_blk
from pyvdpa.drive.net import run_net
from pyvdpa.drive.session import Session
from pyvdpa.vhost_user.frontend import Frontend
from pyvdpa.vhost_user.server import BackendServer
from pyvdpa.virtio.constants import VirtioFeature
from pyvdpa.virtio.packed import PackedDeviceQueue, PackedDriverQueue
from pyvdpa.virtio.ring import (
    DESCRIPTOR,
    DescriptorChain,
    OutOfOrderError,
    QueueBrokenError,
)
from pyvdpa.virtio.split import SplitDeviceQueue, SplitDriverQueue
from ringmem import BLOCK, MEM_BASE, packed_pair, split_pair
from test_dataplane_rings import SharedGuest

_USED_ELEM = struct.Struct("<II")
_U16 = struct.Struct("<H")

Device = SplitDeviceQueue | PackedDeviceQueue | CompiledQueue
Driver = SplitDriverQueue | PackedDriverQueue


@dataclass
class Ring:
    """An in-order driver and device on the same rings."""

    guest: SharedGuest
    driver: Driver
    device: Device
    packed: bool
    size: int
    desc: int
    driver_area: int
    device_area: int
    buffers: int

    def buffer(self, slot: int) -> int:
        return self.buffers + (slot % self.size) * BLOCK

    def used_idx(self) -> int:
        return int(_U16.unpack(self.guest.read(self.device_area + 2, 2))[0])

    def used_elem(self, idx: int) -> tuple[int, int]:
        offset = self.device_area + 4 + 8 * (idx % self.size)
        head, length = _USED_ELEM.unpack(self.guest.read(offset, 8))
        return int(head), int(length)

    def ring_bytes(self) -> bytes:
        """The descriptor area and both other areas, as the driver sees them."""
        end = self.buffers
        return self.guest.read(self.desc, end - self.desc)


CASES = [
    pytest.param(packed, compiled, id=f"{'packed' if packed else 'split'}-"
                 f"{'compiled' if compiled else 'python'}")
    for packed in (False, True)
    for compiled in (False, True)
]  # fmt: skip


def make_ring(
    packed: bool, compiled: bool, size: int = 8, *, in_order: bool = True, batch: bool = True
) -> Ring:
    layout = packed_pair if packed else split_pair
    geometry = layout(size)
    guest = SharedGuest(MEM_BASE, geometry.mem.end - MEM_BASE)
    driver_cls = PackedDriverQueue if packed else SplitDriverQueue
    driver = driver_cls(
        guest,  # type: ignore[arg-type]
        size,
        geometry.desc_addr,
        geometry.driver_area,
        geometry.device_area,
        event_idx=True,
        indirect_addr=geometry.indirect_addr,
        in_order=in_order,
    )
    base = 0x8000 if packed else 0
    device: Device
    if compiled:
        device = CompiledQueue(
            guest.memory, size, geometry.desc_addr, geometry.driver_area, geometry.device_area,
            packed=packed, event_idx=True, indirect=True, base=base, in_order=True, batch=batch,
        )  # fmt: skip
    else:
        cls = PackedDeviceQueue if packed else SplitDeviceQueue
        device = cls(
            guest,  # type: ignore[arg-type]
            size, geometry.desc_addr, geometry.driver_area, geometry.device_area,
            event_idx=True, indirect=True, base=base, in_order=True,
        )  # fmt: skip
    return Ring(
        guest, driver, device, packed, size, geometry.desc_addr, geometry.driver_area,
        geometry.device_area, geometry.buffers,
    )  # fmt: skip


def serve(ring: Ring, plan: list[tuple[int, int, int, bool]], start: int) -> list[int]:
    """Post chains of (readable, writable, written, indirect); the device serves them in one batch.

    Returns the heads the driver got; every length and payload is checked.
    """
    expected: dict[int, tuple[int, bytes, int]] = {}
    for i, (rlen, wlen, written, indirect) in enumerate(plan):
        addr = ring.buffer(start + i)
        readable = [(addr, rlen)] if rlen else []
        writable = [(addr + 512, wlen)] if wlen else []
        head = ring.driver.add(readable, writable, indirect=indirect)
        expected[head] = (written, bytes([(start + i) & 0xFF]) * written, addr + 512)
    completions: list[tuple[DescriptorChain, int]] = []
    while (chain := ring.device.pop()) is not None:
        written = expected[chain.id][0]
        chain.write(expected[chain.id][1])
        completions.append((chain, written))
    assert len(completions) == len(plan)
    ring.device.push_batch(completions)
    heads = []
    while (used := ring.driver.get_used()) is not None:
        head, length = used
        written, data, at = expected.pop(head)
        assert length == written
        assert ring.guest.read(at, written) == data
        heads.append(head)
    assert not expected
    return heads


@pytest.mark.parametrize(("packed", "compiled"), CASES)
def test_batch_of_transmitted_chains_gets_one_used_entry(packed: bool, compiled: bool) -> None:
    ring = make_ring(packed, compiled)
    plan = [(64, 0, 0, False), (32, 0, 0, False), (128, 0, 0, True), (16, 0, 0, False)]
    before = ring.ring_bytes()
    heads = serve(ring, plan, 0)
    if packed:
        # Buffer ids are head slots; one used descriptor, at slot 0, names the last.
        assert heads == [0, 1, 2, 3]
        flags = _U16.unpack(ring.guest.read(ring.desc + 14, 2))[0]
        assert flags & 0x8080 == 0x8080
        assert _U16.unpack(ring.guest.read(ring.desc + 12, 2))[0] == 3
        for slot in (1, 2, 3):
            flags = _U16.unpack(ring.guest.read(ring.desc + 16 * slot + 14, 2))[0]
            assert flags & 0x8080 == 0x0080, "a skipped chain's slot stays available"
    else:
        assert heads == [0, 1, 2, 3]
        assert ring.used_idx() == 4
        assert ring.used_elem(0) == (3, 0)
        for idx in (1, 2, 3):
            assert ring.used_elem(idx) == _USED_ELEM.unpack(
                before[ring.device_area - ring.desc + 4 + 8 * idx :][:8]
            ), "no element written for a skipped chain"


@pytest.mark.parametrize(("packed", "compiled"), CASES)
def test_chain_used_in_part_closes_the_batch(packed: bool, compiled: bool) -> None:
    ring = make_ring(packed, compiled)
    # complete, complete, partial | complete (last: its own entry), partial
    plan = [(0, 64, 64, False), (16, 0, 0, False), (0, 256, 100, False), (0, 8, 8, True),
            (0, 64, 10, False)]  # fmt: skip
    heads = serve(ring, plan, 0)
    assert len(heads) == 5
    if not packed:
        assert ring.used_idx() == 5
        assert ring.used_elem(0) == (heads[2], 100)
        assert ring.used_elem(3) == (heads[4], 10)


@pytest.mark.parametrize(("packed", "compiled"), CASES)
def test_many_batches_wrap_the_ring(packed: bool, compiled: bool) -> None:
    rng = random.Random(35)
    ring = make_ring(packed, compiled, size=8)
    posted = 0
    for _ in range(60):
        plan = []
        slots = 0
        while len(plan) < rng.randint(1, 4):
            indirect = rng.random() < 0.3
            rlen = rng.choice((0, 0, 40))
            wlen = rng.choice((0, 24, 200)) if rlen else rng.choice((24, 200))
            written = rng.choice((0, wlen, wlen, wlen // 2))
            plan.append((rlen, wlen, written, indirect))
            slots += 1 if indirect else (rlen > 0) + (wlen > 0)
        if slots > ring.size:
            continue
        serve(ring, plan, posted)
        posted += len(plan)
    assert ring.driver.num_free == ring.size
    assert not ring.device.broken


@pytest.mark.parametrize("packed", [False, True])
def test_python_and_compiled_write_the_same_rings(packed: bool) -> None:
    rng = random.Random(7)
    plans = []
    for _ in range(30):
        plan = []
        for _ in range(rng.randint(1, 3)):
            wlen = rng.choice((0, 32, 96))
            plan.append((16, wlen, rng.choice((0, wlen, wlen // 3)) if wlen else 0, False))
        plans.append(plan)
    rings = [make_ring(packed, compiled) for compiled in (False, True)]
    for ring in rings:
        posted = 0
        for plan in plans:
            serve(ring, plan, posted)
            posted += len(plan)
    assert rings[0].ring_bytes() == rings[1].ring_bytes()


@pytest.mark.parametrize("packed", [False, True])
def test_compiled_queue_without_batch_writes_every_entry(packed: bool) -> None:
    ring = make_ring(packed, True, batch=False)
    serve(ring, [(16, 0, 0, False)] * 3, 0)
    if packed:
        for slot in range(3):
            flags = _U16.unpack(ring.guest.read(ring.desc + 16 * slot + 14, 2))[0]
            assert flags & 0x8080 == 0x8080
    else:
        assert [ring.used_elem(i)[0] for i in range(3)] == [0, 1, 2]


# --------------------------------------------------------------------------- hostile rings


@pytest.mark.parametrize("compiled", [False, True], ids=["python", "compiled"])
def test_split_head_out_of_ring_order_breaks_the_ring(compiled: bool) -> None:
    ring = make_ring(False, compiled, in_order=False)
    # A driver that ignores IN_ORDER: its free list hands descriptors back LIFO.
    heads = [ring.driver.add([(ring.buffer(i), 16)], []) for i in range(2)]
    assert heads == [0, 1]
    for _ in heads:
        chain = ring.device.pop()
        assert chain is not None
        ring.device.push(chain, 0)
    assert [ring.driver.get_used() for _ in heads] == [(0, 0), (1, 0)]
    bad = ring.driver.add([(ring.buffer(2), 16)], [])
    assert bad == 1
    with pytest.raises(OutOfOrderError, match="ring order expects 2"):
        ring.device.pop()
    assert ring.device.broken
    with pytest.raises(QueueBrokenError):
        ring.device.pop()


@pytest.mark.parametrize("compiled", [False, True], ids=["python", "compiled"])
def test_split_chain_on_scattered_descriptors_breaks_the_ring(compiled: bool) -> None:
    ring = make_ring(False, compiled)
    head = ring.driver.add([(ring.buffer(0), 16)], [(ring.buffer(1), 16)])
    assert head == 0
    # Relink descriptor 0 to descriptor 5 (in order, the next must be 1).
    addr, length, flags, _ = DESCRIPTOR.unpack(ring.guest.read(ring.desc, 16))
    ring.guest.write(ring.desc, DESCRIPTOR.pack(addr, length, flags, 5))
    ring.guest.write(ring.desc + 5 * 16, ring.guest.read(ring.desc + 16, 16))
    with pytest.raises(OutOfOrderError, match="consecutive"):
        ring.device.pop()
    assert ring.device.broken


@pytest.mark.parametrize("compiled", [False, True], ids=["python", "compiled"])
def test_packed_buffer_id_other_than_head_slot_breaks_the_ring(compiled: bool) -> None:
    ring = make_ring(True, compiled, in_order=False)
    # A driver that ignores IN_ORDER numbers buffers from its free list: 0, then 1 at slot 2.
    first = ring.driver.add([(ring.buffer(0), 16)], [(ring.buffer(0) + 512, 16)])
    second = ring.driver.add([(ring.buffer(1), 16)], [])
    assert (first, second) == (0, 1)
    chain = ring.device.pop()
    assert chain is not None and chain.id == 0
    with pytest.raises(OutOfOrderError, match="1"):
        ring.device.pop()
    assert ring.device.broken
    with pytest.raises(QueueBrokenError):
        ring.device.push(chain, 0)


# --------------------------------------------------------------------------- drive <-> devices


def _negotiated_in_order(session: Session) -> bool:
    return bool(session.features & VirtioFeature.IN_ORDER)


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_drive_against_python_devices(tmp_path: Path, packed: bool) -> None:
    net = NetDevice(mode="loopback")
    with (
        BackendServer(tmp_path / "net.sock", lambda: net),
        Session(Frontend.connect(tmp_path / "net.sock"), memory_size=8 << 20) as session,
    ):
        # The Python driver asks IN_ORDER; the compiled one does not.
        result = run_net(session, mode="io", packed=packed, duration=0.5, engine="python")
        assert _negotiated_in_order(session)
    assert result.rx_packets > 100 and result.rx_bad == 0 and result.errors == 0
    blk = BlkDevice(size=4 << 20)
    with (
        BackendServer(tmp_path / "blk.sock", lambda: blk),
        Session(Frontend.connect(tmp_path / "blk.sock"), memory_size=8 << 20) as session,
    ):
        io = run_blk(session, rw="randwrite", verify=True, ios=512, size=1 << 20, packed=packed)
        assert _negotiated_in_order(session)
    assert io.ios >= 512 and io.errors == 0 and io.verify_errors == 0
    blk.close()


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PyvdpaRun]:
    work = tmp_path_factory.mktemp("inorder")
    disk = work / "disk.img"
    disk.write_bytes(os.urandom(4 << 20))
    vdevs = ["sim-net,name=net0", f"sim-blk,name=blk0,path={disk}"]
    with PyvdpaRun(vdevs, work / "vdpa") as run:
        yield run


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("mrg", [True, False], ids=["mrg", "nomrg"])
def test_drive_net_against_compiled_sim_net(app: PyvdpaRun, packed: bool, mrg: bool) -> None:
    with Session(Frontend.connect(app.sockets[0]), memory_size=8 << 20) as session:
        result = run_net(
            session, mode="io", packed=packed, mrg_rxbuf=mrg, duration=0.5, engine="python"
        )
        assert _negotiated_in_order(session)
    assert result.rx_packets > 100 and result.rx_bad == 0 and result.errors == 0


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("rw", ["randwrite", "read"])
def test_drive_blk_against_compiled_sim_blk(app: PyvdpaRun, packed: bool, rw: str) -> None:
    with Session(Frontend.connect(app.sockets[1]), memory_size=8 << 20) as session:
        io = run_blk(session, rw=rw, verify=True, ios=512, size=1 << 20, packed=packed)
        assert _negotiated_in_order(session)
    assert io.ios >= 512 and io.errors == 0 and io.verify_errors == 0


def test_python_device_survives_a_chain_out_of_ring_order(tmp_path: Path) -> None:
    """The Python sim-net breaks only the TX ring; its RX ring and a new connection still work."""
    device = NetDevice(mode="loopback")
    sock = tmp_path / "net.sock"
    with BackendServer(sock, lambda: device):
        session = Session(Frontend.connect(sock), memory_size=4 << 20)
        err = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            wanted = VirtioFeature.VERSION_1 | VirtioFeature.PROTOCOL_FEATURES
            assert session.negotiate(wanted | VirtioFeature.IN_ORDER, 0) & VirtioFeature.IN_ORDER
            for index in range(2):
                session.setup_ring(index, 16)
            session.frontend.set_vring_err(1, err)
            session.enable_rings()
            tx = session.rings[1]
            frame = session.alloc(64)
            desc: memoryview = tx.queue._desc  # type: ignore[attr-defined]
            avail: memoryview = tx.queue._avail  # type: ignore[attr-defined]
            # Descriptor 0, then a chain at descriptor 3 where ring order puts 1.
            DESCRIPTOR.pack_into(desc, 0, frame, 64, 0, 0)
            DESCRIPTOR.pack_into(desc, 3 * 16, frame, 64, 0, 0)
            struct.pack_into("<HH", avail, 4, 0, 3)
            struct.pack_into("<H", avail, 2, 2)
            del desc, avail
            os.eventfd_write(tx.kick_fd, 1)
            ready, _, _ = select.select([err], [], [], 10)
            assert ready, "the broken ring's error eventfd was not signalled"
            assert device.stats[1].bad_desc_errors == 1
            assert device.stats[1].received_desc == 1
            assert device.stats[0].bad_desc_errors == 0
        finally:
            session.close()
            os.close(err)
        with Session(Frontend.connect(sock), memory_size=8 << 20) as again:
            result = run_net(again, mode="io", duration=0.3)
        assert result.rx_packets > 0 and result.errors == 0
