"""The management operations of a running ``pyvdpa run``, one implementation.

Theory of operation (iproute2 ``vdpa``, Linux ``drivers/vdpa/vdpa.c``'s
netlink commands, VFIO mdev ``create``/``remove``): a :class:`Manager` owns
the device table, the drivers, the vhost-user ports and the VDUSE devices of
one process, and every way of managing them calls it: the ``--vdev``
arguments at start, the ``vdpa>`` console and the JSON-RPC control socket.

* :meth:`Manager.add` (``dev add``) validates the request, loads the data
  path program the device runs if this process has not loaded it yet (seconds
  when cold, said in the log and the reply), probes and registers the device,
  then serves it: a vhost-user port on its socket (server or client role), or
  the kernel's vDPA bus through VDUSE.  A failure at any step undoes the
  earlier ones;
* :meth:`Manager.delete` (``dev del``) stops serving the device: the port's
  front-end is disconnected cleanly (the device is closed first, its rings
  taken back, then the connection closed and the socket removed), or the
  device is taken off the vDPA bus; then the driver removes it;
* the ``show`` operations return plain dictionaries, the same ones the
  control socket answers and the client prints.

Operations are serialised by one lock; the data path of other devices never
waits for it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from pyvdpa.dataplane import kernels as k
from pyvdpa.dataplane.engine import EngineMode, warm_up
from pyvdpa.dataplane.kernels.layout import PROGRAM_NAMES
from pyvdpa.drive.info import feature_list
from pyvdpa.errors import PyvdpaError
from pyvdpa.manage.mgmtdev import MGMTDEVS, DevAddRequest, dev_add_request
from pyvdpa.vdev import VdevSpec, parse_vdev
from pyvdpa.vdpa import (
    DRIVERS,
    SimDriver,
    VdpaDevice,
    VdpaError,
    VdpaPort,
    VdpaRegistry,
    VhostAdapter,
)
from pyvdpa.vduse.backend import VduseBackend
from pyvdpa.vduse.kernel import VduseControl
from pyvdpa.vduse.netlink import add_device, delete_device
from pyvdpa.virtio.blk import BlkConfig
from pyvdpa.virtio.constants import BlkFeature, DeviceId, NetStatus
from pyvdpa.virtio.net import NetConfig, format_mac
from pyvdpa.virtio.ring import MAX_QUEUE_SIZE

__all__ = [
    "DEFAULT_SOCKET_DIR",
    "DeviceExistsError",
    "ManagedDevice",
    "Manager",
    "NoInstancesError",
    "NoSuchDeviceError",
    "queue_type",
]

#: Where ``dev add`` puts a vhost-user socket no path was given for.
DEFAULT_SOCKET_DIR = Path("/run/pyvdpa")

#: vDPA vendor id of pyvdpa's devices (Linux vdpa_sim's).
VENDOR_ID = 0

#: The ``vdpa dev show`` type names of the virtio device ids.
TYPE_NAMES = {DeviceId.NET: "network", DeviceId.BLOCK: "block"}


class NoSuchDeviceError(VdpaError):
    """No device of that name."""


class DeviceExistsError(VdpaError):
    """A device of that name (or UUID) exists."""


class NoInstancesError(VdpaError):
    """The device table is full: the type has no available instances."""


def queue_type(device_id: DeviceId, qidx: int) -> str:
    """``rx``/``tx`` for a net queue (even/odd, as ``vdpa dev vstats``), ``request`` for blk."""
    if device_id is DeviceId.NET:
        return "tx" if qidx & 1 else "rx"
    return "request"


@dataclass
class ManagedDevice:
    """A device of the table and how it is served."""

    device: VdpaDevice
    mgmtdev: str
    bus: str
    uuid: str | None = None
    port: VdpaPort | None = None
    backend: VduseBackend | None = None

    @property
    def name(self) -> str:
        """The device name."""
        return self.device.name


class Manager:
    """The devices, drivers, ports and VDUSE devices of one process.

    ``log`` receives one line per event (ports coming and going, programs
    loading); ``client`` is the role of the ports ``--iface`` and the
    console's ``create`` make; ``socket_dir`` is where ``dev add`` puts a
    socket it was not given.
    """

    def __init__(
        self,
        *,
        client: bool = False,
        engine: EngineMode = EngineMode.ADAPTIVE,
        cpus: Sequence[int] | None = None,
        log: Callable[[str], None] = print,
        socket_dir: Path = DEFAULT_SOCKET_DIR,
        registry: VdpaRegistry | None = None,
    ) -> None:
        self.client = client
        self.engine = engine
        self.cpus = None if cpus is None else tuple(cpus)
        self.log = log
        self.socket_dir = socket_dir
        self.registry = VdpaRegistry() if registry is None else registry
        self.drivers: dict[str, SimDriver] = {kind: cls() for kind, cls in DRIVERS.items()}
        self.ports: list[VdpaPort] = []
        #: Devices on the kernel's vDPA bus, by name.
        self.vduse: dict[str, VduseBackend] = {}
        self._devices: dict[str, ManagedDevice] = {}
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ building blocks

    def managed(self, name: str) -> ManagedDevice:
        """The device called ``name``; :class:`NoSuchDeviceError` if there is none."""
        with self._lock:
            entry = self._devices.get(name)
        if entry is None:
            raise NoSuchDeviceError(f"no device named {name!r}")
        return entry

    def probe(self, specs: Sequence[str]) -> list[VdpaDevice]:
        """Probe and register the devices ``--vdev`` arguments describe, in order.

        Devices with ``bus=vduse`` are then put on the kernel's vDPA bus.
        """
        devices = []
        with self._lock:
            for index, text in enumerate(specs):
                spec = replace(parse_vdev(text, index), engine=self.engine, cpus=self.cpus)
                devices.append(self._probe(spec, None).device)
            for device in devices:
                if self._devices[device.name].bus == "vduse":
                    self._serve_vduse(self._devices[device.name])
        return devices

    def _probe(self, spec: VdevSpec, uuid: str | None) -> ManagedDevice:
        if spec.name in self.registry:
            raise DeviceExistsError(f"{spec.name}: cannot register: a device of that name exists")
        if len(self.registry) >= self.registry.max_devices:
            raise NoInstancesError(
                f"{spec.name}: no available instances ({self.registry.max_devices} devices)"
            )
        device = self.drivers[spec.kind].probe(spec, self.registry)
        entry = ManagedDevice(device, spec.kind, spec.bus, uuid)
        self._devices[device.name] = entry
        return entry

    def _serve_vduse(self, entry: ManagedDevice) -> None:
        """Serve a device through VDUSE, then add it to the kernel's vDPA bus.

        As ``vdpa dev add name NAME mgmtdev vduse``: the kernel binds the
        first vDPA bus driver (virtio_vdpa or vhost_vdpa), which talks to the
        device while this runs, so the device is served first.
        """
        hardware = self.drivers[entry.mgmtdev].hardware(entry.device)
        backend = VduseBackend(hardware, entry.name)
        backend.start()
        if not backend.reconnected:
            try:
                add_device(entry.name)
            except BaseException:
                backend.close()
                raise
        entry.backend = backend
        self.vduse[entry.name] = backend
        verb = "taken over on" if backend.reconnected else "added to"
        self.log(f"VDUSE: device {entry.name} {verb} the vDPA bus")

    def create(self, path: str, name: str, *, client: bool | None = None) -> VdpaPort:
        """Attach device ``name`` to a new port on ``path`` and start it."""
        role = self.client if client is None else client
        with self._lock:
            entry = self._devices.get(name)
            if entry is None:
                raise VdpaError(f"Unable to find vdpa device id for {name}.")
            port = VdpaPort(
                path,
                client=role,
                new_device=self._new_device,
                destroy_device=self._destroy_device,
            )
            port.attach(entry.device)
            try:
                port.start()
            except BaseException:
                port.detach()
                raise
            self.ports.append(port)
            entry.port = port
        kind = "client" if role else "server"
        self.log(f"VHOST_CONFIG: ({path}) vhost-user {kind}: socket created, device {name}")
        return port

    def _new_device(self, vhost: VhostAdapter) -> None:
        self.log(f"\nnew port {vhost.ifname}, device : {vhost.device.name}")

    def _destroy_device(self, vhost: VhostAdapter) -> None:
        self.log(f"\ndestroy port {vhost.ifname}, device: {vhost.device.name}")

    # ------------------------------------------------------------------ dev add / del

    def load_program(self, spec: VdevSpec) -> tuple[str, float]:
        """Load the data path program ``spec``'s device runs, if not loaded yet.

        Returns its name and the seconds the load took (0 when it was loaded).
        """
        program = self.drivers[spec.kind].program(spec)
        name = PROGRAM_NAMES[program]
        if name in k.loaded():
            return name, 0.0
        self.log(f"pyvdpa: loading data path program {name} for {spec.name}…")
        started = time.monotonic()
        warm_up(lambda line: self.log(f"pyvdpa: {line}"), {program})
        elapsed = time.monotonic() - started
        self.log(f"pyvdpa: data path program {name} loaded in {elapsed:.1f} s")
        return name, elapsed

    def add(self, params: dict[str, object]) -> dict[str, object]:
        """``dev add``: create, probe, register and serve a device; its ``dev show`` entry.

        The reply adds ``program`` (the data path program the device runs)
        and ``program_load_seconds`` (0 when it was loaded already).
        """
        request = dev_add_request(params, engine=self.engine, cpus=self.cpus)
        with self._lock:
            self._check_new(request)
        if request.bus == "vduse":
            # Before the program loads: a refusal comes at once.
            VduseControl().close()
        # Outside the lock: a cold load takes seconds, other operations go on.
        program, seconds = self.load_program(request.spec)
        with self._lock:
            self._check_new(request)
            entry = self._probe(request.spec, request.uuid)
            try:
                if request.bus == "vduse":
                    self._serve_vduse(entry)
                else:
                    socket = request.socket or str(self.socket_dir / f"{request.name}.sock")
                    self.create(socket, request.name, client=request.client)
            except BaseException:
                self._remove(entry)
                raise
            shown = self._show(entry)
        self.log(f"device {request.name} added (mgmtdev {request.mgmtdev.name})")
        return {**shown, "program": program, "program_load_seconds": round(seconds, 3)}

    def _check_new(self, request: DevAddRequest) -> None:
        if request.name in self.registry:
            raise DeviceExistsError(
                f"{request.name}: cannot register: a device of that name exists"
            )
        if request.uuid is not None and any(e.uuid == request.uuid for e in self._devices.values()):
            raise DeviceExistsError(f"{request.name}: uuid {request.uuid} is taken")
        if len(self.registry) >= self.registry.max_devices:
            raise NoInstancesError(
                f"{request.mgmtdev.name}: no available instances "
                f"({self.registry.max_devices} devices)"
            )

    def delete(self, name: str) -> None:
        """``dev del``: stop serving device ``name`` (its front-end disconnected), remove it."""
        with self._lock:
            self._remove(self.managed(name))
        self.log(f"device {name} deleted")

    def _remove(self, entry: ManagedDevice) -> None:
        errors: list[str] = []
        if entry.port is not None:
            entry.port.close()
            self.ports.remove(entry.port)
            entry.port = None
        if entry.backend is not None:
            try:
                # The bound driver resets the device meanwhile: keep serving.
                delete_device(entry.name)
            except PyvdpaError as exc:
                errors.append(f"VDUSE: {entry.name}: {exc}")
            entry.backend.close()
            self.vduse.pop(entry.name, None)
            entry.backend = None
        self.drivers[entry.mgmtdev].remove(entry.device, self.registry)
        self._devices.pop(entry.name, None)
        for line in errors:
            self.log(line)

    def close(self) -> None:
        """Stop every port, take devices off the vDPA bus, then remove every device."""
        with self._lock:
            for port in list(self.ports):
                port.close()
            self.ports.clear()
            for entry in self._devices.values():
                entry.port = None
            for entry in list(self._devices.values()):
                self._remove(entry)

    # ------------------------------------------------------------------ shows

    def available_instances(self) -> int:
        """How many more devices the table takes."""
        return max(0, self.registry.max_devices - len(self.registry))

    def mgmtdev_show(self, name: str | None = None) -> dict[str, dict[str, object]]:
        """``mgmtdev show [NAME]``: each management device, with its type."""
        if name is not None and name not in MGMTDEVS:
            raise NoSuchDeviceError(f"no management device named {name!r}")
        shown: dict[str, dict[str, object]] = {}
        free = self.available_instances()
        entries = self._entries(None)
        for mgmtdev in MGMTDEVS.values():
            if name is None or mgmtdev.name == name:
                devices = [e.name for e in entries if e.mgmtdev == mgmtdev.name]
                entry = mgmtdev.describe(free, devices)
                entry["dev_features"] = feature_list(mgmtdev.dev_features, mgmtdev.device_id)
                shown[mgmtdev.name] = entry
        return shown

    def _entries(self, name: str | None) -> list[ManagedDevice]:
        if name is not None:
            return [self.managed(name)]
        with self._lock:
            return [self._devices[d.name] for d in self.registry if d.name in self._devices]

    def _show(self, entry: ManagedDevice) -> dict[str, object]:
        caps = entry.device.capabilities()
        shown: dict[str, object] = {
            "type": TYPE_NAMES.get(entry.device.device_type, "unknown"),
            "mgmtdev": entry.mgmtdev,
            "vendor_id": VENDOR_ID,
            "max_vqs": caps.num_vrings,
            "max_vq_size": MAX_QUEUE_SIZE,
            "bus": entry.bus,
        }
        if entry.uuid is not None:
            shown["uuid"] = entry.uuid
        port = entry.port
        if port is not None:
            shown["socket"] = port.path
            shown["role"] = "client" if port.client else "server"
            shown["connected"] = port.vhost is not None
        return shown

    def dev_show(self, name: str | None = None) -> dict[str, dict[str, object]]:
        """``dev show [NAME]``: type, management device, queues, where it is served."""
        return {entry.name: self._show(entry) for entry in self._entries(name)}

    def negotiated_features(self, entry: ManagedDevice) -> int | None:
        """The features the driver negotiated, or ``None`` while no driver has."""
        port = entry.port
        if port is not None:
            vhost = port.vhost
            return vhost.negotiated_features if vhost is not None else None
        if entry.backend is not None:
            return entry.backend.negotiated or None
        return None

    def _config(self, entry: ManagedDevice) -> dict[str, object]:
        hardware = self.drivers[entry.mgmtdev].hardware(entry.device)
        device_id = entry.device.device_type
        shown: dict[str, object]
        if device_id is DeviceId.NET:
            net = NetConfig.decode(hardware.get_config(0, NetConfig.SIZE))
            shown = {
                "mac": format_mac(net.mac),
                "link": "up" if net.status & NetStatus.LINK_UP else "down",
                "link_announce": bool(net.status & NetStatus.ANNOUNCE),
                "max_vq_pairs": net.max_virtqueue_pairs,
                "mtu": net.mtu,
            }
        else:
            blk = BlkConfig.decode(hardware.get_config(0, BlkConfig.SIZE))
            shown = {
                "capacity": blk.capacity,
                "blk_size": blk.blk_size,
                "read_only": bool(int(hardware.features) & BlkFeature.RO),
                "num_queues": blk.num_queues,
                "seg_max": blk.seg_max,
            }
        negotiated = self.negotiated_features(entry)
        if negotiated is not None:
            shown["negotiated_features"] = feature_list(negotiated, device_id)
        return shown

    def config_show(self, name: str | None = None) -> dict[str, dict[str, object]]:
        """``dev config show [NAME]``: the config space decoded, and the negotiated features."""
        return {entry.name: self._config(entry) for entry in self._entries(name)}

    def _queue(self, entry: ManagedDevice, qidx: int) -> dict[str, object]:
        try:
            counters = entry.device.get_stats(qidx)
        except VdpaError as exc:
            raise VdpaError(f"{entry.name}: queue {qidx}: {exc}") from exc
        return {
            "queue_index": qidx,
            "queue_type": queue_type(entry.device.device_type, qidx),
            **counters,
        }

    def vstats_show(self, name: str, qidx: int) -> dict[str, dict[str, object]]:
        """``dev vstats show NAME qidx N``: the counters of one queue."""
        entry = self.managed(name)
        num = entry.device.capabilities().num_vrings
        if not 0 <= qidx < num:
            raise VdpaError(f"{name}: qidx {qidx} out of range 0..{num - 1}")
        return {name: self._queue(entry, qidx)}

    def stats(self) -> dict[str, object]:
        """Every device's queues and counters (``pyvdpa stats``)."""
        devices: dict[str, object] = {}
        for entry in self._entries(None):
            queues = range(entry.device.capabilities().num_vrings)
            devices[entry.name] = {
                "mgmtdev": entry.mgmtdev,
                "bus": entry.bus,
                "queues": [self._queue(entry, qidx) for qidx in queues],
            }
        return {"devices": devices}
