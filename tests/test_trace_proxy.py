"""The tracing proxy over real sockets, between pyvdpa's own front-end and back-end.

Each test runs a :class:`~pyvdpa.trace.TraceProxy` in this process between
``pyvdpa drive``'s session (or a raw socket writing whatever it is told) and
a :class:`~pyvdpa.vhost_user.server.BackendServer` (or a raw socket acting
as a back-end), and checks what moved and what was recorded.  Every test
counts this process's fds before and after: the proxy closes its copies of
every fd it forwards, on every path.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pyvdpa.devices.blk import BlkDevice
from pyvdpa.devices.net import NetDevice
from pyvdpa.drive.blk import run_blk
from pyvdpa.drive.net import run_net
from pyvdpa.drive.session import Session
from pyvdpa.errors import TransportError
from pyvdpa.trace import (
    ChannelKind,
    ConnectionRecord,
    Endpoint,
    MessageRecord,
    Record,
    Side,
    SinkError,
    TraceProxy,
)
from pyvdpa.trace.proxy import MAX_BACKEND_CHANNELS
from pyvdpa.vhost_user import codec
from pyvdpa.vhost_user.frontend import Frontend
from pyvdpa.vhost_user.protocol import HeaderFlags, ProtocolFeature, Request
from pyvdpa.vhost_user.server import BackendServer

pytestmark = pytest.mark.usefixtures("no_fd_leak")

NEED = HeaderFlags.VERSION | HeaderFlags.NEED_REPLY
REPLY = HeaderFlags.VERSION | HeaderFlags.REPLY


class Records:
    """The records a proxy produced, with a way to wait for one."""

    def __init__(self) -> None:
        self.items: list[Record] = []
        self._cond = threading.Condition()

    def __call__(self, record: Record) -> None:
        with self._cond:
            self.items.append(record)
            self._cond.notify_all()

    def messages(self, connection: int | None = None) -> list[MessageRecord]:
        with self._cond:
            return [
                r
                for r in self.items
                if isinstance(r, MessageRecord) and connection in (None, r.connection)
            ]

    def events(self) -> list[tuple[int, str]]:
        with self._cond:
            return [(r.connection, r.event) for r in self.items if isinstance(r, ConnectionRecord)]

    def wait(self, predicate: Callable[[Record], bool], timeout: float = 10.0) -> Record:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for record in self.items:
                    if predicate(record):
                        return record
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"no such record in {self.items}"
                self._cond.wait(remaining)


def closed(connection: int) -> Callable[[Record], bool]:
    return lambda r: (
        isinstance(r, ConnectionRecord) and r.connection == connection and r.event == "close"
    )


@pytest.fixture
def records() -> Records:
    return Records()


@pytest.fixture
def net_backend(sock_dir: Path) -> Iterator[Path]:
    path = sock_dir / "be.sock"
    with BackendServer(path, lambda: NetDevice(mode="loopback")):
        yield path


def proxy(sock_dir: Path, backend: Path, records: Records) -> TraceProxy:
    return TraceProxy(Endpoint(sock_dir / "fe.sock", True), Endpoint(backend, False), records)


def check_paired(messages: list[MessageRecord]) -> None:
    """Every reply answers a request of its code, and nothing is malformed."""
    by_seq = {m.seq: m for m in messages}
    for m in messages:
        assert m.malformed is None, m
        if m.is_reply:
            assert m.reply_to is not None and by_seq[m.reply_to].code == m.code, m
            assert m.latency is not None and m.latency >= 0


@pytest.mark.parametrize("variant", ["eventfds", "inband", "iommu"])
def test_drive_net_through_the_trace(
    sock_dir: Path, net_backend: Path, records: Records, variant: str
) -> None:
    with proxy(sock_dir, net_backend, records) as trace:
        session = Session(
            Frontend.connect(trace.frontend.path),
            memory_size=8 << 20,
            inband=variant == "inband",
            iommu=variant == "iommu",
        )
        with session:
            result = run_net(session, mode="io", duration=0.5)
        records.wait(closed(1))
    assert result.rx_packets > 0 and result.rx_bad == result.errors == 0
    messages = records.messages()
    check_paired(messages)
    names = [m.request for m in messages if not m.is_reply and m.channel is ChannelKind.MAIN]
    assert names[:3] == ["GET_FEATURES", "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES"]
    table = next(m for m in messages if m.request == "SET_MEM_TABLE" and not m.is_reply)
    assert table.fds == ("memfd:pyvdpa-drive",)
    assert table.fields["regions"][0]["memory_size"] == 8 << 20
    kicks = [m for m in messages if m.request == "SET_VRING_KICK" and not m.is_reply]
    if variant == "inband":
        assert all(m.fields["nofd"] and not m.fds for m in kicks)
    else:
        assert [m.fds for m in kicks] == [("eventfd",), ("eventfd",)]
    backend_channel = [m for m in messages if m.channel is ChannelKind.BACKEND]
    if variant == "eventfds":
        assert not backend_channel
        return
    handover = next(m for m in messages if m.request == "SET_BACKEND_REQ_FD")
    assert handover.note == "back-end channel interposed" and handover.fds == ("socket",)
    wanted = "VRING_CALL" if variant == "inband" else "IOTLB_MSG"
    asked = [m for m in backend_channel if m.sender is Side.BACKEND]
    acks = [m for m in backend_channel if m.sender is Side.FRONTEND]
    assert asked and {m.request for m in asked} == {wanted}
    if variant == "inband":
        # Each in-band call waits for the front-end's acknowledgement.
        assert len(acks) == len(asked) and all(a.fields["result"] == "success" for a in acks)
        assert all(a.reply_to == m.seq for a, m in zip(acks, asked, strict=True))
    else:
        # A miss is answered on the main socket, by an UPDATE of the page.
        assert not acks and {m.fields["type"] for m in asked} == {"MISS"}
        updates = [m for m in messages if m.request == "IOTLB_MSG" and m.sender is Side.FRONTEND]
        assert {m.fields["type"] for m in updates} >= {"UPDATE"}
        assert {m.fields["iova"] & ~0xFFF for m in asked} <= {m.fields["iova"] for m in updates}


def test_pairs_follow_one_another(sock_dir: Path, net_backend: Path, records: Records) -> None:
    with proxy(sock_dir, net_backend, records) as trace:
        for connection in (1, 2):
            with Session(Frontend.connect(trace.frontend.path), memory_size=4 << 20) as session:
                assert run_net(session, mode="io", duration=0.2).rx_packets > 0
            records.wait(closed(connection))
    assert records.events() == [(1, "open"), (1, "close"), (2, "open"), (2, "close")]
    assert {m.connection for m in records.messages()} == {1, 2}


def test_backend_in_client_mode_and_frontend_listening(sock_dir: Path, records: Records) -> None:
    """``--listen-backend`` and ``--connect-frontend``: both peers in the other role."""
    fe, be = sock_dir / "fe.sock", sock_dir / "be.sock"
    disk = BlkDevice(size=1 << 20)
    server = BackendServer(be, lambda: disk, client=True, reconnect_interval=0.05)
    try:
        with TraceProxy(Endpoint(fe, False), Endpoint(be, True), records), server:
            with Session(Frontend.listen(fe), memory_size=4 << 20) as session:
                result = run_blk(session, rw="randwrite", bs=4096, iodepth=4, ios=64, verify=True)
            records.wait(closed(1))
    finally:
        disk.close()
    assert result.errors == result.verify_errors == 0 and result.ios == 64
    check_paired(records.messages(1))
    config = next(m for m in records.messages(1) if m.request == "GET_CONFIG" and m.is_reply)
    assert config.fields["size"] == len(bytes.fromhex(config.fields["data"]))


# --- hostile peers -------------------------------------------------------------------------


class RawSocket:
    """A peer that writes whatever bytes and fds it is told to, and reads what comes."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(5)

    @classmethod
    def connect(cls, path: Path) -> RawSocket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(path))
        return cls(sock)

    def send(self, request: int, body: bytes = b"", flags: int = 1, fds: tuple[int, ...] = ()):
        anc = []
        if fds:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]
        self.sock.sendmsg([codec.HEADER.pack(request, flags, len(body)) + body], anc)

    def recv(self) -> tuple[tuple[int, int, int], bytes, list[int]]:
        """One message: header fields, payload, fds (owned by the caller)."""
        data, anc, _, _ = self.sock.recvmsg(12, socket.CMSG_SPACE(8 * 4))
        fds: list[int] = []
        for _, _, fd_data in anc:
            fds.extend(struct.unpack(f"{len(fd_data) // 4}i", fd_data))
        assert len(data) == 12, data
        header = codec.HEADER.unpack(data)
        body = b""
        while len(body) < header[2]:
            chunk = self.sock.recv(header[2] - len(body))
            assert chunk
            body += chunk
        return header, body, fds

    def at_eof(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


class FakeBackend:
    """A listening socket whose connections the test answers by hand."""

    def __init__(self, path: Path) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(4)
        self.listener.settimeout(10)

    def accept(self) -> RawSocket:
        return RawSocket(self.listener.accept()[0])

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def fake(sock_dir: Path) -> Iterator[tuple[Path, FakeBackend]]:
    path = sock_dir / "fake.sock"
    backend = FakeBackend(path)
    yield path, backend
    backend.close()


def _eventfd() -> int:
    return os.eventfd(0)


def test_garbage_from_the_frontend_is_shown_and_forwarded(
    sock_dir: Path, net_backend: Path, records: Records
) -> None:
    """A payload that does not decode reaches the back-end unchanged; it refuses it."""
    with proxy(sock_dir, net_backend, records) as trace:
        peer = RawSocket.connect(trace.frontend.path)
        ack = struct.pack("=Q", ProtocolFeature.REPLY_ACK)
        peer.send(Request.SET_PROTOCOL_FEATURES, ack)
        peer.send(Request.SET_OWNER, flags=NEED)
        assert peer.recv()[1] == bytes(8)
        efd = _eventfd()
        peer.send(Request.SET_VRING_NUM, b"\x01\x02\x03", flags=NEED, fds=(efd,))
        os.close(efd)
        (_, flags, _), body, fds = peer.recv()
        assert flags == REPLY and struct.unpack("=Q", body)[0] != 0 and not fds
        peer.send(Request.SET_OWNER, flags=5)
        peer.close()
        records.wait(closed(1))
    bad = [m for m in records.messages() if m.malformed is not None]
    assert [m.malformed for m in bad] == [
        "SET_VRING_NUM: takes no fds, got 1",
        "SET_OWNER: REPLY flag set on a request",
    ]
    assert bad[0].raw == b"\x01\x02\x03" and bad[0].fds == ("eventfd",)
    refusal = next(m for m in records.messages() if m.reply_to == bad[0].seq)
    assert refusal.fields["result"] == "failure"


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (codec.HEADER.pack(1, 1, 5000), "payload size 5000 exceeds 4096"),
        (codec.HEADER.pack(1, 2, 0), "header version 2, expected 1"),
        (codec.HEADER.pack(1, 0x41, 0), "reserved header flags 0x40 set"),
        (codec.HEADER.pack(5, 1, 40)[:12] + b"short", "peer disconnected mid-message"),
        (codec.HEADER.pack(Request.SET_MEM_TABLE, 1, 0), "message carried more than 8 fds"),
    ],
    ids=["oversized", "version", "reserved-flag", "cut-short", "nine-fds"],
)
def test_a_header_that_cannot_be_framed_ends_the_pair(
    sock_dir: Path, net_backend: Path, records: Records, header: bytes, reason: str
) -> None:
    with proxy(sock_dir, net_backend, records) as trace:
        peer = RawSocket.connect(trace.frontend.path)
        peer.send(Request.GET_FEATURES)
        peer.recv()
        efds = [_eventfd() for _ in range(9 if "fds" in reason else 1)]
        fd_data = struct.pack(f"{len(efds)}i", *efds)
        peer.sock.sendmsg([header], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fd_data)])
        for efd in efds:
            os.close(efd)
        if reason.startswith("peer disconnected"):
            peer.sock.shutdown(socket.SHUT_WR)
        end = records.wait(closed(1))
        assert peer.at_eof()
        peer.close()
        assert isinstance(end, ConnectionRecord) and reason in end.detail
        assert end.detail.startswith("front-end")
        # The proxy goes on with the next front-end.
        with Session(Frontend.connect(trace.frontend.path), memory_size=4 << 20) as session:
            assert run_net(session, mode="io", duration=0.2).rx_packets > 0
        records.wait(closed(2))


def test_garbage_from_the_backend_is_shown_and_forwarded(
    sock_dir: Path, fake: tuple[Path, FakeBackend], records: Records
) -> None:
    path, backend = fake
    with proxy(sock_dir, path, records) as trace:
        peer = RawSocket.connect(trace.frontend.path)
        be = backend.accept()
        peer.send(Request.GET_FEATURES)
        assert be.recv()[0] == (Request.GET_FEATURES, 1, 0)
        # A reply with NEED_REPLY set, then a reply nobody asked for, then an unknown code.
        be.send(Request.GET_FEATURES, struct.pack("=Q", 1 << 32), flags=0xD)
        be.send(Request.GET_QUEUE_NUM, struct.pack("=Q", 2), flags=5)
        be.send(200, b"\xff", flags=5)
        assert peer.recv()[:2] == ((Request.GET_FEATURES, 0xD, 8), struct.pack("=Q", 1 << 32))
        assert peer.recv()[:2] == ((Request.GET_QUEUE_NUM, 5, 8), struct.pack("=Q", 2))
        assert peer.recv()[:2] == ((200, 5, 1), b"\xff")
        be.send(1, flags=1, body=b"x" * 10)
        be.sock.sendall(codec.HEADER.pack(1, 5, 9999))
        end = records.wait(closed(1))
        assert isinstance(end, ConnectionRecord) and end.detail.startswith("back-end sent")
        assert peer.recv()[:2] == ((1, 1, 10), b"x" * 10)
        assert peer.at_eof() and be.at_eof()
        peer.close()
        be.close()
    replies = [m for m in records.messages() if m.sender is Side.BACKEND]
    assert [m.malformed for m in replies] == [
        "GET_FEATURES: reply flags 0xd, expected 0x5",
        "reply to GET_QUEUE_NUM, which no request waits for",
        "unknown request 200",
        "GET_FEATURES: reply flags 0x1, expected 0x5",
    ]
    assert replies[0].reply_to == 1


def test_backend_channel_is_interposed_and_garbage_on_it_ends_it_alone(
    sock_dir: Path, fake: tuple[Path, FakeBackend], records: Records
) -> None:
    path, backend = fake
    with proxy(sock_dir, path, records) as trace:
        peer = RawSocket.connect(trace.frontend.path)
        be = backend.accept()
        features = ProtocolFeature.REPLY_ACK | ProtocolFeature.BACKEND_REQ
        peer.send(Request.SET_PROTOCOL_FEATURES, struct.pack("=Q", features))
        be.recv()
        ours, theirs = socket.socketpair()
        peer.send(Request.SET_BACKEND_REQ_FD, fds=(theirs.fileno(),))
        theirs.close()
        (_, _, _), _, fds = be.recv()
        assert len(fds) == 1
        channel = RawSocket(socket.socket(fileno=fds[0]))
        # The back-end's request arrives on the front-end's socket, unchanged, and the ack back.
        channel.send(2, flags=NEED)  # CONFIG_CHANGE_MSG
        front = RawSocket(ours)
        assert front.recv() == ((2, NEED, 0), b"", [])
        front.send(2, struct.pack("=Q", 0), flags=5)
        assert channel.recv() == ((2, 5, 8), bytes(8), [])
        # An fd that is not a socket is passed on as it is.
        efd = _eventfd()
        peer.send(Request.SET_BACKEND_REQ_FD, fds=(efd,))
        os.close(efd)
        _, _, fds = be.recv()
        assert os.readlink(f"/proc/self/fd/{fds[0]}") == "anon_inode:[eventfd]"
        os.close(fds[0])
        # Garbage on the back-end channel ends that channel only.
        channel.sock.sendall(codec.HEADER.pack(1, 1, 1 << 20))
        assert front.at_eof() and channel.at_eof()
        peer.send(Request.GET_FEATURES)
        assert be.recv()[0] == (Request.GET_FEATURES, 1, 0)
        front.close()
        channel.close()
        peer.close()
        be.close()
        records.wait(closed(1))
    messages = records.messages()
    backend_side = [m for m in messages if m.channel is ChannelKind.BACKEND]
    assert [(m.request, m.sender, m.reply_to) for m in backend_side] == [
        ("CONFIG_CHANGE_MSG", Side.BACKEND, None),
        ("CONFIG_CHANGE_MSG", Side.FRONTEND, backend_side[0].seq),
    ]
    handovers = [m for m in messages if m.request == "SET_BACKEND_REQ_FD"]
    assert [m.note for m in handovers] == ["back-end channel interposed", None]
    assert handovers[1].fds == ("eventfd",)
    reason = "back-end sent a message that cannot be framed: request 1: payload size 1048576 "
    events = [(r.event, r.detail) for r in records.items if isinstance(r, ConnectionRecord)]
    assert events[1:3] == [
        ("malformed", reason + "exceeds 4096"),
        ("backend-channel-close", reason + "exceeds 4096"),
    ]


# --- the command ---------------------------------------------------------------------------


def test_the_command_writes_json_lines_and_stops_on_sigterm(
    sock_dir: Path, net_backend: Path, tmp_path: Path
) -> None:
    out = tmp_path / "trace.jsonl"
    fe = sock_dir / "fe.sock"
    argv = [sys.executable, "-m", "pyvdpa", "trace", "--listen", str(fe)]
    argv += ["--connect", str(net_backend), "--json", "--out", str(out), "--type", "net"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with Session(Frontend.connect(fe, timeout=20), memory_size=4 << 20) as session:
            assert run_net(session, mode="txonly", duration=0.2).tx_packets > 0
        deadline = time.monotonic() + 10
        while '"event":"close"' not in out.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=20)
    assert proc.returncode == 0, stderr
    assert stdout == "" and not fe.exists()
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines[0]["event"] == "open" and lines[-1]["event"] == "close"
    features = next(x for x in lines if x.get("request") == "GET_FEATURES" and x["kind"] == "reply")
    assert "MRG_RXBUF" in features["payload"]["features_names"]
    assert all("malformed" not in x for x in lines)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--listen", "/tmp/x.sock", "--connect", "/tmp/x.sock"], "sockets must differ"),
        (["--listen", "/nonexistent/dir/fe.sock", "--connect", "/tmp/b"], "does not exist"),
        (["--listen", "/tmp/a.sock"], "one of the arguments --connect --listen-backend"),
    ],
)
def test_command_errors_are_one_line(args: list[str], message: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pyvdpa", "trace", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode != 0
    assert proc.stderr.startswith("pyvdpa: error: ") and message in proc.stderr
    assert proc.stderr.count("\n") == 1


def test_backend_channels_handed_over_again_and_again_are_bounded(
    sock_dir: Path, fake: tuple[Path, FakeBackend], records: Records
) -> None:
    """Channels the back-end still holds count; closed ones are reaped; past the bound, as-is."""
    path, backend = fake
    with proxy(sock_dir, path, records) as trace:
        peer = RawSocket.connect(trace.frontend.path)
        be = backend.accept()
        held = []
        frontend_ends = []

        def hand_over() -> int:
            ours, theirs = socket.socketpair()
            frontend_ends.append(ours)
            peer.send(Request.SET_BACKEND_REQ_FD, fds=(theirs.fileno(),))
            theirs.close()
            _, _, fds = be.recv()
            held.append(fds[0])
            return fds[0]

        for _ in range(MAX_BACKEND_CHANNELS + 1):
            hand_over()
        os.close(held.pop(0))
        records.wait(lambda r: isinstance(r, ConnectionRecord) and r.event.startswith("backend"))
        hand_over()
        for fd in held:
            os.close(fd)
        for sock in frontend_ends:
            sock.close()
        peer.close()
        be.close()
        records.wait(closed(1))
    notes = [m.note for m in records.messages() if m.request == "SET_BACKEND_REQ_FD"]
    interposed = "back-end channel interposed"
    assert notes == [interposed] * MAX_BACKEND_CHANNELS + [
        f"not interposed: {MAX_BACKEND_CHANNELS} back-end channels open",
        interposed,
    ]


def test_a_trace_that_cannot_be_written_stops_the_command(
    sock_dir: Path, net_backend: Path
) -> None:
    fe = sock_dir / "fe.sock"
    argv = [sys.executable, "-m", "pyvdpa", "trace", "--listen", str(fe)]
    argv += ["--connect", str(net_backend), "--out", "/dev/full"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # The first record (the pair opening) fails: the proxy stops and the pair ends.
        with Frontend.connect(fe, timeout=20) as frontend, pytest.raises(TransportError):
            frontend.get_features()
    finally:
        _, stderr = proc.communicate(timeout=20)
    assert proc.returncode == 1
    assert stderr == "pyvdpa: error: cannot write the trace: No space left on device\n"
    assert not fe.exists()


def test_a_sink_that_fails_stops_the_message_it_was_given(
    sock_dir: Path, fake: tuple[Path, FakeBackend]
) -> None:
    """Nothing passes untraced: the message whose record failed never reaches the back-end."""
    path, backend = fake
    seen: list[Record] = []

    def sink(record: Record) -> None:
        if isinstance(record, MessageRecord):
            raise SinkError("disk full")
        seen.append(record)

    trace = TraceProxy(Endpoint(sock_dir / "fe.sock", True), Endpoint(path, False), sink)
    with trace:
        peer = RawSocket.connect(trace.frontend.path)
        be = backend.accept()
        peer.send(int(Request.GET_FEATURES), b"", 1, ())
        assert be.at_eof()  # the pair ended without forwarding a byte
        peer.close()
        be.close()
        deadline = time.monotonic() + 10
        while trace.running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not trace.running
    assert [r.event for r in seen if isinstance(r, ConnectionRecord)] == ["open"]


@pytest.mark.parametrize("sender", [Side.FRONTEND, Side.BACKEND])
def test_random_framed_messages_arrive_byte_for_byte(
    sock_dir: Path, fake: tuple[Path, FakeBackend], records: Records, sender: Side
) -> None:
    """Whatever decodes or not, every framed message reaches the other side unchanged."""
    path, backend = fake
    rng = random.Random(f"trace-{sender.name}")
    sent = []
    with proxy(sock_dir, path, records) as trace:
        peer = RawSocket.connect(trace.frontend.path)
        be = backend.accept()
        source, sink = (peer, be) if sender is Side.FRONTEND else (be, peer)
        for _ in range(200):
            code = rng.choice([rng.randrange(0, 64), int(Request.GET_FEATURES), 5, 13])
            flags = rng.choice([1, 5, 9, 13])
            body = rng.randbytes(rng.choice([0, 8, 40, rng.randrange(0, 300)]))
            fds = (_eventfd(),) if rng.random() < 0.1 else ()
            source.send(code, body, flags, fds)
            for fd in fds:
                os.close(fd)
            sent.append(((code, flags, len(body)), body, len(fds)))
            header, got, got_fds = sink.recv()
            for fd in got_fds:
                assert os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
                os.close(fd)
            assert (header, got, len(got_fds)) == sent[-1]
        peer.close()
        be.close()
        records.wait(closed(1))
    messages = records.messages()
    assert [(m.code, m.flags, m.size) for m in messages] == [s[0] for s in sent]
    assert all(m.sender is sender for m in messages)


def test_a_backend_that_is_not_there_closes_the_frontend(sock_dir: Path, records: Records) -> None:
    fe, missing = sock_dir / "fe.sock", sock_dir / "missing.sock"
    with TraceProxy(Endpoint(fe, True), Endpoint(missing, False), records, connect_timeout=0.3):
        peer = RawSocket.connect(fe)
        failure = records.wait(lambda r: isinstance(r, ConnectionRecord))
        assert peer.at_eof()
        peer.close()
    assert isinstance(failure, ConnectionRecord) and failure.event == "failed"
    assert failure.detail == f"back-end: cannot connect to {missing}: no listener"
    assert failure.connection == 1
