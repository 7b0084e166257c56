"""The back-end in client role: it connects to a listening front-end.

QEMU with ``server=on`` on its chardev and DPDK virtio-user with
``server=1`` listen, and the back-end connects to them; everything after
the connection must behave as in server role.
"""

from __future__ import annotations

from pathlib import Path

from pyvdpa.devices.net import NetDevice
from pyvdpa.vhost_user.frontend import Frontend
from pyvdpa.vhost_user.server import BackendServer
from test_vhost_user_e2e import every_request


def test_every_request_with_the_backend_connecting(tmp_path: Path) -> None:
    """Requests 1..43 over a connection the back-end made."""
    path = tmp_path / "listening.sock"
    device = NetDevice(mode="loopback", status_feature=True)
    with BackendServer(path, lambda: device, client=True, reconnect_interval=0.05) as server:
        every_request(server, device, Frontend.listen(path, timeout=10))
