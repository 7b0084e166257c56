"""What the Linux kernel hands pyvdpa: VDUSE requests and structs, vhost-vdpa structs, vdpa netlink.

Input: a selector byte choosing the decoder, a byte choosing the netlink
request a reply answers, then the bytes the kernel wrote (for netlink,
up to four datagrams, each preceded by its 16-bit length).

Decoders: :mod:`pyvdpa.vduse.uapi` (``decode_request``, ``Response``,
``VqInfo``, ``DeviceConfig``, ``VqConfig``, ``VqEventfd``, ``IotlbEntry``,
``ConfigData``, ``IovaUmem``, ``IovaInfo``, ``decode_u64``),
:mod:`pyvdpa.vhost_vdpa.uapi` (``VringState``, ``VringAddr``,
``VringFile``, ``VdpaConfig``, ``IovaRange``, ``IotlbMsg``, ``MsgV2``) and
:mod:`pyvdpa.vduse.netlink` (``decode_messages``, ``parse_attributes``,
a ``ReplyCollector`` fed the datagrams, then every reply decoder).

Verdict: a decoder returns or raises a :class:`~pyvdpa.errors.PyvdpaError`
subclass (the protocol errors each module documents).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from fuzz_targets.reader import Reader
from pyvdpa.errors import PyvdpaError
from pyvdpa.vduse import netlink
from pyvdpa.vduse import uapi as vduse
from pyvdpa.vhost_vdpa import uapi as vhost

__all__ = ["DECODERS", "FAMILY", "SEQ", "test_one_input"]

FAMILY = 0x1C
"""The vdpa generic netlink family id the requests and replies use."""
SEQ = 5
"""The sequence number of the request the replies answer."""

#: The struct and datagram decoders, by selector; one more selector means netlink replies.
DECODERS: tuple[Callable[[bytes], object], ...] = (
    lambda data: vduse.decode_request(data, vq_num=2),
    lambda data: vduse.Response.decode(data, packed=False),
    lambda data: vduse.Response.decode(data, packed=True),
    lambda data: vduse.VqInfo.decode(data, packed=False),
    lambda data: vduse.VqInfo.decode(data, packed=True),
    vduse.DeviceConfig.decode,
    vduse.VqConfig.decode,
    vduse.VqEventfd.decode,
    vduse.IotlbEntry.decode,
    vduse.ConfigData.decode,
    vduse.IovaUmem.decode,
    vduse.IovaInfo.decode,
    vduse.decode_u64,
    vhost.VringState.decode,
    vhost.VringAddr.decode,
    vhost.VringFile.decode,
    vhost.VdpaConfig.decode,
    vhost.IovaRange.decode,
    vhost.IotlbMsg.decode,
    vhost.MsgV2.decode,
    netlink.decode_messages,
    netlink.parse_attributes,
)

_REQUESTS = (
    netlink.family_request(),
    netlink.get_device_request(FAMILY),
    netlink.get_device_request(FAMILY, "blk0"),
    netlink.get_mgmtdev_request(FAMILY),
    netlink.add_device_request(FAMILY, "net0"),
    netlink.delete_device_request(FAMILY, "net0"),
    netlink.get_config_request(FAMILY, "net0"),
)

_REPLY_DECODERS: tuple[Callable[[netlink.GenericMessage], object], ...] = (
    netlink.MgmtDev.from_reply,
    netlink.VdpaDevice.from_reply,
    netlink.VdpaDeviceConfig.from_reply,
    netlink.decode_family_id,
)


def _replies(request: netlink.NetlinkRequest, reader: Reader) -> None:
    collector = netlink.ReplyCollector(request, SEQ)
    for _ in range(4):
        if reader.exhausted:
            break
        if collector.feed(reader.take(reader.u16() % 4096)):
            break
    for reply in collector.replies:
        for decode in _REPLY_DECODERS:
            with contextlib.suppress(PyvdpaError):
                decode(reply)


def test_one_input(data: bytes) -> None:
    """Decode the kernel's bytes with the decoder the input selects."""
    reader = Reader(data)
    selector, which = reader.u8(), reader.u8()
    choice = selector % (len(DECODERS) + 1)
    try:
        if choice == len(DECODERS):
            _replies(_REQUESTS[which % len(_REQUESTS)], reader)
        else:
            DECODERS[choice](reader.rest())
    except PyvdpaError:
        pass
