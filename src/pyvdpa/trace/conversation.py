"""One traced connection pair, sans I/O: messages in, decoded records out.

Theory of operation (QEMU ``docs/interop/vhost-user.rst``, "Communication",
"REPLY_ACK", "Back-end communication"): on the main socket the front-end
sends requests and the back-end replies; on the back-end channel (the
socket SET_BACKEND_REQ_FD hands over) the roles swap.  So the socket and
the sender say whether a message is a request or a reply, and the header's
flags are checked, not trusted, for that.

A request is answered when the codec's table says it always is
(:func:`pyvdpa.vhost_user.codec.has_reply`: GET_FEATURES, GET_VRING_BASE,
IOTLB_MSG...), when it sets NEED_REPLY once REPLY_ACK was negotiated
(SET_PROTOCOL_FEATURES, as the front-end sent it), and, for SET_MEM_TABLE
and ADD_MEM_REG, after POSTCOPY_LISTEN.  Such a request waits in a queue
per socket and request code; a reply takes the oldest one with its code,
which gives the record its ``reply_to`` and latency.  A reply no request
waits for is shown as malformed, and so is a GET_CONFIG reply covering
other bytes than those asked (QEMU refuses it; an empty reply is the
back-end's refusal and is well-formed).  The queues are bounded: a request the
peer never answers is forgotten once :data:`MAX_PENDING` younger ones of
the same code wait behind it.

Every message is decoded by the codec on a copy of its bytes; the proxy
forwards the original bytes whatever the outcome.  A message the codec
refuses (unknown request, wrong payload size or fd count, invalid field,
REPLY flag on a request, a reply with flags other than VERSION|REPLY) is
shown with the codec's reason and its raw payload.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from pyvdpa.drive.info import infer_device_type
from pyvdpa.errors import RemoteProtocolError
from pyvdpa.trace.render import ChannelKind, MessageRecord, Side, describe_fd, payload_fields
from pyvdpa.vhost_user.codec import (
    REQUESTS,
    Header,
    Message,
    ReplyRule,
    decode_backend_reply,
    decode_backend_request,
    decode_reply,
    decode_request,
    has_reply,
)
from pyvdpa.vhost_user.messages import U64, ConfigSpace, Payload
from pyvdpa.vhost_user.protocol import BackendRequest, HeaderFlags, ProtocolFeature, Request
from pyvdpa.virtio.constants import VirtioFeature

__all__ = ["MAX_PENDING", "Conversation"]

#: Requests of one code that may wait for their replies at once.
MAX_PENDING = 64

_AnyRequest = Request | BackendRequest


@dataclass(frozen=True, slots=True)
class _Waiting:
    """A request waiting for its reply: its number, arrival time and decoded payload."""

    seq: int
    time: float
    payload: Payload | None


def _mismatch(asked: Payload | None, answer: Payload) -> str | None:
    """What a well-formed reply gets wrong about its request (GET_CONFIG's size, as QEMU checks)."""
    if (
        isinstance(asked, ConfigSpace)
        and isinstance(answer, ConfigSpace)
        and (answer.offset, answer.size) != (asked.offset, asked.size)
    ):
        return (
            f"GET_CONFIG: reply covers {answer.size} bytes at offset {answer.offset}, "
            f"asked {asked.size} at {asked.offset}"
        )
    return None


class Conversation:
    """The state of one connection pair: negotiation seen so far and requests awaiting replies.

    ``device_id`` selects the device-specific feature names; when ``None``
    it is inferred from the first GET_FEATURES reply.  Not thread-safe: the
    proxy serialises calls to :meth:`observe`.
    """

    def __init__(self, connection: int, device_id: int | None = None) -> None:
        """Start with nothing negotiated."""
        self.connection = connection
        self.device_id = device_id
        self._device_id_given = device_id is not None
        self._seq = 0
        self._protocol_features = ProtocolFeature(0)
        self._features = 0
        self._postcopy = False
        self._pending: dict[tuple[ChannelKind, int], deque[_Waiting]] = {}

    def observe(
        self,
        channel: ChannelKind,
        sender: Side,
        header: Header,
        body: bytes,
        fd_links: Sequence[str],
        now: float,
        note: str | None = None,
    ) -> MessageRecord:
        """Decode one framed message and return its record.

        ``fd_links`` describe the fds that came with it (``/proc`` link
        text); ``now`` is its arrival time in seconds; ``note`` is printed
        with it (what the proxy did to it).  Never raises for what the
        message holds.
        """
        self._seq += 1
        is_reply = (channel is ChannelKind.MAIN) == (sender is Side.BACKEND)
        request = _request(channel, header.request)
        name = request.name if request is not None else f"UNKNOWN_{header.request}"
        # The codec only counts fds; the proxy keeps the real ones.
        fds = (-1,) * len(fd_links)
        reply_to: int | None = None
        latency: float | None = None
        malformed: str | None = None
        message: Message | None = None
        if request is None:
            kind = "back-end request" if channel is ChannelKind.BACKEND else "request"
            malformed = f"unknown {kind} {header.request}"
        elif is_reply:
            waiting = self._take_pending(channel, header.request)
            if waiting is not None:
                reply_to = waiting.seq
                latency = now - waiting.time
            try:
                message = _decode_reply(request, header, body, fds)
            except RemoteProtocolError as exc:
                malformed = str(exc)
            if waiting is None and malformed is None:
                malformed = f"reply to {name}, which no request waits for"
            elif waiting is not None and message is not None and malformed is None:
                malformed = _mismatch(waiting.payload, message.payload)
        else:
            try:
                message = _decode_request(channel, header, body, fds)
            except RemoteProtocolError as exc:
                malformed = str(exc)
            if self._expects_reply(request, header.flags):
                asked = message.payload if message is not None else None
                self._add_pending(channel, header.request, _Waiting(self._seq, now, asked))
        fields = {}
        if message is not None and request is not None:
            self._learn(message, is_reply)
            fields = payload_fields(
                request,
                message.payload,
                is_reply=is_reply,
                device_id=self.device_id,
                packed=bool(self._features & VirtioFeature.RING_PACKED),
            )
        return MessageRecord(
            time=now,
            connection=self.connection,
            seq=self._seq,
            channel=channel,
            sender=sender,
            is_reply=is_reply,
            request=name,
            code=header.request,
            flags=int(header.flags),
            size=header.size,
            fields=fields,
            fds=tuple(describe_fd(link) for link in fd_links),
            reply_to=reply_to,
            latency=latency,
            malformed=malformed,
            raw=body if malformed is not None else None,
            note=note,
        )

    def _expects_reply(self, request: _AnyRequest, flags: HeaderFlags) -> bool:
        if has_reply(request):
            return True
        if (
            isinstance(request, Request)
            and REQUESTS[request].reply is ReplyRule.POSTCOPY
            and self._postcopy
        ):
            return True
        return bool(flags & HeaderFlags.NEED_REPLY) and bool(
            self._protocol_features & ProtocolFeature.REPLY_ACK
        )

    def _add_pending(self, channel: ChannelKind, code: int, waiting: _Waiting) -> None:
        queue = self._pending.setdefault((channel, code), deque(maxlen=MAX_PENDING))
        queue.append(waiting)

    def _take_pending(self, channel: ChannelKind, code: int) -> _Waiting | None:
        queue = self._pending.get((channel, code))
        return queue.popleft() if queue else None

    def _learn(self, message: Message, is_reply: bool) -> None:
        """Keep what later messages are decoded with."""
        request, payload = message.request, message.payload
        if isinstance(request, BackendRequest) or not isinstance(payload, U64):
            if not is_reply and request is Request.POSTCOPY_LISTEN:
                self._postcopy = True
            elif not is_reply and request is Request.POSTCOPY_END:
                self._postcopy = False
            return
        if is_reply and request is Request.GET_FEATURES and not self._device_id_given:
            self.device_id = infer_device_type(payload.value) or self.device_id
        elif not is_reply and request is Request.SET_FEATURES:
            self._features = payload.value
        elif not is_reply and request is Request.SET_PROTOCOL_FEATURES:
            self._protocol_features = ProtocolFeature(payload.value)


def _request(channel: ChannelKind, code: int) -> _AnyRequest | None:
    try:
        return Request(code) if channel is ChannelKind.MAIN else BackendRequest(code)
    except ValueError:
        return None


def _decode_request(
    channel: ChannelKind, header: Header, body: bytes, fds: Sequence[int]
) -> Message:
    if channel is ChannelKind.MAIN:
        return decode_request(header, body, fds)
    return decode_backend_request(header, body, fds)


def _decode_reply(request: _AnyRequest, header: Header, body: bytes, fds: Sequence[int]) -> Message:
    if isinstance(request, BackendRequest):
        return decode_backend_reply(request, header, body, fds)
    return decode_reply(request, header, body, fds)
