"""JSON-RPC 2.0 over a byte stream, sans I/O.

Theory of operation (JSON-RPC 2.0 specification; framing as SPDK's and
QMP's control sockets, one JSON text per line): a message is one JSON object
on one line, ended by ``\\n``.  :class:`MessageReader` cuts a byte stream
into lines and refuses a line longer than its limit (the stream cannot be
trusted past that point: the connection is closed after the error reply).
:func:`parse_request` validates one line as a request and returns a
:class:`Request` or raises :class:`RpcError` carrying the error object to
send back; :func:`encode_result` and :func:`encode_error` build the reply
lines.  The client side is :func:`encode_request` and :func:`parse_response`.

Batch requests (a JSON array) are answered with one error object, as the
method table serves one request at a time.  Notifications (no ``id``) are
executed and never answered, as the specification requires.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Final

from pyvdpa.errors import PyvdpaError

__all__ = [
    "INTERNAL_ERROR",
    "INVALID_PARAMS",
    "INVALID_REQUEST",
    "MAX_MESSAGE",
    "METHOD_NOT_FOUND",
    "PARSE_ERROR",
    "MessageReader",
    "Request",
    "RequestId",
    "RpcError",
    "encode_error",
    "encode_request",
    "encode_result",
    "parse_request",
    "parse_response",
]

#: Longest message, newline included (bytes).  A dev add fits in a few hundred.
MAX_MESSAGE: Final = 64 * 1024

#: JSON-RPC 2.0 error codes (section 5.1).
PARSE_ERROR: Final = -32700
INVALID_REQUEST: Final = -32600
METHOD_NOT_FOUND: Final = -32601
INVALID_PARAMS: Final = -32602
INTERNAL_ERROR: Final = -32603

#: A request id: a string, an integer, or ``None`` (a reply to an unreadable request).
RequestId = str | int | None

_VERSION = "2.0"
_MAX_ID_LENGTH = 256


class RpcError(PyvdpaError):
    """An error object: ``code``, ``message`` and optional ``data``.

    Raised by the codec and by methods; ``request_id`` is the id of the
    request it answers, when known.
    """

    def __init__(
        self,
        code: int,
        message: str,
        data: object = None,
        *,
        request_id: RequestId = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data
        self.request_id = request_id

    def error_object(self) -> dict[str, object]:
        """The ``error`` member of a response."""
        error: dict[str, object] = {"code": self.code, "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return error


@dataclass(frozen=True, slots=True)
class Request:
    """A valid request: ``params`` is always an object (positional params are refused)."""

    method: str
    params: dict[str, object]
    id: RequestId
    #: No ``id`` member: execute, never answer.
    notification: bool = False


class MessageReader:
    """Cuts a byte stream into lines of at most ``limit`` bytes."""

    def __init__(self, limit: int = MAX_MESSAGE) -> None:
        self.limit = limit
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """Add ``data``; return the complete lines (without ``\\n``).

        Raises :class:`RpcError` (``INVALID_REQUEST``) once the buffered line
        passes the limit; the reader must not be fed again.
        """
        self._buffer += data
        lines = []
        while (end := self._buffer.find(b"\n")) >= 0:
            if end + 1 > self.limit:
                break
            lines.append(bytes(self._buffer[:end]))
            del self._buffer[: end + 1]
        if len(self._buffer) >= self.limit:
            self._buffer.clear()
            raise RpcError(INVALID_REQUEST, f"message longer than {self.limit} bytes")
        return lines

    @property
    def pending(self) -> int:
        """Bytes of an unfinished line."""
        return len(self._buffer)


def _load(line: bytes) -> object:
    try:
        return json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise RpcError(PARSE_ERROR, f"not JSON: {exc}") from None


def _check_id(value: object) -> RequestId:
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    if isinstance(value, str) and len(value) <= _MAX_ID_LENGTH:
        return value
    raise RpcError(
        INVALID_REQUEST, "id must be a string (at most 256 characters), an integer or null"
    )


def parse_request(line: bytes) -> Request:
    """One line as a JSON-RPC 2.0 request; :class:`RpcError` says what is wrong."""
    message = _load(line)
    if isinstance(message, list):
        raise RpcError(INVALID_REQUEST, "batch requests are not supported")
    if not isinstance(message, dict):
        raise RpcError(INVALID_REQUEST, "a request is a JSON object")
    request_id = _check_id(message.get("id"))
    extra = set(message) - {"jsonrpc", "method", "params", "id"}
    try:
        if message.get("jsonrpc") != _VERSION:
            raise RpcError(INVALID_REQUEST, 'jsonrpc must be "2.0"')
        if extra:
            raise RpcError(INVALID_REQUEST, f"unknown members: {', '.join(sorted(extra))}")
        method = message.get("method")
        if not isinstance(method, str) or not method:
            raise RpcError(INVALID_REQUEST, "method must be a non-empty string")
        params = message.get("params", {})
        if not isinstance(params, dict):
            raise RpcError(INVALID_PARAMS, "params must be an object (named parameters)")
    except RpcError as exc:
        exc.request_id = request_id
        raise
    return Request(method, params, request_id, notification="id" not in message)


def _line(message: dict[str, object]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def encode_result(request_id: RequestId, result: object) -> bytes:
    """A success response line."""
    return _line({"jsonrpc": _VERSION, "id": request_id, "result": result})


def encode_error(error: RpcError) -> bytes:
    """An error response line (to ``error.request_id``)."""
    return _line({"jsonrpc": _VERSION, "id": error.request_id, "error": error.error_object()})


def encode_request(request_id: int, method: str, params: dict[str, object]) -> bytes:
    """A request line (client side)."""
    return _line({"jsonrpc": _VERSION, "id": request_id, "method": method, "params": params})


def parse_response(line: bytes, request_id: int) -> object:
    """The result of the response to ``request_id``; :class:`RpcError` for an error response.

    A response that is not JSON-RPC 2.0, or answers another id, raises
    :class:`RpcError` with ``INTERNAL_ERROR`` (the server is not one).
    """
    message = _load(line)
    if not isinstance(message, dict) or message.get("jsonrpc") != _VERSION:
        raise RpcError(INTERNAL_ERROR, "the control socket did not answer in JSON-RPC 2.0")
    error = message.get("error")
    if isinstance(error, dict):
        code, text = error.get("code"), error.get("message")
        if not isinstance(code, int) or not isinstance(text, str):
            raise RpcError(INTERNAL_ERROR, "malformed error object in the response")
        answered = message.get("id")
        rid = answered if isinstance(answered, (str, int)) else None
        raise RpcError(code, text, error.get("data"), request_id=rid)
    if message.get("id") != request_id or "result" not in message:
        raise RpcError(INTERNAL_ERROR, "the response does not answer the request")
    return message["result"]
