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
* ``mgmtdev ...``, ``dev ...``, ``stats`` — the management commands, as
  ``pyvdpa mgmtdev|dev|stats`` (and iproute2's ``vdpa``) take and print them;
* ``quit`` (or end of input).

The same operations (:mod:`pyvdpa.manage`) are served on a JSON-RPC control
socket (``--control PATH``, by default ``/run/pyvdpa/control.sock``): a
``pyvdpa run`` may start with no device at all and get them with
``pyvdpa dev add``.  ``--metrics ADDR:PORT`` serves every queue's counters
as OpenMetrics text.

Shutting down stops every port (front-ends are disconnected, ``dev_close``
runs, the sockets made are removed) and removes every device (TAPs and
disks are released).  A mistake on the command line is one line on stderr
and a non-zero exit; a mistake at the console is one line and the console
goes on.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import TextIO

from pyvdpa.dataplane import shared_engines
from pyvdpa.dataplane.engine import EngineMode, warm_up
from pyvdpa.devices.net import NetControl
from pyvdpa.errors import ConfigError, PyvdpaError
from pyvdpa.manage.commands import parse_words, render, split_flags
from pyvdpa.manage.methods import call
from pyvdpa.manage.metrics import MetricsServer, parse_address
from pyvdpa.manage.operations import DEFAULT_SOCKET_DIR, Manager
from pyvdpa.manage.rpc import Request
from pyvdpa.manage.server import DEFAULT_CONTROL, ControlServer
from pyvdpa.vdev import parse_vdev
from pyvdpa.vdpa import VdpaError
from pyvdpa.vduse.kernel import VduseControl

__all__ = ["PROMPT", "QUEUE_ALL", "Console", "VdpaApp", "add_run_arguments", "parse_cpus", "run"]

log = logging.getLogger(__name__)

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

Management (as pyvdpa mgmtdev|dev|stats and iproute2's vdpa; -j for JSON, -p pretty):
    mgmtdev show [<mgmtdev>]                  : management devices and their types.
    dev add name <name> mgmtdev <mgmtdev> [<key> <value>]...
                                              : create a device and serve it.
    dev del <name>                            : disconnect and remove a device.
    dev show [<name>]                         : devices.
    dev config show [<name>]                  : config space and negotiated features.
    dev vstats show <name> qidx <N>           : one queue's counters.
    stats                                     : every queue of every device.
    quit                                      : exit vdpa sample app."""


class _Shutdown(BaseException):
    """Raised in the main thread by SIGINT/SIGTERM to unwind to the cleanup."""


class VdpaApp(Manager):
    """The devices, drivers and ports of one ``pyvdpa run``, and what it prints."""

    def __init__(
        self,
        *,
        client: bool = False,
        out: TextIO = sys.stdout,
        engine: EngineMode = EngineMode.ADAPTIVE,
        cpus: Sequence[int] | None = None,
        socket_dir: Path = DEFAULT_SOCKET_DIR,
    ) -> None:
        self.out = out
        # Re-entrant: the signal handler prints from the main thread, maybe mid-print.
        self._out_lock = threading.RLock()
        super().__init__(
            client=client, engine=engine, cpus=cpus, log=self.say, socket_dir=socket_dir
        )

    def write(self, text: str) -> None:
        """Write ``text`` as is (callbacks write from connection threads too)."""
        with self._out_lock:
            self.out.write(text)
            self.out.flush()

    def say(self, text: str) -> None:
        """Print one message and a newline."""
        self.write(text + "\n")

    def create_ifaces(self, prefix: str) -> None:
        """One port per vhost-user device, ``PREFIX0``, ``PREFIX1``… in registration order."""
        sockets = [d for d in self.registry if d.name not in self.vduse]
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
        hardware = self.drivers[self.managed(name).mgmtdev].hardware(device)
        if not isinstance(hardware, NetControl):
            kind = device.device_type.name.lower()
            raise VdpaError(f"Device {name} is a {kind} device: link applies to net devices.")
        hardware.set_link(up)

    def request(self, method: str, params: dict[str, object]) -> object:
        """Run a control socket method in this process (the console's way in)."""
        return self.request_handler(Request(method, params, None))

    def request_handler(self, request: Request) -> object:
        """The control socket's handler: ``request`` run on this app's operations."""
        return call(self, request)


class Console:
    """The interactive command line over ``stdin`` and the app's output."""

    def __init__(self, app: VdpaApp, stdin: TextIO) -> None:
        self.app = app
        self.stdin = stdin
        self._commands: dict[str, tuple[tuple[int, ...] | None, Callable[[list[str]], bool]]] = {
            "help": ((0,), self._help),
            "list": ((0,), self._list),
            "create": ((2,), self._create),
            "stats": ((0, 2), self._stats),
            "link": ((2,), self._link),
            "mgmtdev": (None, self._manage),
            "dev": (None, self._manage),
            "quit": ((0,), self._quit),
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
        arities, handler = entry
        if arities is not None and len(words) - 1 not in arities:
            self.app.say("Bad arguments")
            return True
        try:
            return handler(words if handler == self._manage else words[1:])
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
        if not args:
            return self._manage(["stats"])
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

    def _manage(self, words: list[str]) -> bool:
        """``mgmtdev``, ``dev``, ``stats``: as ``pyvdpa`` prints them (``-j``, ``-p`` too)."""
        words, json_output, pretty = split_flags(words)
        command = parse_words(words)
        result = self.app.request(command.method, command.params)
        text = render(command, result, json_output=json_output, pretty=pretty)
        if text:
            self.app.say(text)
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
        default=[],
        metavar="SPEC",
        help="sim-net,name=N,mode=loopback|drop|gen|tap,ifname=TAP,mac=M,mtu=N,queues=N,"
        "frame-size=N,burst=N or sim-blk,name=N,path=FILE|size=N,readonly=on,queues=N,serial=S "
        "(none: devices come with dev add on the control socket)",
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
        "(default: one worker; in poll mode pinned to the highest-numbered CPU the process "
        "may use that no other polling worker of it holds, elsewhere scheduled by the system)",
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
    control = parser.add_mutually_exclusive_group()
    control.add_argument(
        "--control",
        metavar="PATH",
        help=f"serve the JSON-RPC control socket on PATH (default {DEFAULT_CONTROL}, "
        "skipped with a warning when another pyvdpa run serves it)",
    )
    control.add_argument("--no-control", action="store_true", help="serve no control socket")
    parser.add_argument(
        "--metrics",
        metavar="ADDR:PORT",
        type=parse_address,
        help="serve OpenMetrics (Prometheus) per-queue counters over HTTP on ADDR:PORT "
        "(ADDR defaults to 127.0.0.1)",
    )


def _start_control(args: argparse.Namespace, app: VdpaApp) -> ControlServer | None:
    """Serve the control socket; the default path is given up with a warning if taken."""
    path = Path(args.control) if args.control else DEFAULT_CONTROL
    server = ControlServer(path, app.request_handler)
    try:
        server.start()
    except ConfigError as exc:
        if args.control:
            raise
        log.warning("%s; serving no control socket (give --control PATH)", exc)
        return None
    log.info("control socket %s", path)
    return server


def run(args: argparse.Namespace, stdin: TextIO = sys.stdin, out: TextIO = sys.stdout) -> int:
    """Run the application; errors from the command line propagate (after cleanup)."""
    specs = [parse_vdev(text, index) for index, text in enumerate(args.vdev)]
    served = any(spec.bus == "vhost-user" for spec in specs)
    if served and not args.iface and not args.interactive:
        raise ConfigError("--iface PREFIX is required unless -i/--interactive is given")
    if not specs and args.iface:
        raise ConfigError("--iface PREFIX names the sockets of --vdev devices: give --vdev")
    if not specs and args.no_control and not args.interactive:
        raise ConfigError("nothing to serve: give --vdev, a control socket or -i")
    socket_dir = Path(args.control).parent if args.control else DEFAULT_SOCKET_DIR
    app = VdpaApp(
        client=args.client,
        out=out,
        engine=EngineMode(args.engine),
        cpus=args.cpus,
        socket_dir=socket_dir,
    )
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def on_signal(signum: int, frame: FrameType | None) -> None:
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        app.say(f"\nSignal {signum} received, preparing to exit...")
        raise _Shutdown

    for sig in previous:
        signal.signal(sig, on_signal)
    control: ControlServer | None = None
    metrics: MetricsServer | None = None
    try:
        if args.interactive:
            app.say("Interactive-mode selected")
        if args.iface:
            app.say(f"iface {args.iface}")
        if args.control:
            # Before the data path loads: a refusal comes at once.
            control = _start_control(args, app)
        if any(spec.bus == "vduse" for spec in specs):
            VduseControl().close()
        if specs:
            # Only the programs these devices run: a first start compiles less.
            programs = {app.drivers[spec.kind].program(spec) for spec in specs}
            warm_up(lambda line: print(f"pyvdpa: {line}", file=sys.stderr, flush=True), programs)
        app.probe(args.vdev)
        if app.engine is EngineMode.POLL and app.cpus is None:
            for engine in shared_engines():
                picked = ", ".join(str(cpu) for cpu in engine.cpus)
                print(
                    f"pyvdpa: poll-mode data path pinned to CPU {picked} (--cpus to choose)",
                    file=sys.stderr,
                    flush=True,
                )
        if args.iface:
            app.create_ifaces(args.iface)
        if control is None and not args.no_control:
            control = _start_control(args, app)
        if control is None and not specs and not args.interactive:
            raise ConfigError(f"nothing to serve: {DEFAULT_CONTROL} is taken; give --control PATH")
        if args.metrics is not None:
            metrics = MetricsServer(args.metrics, app.stats)
            metrics.start()
            log.info("metrics on http://%s/metrics", metrics.address)
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
            if metrics is not None:
                metrics.stop()
            if control is not None:
                control.stop()
            app.close()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return 0
