"""Ports: a vDPA device served on a vhost-user socket.

Theory of operation (DPDK ``rte_vhost_driver_register``,
``rte_vhost_driver_callback_register``, ``rte_vhost_driver_attach_vdpa_device``,
``rte_vhost_driver_start``, ``rte_vhost_driver_detach_vdpa_device``,
``rte_vhost_driver_unregister``; the ``vdpa`` example's ``start_vdpa``): an
application makes a :class:`VdpaPort` for a socket path, in server or client
role, attaches one registered device to it and starts it.  Each front-end
that connects gets a fresh :class:`~pyvdpa.vdpa.vhost.VhostAdapter` bound to
the device, through which the back-end calls the device's operations.

Rules:

* a device is attached to one port at a time; a port holds one device;
* a port serves one front-end at a time.  A new front-end arriving while
  the previous one is still being torn down waits for it (up to
  ``handover_timeout`` seconds), so a guest that reconnects at once is
  served; one arriving while another is really connected is refused: its
  connection alone is closed, the first goes on;
* server role refuses a path that exists (remove a stale socket knowingly);
  client role connects, and reconnects whenever the front-end goes away;
* stopping the port closes the connection (``dev_close`` runs) and removes
  the socket it created; a stopped port can be started again.
"""

from __future__ import annotations

import os
import threading
import time
from types import TracebackType

from pyvdpa.vdpa.device import VdpaDevice, VdpaError
from pyvdpa.vdpa.vhost import DeviceCallback, VhostAdapter
from pyvdpa.vhost_user.backend import IMPLEMENTED_PROTOCOL_FEATURES, BackendConnection
from pyvdpa.vhost_user.protocol import ProtocolFeature
from pyvdpa.vhost_user.server import BackendServer

__all__ = ["VdpaPort"]


class VdpaPort:
    """A vhost-user socket serving one attached vDPA device.

    ``features``, ``protocol_features`` and ``queue_num`` bound what the
    socket offers (``None``: no bound on features or queues); the device's
    capabilities are intersected with them.  ``new_device`` and
    ``destroy_device`` are called, on the connection's thread, when a
    front-end's device becomes ready and when it stops.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        client: bool = False,
        features: int | None = None,
        protocol_features: ProtocolFeature = IMPLEMENTED_PROTOCOL_FEATURES,
        queue_num: int | None = None,
        new_device: DeviceCallback | None = None,
        destroy_device: DeviceCallback | None = None,
        reconnect_interval: float = 0.5,
        handover_timeout: float = 1.0,
    ) -> None:
        if queue_num is not None and queue_num < 1:
            raise VdpaError(f"{os.fspath(path)}: queue_num must be positive, not {queue_num}")
        self.path = os.fspath(path)
        self.client = client
        self.features = features
        self.protocol_features = protocol_features
        self.queue_num = queue_num
        self.new_device = new_device
        self.destroy_device = destroy_device
        self.reconnect_interval = reconnect_interval
        self.handover_timeout = handover_timeout
        self._device: VdpaDevice | None = None
        self._server: BackendServer | None = None
        self._vhost: VhostAdapter | None = None
        self._stopping = False
        self._cond = threading.Condition()

    def __repr__(self) -> str:
        device = self._device.name if self._device is not None else None
        return f"VdpaPort({self.path!r}, device={device!r}, client={self.client})"

    @property
    def device(self) -> VdpaDevice | None:
        """The attached device."""
        return self._device

    @property
    def vhost(self) -> VhostAdapter | None:
        """The vhost device of the connected front-end, if one is connected."""
        return self._vhost

    @property
    def started(self) -> bool:
        """Whether the port listens (server role) or connects (client role)."""
        return self._server is not None

    def attach(self, device: VdpaDevice) -> None:
        """Attach ``device``; refused if another device is attached here or it is elsewhere."""
        with self._cond:
            if self._device is device:
                return
            if self._device is not None:
                raise VdpaError(f"{self.path}: {self._device.name} is attached; detach it first")
            device.claim(self)
            self._device = device

    def detach(self) -> None:
        """Detach the device; refused while the port is started."""
        with self._cond:
            if self._server is not None:
                raise VdpaError(f"{self.path}: stop the port before detaching its device")
            if self._device is not None:
                self._device.release(self)
                self._device = None

    def start(self) -> None:
        """Listen (server role) or start connecting (client role).

        Raises :class:`VdpaError` without an attached device, and
        :class:`~pyvdpa.errors.ConfigError` when the socket cannot be made
        (in server role, for instance, when the path exists).
        """
        with self._cond:
            if self._server is not None:
                raise VdpaError(f"{self.path}: port already started")
            if self._device is None:
                raise VdpaError(f"{self.path}: attach a vDPA device before starting the port")
            server = BackendServer(
                self.path,
                self._new_vhost,
                client=self.client,
                reconnect_interval=self.reconnect_interval,
                on_disconnect=self._on_disconnect,
            )
            self._stopping = False
            server.start()
            self._server = server

    def stop(self) -> None:
        """Close the front-end's connection (``dev_close`` runs) and the socket."""
        with self._cond:
            server, self._server = self._server, None
            self._stopping = True
            self._cond.notify_all()
        if server is not None:
            server.stop()

    def close(self) -> None:
        """Stop the port and detach its device."""
        self.stop()
        self.detach()

    def __enter__(self) -> VdpaPort:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _new_vhost(self) -> VhostAdapter:
        """Device factory of the back-end server: one vhost device per front-end."""
        with self._cond:
            deadline = time.monotonic() + self.handover_timeout
            while self._vhost is not None and not self._stopping:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise VdpaError(
                        f"{self._vhost.device.name} already serves a front-end on {self.path}"
                    )
                self._cond.wait(remaining)
            if self._stopping:
                raise VdpaError(f"{self.path}: port is stopping")
            if self._device is None:
                raise VdpaError(f"{self.path}: no vDPA device attached")
            vhost = VhostAdapter(self._device, self)
            self._vhost = vhost
            return vhost

    def _on_disconnect(self, connection: BackendConnection) -> None:
        with self._cond:
            if connection.device is self._vhost:
                self._vhost = None
                self._cond.notify_all()
