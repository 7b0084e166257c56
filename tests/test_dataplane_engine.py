"""The data-plane engine behind a real vhost-user socket, driven by pyvdpa's front-end.

Each test serves :class:`EngineNetDevice` with :class:`BackendServer` and
drives it as a VMM would (:class:`~pyvdpa.drive.session.Session`): the
exact ring position handed back by GET_VRING_BASE while traffic flows, the
generated and looped-back frames as the driver reads them from guest memory,
notifications in both directions, a call eventfd replaced while the ring
runs, and a hostile ring that breaks only itself.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fds import fd_count
from pyvdpa.dataplane import engine as engine_module
from pyvdpa.dataplane.engine import WORKER_THREAD_PREFIX, Engine, EngineMode
from pyvdpa.dataplane.net import DEFAULT_MAC, EngineNetDevice, generated_frame
from pyvdpa.device import Device
from pyvdpa.drive.session import DriverRing, Session
from pyvdpa.errors import ConfigError
from pyvdpa.memory import allocate_shared
from pyvdpa.vhost_user.frontend import Frontend
from pyvdpa.vhost_user.protocol import ProtocolFeature
from pyvdpa.vhost_user.server import BackendServer
from pyvdpa.virtio.constants import NetFeature, VirtioFeature
from pyvdpa.virtio.ring import QueueFullError

HDR = 12
SETTLE = 5.0
FOREIGN = bytes.fromhex("020000000099")


def _until(condition: Callable[[], bool], timeout: float = SETTLE) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _eventfd_count(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


@dataclass
class Driven:
    """A device served on a socket, a session connected to it, and its engine."""

    device: EngineNetDevice
    session: Session
    engine: Engine

    def ring(self, index: int) -> DriverRing:
        return self.session.rings[index]

    def used(self, index: int) -> list[tuple[int, int]]:
        """Used entries returned on ring ``index`` since the last call."""
        ring = self.ring(index)
        return list(iter(ring.queue.get_used, None))

    def wait_used(self, index: int, count: int) -> list[tuple[int, int]]:
        """Used entries of ring ``index``, once ``count`` have come (or after SETTLE).

        A burst's counters move before its used entries are published, so a
        test that saw a counter reach a value waits for the entries too.
        """
        entries: list[tuple[int, int]] = []

        def arrived() -> bool:
            entries.extend(self.used(index))
            return len(entries) >= count

        _until(arrived)
        return entries


@dataclass
class Served(Driven):
    """A device driven with single-descriptor frames and receive buffers."""

    def transmit(self, index: int, frame: bytes) -> int:
        """Post one frame (header included) on TX ring ``index``; return its chain id."""
        addr = self.session.alloc(HDR + len(frame))
        self.session.memory.write(addr, bytes(HDR) + frame)
        ring = self.ring(index)
        ident = ring.queue.add([(addr, HDR + len(frame))], [])
        ring.kick()
        return ident

    def post_rx(self, index: int, size: int, count: int) -> dict[int, int]:
        """Post ``count`` receive buffers of ``size`` bytes; return id -> address."""
        ring = self.ring(index)
        posted = {}
        for _ in range(count):
            addr = self.session.alloc(size)
            posted[ring.queue.add([], [(addr, size)])] = addr
        ring.kick()
        return posted


@pytest.fixture
def serve(sock_dir: Path) -> Iterator[Callable[..., Served]]:
    """Serve an engine device and connect a session: ``serve(mode=..., packed=...)``."""
    stack = contextlib.ExitStack()
    count = iter(range(100))

    def start(
        *,
        mode: str = "loopback",
        engine: str = "poll",
        packed: bool = False,
        event_idx: bool = True,
        mrg_rxbuf: bool = True,
        queue_pairs: int = 1,
        ring_size: int = 64,
        frame_size: int = 64,
        workers: int = 1,
        extra_features: int = 0,
    ) -> Served:
        eng = stack.enter_context(Engine(engine, workers=workers))
        device = EngineNetDevice(
            mode=mode, engine=eng, queue_pairs=queue_pairs, frame_size=frame_size
        )
        path = sock_dir / f"net{next(count)}.sock"

        def factory() -> Device:
            return device

        stack.enter_context(BackendServer(path, factory))
        session = stack.enter_context(Session(Frontend.connect(path), memory_size=16 << 20))
        wanted = int(VirtioFeature.VERSION_1)
        if packed:
            wanted |= VirtioFeature.RING_PACKED
        if event_idx:
            wanted |= VirtioFeature.RING_EVENT_IDX
        if mrg_rxbuf:
            wanted |= NetFeature.MRG_RXBUF
        if queue_pairs > 1:
            wanted |= NetFeature.MQ
        wanted |= extra_features
        session.negotiate(wanted, wanted)
        for index in range(2 * queue_pairs):
            session.setup_ring(index, ring_size)
        session.enable_rings()
        return Served(device, session, eng)

    yield start
    stack.close()


# ---------------------------------------------------------------------- frames


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("mrg_rxbuf", [True, False], ids=["mrg", "nomrg"])
def test_gen_fills_receive_buffers_with_the_generated_frame(
    packed: bool, mrg_rxbuf: bool, serve: Callable[..., Served]
) -> None:
    size = 1000
    served = serve(mode="gen", packed=packed, mrg_rxbuf=mrg_rxbuf, frame_size=size)
    buffer = 400 if mrg_rxbuf else HDR + size
    posted = served.post_rx(0, buffer, 24)
    assert _until(lambda: served.device.stats[0].packets == (8 if mrg_rxbuf else 24))
    used = served.wait_used(0, 24)
    expected = generated_frame(size, DEFAULT_MAC)
    stream = b"".join(served.session.memory.read(posted[i], n) for i, n in used)
    frames = 0
    while stream:
        count = struct.unpack_from("<H", stream, 10)[0]
        assert count == (3 if mrg_rxbuf else 1)
        assert stream[:10] == bytes(10)
        assert stream[HDR : HDR + size] == expected
        stream = stream[HDR + size :]
        frames += 1
    assert frames == served.device.stats[0].packets
    assert served.device.stats[0].invalid_buffer == 0


def test_gen_without_mrg_rxbuf_skips_buffers_too_small(serve: Callable[..., Served]) -> None:
    served = serve(mode="gen", mrg_rxbuf=False, frame_size=200)
    served.post_rx(0, 100, 4)
    assert _until(lambda: served.device.stats[0].received_desc == 4)
    rx = served.device.stats[0]
    assert (rx.packets, rx.invalid_buffer, rx.dropped) == (0, 4, 4)
    assert served.wait_used(0, 4) == [(0, 0), (1, 0), (2, 0), (3, 0)]


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_loopback_filters_and_keeps_pairs_apart(packed: bool, serve: Callable[..., Served]) -> None:
    served = serve(packed=packed, queue_pairs=2, workers=2)
    assert {served.engine.worker_of(p) for p in served.engine.ports} == {0, 1}
    rx_posted = [served.post_rx(2 * pair, 2048, 8) for pair in range(2)]
    sent = {0: [], 1: []}
    for pair in range(2):
        for i, dst in enumerate([DEFAULT_MAC, b"\xff" * 6, FOREIGN, bytes.fromhex("3333000000fb")]):
            frame = dst + bytes(6) + b"\x88\xb5" + bytes([pair, i]) * 30
            served.transmit(2 * pair + 1, frame)
            if dst != FOREIGN:
                sent[pair].append(frame)
    assert _until(lambda: all(served.device.stats[2 * p].packets == 3 for p in range(2)))
    for pair in range(2):
        got = [
            served.session.memory.read(rx_posted[pair][i] + HDR, n - HDR)
            for i, n in served.wait_used(2 * pair, 3)
        ]
        assert got == sent[pair]
        assert len(served.wait_used(2 * pair + 1, 4)) == 4
        assert served.device.stats[2 * pair + 1].dropped == 1


def test_loopback_without_receive_buffers_drops(serve: Callable[..., Served]) -> None:
    served = serve()
    served.transmit(1, DEFAULT_MAC + bytes(60))
    assert _until(lambda: served.device.stats[1].completed_desc == 1)
    assert served.device.stats[0].dropped == 1
    assert served.device.dropped == 1


# ---------------------------------------------------------------------- quiescing


class _Transmitter(threading.Thread):
    """A driver thread: keeps the TX ring full, reclaims what the device returns."""

    def __init__(self, served: Served, index: int) -> None:
        super().__init__(daemon=True)
        self.served = served
        self.index = index
        self.stop = threading.Event()
        self.added = 0
        self.completed = 0
        self.lock = threading.Lock()
        ring = served.ring(index)
        self.buffer = served.session.alloc(HDR + 64)
        served.session.memory.write(self.buffer, bytes(HDR) + DEFAULT_MAC + bytes(58))
        self.ring = ring

    def reclaim(self) -> None:
        with self.lock:
            while self.ring.queue.get_used() is not None:
                self.completed += 1

    def run(self) -> None:
        while not self.stop.is_set():
            with self.lock:
                try:
                    self.ring.queue.add([(self.buffer, HDR + 64)], [])
                    self.added += 1
                except QueueFullError:
                    pass
                self.ring.kick()
            self.reclaim()


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("engine", ["poll", "event"])
def test_get_vring_base_under_traffic_is_exact(
    packed: bool, engine: str, serve: Callable[..., Served]
) -> None:
    served = serve(mode="drop", engine=engine, packed=packed)
    frontend = served.session.frontend
    driver = _Transmitter(served, 1)
    driver.start()
    assert _until(lambda: served.device.stats[1].completed_desc > 2000)
    base = frontend.get_vring_base(1)
    driver.stop.set()
    driver.join()
    consumed = served.device.stats[1].completed_desc
    driver.reclaim()
    # Every chain the device took was completed before GET_VRING_BASE answered.
    assert driver.completed == consumed
    if packed:
        slot, wrap = consumed % 64, 1 ^ (consumed // 64) & 1
        assert base == (slot | wrap << 15) * 0x10001
    else:
        assert base == consumed & 0xFFFF
    # The stopped ring is no longer touched.
    memory = served.session.memory
    before = memory.read(served.session.region.guest_phys_addr, 1 << 20)
    time.sleep(0.2)
    assert memory.read(served.session.region.guest_phys_addr, 1 << 20) == before
    # Restarted from the base, it takes every chain left exactly once.
    frontend.set_vring_base(1, base)
    frontend.set_vring_kick(1, driver.ring.kick_fd)
    driver.ring.kick()
    assert _until(lambda: served.device.stats[1].completed_desc == driver.added)

    def all_reclaimed() -> bool:
        # A burst's counters move before its used entries are published.
        driver.reclaim()
        return driver.completed == driver.added

    assert _until(all_reclaimed)


# ---------------------------------------------------------------------- notifications


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("event_idx", [False, True], ids=["flags", "event_idx"])
def test_interrupts_only_when_the_driver_asks(
    packed: bool, event_idx: bool, serve: Callable[..., Served]
) -> None:
    served = serve(mode="drop", engine="event", packed=packed, event_idx=event_idx)
    ring = served.ring(1)
    ring.queue.disable_interrupts()
    for _ in range(5):
        served.transmit(1, DEFAULT_MAC + bytes(60))
    assert _until(lambda: served.device.stats[1].completed_desc == 5)
    time.sleep(0.05)
    assert _eventfd_count(ring.call_fd) == 0
    assert served.device.stats[1].calls == 0
    assert len(served.wait_used(1, 5)) == 5
    assert not ring.queue.enable_interrupts()
    served.transmit(1, DEFAULT_MAC + bytes(60))
    assert _until(lambda: served.device.stats[1].calls == 1)
    assert _eventfd_count(ring.call_fd) == 1


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_kicks_wanted_only_by_a_sleeping_worker(packed: bool, serve: Callable[..., Served]) -> None:
    polling = serve(mode="drop", engine="poll", packed=packed)
    # Once the worker runs, it asks for no kick at all.
    assert _until(lambda: not _add_and_ask(polling, 1))
    for _ in range(20):
        assert not _add_and_ask(polling, 1)
    sleeping = serve(mode="drop", engine="event", packed=packed)
    asked = []
    # Once idle, the worker sleeps and asks for a kick at the next chain; the kick wakes it.
    assert _until(lambda: asked.append(_add_and_ask(sleeping, 1)) or asked[-1])
    assert _until(lambda: sleeping.device.stats[1].completed_desc == len(asked))


def _add_and_ask(served: Served, index: int) -> bool:
    """Add a chain; return whether the device asked to be kicked for it (and kick then)."""
    ring = served.ring(index)
    for _ in iter(ring.queue.get_used, None):
        pass
    addr = served.session.alloc(HDR + 64)
    ring.queue.add([(addr, HDR + 64)], [])
    wanted = ring.queue.kick_needed()
    if wanted:
        os.eventfd_write(ring.kick_fd, 1)
    return wanted


def test_ring_without_kick_eventfd_is_polled_by_a_sleeping_worker(
    serve: Callable[..., Served],
) -> None:
    served = serve(mode="drop", engine="event")
    served.session.frontend.set_vring_kick(1, None)
    ring = served.ring(1)
    addr = served.session.alloc(HDR + 64)
    ring.queue.add([(addr, HDR + 64)], [])
    # No kick is sent: the worker finds the chain on its own.
    assert _until(lambda: served.device.stats[1].completed_desc == 1)


def test_call_eventfd_replaced_while_running(serve: Callable[..., Served]) -> None:
    served = serve(mode="drop", engine="event", event_idx=False)
    ring = served.ring(1)
    served.transmit(1, DEFAULT_MAC + bytes(60))
    assert _until(lambda: _eventfd_count(ring.call_fd) == 1)
    new_call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        served.session.frontend.set_vring_call(1, new_call)
        time.sleep(0.3)
        served.transmit(1, DEFAULT_MAC + bytes(60))
        assert _until(lambda: _eventfd_count(new_call) == 1)
        assert _eventfd_count(ring.call_fd) == 0
    finally:
        os.close(new_call)


# ---------------------------------------------------------------------- hostile rings


def test_hostile_ring_breaks_only_itself(serve: Callable[..., Served]) -> None:
    served = serve(engine="event")
    bystander = serve(engine="event")
    err = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        served.session.frontend.set_vring_err(1, err)
        # A buffer far outside guest memory.
        served.ring(1).queue.add([(0xDEAD_0000_0000, 64)], [])
        served.ring(1).kick()
        assert _until(lambda: served.device.stats[1].invalid_buffer == 1)
        assert select.select([err], [], [], SETTLE)[0] == [err]
        assert served.device.stats[1].completed_desc == 0
        # The receive ring of the same device and another device keep working.
        bystander.post_rx(0, 2048, 2)
        bystander.transmit(1, DEFAULT_MAC + bytes(60))
        assert _until(lambda: bystander.device.stats[0].packets == 1)
    finally:
        os.close(err)


# ---------------------------------------------------------------------- migration


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_dirty_log_covers_what_the_engine_writes(
    packed: bool, serve: Callable[..., Served]
) -> None:
    served = serve(packed=packed, extra_features=int(VirtioFeature.LOG_ALL))
    frontend = served.session.frontend
    frontend.set_protocol_features(served.session.protocol_features | ProtocolFeature.LOG_SHMFD)
    region = served.session.region
    log = allocate_shared((region.guest_phys_addr + region.memory_size) // 4096 // 8, "dirty-log")
    try:
        frontend.set_log_base(log.fd, log.size)
        session = served.session
        rx_buffer = session.alloc(4096, 4096)
        tx_buffer = session.alloc(4096, 4096)
        rx = served.ring(0)
        rx_id = rx.queue.add([], [(rx_buffer, 2048)])
        rx.kick()
        session.memory.write(tx_buffer, bytes(HDR) + DEFAULT_MAC + bytes(58))
        served.ring(1).queue.add([(tx_buffer, HDR + 64)], [])
        served.ring(1).kick()
        assert _until(lambda: served.device.stats[0].packets == 1)
        assert served.wait_used(0, 1) == [(rx_id, HDR + 64)]
        bits = bytes(log.buf)
        dirty = {i << 12 for i in range(len(bits) * 8) if bits[i >> 3] >> (i & 7) & 1}
        # The frame written, the used entries (one page or two), nothing the device only read.
        assert rx_buffer in dirty
        assert tx_buffer not in dirty
        assert 2 <= len(dirty) <= 3
    finally:
        log.close()


# ---------------------------------------------------------------------- engine


def test_engine_refuses_bad_settings() -> None:
    with pytest.raises(ConfigError):
        Engine("sometimes")
    with pytest.raises(ConfigError):
        Engine(workers=2, cpus=[0])
    with pytest.raises(ConfigError):
        Engine(burst=0)
    engine = Engine(EngineMode.EVENT)
    with pytest.raises(ConfigError):
        EngineNetDevice(mode="bridge", engine=engine)
    engine.close()


def test_worker_threads_carry_a_system_name(serve: Callable[..., Served]) -> None:
    serve(mode="drop", workers=2)
    names = {task.read_text().strip() for task in Path("/proc/self/task").glob("*/comm")}
    assert {f"{WORKER_THREAD_PREFIX}0", f"{WORKER_THREAD_PREFIX}1"} <= names


def test_device_close_takes_every_ring_back(serve: Callable[..., Served]) -> None:
    served = serve(mode="drop", queue_pairs=2)
    assert len(served.engine.ports) == 2
    served.device.close()
    assert served.engine.ports == []


def test_warm_up_reports_a_slow_first_compilation(monkeypatch: pytest.MonkeyPatch) -> None:
    lines: list[str] = []
    monkeypatch.setattr(engine_module, "COMPILE_NOTICE_AFTER", 0.05)
    loads: list[object] = []

    def slow_load(*programs: object) -> None:
        loads.append(programs)
        time.sleep(0.4)

    monkeypatch.setattr(engine_module.k, "load", slow_load)
    engine_module.warm_up(lines.append, {engine_module.k.P_BLK})
    assert loads == [({engine_module.k.P_BLK},)]
    assert len(lines) == 2
    assert lines[0].startswith("compiling the data-path kernels")
    assert re.fullmatch(r"data-path kernels ready in \d+ s", lines[1])


def test_warm_up_is_silent_when_the_cache_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    lines: list[str] = []
    monkeypatch.setattr(engine_module, "COMPILE_NOTICE_AFTER", 5.0)
    engine_module.warm_up(lines.append)
    assert lines == []


def _workers() -> dict[int, tuple[str, set[int]]]:
    """This process's data-path worker threads: tid -> (name, affinity)."""
    found = {}
    for task in Path("/proc/self/task").iterdir():
        name = (task / "comm").read_text().strip()
        if name.startswith(WORKER_THREAD_PREFIX):
            found[int(task.name)] = (name, os.sched_getaffinity(int(task.name)))
    return found


def test_workers_are_pinned_to_their_cpus() -> None:
    cpus = sorted(os.sched_getaffinity(0))[-2:]
    others = _workers()
    with Engine(EngineMode.EVENT, workers=len(cpus), cpus=cpus):
        mine = {tid: w for tid, w in _workers().items() if tid not in others}
        assert sorted(mine.values()) == [
            (f"{WORKER_THREAD_PREFIX}{i}", {cpu}) for i, cpu in enumerate(cpus)
        ]
    # The caller's own affinity is untouched.
    assert os.sched_getaffinity(0) == set(range(os.cpu_count() or 1))


def test_a_cpu_that_cannot_be_used_is_a_config_error() -> None:
    before = fd_count()
    others = set(_workers())
    missing = os.cpu_count() or 1
    engine = Engine(EngineMode.EVENT, workers=2, cpus=[0, missing])
    with pytest.raises(ConfigError, match=f"cannot pin data-path worker 1 to CPU {missing}"):
        engine.start()
    # The worker that did start was stopped (its system thread ends just
    # after the join returns), and nothing leaked.
    assert _until(lambda: set(_workers()) <= others)
    assert fd_count() == before
