"""The vhost-user codec: requests, replies and back-end requests off the wire.

Input: a selector byte (which decoder; with bit 7 set, the header is made
to name the chosen request and to agree with the body's length, so that
mutations reach the payload decoders), a byte choosing the request (the
one a reply answers), a byte giving the number of fds that came with the
message, then the 12-byte header and the body.

Verdicts: :func:`~pyvdpa.vhost_user.codec.decode_header` and the
``decode_*`` functions raise nothing but
:class:`~pyvdpa.errors.RemoteProtocolError`; a message they accept encodes
again (:func:`~pyvdpa.vhost_user.codec.encode` refuses nothing the
decoder accepted) and decodes to the same message; with every protocol
feature negotiated, :func:`~pyvdpa.vhost_user.codec.check_gate` lets every
request through.
"""

from __future__ import annotations

import contextlib
import functools
import operator

from fuzz_targets.reader import Reader
from pyvdpa.errors import RemoteProtocolError
from pyvdpa.vhost_user import codec
from pyvdpa.vhost_user.codec import HEADER, U64, Header, Message
from pyvdpa.vhost_user.protocol import (
    HEADER_SIZE,
    BackendRequest,
    HeaderFlags,
    ProtocolFeature,
    Request,
)

__all__ = ["test_one_input"]

_REQUESTS = tuple(Request)
_BACKEND_REQUESTS = tuple(BackendRequest)
_REPLY = HeaderFlags.VERSION | HeaderFlags.REPLY
#: First fd number handed to the decoders; they count fds and never use them.
_FD_BASE = 1000
_ALL_FEATURES = functools.reduce(operator.or_, ProtocolFeature)


def _gates(message: Message) -> None:
    # With every protocol feature negotiated no request is gated; with none, some are.
    codec.check_gate(message.request, _ALL_FEATURES)
    with contextlib.suppress(RemoteProtocolError):
        codec.check_gate(message.request, ProtocolFeature(0))


def _request(header: Header, body: bytes, fds: tuple[int, ...]) -> None:
    message = codec.decode_request(header, body, fds)
    _gates(message)
    wire, sent_fds = codec.encode(message)
    again = codec.decode_request(codec.decode_header(wire[:HEADER_SIZE]), wire[HEADER_SIZE:], fds)
    assert sent_fds == fds, (message, sent_fds)
    assert again == message, (message, again)


def _backend_request(header: Header, body: bytes, fds: tuple[int, ...]) -> None:
    message = codec.decode_backend_request(header, body, fds)
    _gates(message)
    wire, sent_fds = codec.encode(message)
    again = codec.decode_backend_request(
        codec.decode_header(wire[:HEADER_SIZE]), wire[HEADER_SIZE:], fds
    )
    assert sent_fds == fds, (message, sent_fds)
    assert again == message, (message, again)


def _reply(sent: Request, header: Header, body: bytes, fds: tuple[int, ...]) -> None:
    message = codec.decode_reply(sent, header, body, fds)
    wire, sent_fds = codec.encode(Message(sent, message.payload, _REPLY, fds))
    again = codec.decode_reply(
        sent, codec.decode_header(wire[:HEADER_SIZE]), wire[HEADER_SIZE:], fds
    )
    assert sent_fds == fds, (message, sent_fds)
    assert again == message, (message, again)


def _reply_ack(sent: Request, header: Header, body: bytes, fds: tuple[int, ...]) -> None:
    value = codec.decode_reply_ack(sent, header, body, fds)
    wire = HEADER.pack(sent, _REPLY, U64.LAYOUT.size) + U64(value).encode()
    again = codec.decode_reply_ack(
        sent, codec.decode_header(wire[:HEADER_SIZE]), wire[HEADER_SIZE:], ()
    )
    assert again == value, (value, again)


def _backend_reply(sent: BackendRequest, header: Header, body: bytes, fds: tuple[int, ...]) -> None:
    message = codec.decode_backend_reply(sent, header, body, fds)
    assert isinstance(message.payload, U64), message
    wire = codec.encode_backend_reply(sent, message.payload.value)
    again = codec.decode_backend_reply(
        sent, codec.decode_header(wire[:HEADER_SIZE]), wire[HEADER_SIZE:], ()
    )
    assert again == message, (message, again)


def test_one_input(data: bytes) -> None:
    """Decode one message with the decoder the input selects; check the verdict."""
    reader = Reader(data)
    selector, which, fd_count = reader.u8(), reader.u8(), reader.u8()
    fds = tuple(range(_FD_BASE, _FD_BASE + fd_count % 10))
    raw_header = reader.take(HEADER_SIZE)
    body = reader.rest()
    mode = (selector & 0x7F) % 5
    backend = mode in (1, 4)
    choices: tuple[Request, ...] | tuple[BackendRequest, ...] = (
        _BACKEND_REQUESTS if backend else _REQUESTS
    )
    chosen = choices[which % len(choices)]
    if selector & 0x80:
        # A header naming the chosen request and agreeing with the body's length.
        _, flags, _ = HEADER.unpack(raw_header)
        raw_header = HEADER.pack(chosen, flags, len(body))
    try:
        header = codec.decode_header(raw_header)
        if mode == 0:
            _request(header, body, fds)
        elif mode == 1:
            _backend_request(header, body, fds)
        elif mode == 2:
            assert isinstance(chosen, Request)
            _reply(chosen, header, body, fds)
        elif mode == 3:
            assert isinstance(chosen, Request)
            _reply_ack(chosen, header, body, fds)
        else:
            assert isinstance(chosen, BackendRequest)
            _backend_reply(chosen, header, body, fds)
    except RemoteProtocolError:
        pass
