"""The control socket's input: JSON-RPC lines, requests and their parameters, command words.

Input: a byte giving the size of the chunks the stream arrives in, then
the byte stream a client writes to the control socket.

The stream is cut into lines by :class:`~pyvdpa.manage.rpc.MessageReader`;
each line is parsed as a request (:func:`~pyvdpa.manage.rpc.parse_request`)
and run against a :class:`~pyvdpa.manage.operations.Manager` without
devices (``dev_add``'s parameters are validated with
:func:`~pyvdpa.manage.mgmtdev.dev_add_request`, which is all the socket
does before it builds a device), as a response by the client side
(:func:`~pyvdpa.manage.rpc.parse_response`), and as the words of a
``pyvdpa dev ...`` command line or the console
(:func:`~pyvdpa.manage.commands.parse_words`).

Verdicts: nothing but :class:`~pyvdpa.manage.rpc.RpcError` and
:class:`~pyvdpa.errors.ConfigError` comes out; a method never fails with
``INTERNAL_ERROR`` (the code of an exception nobody expected); every
error encodes as a reply line naming the request's id.
"""

from __future__ import annotations

import contextlib
import json

from fuzz_targets.reader import Reader
from pyvdpa.dataplane.engine import EngineMode
from pyvdpa.errors import ConfigError
from pyvdpa.manage.commands import parse_words
from pyvdpa.manage.methods import call
from pyvdpa.manage.mgmtdev import dev_add_request
from pyvdpa.manage.operations import Manager
from pyvdpa.manage.rpc import (
    INTERNAL_ERROR,
    MessageReader,
    RpcError,
    encode_error,
    encode_result,
    parse_request,
    parse_response,
)

__all__ = ["test_one_input"]

#: Lines looked at per input: the rest only slows the fuzzer down.
_MAX_LINES = 8

_manager: Manager | None = None


def _the_manager() -> Manager:
    global _manager
    if _manager is None:
        _manager = Manager(log=lambda line: None)
    return _manager


def _check_error(error: RpcError) -> None:
    assert error.code != INTERNAL_ERROR, (error.code, error.message)
    reply = json.loads(encode_error(error))
    assert reply["id"] == error.request_id and reply["error"]["code"] == error.code, reply


def _request(line: bytes) -> None:
    try:
        request = parse_request(line)
        encode_result(request.id, None)
        if request.method == "dev_add":
            dev_add_request(request.params, engine=EngineMode.ADAPTIVE, cpus=None)
        else:
            encode_result(request.id, call(_the_manager(), request))
    except RpcError as exc:
        _check_error(exc)
    except ConfigError:
        pass


def test_one_input(data: bytes) -> None:
    """Read the stream as the control socket and its clients do."""
    reader = Reader(data)
    chunk = reader.u8() % 64 + 1
    stream = reader.rest()
    lines: list[bytes] = []
    messages = MessageReader()
    try:
        for at in range(0, len(stream), chunk):
            lines += messages.feed(stream[at : at + chunk])
    except RpcError as exc:
        _check_error(exc)
    for line in lines[:_MAX_LINES]:
        _request(line)
        with contextlib.suppress(RpcError):
            parse_response(line, 1)
        with contextlib.suppress(ConfigError):
            parse_words(line.decode("utf-8", "surrogateescape").split(), "/")
