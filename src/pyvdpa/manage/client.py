"""The control socket's client: ``pyvdpa mgmtdev|dev|stats``.

Theory of operation: :class:`ControlClient` connects to a running
``pyvdpa run``'s control socket and makes one JSON-RPC call at a time;
:func:`run_words` parses an iproute2-shaped command line
(:mod:`pyvdpa.manage.commands`), calls, and prints the result as text or
JSON.  An error object from the server is a :class:`RpcError`, printed by
the command as one line.
"""

from __future__ import annotations

import itertools
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import TextIO

from pyvdpa.errors import TransportError
from pyvdpa.manage.commands import FLAGS, parse_words, render, split_flags
from pyvdpa.manage.rpc import MAX_MESSAGE, MessageReader, encode_request, parse_response
from pyvdpa.manage.server import DEFAULT_CONTROL

__all__ = ["OBJECTS", "ControlClient", "control_path", "leading_options", "run_words"]

#: The objects of the client, as ``pyvdpa`` subcommands.
OBJECTS = ("mgmtdev", "dev", "stats")

#: Longest reply the client reads (a stats of a full device table fits).
MAX_REPLY = 64 * MAX_MESSAGE


def control_path(given: str | None) -> Path:
    """``--control PATH``, else ``$PYVDPA_CONTROL``, else the default path."""
    if given:
        return Path(given)
    return Path(os.environ.get("PYVDPA_CONTROL") or DEFAULT_CONTROL)


def leading_options(arguments: Sequence[str]) -> list[str]:
    """``-j -p --control PATH OBJECT ...`` (iproute2 order) as ``OBJECT -j -p --control PATH ...``.

    Other command lines are returned as they are.
    """
    index = 0
    while index < len(arguments):
        if arguments[index] in FLAGS:
            index += 1
        elif arguments[index] == "--control" and index + 1 < len(arguments):
            index += 2
        else:
            break
    if index and index < len(arguments) and arguments[index] in OBJECTS:
        return [arguments[index], *arguments[:index], *arguments[index + 1 :]]
    return list(arguments)


class ControlClient:
    """One connection to a control socket."""

    def __init__(self, path: str | os.PathLike[str], *, timeout: float | None = 600.0) -> None:
        self.path = os.fspath(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            hint = " (is pyvdpa run serving it?)" if exc.errno in (2, 111) else ""
            raise TransportError(
                f"cannot connect to control socket {self.path}: {exc.strerror}{hint}"
            ) from None
        self._sock = sock
        self._reader = MessageReader(MAX_REPLY)
        self._lines: list[bytes] = []
        self._ids = itertools.count(1)

    def call(self, method: str, params: dict[str, object] | None = None) -> object:
        """Call ``method``; its result, or :class:`~pyvdpa.manage.rpc.RpcError`."""
        request_id = next(self._ids)
        try:
            self._sock.sendall(encode_request(request_id, method, params or {}))
            while not self._lines:
                data = self._sock.recv(65536)
                if not data:
                    raise TransportError(f"control socket {self.path} closed the connection")
                self._lines.extend(self._reader.feed(data))
        except TimeoutError:
            raise TransportError(f"control socket {self.path}: no answer to {method}") from None
        except OSError as exc:
            raise TransportError(f"control socket {self.path}: {exc.strerror}") from None
        return parse_response(self._lines.pop(0), request_id)

    def close(self) -> None:
        """Close the connection."""
        self._sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def run_words(
    words: Sequence[str],
    *,
    control: str | None = None,
    json_output: bool = False,
    pretty: bool = False,
    out: TextIO | None = None,
) -> int:
    """Run one ``mgmtdev``/``dev``/``stats`` command line against a running ``pyvdpa run``."""
    # iproute2 takes its options before the object; these take them anywhere too.
    pending, json_flag, pretty_flag = split_flags(words)
    json_output, pretty = json_output or json_flag, pretty or pretty_flag
    rest = []
    while pending:
        word = pending.pop(0)
        if word == "--control" and pending:
            control = pending.pop(0)
        else:
            rest.append(word)
    command = parse_words(rest)
    with ControlClient(control_path(control)) as client:
        result = client.call(command.method, command.params)
    text = render(command, result, json_output=json_output, pretty=pretty)
    if text:
        print(text, file=sys.stdout if out is None else out)
    if command.method == "dev_add" and isinstance(result, dict) and not json_output:
        seconds = result.get("program_load_seconds")
        if isinstance(seconds, (int, float)) and seconds > 0:
            print(
                f"pyvdpa: data path program {result.get('program')} loaded in {seconds:.1f} s",
                file=sys.stderr,
            )
    return 0
