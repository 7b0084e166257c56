"""Serve one device on a vhost-user socket until the program is told to stop.

Theory of operation: :class:`~pyvdpa.vhost_user.server.BackendServer` gives
each connection the device its factory makes.  A device object is one
device, so :func:`serve` lends it to one front-end at a time: while a
front-end is connected another one is refused (its connection alone is
closed), and once the first has gone, and the back-end has stopped every
ring and reset the device, the next may come.  The calling thread blocks
until one of the stop signals arrives: they are blocked while serving
(before the server's threads start, which inherit the mask) and taken with
``sigwait``, so no handler runs in the middle of the server's work.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterable

from pyvdpa.device import Device
from pyvdpa.errors import ConfigError
from pyvdpa.vhost_user.backend import BackendConnection
from pyvdpa.vhost_user.server import BackendServer

__all__ = ["serve"]

#: The signals that end :func:`serve` unless told otherwise.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def serve(
    device: Device,
    path: str | os.PathLike[str],
    *,
    client: bool = False,
    ready: Callable[[], None] | None = None,
    signals: Iterable[signal.Signals] = STOP_SIGNALS,
) -> signal.Signals:
    """Serve ``device`` on the vhost-user socket ``path`` until a stop signal arrives.

    The back-end listens on ``path`` (which must not exist), or with
    ``client`` connects to a front-end listening there and reconnects after
    each disconnect.  ``ready`` is called once the socket is being served.
    Returns the signal that stopped it, once the connection and the socket
    are closed (a socket it listened on is removed).  Call it from the
    program's main thread before starting threads of its own: a thread that
    does not block the signals would take them.  Raises
    :class:`~pyvdpa.errors.ConfigError` when ``path`` cannot be served.
    """
    stop = set(signals)
    in_use = threading.Lock()

    def lend() -> Device:
        if not in_use.acquire(blocking=False):
            raise ConfigError("the device is in use by another front-end")
        return device

    def give_back(connection: BackendConnection) -> None:
        in_use.release()

    previous = signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    try:
        with BackendServer(path, lend, client=client, on_disconnect=give_back):
            if ready is not None:
                ready()
            return signal.Signals(signal.sigwait(stop))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
