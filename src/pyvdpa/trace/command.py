"""The ``pyvdpa trace`` command line.

``--listen PATH`` or ``--connect-frontend PATH`` says how the front-end is
reached (it connects to the proxy, or it listens: QEMU ``server=on``);
``--connect PATH`` or ``--listen-backend PATH`` how the back-end is (it
listens, or it connects in client mode).  The proxy runs until SIGINT or
SIGTERM, printing one line per record on standard output or in ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import TextIO

from pyvdpa.drive.info import DEVICE_TYPES
from pyvdpa.errors import ConfigError, PyvdpaError
from pyvdpa.trace.proxy import Endpoint, Record, SinkError, TraceProxy
from pyvdpa.trace.render import format_json, format_text

__all__ = ["add_trace_arguments", "run_trace"]


def add_trace_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``pyvdpa trace`` to ``parser``."""
    front = parser.add_mutually_exclusive_group(required=True)
    front.add_argument(
        "--listen", metavar="PATH", help="listen here; the front-end connects (QEMU, virtio-user)"
    )
    front.add_argument(
        "--connect-frontend",
        metavar="PATH",
        help="connect to a front-end listening here (QEMU server=on, virtio-user server=1)",
    )
    back = parser.add_mutually_exclusive_group(required=True)
    back.add_argument("--connect", metavar="PATH", help="connect to the back-end listening here")
    back.add_argument(
        "--listen-backend",
        metavar="PATH",
        help="listen here; a back-end in client mode connects (pyvdpa run --client)",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--out", metavar="FILE", help="write the trace here, not to stdout")
    parser.add_argument(
        "--type",
        choices=tuple(DEVICE_TYPES),
        default=None,
        help="device type for feature names (inferred from GET_FEATURES otherwise)",
    )


def _endpoints(args: argparse.Namespace) -> tuple[Endpoint, Endpoint]:
    if args.listen is not None:
        frontend = Endpoint(Path(args.listen), listen=True)
    else:
        frontend = Endpoint(Path(args.connect_frontend), listen=False)
    if args.connect is not None:
        backend = Endpoint(Path(args.connect), listen=False)
    else:
        backend = Endpoint(Path(args.listen_backend), listen=True)
    if frontend.path.resolve() == backend.path.resolve():
        raise ConfigError("the front-end and back-end sockets must differ")
    return frontend, backend


def _open_out(path: str | None) -> TextIO:
    if path is None:
        return sys.stdout
    try:
        return open(path, "w", buffering=1, encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror}") from exc


def run_trace(args: argparse.Namespace) -> int:
    """Run the proxy until SIGINT or SIGTERM, or until the trace cannot be written."""
    frontend, backend = _endpoints(args)
    out = _open_out(args.out)
    formatter = format_json if args.json else format_text

    stop = threading.Event()
    failed: list[str] = []

    def write(record: Record) -> None:
        # Relaying untraced would hide what the user asked to see: the proxy
        # stops (ending the pair) and the command says why.
        try:
            out.write(formatter(record) + "\n")
            out.flush()
        except OSError as exc:
            failed.append(f"cannot write the trace: {exc.strerror or exc}")
            stop.set()
            raise SinkError(failed[0]) from exc

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    for sig in previous:
        signal.signal(sig, on_signal)
    proxy = TraceProxy(
        frontend, backend, write, device_id=None if args.type is None else DEVICE_TYPES[args.type]
    )
    try:
        with proxy:
            while proxy.running and not stop.wait(0.5):
                pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if out is not sys.stdout:
            with contextlib.suppress(OSError):
                out.close()
    if failed:
        raise PyvdpaError(failed[0])
    return 0
