"""``pyvdpa run``: the vDPA example application.

Theory of operation (DPDK ``examples/vdpa``, whose options and console this
follows): the ``--vdev`` arguments are probed by the vDPA drivers
(:mod:`pyvdpa.vdpa.driver`) and registered; with ``--iface PREFIX`` every
device, in ``--vdev`` order, is attached to a port on socket ``PREFIX0``,
``PREFIX1``… and started (``--client`` connects to the sockets instead of
listening on them).  Without ``-i`` the application then serves until
SIGINT or SIGTERM; with ``-i`` it reads commands from standard input at the
``vdpa> `` prompt:

* ``help``;
* ``list`` — ``device name  queue num  supported features`` rows;
* ``create <socket file> <device name>`` — attach a device to a new port;
* ``stats <device name> <queue id>`` — a queue's counters, ``0xffff`` for
  every queue of the device;
* ``link <device name> up|down`` — a net device's link status
  (VIRTIO_NET_S_LINK_UP), which its driver is told of (a VDUSE config
  interrupt, or CONFIG_CHANGE_MSG to a vhost-user front-end that takes it);
* ``quit`` (or end of input).

Shutting down stops every port (front-ends are disconnected, ``dev_close``
runs, the sockets made are removed) and removes every device (TAPs and
disks are released).  A mistake on the command line is one line on stderr
and a non-zero exit; a mistake at the console is one line and the console
goes on.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from types import FrameType
from typing import TextIO

from pyvdpa.dataplane.engine import EngineMode, warm_up
from pyvdpa.devices.net import NetControl
from pyvdpa.errors import ConfigError, PyvdpaError
from pyvdpa.vdev import parse_vdev
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

__all__ = ["PROMPT", "QUEUE_ALL", "Console", "VdpaApp", "add_run_arguments", "parse_cpus", "run"]

#: The console prompt.
PROMPT = "vdpa> "

#: ``stats`` queue id meaning every queue of the device.
QUEUE_ALL = 0xFFFF

#: Width of a counter name in ``stats`` output (DPDK's ``RTE_VDPA_STATS_NAME_SIZE``).
STATS_NAME_WIDTH = 64

HELP = """
The following commands are currently available:

Control:
    help                                      : Show interactive instructions.
    list                                      : list all available vdpa devices.
    create <socket file> <device name>        : create a new vdpa port.
    stats <device name> <virtio queue ID>     : show statistics of virtio queue, 0xffff for all.
    link <device name> up|down                : set the link status of a net device.
    quit                                      : exit vdpa sample app."""


class _Shutdown(BaseException):
    """Raised in the main thread by SIGINT/SIGTERM to unwind to the cleanup."""


class VdpaApp:
    """The devices, drivers and ports of one ``pyvdpa run``."""

    def __init__(
        self,
        *,
        client: bool = False,
        out: TextIO = sys.stdout,
        engine: EngineMode = EngineMode.ADAPTIVE,
        cpus: Sequence[int] | None = None,
    ) -> None:
        self.client = client
        self.out = out
        self.engine = engine
        self.cpus = None if cpus is None else tuple(cpus)
        self.registry = VdpaRegistry()
        self.drivers: dict[str, SimDriver] = {kind: cls() for kind, cls in DRIVERS.items()}
        self.ports: list[VdpaPort] = []
        #: Devices on the kernel's vDPA bus, by name.
        self.vduse: dict[str, VduseBackend] = {}
        self._buses: dict[str, str] = {}
        self._owners: dict[str, SimDriver] = {}
        # Re-entrant: the signal handler prints from the main thread, maybe mid-print.
        self._out_lock = threading.RLock()

    def write(self, text: str) -> None:
        """Write ``text`` as is (callbacks write from connection threads too)."""
        with self._out_lock:
            self.out.write(text)
            self.out.flush()

    def say(self, text: str) -> None:
        """Print one message and a newline."""
        self.write(text + "\n")

    def probe(self, specs: Sequence[str]) -> list[VdpaDevice]:
        """Probe and register the devices ``--vdev`` arguments describe, in order."""
        devices = []
        for index, text in enumerate(specs):
            spec = dataclasses.replace(parse_vdev(text, index), engine=self.engine, cpus=self.cpus)
            driver = self.drivers[spec.kind]
            device = driver.probe(spec, self.registry)
            self._owners[device.name] = driver
            self._buses[device.name] = spec.bus
            devices.append(device)
        for device in devices:
            if self._buses[device.name] == "vduse":
                self.add_to_vdpa_bus(device)
        return devices

    def add_to_vdpa_bus(self, device: VdpaDevice) -> None:
        """Serve ``device`` through VDUSE, then add it to the kernel's vDPA bus.

        As ``vdpa dev add name NAME mgmtdev vduse``: the kernel binds the
        first vDPA bus driver (virtio_vdpa or vhost_vdpa), which talks to the
        device while this runs, so the device is served first.
        """
        hardware = self._owners[device.name].hardware(device)
        backend = VduseBackend(hardware, device.name)
        backend.start()
        if not backend.reconnected:
            try:
                add_device(device.name)
            except BaseException:
                backend.close()
                raise
        self.vduse[device.name] = backend
        verb = "taken over on" if backend.reconnected else "added to"
        self.say(f"VDUSE: device {device.name} {verb} the vDPA bus")

    def create(self, path: str, name: str) -> VdpaPort:
        """Attach device ``name`` to a new port on ``path`` and start it."""
        device = self.registry.find(name)
        if device is None:
            raise VdpaError(f"Unable to find vdpa device id for {name}.")
        port = VdpaPort(
            path,
            client=self.client,
            new_device=self._new_device,
            destroy_device=self._destroy_device,
        )
        port.attach(device)
        try:
            port.start()
        except BaseException:
            port.detach()
            raise
        self.ports.append(port)
        role = "client" if self.client else "server"
        self.say(f"VHOST_CONFIG: ({path}) vhost-user {role}: socket created, device {name}")
        return port

    def create_ifaces(self, prefix: str) -> None:
        """One port per device, ``PREFIX0``, ``PREFIX1``… in registration order."""
        sockets = [d for d in self.registry if self._buses.get(d.name) != "vduse"]
        for index, device in enumerate(sockets):
            self.create(f"{prefix}{index}", device.name)

    def list_lines(self) -> list[str]:
        """The ``list`` table."""
        lines = ["device name\tqueue num\tsupported features"]
        for device in self.registry:
            caps = device.capabilities()
            bus = "\tvduse" if device.name in self.vduse else ""
            lines.append(f"{device.name}\t\t{caps.queue_num}\t\t{caps.features:#x}{bus}")
        return lines

    def stats_lines(self, name: str, qid: int) -> list[str]:
        """The ``stats`` report of queue ``qid`` (or every queue) of device ``name``."""
        device = self.registry.find(name)
        if device is None:
            raise VdpaError(f"Invalid device: {name}.")
        if device.port is None and name not in self.vduse:
            raise VdpaError(f"Device {name} was not created.")
        qids = range(device.capabilities().num_vrings) if qid == QUEUE_ALL else range(qid, qid + 1)
        lines = ["", f"Device {name}:"]
        for queue in qids:
            try:
                stats = device.get_stats(queue)
            except VdpaError as exc:
                raise VdpaError(
                    f"Failed to get vdpa queue statistics for device {name} qid {queue}: {exc}"
                ) from exc
            lines.append(f"\tVirtq {queue}:")
            lines.extend(f"\t\t{stat:<{STATS_NAME_WIDTH}} {value}" for stat, value in stats.items())
        return lines

    def set_link(self, name: str, up: bool) -> None:
        """Set net device ``name``'s link status; its driver is told (see ``link``)."""
        device = self.registry.find(name)
        if device is None:
            raise VdpaError(f"Invalid device: {name}.")
        hardware = self._owners[name].hardware(device)
        if not isinstance(hardware, NetControl):
            kind = device.device_type.name.lower()
            raise VdpaError(f"Device {name} is a {kind} device: link applies to net devices.")
        hardware.set_link(up)

    def close(self) -> None:
        """Stop every port, take devices off the vDPA bus, then remove every device."""
        for port in self.ports:
            port.close()
        self.ports.clear()
        for name, backend in list(self.vduse.items()):
            try:
                # The bound driver resets the device meanwhile: keep serving.
                delete_device(name)
            except PyvdpaError as exc:
                self.say(f"VDUSE: {name}: {exc}")
            backend.close()
            del self.vduse[name]
        for device in list(self.registry):
            owner = self._owners.pop(device.name, None)
            if owner is not None:
                owner.remove(device, self.registry)

    def _new_device(self, vhost: VhostAdapter) -> None:
        self.say(f"\nnew port {vhost.ifname}, device : {vhost.device.name}")

    def _destroy_device(self, vhost: VhostAdapter) -> None:
        self.say(f"\ndestroy port {vhost.ifname}, device: {vhost.device.name}")


class Console:
    """The interactive command line over ``stdin`` and the app's output."""

    def __init__(self, app: VdpaApp, stdin: TextIO) -> None:
        self.app = app
        self.stdin = stdin
        self._commands: dict[str, tuple[int, Callable[[list[str]], bool]]] = {
            "help": (0, self._help),
            "list": (0, self._list),
            "create": (2, self._create),
            "stats": (2, self._stats),
            "link": (2, self._link),
            "quit": (0, self._quit),
        }

    def run(self) -> None:
        """Read and execute commands until ``quit`` or the end of input."""
        while True:
            self.app.write(PROMPT)
            line = self.stdin.readline()
            if not line:
                self.app.say("")
                return
            if not self.execute(line):
                return

    def execute(self, line: str) -> bool:
        """Run one command line; ``False`` when the console should end."""
        words = line.split()
        if not words:
            return True
        entry = self._commands.get(words[0])
        if entry is None:
            self.app.say("Command not found")
            return True
        arity, handler = entry
        if len(words) - 1 != arity:
            self.app.say("Bad arguments")
            return True
        try:
            return handler(words[1:])
        except PyvdpaError as exc:
            self.app.say(str(exc))
            return True

    def _help(self, args: list[str]) -> bool:
        self.app.say(HELP)
        return True

    def _list(self, args: list[str]) -> bool:
        self.app.say("\n".join(self.app.list_lines()))
        return True

    def _create(self, args: list[str]) -> bool:
        self.app.create(args[0], args[1])
        return True

    def _stats(self, args: list[str]) -> bool:
        try:
            qid = int(args[1], 0)
        except ValueError:
            self.app.say("Bad arguments")
            return True
        if not 0 <= qid <= QUEUE_ALL:
            self.app.say("Bad arguments")
            return True
        self.app.say("\n".join(self.app.stats_lines(args[0], qid)))
        return True

    def _link(self, args: list[str]) -> bool:
        name, state = args
        if state not in ("up", "down"):
            self.app.say("Bad arguments")
            return True
        self.app.set_link(name, state == "up")
        self.app.say(f"Device {name}: link {state}.")
        return True

    def _quit(self, args: list[str]) -> bool:
        return False


def parse_cpus(text: str) -> tuple[int, ...]:
    """A CPU list as ``taskset -c`` and DPDK's ``-l`` write it: ``1``, ``2,3``, ``0-3,6``."""
    cpus: list[int] = []
    available = os.cpu_count() or 1
    try:
        for part in text.split(","):
            low, dash, high = part.partition("-")
            first, last = int(low), int(high if dash else low)
            if first > last:
                raise ValueError
            # Checked before the range is expanded: "0-99999999999" is one line to type.
            if first < 0 or last >= available:
                raise argparse.ArgumentTypeError(
                    f"CPU list {text!r}: this machine has CPUs 0..{available - 1}"
                )
            cpus.extend(range(first, last + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid CPU list {text!r} (e.g. 1, 2,3 or 0-3)"
        ) from None
    if len(set(cpus)) != len(cpus):
        raise argparse.ArgumentTypeError(f"CPU list {text!r} names a CPU twice")
    return tuple(cpus)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``pyvdpa run`` (those of DPDK's vdpa example, plus ``--vdev``)."""
    parser.add_argument(
        "--vdev",
        action="append",
        required=True,
        metavar="SPEC",
        help="sim-net,name=N,mode=loopback|drop|gen|tap,ifname=TAP,mac=M,mtu=N,queues=N,"
        "frame-size=N or sim-blk,name=N,path=FILE|size=N,readonly=on,queues=N,serial=S",
    )
    parser.add_argument(
        "--engine",
        choices=[mode.value for mode in EngineMode],
        default=EngineMode.ADAPTIVE.value,
        help="how the compiled data path waits for work: poll (busy, lowest latency), "
        "event (sleeps on kicks), adaptive (polls a while, then sleeps; default)",
    )
    parser.add_argument(
        "--cpus",
        type=parse_cpus,
        metavar="LIST",
        help="pin the data path: one worker per CPU listed, e.g. 1 or 2,3 or 2-5 "
        "(default: one worker the system schedules)",
    )
    parser.add_argument(
        "--iface", metavar="PREFIX", help="socket path prefix: PREFIX0, PREFIX1… in --vdev order"
    )
    parser.add_argument(
        "--client", action="store_true", help="connect to the sockets (client mode)"
    )
    parser.add_argument(
        "-i", "--interactive", action="store_true", help="read commands at a vdpa> prompt"
    )


def run(args: argparse.Namespace, stdin: TextIO = sys.stdin, out: TextIO = sys.stdout) -> int:
    """Run the application; errors from the command line propagate (after cleanup)."""
    buses = [parse_vdev(text).bus for text in args.vdev]
    vduse_only = bool(buses) and all(bus == "vduse" for bus in buses)
    if not args.iface and not args.interactive and not vduse_only:
        raise ConfigError("--iface PREFIX is required unless -i/--interactive is given")
    app = VdpaApp(client=args.client, out=out, engine=EngineMode(args.engine), cpus=args.cpus)
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def on_signal(signum: int, frame: FrameType | None) -> None:
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        app.say(f"\nSignal {signum} received, preparing to exit...")
        raise _Shutdown

    for sig in previous:
        signal.signal(sig, on_signal)
    try:
        if args.interactive:
            app.say("Interactive-mode selected")
        if args.iface:
            app.say(f"iface {args.iface}")
        if "vduse" in buses:
            # Before the data path loads: refusals come at once.
            VduseControl().close()
        if args.vdev:
            # Only the programs these devices run: a first start compiles less.
            programs = {app.drivers[spec.kind].program(spec) for spec in map(parse_vdev, args.vdev)}
            warm_up(lambda line: print(f"pyvdpa: {line}", file=sys.stderr, flush=True), programs)
        app.probe(args.vdev)
        if args.iface:
            app.create_ifaces(args.iface)
        if args.interactive:
            Console(app, stdin).run()
        else:
            while True:
                signal.pause()
    except _Shutdown:
        pass
    finally:
        # A signal during the cleanup must not cut it short.
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        try:
            app.close()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return 0
