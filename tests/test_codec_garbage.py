"""The vhost-user codec against malformed and hostile input.

Every failure must be a :class:`RemoteProtocolError`; header-level damage
must ask for the connection to be dropped, anything after it must not.
"""

from __future__ import annotations

import contextlib
import struct
from uuid import UUID

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvdpa.errors import RemoteProtocolError
from pyvdpa.memory import MemoryRegion
from pyvdpa.vhost_user import codec
from pyvdpa.vhost_user.codec import (
    BACKEND_REQUESTS,
    HEADER,
    REQUESTS,
    U64,
    ConfigSpace,
    ConfigType,
    CryptoSession,
    CryptoSessionOp,
    DeviceStateTransfer,
    FdRule,
    Header,
    Inflight,
    IotlbMsg,
    IotlbPerm,
    IotlbType,
    LegacyCryptoSession,
    LogArea,
    MemTable,
    Message,
    MigrationPhase,
    NoPayload,
    Payload,
    SharedObject,
    SingleMemRegion,
    SymSessionSetup,
    TransferDirection,
    VringAddr,
    VringAddrFlags,
    VringArea,
    VringState,
)
from pyvdpa.vhost_user.protocol import (
    HEADER_SIZE,
    MAX_PAYLOAD_SIZE,
    VRING_NOFD_MASK,
    BackendRequest,
    HeaderFlags,
    Request,
)

VERSION = HeaderFlags.VERSION
REPLY = HeaderFlags.VERSION | HeaderFlags.REPLY
REGION = MemoryRegion(0x0, 0x10_0000, 0x7F00_0000_0000, 0)

#: One valid payload of each type.
SAMPLES: dict[type[Payload], Payload] = {
    NoPayload: NoPayload(),
    U64: U64(0),
    VringState: VringState(0, 0),
    VringAddr: VringAddr(0, VringAddrFlags(0), 0x1000, 0x2000, 0x3000, 0),
    MemTable: MemTable((REGION, MemoryRegion(0x10_0000, 0x1000, 0x1000, 0x2000))),
    SingleMemRegion: SingleMemRegion(REGION),
    LogArea: LogArea(4096, 0),
    IotlbMsg: IotlbMsg(0x1000, 0x1000, 0x7000, IotlbPerm.RW, IotlbType.UPDATE),
    ConfigSpace: ConfigSpace(0, 8, ConfigType.FRONTEND, bytes(8)),
    VringArea: VringArea(1, False, 4096, 0),
    Inflight: Inflight(4096, 0, 2, 256),
    DeviceStateTransfer: DeviceStateTransfer(TransferDirection.SAVE, MigrationPhase.STOPPED),
    SharedObject: SharedObject(UUID(int=0x1234)),
    CryptoSession: CryptoSession(
        CryptoSessionOp.CIPHER_CREATE_SESSION,
        0,
        SymSessionSetup(1, 0, 0, 0, 1, 1, 0, 0, b"k" * 16),
    ),
    LegacyCryptoSession: LegacyCryptoSession(
        CryptoSessionOp.CIPHER_CREATE_SESSION,
        0,
        SymSessionSetup(1, 0, 0, 0, 1, 1, 0, 0, b"k" * 16),
    ),
}


def fd_count(rule: FdRule, payload: Payload) -> int:
    if isinstance(payload, MemTable):
        return len(payload.regions)
    # The samples never set NOFD, so their fd comes along.
    return 1 if rule is FdRule.UNLESS_NOFD else rule.min


def sample(request: Request | BackendRequest) -> tuple[bytes, tuple[int, ...]]:
    """A valid body and fds for ``request``."""
    spec = BACKEND_REQUESTS[request] if isinstance(request, BackendRequest) else REQUESTS[request]
    payload = SAMPLES[spec.payloads[0]]
    if isinstance(request, BackendRequest) and request is BackendRequest.IOTLB_MSG:
        payload = IotlbMsg(0x1000, 0, 0, IotlbPerm.RO, IotlbType.MISS)
    elif request in (Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR):
        payload = U64(0)
    fds = tuple(range(10, 10 + fd_count(spec.fds, payload)))
    wire, _ = codec.encode(Message(request, payload, fds=fds))
    return wire[HEADER_SIZE:], fds


def request_error(
    request: int, body: bytes, fds: tuple[int, ...] = (), flags: int = VERSION
) -> RemoteProtocolError:
    header = Header(request, HeaderFlags(flags), len(body))
    with pytest.raises(RemoteProtocolError) as info:
        codec.decode_request(header, body, fds)
    return info.value


def ids(request: Request | BackendRequest) -> str:
    return request.name


# ---------------------------------------------------------------- headers


@pytest.mark.parametrize("length", [0, 1, 4, 8, 11, 13, 24])
def test_header_of_wrong_length(length: int) -> None:
    with pytest.raises(RemoteProtocolError, match="header is") as info:
        codec.decode_header(bytes(length))
    assert info.value.drop_connection


@pytest.mark.parametrize("version", [0, 2, 3])
def test_header_of_wrong_version(version: int) -> None:
    with pytest.raises(RemoteProtocolError, match=f"version {version}") as info:
        codec.decode_header(HEADER.pack(Request.GET_FEATURES, version, 0))
    assert info.value.drop_connection


@pytest.mark.parametrize("bit", [1 << n for n in range(4, 32)])
def test_header_with_reserved_flags(bit: int) -> None:
    with pytest.raises(RemoteProtocolError, match="reserved header flags") as info:
        codec.decode_header(HEADER.pack(Request.GET_FEATURES, VERSION | bit, 0))
    assert info.value.drop_connection


@pytest.mark.parametrize("size", [MAX_PAYLOAD_SIZE + 1, 2**31, 2**32 - 1])
def test_header_with_oversize_payload(size: int) -> None:
    with pytest.raises(RemoteProtocolError, match="exceeds") as info:
        codec.decode_header(HEADER.pack(Request.SET_MEM_TABLE, VERSION, size))
    assert info.value.drop_connection


def test_header_flags_that_are_fine() -> None:
    for flags in (VERSION, REPLY, VERSION | HeaderFlags.NEED_REPLY):
        assert codec.decode_header(HEADER.pack(1, flags, MAX_PAYLOAD_SIZE)).flags == flags


def test_body_not_matching_the_header() -> None:
    header = Header(Request.SET_FEATURES, VERSION, 8)
    with pytest.raises(RemoteProtocolError, match="header announced 8") as info:
        codec.decode_request(header, bytes(7), ())
    assert info.value.drop_connection


@pytest.mark.parametrize("request_", [0, 44, 45, 255, 1000, 2**32 - 1])
def test_unknown_request(request_: int) -> None:
    error = request_error(request_, b"")
    assert "unknown request" in str(error)
    assert not error.drop_connection


@pytest.mark.parametrize("request_", [0, 6, 7, 8, 44])
def test_unknown_backend_request(request_: int) -> None:
    with pytest.raises(RemoteProtocolError, match="unknown back-end request") as info:
        codec.decode_backend_request(Header(request_, VERSION, 0), b"", ())
    assert not info.value.drop_connection


@pytest.mark.parametrize("request_", list(Request), ids=ids)
def test_reply_flag_on_a_request(request_: Request) -> None:
    body, fds = sample(request_)
    error = request_error(request_, body, fds, REPLY)
    assert "REPLY flag set on a request" in str(error)
    assert error.drop_connection


# ---------------------------------------------------------------- payload sizes


@pytest.mark.parametrize("request_", list(Request), ids=ids)
def test_truncated_and_oversized_payloads(request_: Request) -> None:
    body, fds = sample(request_)
    bad = [body + b"\0", body + bytes(8)]
    if body:
        bad += [body[:-1], body[: len(body) // 2]]
    for wrong in bad:
        error = request_error(request_, wrong, fds)
        assert str(error).startswith(f"{request_.name}: payload is {len(wrong)} bytes, expected")
        assert not error.drop_connection


@pytest.mark.parametrize("request_", list(BackendRequest), ids=ids)
def test_truncated_and_oversized_backend_payloads(request_: BackendRequest) -> None:
    body, fds = sample(request_)
    for wrong in (body + b"\0", body[:-1] if body else bytes(3)):
        header = Header(request_, VERSION, len(wrong))
        with pytest.raises(RemoteProtocolError, match=f"BACKEND_{request_.name}: payload is"):
            codec.decode_backend_request(header, wrong, fds)


# ---------------------------------------------------------------- fds


NO_FDS = [r for r, spec in REQUESTS.items() if spec.fds is FdRule.NONE]
ONE_FD = [r for r, spec in REQUESTS.items() if spec.fds is FdRule.ONE]
AT_MOST_ONE = [r for r, spec in REQUESTS.items() if spec.fds.max == 1]


@pytest.mark.parametrize("request_", NO_FDS, ids=ids)
def test_fds_on_requests_that_take_none(request_: Request) -> None:
    body, _ = sample(request_)
    error = request_error(request_, body, (5,))
    assert str(error) == f"{request_.name}: takes no fds, got 1"


@pytest.mark.parametrize("request_", AT_MOST_ONE, ids=ids)
def test_too_many_fds(request_: Request) -> None:
    body, _ = sample(request_)
    assert "got 2 fds" in str(request_error(request_, body, (5, 6)))


@pytest.mark.parametrize("request_", ONE_FD, ids=ids)
def test_missing_fd(request_: Request) -> None:
    body, _ = sample(request_)
    assert "needs exactly one fd, got 0 fds" in str(request_error(request_, body, ()))


@pytest.mark.parametrize("fds", [(), (5,), (5, 6, 7), tuple(range(9))])
def test_wrong_fd_count_for_mem_table(fds: tuple[int, ...]) -> None:
    body = SAMPLES[MemTable].encode()  # two regions
    assert "SET_MEM_TABLE" in str(request_error(Request.SET_MEM_TABLE, body, fds))


@pytest.mark.parametrize("request_", [Request.SET_VRING_KICK, Request.SET_VRING_CALL])
@pytest.mark.parametrize(
    ("value", "fds", "match"),
    [
        (0x200, (5,), "reserved bits 0x200"),
        (0x1_0000_0000, (5,), "reserved bits"),
        (VRING_NOFD_MASK | 0x400, (), "reserved bits 0x400"),
        (VRING_NOFD_MASK, (5,), "got 1 fds, expected 0"),
        (3, (), "got 0 fds, expected 1"),
    ],
)
def test_bad_vring_file(request_: Request, value: int, fds: tuple[int, ...], match: str) -> None:
    assert match in str(request_error(request_, U64(value).encode(), fds))


def test_host_notifier_fd_must_agree_with_nofd() -> None:
    for nofd, fds in ((True, (5,)), (False, ())):
        body = VringArea(0, nofd, 4096, 0).encode()
        with pytest.raises(RemoteProtocolError, match="fds, expected"):
            codec.decode_backend_request(
                Header(BackendRequest.VRING_HOST_NOTIFIER_MSG, VERSION, len(body)), body, fds
            )


# ---------------------------------------------------------------- payload validity


def mem_table(nregions: int) -> bytes:
    region = struct.pack("=QQQQ", 0, 4096, 0x1000, 0)
    return struct.pack("=II", nregions, 0) + region * nregions


@pytest.mark.parametrize(
    ("request_", "body", "fds", "match"),
    [
        (Request.SET_MEM_TABLE, mem_table(0), (), "0 regions"),
        (Request.SET_MEM_TABLE, mem_table(9), tuple(range(8)), "9 regions"),
        (Request.SET_MEM_TABLE, struct.pack("=II", 2**32 - 1, 0), (), "payload is 8 bytes"),
        (Request.SET_MEM_TABLE, struct.pack("=II4Q", 1, 0, 0, 0, 1, 0), (5,), "is empty"),
        (Request.SET_MEM_TABLE, struct.pack("=II4Q", 1, 0, 2**64 - 1, 2, 1, 0), (5,), "wraps"),
        (Request.ADD_MEM_REG, struct.pack("=5Q", 0, 0, 2, 2**64 - 1, 0), (5,), "wraps"),
        (
            Request.SET_CONFIG,
            struct.pack("=III", 0, 257, 0) + bytes(257),
            (),
            "config size 257 exceeds 256",
        ),
        (Request.SET_CONFIG, struct.pack("=III", 0, 4, 2) + bytes(4), (), "config flags 2"),
        (Request.GET_CONFIG, struct.pack("=III", 0, 4, 0) + bytes(3), (), "payload is 15"),
        (Request.IOTLB_MSG, struct.pack("=QQQBB6x", 0, 1, 0, 0, 2), (), "without an access"),
        (Request.IOTLB_MSG, struct.pack("=QQQBB6x", 0, 1, 0, 4, 2), (), "permission 4"),
        (Request.IOTLB_MSG, struct.pack("=QQQBB6x", 0, 1, 0, 1, 0), (), "IOTLB type 0"),
        (Request.IOTLB_MSG, struct.pack("=QQQBB6x", 0, 1, 0, 1, 5), (), "IOTLB type 5"),
        (Request.IOTLB_MSG, struct.pack("=QQQBB6x", 0, 1, 0, 1, 1), (), "not MISS"),
        (Request.IOTLB_MSG, struct.pack("=QQQBB6x", 2**64 - 1, 2, 0, 1, 3), (), "wraps"),
        (Request.SET_VRING_ADDR, struct.pack("=IIQQQQ", 0, 2, 0, 0, 0, 0), (), "unknown bits"),
        (Request.SET_VRING_ENABLE, VringState(0, 2).encode(), (), "num 2 is not 0 or 1"),
        (Request.SET_VRING_ENDIAN, VringState(0, 7).encode(), (), "num 7 is not 0 or 1"),
        (Request.VRING_KICK, VringState(0, 1).encode(), (), "reserved num is 1"),
        (Request.SET_STATUS, U64(0x100).encode(), (), "does not fit in 8 bits"),
        (Request.SET_LOG_BASE, struct.pack("=QQ", 2, 2**64 - 1), (5,), "wraps"),
        (Request.SET_DEVICE_STATE_FD, struct.pack("=II", 2, 0), (5,), "direction 2"),
        (Request.SET_DEVICE_STATE_FD, struct.pack("=II", 0, 1), (5,), "migration phase 1"),
        (Request.CREATE_CRYPTO_SESSION, struct.pack("=Q", 0x0003) + bytes(1064), (), "op_code 3"),
        (
            Request.CREATE_CRYPTO_SESSION,
            struct.pack("=Q6I", 0x0002, 0, 65, 0, 0, 0, 0) + bytes(1040),
            (),
            "cipher key of 65 bytes",
        ),
        (
            Request.CREATE_CRYPTO_SESSION,
            struct.pack("=Q3I", 0x0404, 0, 0, 1025) + bytes(1052),
            (),
            "asymmetric key of 1025 bytes",
        ),
        (
            Request.CREATE_CRYPTO_SESSION,
            struct.pack("=qI", 0, 0x0404) + bytes(620),
            (),
            "symmetric sessions only",
        ),
    ],
)
def test_invalid_payloads(request_: Request, body: bytes, fds: tuple[int, ...], match: str) -> None:
    error = request_error(request_, body, fds)
    assert str(error).startswith(f"{request_.name}: ")
    assert match in str(error)
    assert not error.drop_connection


def test_backend_iotlb_must_be_a_miss_or_failure() -> None:
    body = IotlbMsg(0, 1, 0, IotlbPerm.RO, IotlbType.UPDATE).encode()
    with pytest.raises(RemoteProtocolError, match="not UPDATE"):
        codec.decode_backend_request(Header(BackendRequest.IOTLB_MSG, VERSION, 32), body, ())


# ---------------------------------------------------------------- fuzzing


REQUEST_CODES = st.one_of(st.integers(0, 50), st.integers(0, 2**32 - 1))
FLAGS = st.one_of(
    st.sampled_from([0, 1, 2, 3, 5, 9, 13, 0x10, 0x80000001]), st.integers(0, 2**32 - 1)
)
FDS = st.lists(st.integers(0, 1000), max_size=10)


def decode_all(header: Header, body: bytes, fds: list[int]) -> None:
    """Feed one frame to every decoder; anything but RemoteProtocolError escapes."""
    for decode in (codec.decode_request, codec.decode_backend_request):
        with contextlib.suppress(RemoteProtocolError):
            decode(header, body, fds)
    for sent in (Request(header.request % 43 + 1), Request.GET_CONFIG):
        with contextlib.suppress(RemoteProtocolError):
            codec.decode_reply(sent, header, body, fds)
        with contextlib.suppress(RemoteProtocolError):
            codec.decode_reply_ack(sent, header, body, fds)
    with contextlib.suppress(RemoteProtocolError):
        codec.decode_backend_reply(BackendRequest(header.request % 5 + 1), header, body, fds)


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=HEADER_SIZE + 4), body=st.binary(max_size=64), fds=FDS)
def test_random_bytes(data: bytes, body: bytes, fds: list[int]) -> None:
    try:
        header = codec.decode_header(data)
    except RemoteProtocolError:
        return
    decode_all(header, body[: header.size], fds)


@settings(max_examples=600, deadline=None)
@given(request=REQUEST_CODES, flags=FLAGS, body=st.binary(max_size=1100), fds=FDS)
def test_random_frames(request: int, flags: int, body: bytes, fds: list[int]) -> None:
    try:
        header = codec.decode_header(HEADER.pack(request, flags, len(body)))
    except RemoteProtocolError:
        return
    decode_all(header, body, fds)


@settings(max_examples=600, deadline=None)
@given(
    request=st.sampled_from([*Request, *BackendRequest]),
    flips=st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), max_size=6),
    fds=st.one_of(st.none(), FDS),
)
def test_mutated_valid_frames(
    request: Request | BackendRequest, flips: list[tuple[int, int]], fds: list[int] | None
) -> None:
    """Valid bodies with a few bytes changed: right sizes, hostile contents."""
    body, good_fds = sample(request)
    mutated = bytearray(body)
    for position, value in flips:
        if mutated:
            mutated[position % len(mutated)] = value
    header = Header(request, VERSION, len(mutated))
    used = list(good_fds) if fds is None else fds
    decode = (
        codec.decode_backend_request
        if isinstance(request, BackendRequest)
        else codec.decode_request
    )
    try:
        message = decode(header, bytes(mutated), used)
    except RemoteProtocolError:
        return
    # What decodes re-encodes to the same bytes (padding aside, which is zeroed).
    wire, _ = codec.encode(message)
    assert len(wire) == HEADER_SIZE + len(mutated)
