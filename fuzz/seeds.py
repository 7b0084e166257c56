"""Write the seed inputs of the committed corpus (``fuzz/corpus/<target>/seed-*``).

Seeds give each target a start in every region of its input space: the
codec one message of each size each request's payload types take (zeroed,
with the header made to agree) and valid messages of the payload types a
zeroed body gets wrong, the chain walker a few well-formed rings,
the IOTLB short operation lists, the inflight buffer what a device left
in it with chains in flight, ``--vdev`` the documented examples, the
control socket one request per method, responses and command words, the
kernel target zeroed structs and well-formed vdpa netlink replies.  The
fuzzer's own finds are added beside them.

Usage: ``python3 fuzz/seeds.py`` (idempotent: it rewrites the same files).
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from fuzz_targets import chain, inflight, kernel  # noqa: E402
from pyvdpa.errors import ProtocolError  # noqa: E402
from pyvdpa.memory import MemoryRegion  # noqa: E402
from pyvdpa.vhost_user import codec  # noqa: E402
from pyvdpa.vhost_user.messages import (  # noqa: E402
    AsymSessionSetup,
    ConfigSpace,
    ConfigType,
    CryptoSession,
    CryptoSessionOp,
    DeviceStateTransfer,
    Inflight,
    IotlbMsg,
    IotlbPerm,
    IotlbType,
    LegacyCryptoSession,
    MemTable,
    MigrationPhase,
    Payload,
    SingleMemRegion,
    SymSessionSetup,
    TransferDirection,
    VringAddr,
    VringAddrFlags,
)
from pyvdpa.vhost_user.protocol import BackendRequest, HeaderFlags, Request  # noqa: E402


def _payload_sizes(kind: type[Payload]) -> Iterator[int]:
    if kind is MemTable:
        yield from (MemTable.HEAD.size + n * MemTable.REGION.size for n in (1, 2))
    elif kind is ConfigSpace:
        yield from (ConfigSpace.HEAD.size + n for n in (4, 8))
    else:
        for name in ("LAYOUT", "SYM"):
            layout = getattr(kind, name, None)
            if isinstance(layout, struct.Struct):
                yield layout.size
                return


def _sample_payloads() -> list[Payload]:
    """Valid payloads of the types whose fields a zeroed body gets wrong."""
    region = MemoryRegion(0x0, 0x10_0000, 0x7F00_0000_0000, 0)
    sym = SymSessionSetup(1, 0, 0, 0, 1, 1, 0, 0, b"k" * 16, b"a" * 8)
    return [
        IotlbMsg(0x1000, 0x1000, 0x7000, IotlbPerm.RW, IotlbType.UPDATE),
        IotlbMsg(0x1000, 0x1000, 0, IotlbPerm.RO, IotlbType.INVALIDATE),
        IotlbMsg(0x1000, 0, 0, IotlbPerm.RO, IotlbType.MISS),
        MemTable((region, MemoryRegion(0x10_0000, 0x1000, 0x1000, 0x2000))),
        SingleMemRegion(region),
        ConfigSpace(0, 8, ConfigType.FRONTEND, bytes(range(8))),
        VringAddr(0, VringAddrFlags(0), 0x1000, 0x2000, 0x3000, 0),
        Inflight(4096, 0, 2, 256),
        DeviceStateTransfer(TransferDirection.SAVE, MigrationPhase.STOPPED),
        CryptoSession(CryptoSessionOp.CIPHER_CREATE_SESSION, 0, sym),
        CryptoSession(
            CryptoSessionOp.AKCIPHER_CREATE_SESSION, 5, AsymSessionSetup(1, 2, 3, 4, b"key")
        ),
        LegacyCryptoSession(CryptoSessionOp.HASH_CREATE_SESSION, 0, sym),
    ]


def _encoded(message: codec.Message) -> bytes | None:
    try:
        wire, _ = codec.encode(message)
    except ProtocolError:
        return None
    return wire


def codec_seeds() -> Iterator[bytes]:
    """One input per (decoder, request, payload size), and valid messages of each kind."""
    for payload in _sample_payloads():
        for index, request in enumerate(Request):
            spec = codec.REQUESTS[request]
            count = spec.fds.value[1] if spec.fds is not codec.FdRule.PER_REGION else 2
            if isinstance(payload, spec.payloads):
                wire = _encoded(codec.Message(request, payload, fds=tuple(range(count))))
                if wire is not None:
                    yield bytes([0x80, index, count]) + wire
            if isinstance(payload, spec.reply_payloads):
                reply = codec.Message(request, payload, HeaderFlags.VERSION | HeaderFlags.REPLY)
                wire = _encoded(reply)
                if wire is not None:
                    yield bytes([0x82, index, 0]) + wire
        for index, backend in enumerate(BackendRequest):
            spec = codec.BACKEND_REQUESTS[backend]
            if isinstance(payload, spec.payloads):
                wire = _encoded(codec.Message(backend, payload, fds=(0,) * spec.fds.value[0]))
                if wire is not None:
                    yield bytes([0x81, index, spec.fds.value[0]]) + wire
    header = codec.HEADER.pack(0, 1, 0)
    for index, request in enumerate(Request):
        spec = codec.REQUESTS[request]
        fds = spec.fds.value[1]
        for kind in spec.payloads:
            for size in _payload_sizes(kind):
                yield bytes([0x80, index, fds]) + header + bytes(size)
        replies = spec.reply_payloads or (codec.U64,)
        for kind in replies:
            for size in _payload_sizes(kind):
                yield bytes([0x82, index, spec.reply_fds.value[1]]) + header + bytes(size)
        yield bytes([0x83, index, 0]) + header + bytes(8)
    for index, backend in enumerate(BackendRequest):
        spec = codec.BACKEND_REQUESTS[backend]
        for kind in spec.payloads:
            for size in _payload_sizes(kind):
                yield bytes([0x81, index, spec.fds.value[1]]) + header + bytes(size)
        yield bytes([0x84, index, 0]) + header + bytes(8)


def _iotlb_op(op: int, iova: int, size: int, uaddr: int) -> bytes:
    return bytes([op]) + b"".join(v.to_bytes(2, "little") for v in (iova, size, uaddr))


def iotlb_seeds() -> Iterator[bytes]:
    """Pages mapped, split by an invalidation, translated across, viewed, cleared."""
    rw, ro, wo = 3 << 5, 1 << 5, 2 << 5
    yield _iotlb_op(0 | rw, 0x100, 0x100, 0x0) + _iotlb_op(2, 0x100, 0x10, 0)
    yield (
        _iotlb_op(0 | rw, 0x100, 0x100, 0x0)
        + _iotlb_op(0 | rw, 0x200, 0x100, 0x100)
        + _iotlb_op(1, 0x180, 0x10, 0)
        + _iotlb_op(2 | 0x10, 0x1F0, 0x20, 0)
        + _iotlb_op(4, 0x100, 0x200, 0)
    )
    yield (
        _iotlb_op(0 | ro, 0x0, 0x40, 0x40)
        + _iotlb_op(0 | wo, 0x40, 0x40, 0x80)
        + _iotlb_op(3, 0x0, 0x80, 0)
        + _iotlb_op(3 | 0x10, 0x40, 0x10, 0)
        + _iotlb_op(5, 0, 0, 0)
        + _iotlb_op(2, 0x0, 0x1, 0)
    )
    wide = bytes([0x08 | rw]) + (2**64 - 0x1000).to_bytes(8, "little")
    yield wide + (0x1000).to_bytes(8, "little") + (0x1000).to_bytes(8, "little")


def vdev_seeds() -> Iterator[bytes]:
    """The documented ``--vdev``, ``--cpus`` and ``--metrics`` forms."""
    examples = [
        b"sim-net,name=net0,mode=loopback\0" + b"1",
        b"sim-net,name=vn0,mode=tap,ifname=pyv0,bus=vduse\0" + b"0-1",
        b"sim-net,mode=gen,frame-size=1500,mac=52:54:00:12:34:56,mtu=9000,queues=4\0" + b"0,1",
        b"sim-blk,name=blk0,path=disk.img\0" + b"0",
        b"sim-blk,size=64M,readonly=on,serial=disk0,queues=2\0" + b"1-1",
        b"sim-blk,name=vd0,path=disk.img,bus=vduse",
        b"sim-net\0" + b"0\0" + b"127.0.0.1:9100",
        b"sim-blk,size=1G\0" + b"1\0" + b"[::1]:9100",
        b"sim-net,mode=drop\0" + b"0-1\0" + b"9100",
    ]
    for index, example in enumerate(examples):
        yield bytes([index]) + example


def control_seeds() -> Iterator[bytes]:
    """One request per method, a response, command words, split across chunk sizes."""
    requests: list[dict[str, object]] = [
        {"method": "mgmtdev_show"},
        {"method": "mgmtdev_show", "params": {"name": "sim-net"}},
        {"method": "dev_show", "params": {"name": "net0"}},
        {"method": "dev_config_show"},
        {"method": "dev_vstats_show", "params": {"name": "net0", "qidx": 0}},
        {"method": "dev_del", "params": {"name": "net0"}},
        {"method": "stats"},
        {
            "method": "dev_add",
            "params": {"name": "net1", "mgmtdev": "sim-net", "mac": "52:54:00:12:34:56",
                       "mtu": 1500, "max_vqp": 2, "mode": "gen", "frame_size": 128,
                       "uuid": "6fa1b0c2-6d2b-4a8e-9f1c-0a0b0c0d0e0f", "client": True,
                       "socket": "/tmp/net1.sock"},
        },
        {
            "method": "dev_add",
            "params": {"name": "blk1", "mgmtdev": "sim-blk", "size": "64M", "readonly": True,
                       "queues": 2, "serial": "disk1", "bus": "vduse"},
        },
    ]  # fmt: skip
    for number, request in enumerate(requests):
        line = json.dumps({"jsonrpc": "2.0", "id": number, **request}).encode()
        yield bytes([number * 7]) + line + b"\n"
    yield b"\x10" + b'{"jsonrpc":"2.0","id":1,"result":{"dev":{}}}\n'
    yield b"\x03" + b'{"jsonrpc":"2.0","id":1,"error":{"code":-32001,"message":"no"}}\n'
    words = [
        b"dev add name net2 mgmtdev sim-net mac 52:54:00:00:00:01 max_vqp 2 client",
        b"dev add name blk2 mgmtdev sim-blk path disk.img readonly queues 2",
        b"dev vstats show net0 qidx 0x1",
        b"mgmtdev show sim-blk",
        b"dev config show net0",
        b"d del net0",
        b"stats",
    ]
    for number, line in enumerate(words):
        yield bytes([number * 5 + 1]) + line + b"\n"


def _nla(kind: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + bytes(-len(raw) % 4)


def _nlmsg(kind: int, flags: int, payload: bytes) -> bytes:
    raw = struct.pack("=IHHII", 16 + len(payload), kind, flags, kernel.SEQ, 0) + payload
    return raw + bytes(-len(raw) % 4)


def _datagrams(which: int, *datagrams: bytes) -> bytes:
    selector = len(kernel.DECODERS)
    framed = b"".join(len(d).to_bytes(2, "little") + d for d in datagrams)
    return bytes([selector, which]) + framed


def kernel_seeds() -> Iterator[bytes]:
    """Zeroed structs of the sizes the kernel writes; well-formed vdpa netlink replies."""
    sizes = (8, 16, 24, 32, 48, 64, 72, 152, 336)
    for selector in range(len(kernel.DECODERS)):
        for size in sizes:
            yield bytes([selector, 0]) + bytes(size)
    family, dev_new, mgmtdev_new, config_get = 0x10, 3, 1, 6
    multi, done = 0x2, 3
    genl = struct.pack("=BBH", 1, 2, 0)
    ctrl = genl + _nla(2, b"vdpa\0") + _nla(1, struct.pack("=H", kernel.FAMILY))
    yield _datagrams(0, _nlmsg(family, 0, ctrl))
    device = struct.pack("=BBH", dev_new, 1, 0) + _nla(4, b"net0\0") + _nla(5, b"\1\0\0\0")
    device += _nla(6, bytes(4)) + _nla(7, struct.pack("=I", 2)) + _nla(8, struct.pack("=H", 256))
    yield _datagrams(2, _nlmsg(kernel.FAMILY, 0, device))
    yield _datagrams(1, _nlmsg(kernel.FAMILY, multi, device), _nlmsg(done, multi, bytes(4)))
    mgmt = struct.pack("=BBH", mgmtdev_new, 1, 0) + _nla(2, b"vduse\0")
    mgmt += _nla(3, struct.pack("=Q", 0x6)) + _nla(15, struct.pack("=I", 64))
    yield _datagrams(3, _nlmsg(kernel.FAMILY, multi, mgmt), _nlmsg(done, multi, bytes(4)))
    config = struct.pack("=BBH", config_get, 1, 0) + _nla(4, b"net0\0")
    config += (
        _nla(10, bytes(6)) + _nla(11, struct.pack("=H", 1)) + _nla(13, struct.pack("=H", 1500))
    )
    config += _nla(14, struct.pack("=Q", 1 << 32))
    yield _datagrams(6, _nlmsg(kernel.FAMILY, 0, config))
    ack = struct.pack("=i", 0) + struct.pack("=IHHII", 36, kernel.FAMILY, 5, kernel.SEQ, 0)
    yield _datagrams(4, _nlmsg(2, 0x100, ack))
    refusal = struct.pack("=i", -17) + struct.pack("=IHHII", 36, kernel.FAMILY, 5, kernel.SEQ, 0)
    yield _datagrams(5, _nlmsg(2, 0x200, refusal + _nla(1, b"device exists\0")))


SEEDS = {
    "codec": codec_seeds,
    "chain": chain.seeds,
    "iotlb": iotlb_seeds,
    "inflight": inflight.seeds,
    "vdev": vdev_seeds,
    "control": control_seeds,
    "kernel": kernel_seeds,
}


def main() -> int:
    """Write every target's seeds; print how many."""
    for target, make in SEEDS.items():
        directory = HERE / "corpus" / target
        directory.mkdir(parents=True, exist_ok=True)
        count = 0
        for data in make():
            digest = hashlib.sha1(data).hexdigest()[:16]
            (directory / f"seed-{digest}").write_bytes(data)
            count += 1
        print(f"{target}: {count} seeds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
