"""The ``pyvdpa`` command.

* ``pyvdpa run`` is the vDPA example app (:mod:`pyvdpa.app`): simulated
  vDPA devices served on vhost-user sockets;
* ``pyvdpa drive net|blk`` drives any vhost-user back-end or vhost-vdpa
  device with traffic;
* ``pyvdpa info`` tells what a vhost-vdpa device or vhost-user back-end offers;
* ``pyvdpa trace`` sits between a vhost-user front-end and back-end and
  prints every message it relays (:mod:`pyvdpa.trace`);
* ``pyvdpa check`` runs conformance and robustness cases against a vhost-user
  back-end (:mod:`pyvdpa.check`);
* ``pyvdpa mgmtdev|dev|stats`` manage a running ``pyvdpa run`` over its
  control socket, as iproute2's ``vdpa`` (:mod:`pyvdpa.manage.client`).

Every failure the user can cause prints one line, ``pyvdpa: error: ...``,
and exits non-zero; tracebacks are for bugs only.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from pyvdpa.app import add_run_arguments, parse_cpus
from pyvdpa.app import run as run_app
from pyvdpa.check.command import add_check_arguments, run_check_command
from pyvdpa.drive.blk import WORKLOADS, run_blk
from pyvdpa.drive.info import DEVICE_TYPES, vhost_user_info, vhost_vdpa_info
from pyvdpa.drive.net import BURST, ENGINES, run_net
from pyvdpa.drive.session import DriverSession, Session
from pyvdpa.drive.vhost_vdpa import VdpaSession
from pyvdpa.errors import ConfigError, PyvdpaError
from pyvdpa.manage.client import leading_options, run_words
from pyvdpa.trace.command import add_trace_arguments, run_trace
from pyvdpa.vdev import parse_size
from pyvdpa.vhost_user.frontend import Frontend
from pyvdpa.vhost_vdpa.device import VhostVdpaDevice

__all__ = ["main"]

EXIT_ERROR = 1
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(message)


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``pyvdpa`` command."""
    parser = _Parser(prog="pyvdpa", description="vDPA and vhost-user toolkit")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="the vDPA example app: serve simulated vDPA devices")
    add_run_arguments(run)

    sub.add_parser(
        "bench",
        add_help=False,
        help="DPDK testpmd against DPDK net_vhost and pyvdpa in one run (pyvdpa bench --help)",
    )

    drive = sub.add_parser(
        "drive", help="drive a vhost-user back-end or a vhost-vdpa device with traffic"
    )
    kinds = drive.add_subparsers(dest="kind", required=True, parser_class=_Parser)
    for name, help_text in (("net", "packets, like testpmd"), ("blk", "block I/O, like fio")):
        p = kinds.add_parser(name, help=help_text)
        _add_target(p)
        p.add_argument(
            "--server",
            action="store_true",
            help="listen on the socket; the back-end connects (vhost-user)",
        )
        p.add_argument("--duration", type=_seconds, default=5.0, help="seconds (default 5)")
        p.add_argument("--packed", action="store_true", help="use the packed ring layout")
        p.add_argument("--no-in-order", action="store_true", help="do not ask VIRTIO_F_IN_ORDER")
        p.add_argument(
            "--inband",
            action="store_true",
            help="kicks and calls as vhost-user messages (VRING_KICK, VRING_CALL), no eventfds "
            "(vhost-user)",
        )
        p.add_argument("--json", action="store_true", help="print one JSON object")
        p.add_argument("--ring-size", type=_positive, default=256, help="descriptors per ring")
        p.add_argument("--memory", type=_size, default=64 << 20, help="shared memory size")
        p.add_argument(
            "--iommu",
            action="store_true",
            help="act as a VMM with an IOMMU: vhost-user: negotiate ACCESS_PLATFORM, give "
            "the device IOVAs and answer its IOTLB misses; vhost-vdpa: IOVAs far from the "
            "guest-physical layout, mappings remapped while traffic runs",
        )
        if name == "net":
            p.add_argument("--mode", choices=("txonly", "rxonly", "io"), default="txonly")
            p.add_argument("--frame-size", type=_positive, default=64)
            p.add_argument("--queues", type=_positive, default=1, help="queue pairs")
            p.add_argument("--no-mrg-rxbuf", action="store_true", help="do not ask MRG_RXBUF")
            p.add_argument(
                "--engine",
                choices=ENGINES,
                default=None,
                help="compiled: ring kernels without the GIL, one thread per queue pair; "
                "python: the reference driver (default: compiled where it covers the mode, "
                "txonly without --inband)",
            )
            p.add_argument(
                "--burst", type=_positive, default=BURST, help=f"frames per burst ({BURST})"
            )
            p.add_argument(
                "--log-all",
                action="store_true",
                help="act as a VMM migrating its guest: negotiate VHOST_F_LOG_ALL, share a "
                "dirty log and check after the run that the back-end logged every page it "
                "wrote (vhost-user; the Python driver)",
            )
            p.add_argument(
                "--cpus",
                type=parse_cpus,
                default=(),
                metavar="LIST",
                help="CPUs to pin the compiled driver's threads to, one per queue pair "
                "(e.g. 1 or 0-1; round robin)",
            )
        else:
            p.add_argument(
                "--remap-idle",
                action="store_true",
                help="with --iommu on vhost-vdpa: remap only while the device holds no "
                "request, the I/O paused until it returns all (for devices that drop the "
                "translations of requests in flight on any IOTLB change)",
            )
            p.add_argument(
                "--engine",
                choices=ENGINES,
                default="python",
                help="python: the driver that runs blk (the compiled driver runs net only)",
            )
            p.add_argument("--rw", choices=WORKLOADS, default="randread")
            p.add_argument("--bs", type=_positive, default=4096)
            p.add_argument("--iodepth", type=_positive, default=32)
            p.add_argument("--size", type=_size, default=None, help="bytes of the disk to use")
            p.add_argument("--verify", action="store_true", help="read back and compare")
            p.add_argument("--ios", type=_positive, default=None, help="stop after N I/Os")

    info = sub.add_parser("info", help="what a vhost-vdpa device or a vhost-user back-end offers")
    _add_target(info)
    info.add_argument(
        "--type",
        choices=tuple(DEVICE_TYPES),
        default=None,
        help="the device type of a vhost-user back-end (vhost-user does not tell it; "
        "inferred from the features otherwise)",
    )
    info.add_argument("--json", action="store_true", help="print one JSON object")

    trace = sub.add_parser(
        "trace", help="relay a vhost-user connection and print every message, decoded"
    )
    add_trace_arguments(trace)

    check = sub.add_parser(
        "check", help="conformance and robustness cases against a vhost-user back-end"
    )
    add_check_arguments(check)
    for obj, help_text in (
        ("mgmtdev", "management devices of a running pyvdpa run (mgmtdev show)"),
        ("dev", "devices of a running pyvdpa run: show, add, del, config show, vstats show"),
        ("stats", "every queue's counters of a running pyvdpa run, as JSON"),
    ):
        p = sub.add_parser(obj, help=help_text)
        p.add_argument("-j", "--json", action="store_true", help="JSON output")
        p.add_argument("-p", "--pretty", action="store_true", help="indented JSON")
        p.add_argument("--control", metavar="PATH", help="control socket of the pyvdpa run")
        p.add_argument("words", nargs=argparse.REMAINDER, help="as iproute2's vdpa takes them")
    return parser


def _add_target(parser: argparse.ArgumentParser) -> None:
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--socket", help="vhost-user socket path")
    target.add_argument(
        "--vhost-vdpa", metavar="PATH", help="vhost-vdpa device (/dev/vhost-vdpa-N)"
    )


def _open_session(args: argparse.Namespace) -> DriverSession:
    if args.vhost_vdpa is not None:
        for option in ("server", "inband", "log_all"):
            if getattr(args, option, False):
                name = option.replace("_", "-")
                raise ConfigError(f"--{name} applies to vhost-user only, not --vhost-vdpa")
        remap_idle = getattr(args, "remap_idle", False)
        if remap_idle and not args.iommu:
            raise ConfigError("--remap-idle applies with --iommu only")
        device = VhostVdpaDevice.open(args.vhost_vdpa)
        return VdpaSession(device, memory_size=args.memory, iommu=args.iommu, remap_idle=remap_idle)
    if getattr(args, "remap_idle", False):
        raise ConfigError("--remap-idle applies to --vhost-vdpa only")
    frontend = Frontend.listen(args.socket) if args.server else Frontend.connect(args.socket)
    return Session(
        frontend,
        memory_size=args.memory,
        inband=args.inband,
        iommu=args.iommu,
        log_all=getattr(args, "log_all", False),
    )


def _cmd_info(args: argparse.Namespace) -> int:
    if args.vhost_vdpa is not None:
        if args.type is not None:
            raise ConfigError("--type applies to vhost-user only: a vhost-vdpa device tells it")
        report = vhost_vdpa_info(args.vhost_vdpa)
    else:
        with Frontend.connect(args.socket) as frontend:
            report = vhost_user_info(frontend, args.socket, args.type)
    if args.json:
        print(json.dumps(report.as_dict()))
    else:
        print(f"{report.transport} {report.path}")
        print("\n".join(report.lines()))
    return 0


def _print_result(figures: dict[str, object], as_json: bool) -> None:
    if as_json:
        print(json.dumps(figures))
        return
    for key, value in figures.items():
        shown = f"{value:,.1f}" if isinstance(value, float) else str(value)
        print(f"  {key:<16} {shown}")


def _cmd_drive(args: argparse.Namespace) -> int:
    if args.kind == "blk" and args.engine == "compiled":
        raise ConfigError("--engine compiled: the compiled driver runs drive net only, not blk")
    progress = not args.json and sys.stdout.isatty()
    with _open_session(args) as session:
        if args.kind == "net":
            net = run_net(
                session,
                mode=args.mode,
                frame_size=args.frame_size,
                queues=args.queues,
                packed=args.packed,
                mrg_rxbuf=not args.no_mrg_rxbuf,
                in_order=not args.no_in_order,
                ring_size=args.ring_size,
                duration=args.duration,
                progress=progress,
                engine=args.engine,
                burst=args.burst,
                cpus=args.cpus,
            )
            figures = net.as_dict()
            unlogged = 0
            if isinstance(session, Session) and session.log_all:
                logged = session.log_coverage()
                unlogged = len(logged.missing)
                figures["log_pages_written"] = logged.written
                figures["log_pages_missing"] = unlogged
                if unlogged:
                    shown = ", ".join(f"{gpa:#x}" for gpa in logged.missing[:8])
                    print(f"pyvdpa: pages written but not logged: {shown}", file=sys.stderr)
            _print_result(figures, args.json)
            return EXIT_ERROR if net.errors or net.rx_bad or unlogged else 0
        blk = run_blk(
            session,
            rw=args.rw,
            bs=args.bs,
            iodepth=args.iodepth,
            size=args.size,
            verify=args.verify,
            duration=args.duration,
            ios=args.ios,
            ring_size=args.ring_size,
            packed=args.packed,
            in_order=not args.no_in_order,
            progress=progress,
        )
        _print_result(blk.as_dict(), args.json)
        return EXIT_ERROR if blk.errors or blk.verify_errors else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pyvdpa`` command."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["bench"]:
        # The benchmark has options of its own, parsed by its own parser.
        from pyvdpa import bench

        return bench.main(arguments[1:])
    try:
        args = build_parser().parse_args(leading_options(arguments))
    except ConfigError as exc:
        print(f"pyvdpa: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="pyvdpa: %(levelname)s: %(message)s")
    try:
        if args.command == "run":
            return run_app(args)
        if args.command == "info":
            return _cmd_info(args)
        if args.command in ("mgmtdev", "dev", "stats"):
            return run_words(
                [args.command, *args.words],
                control=args.control,
                json_output=args.json or args.command == "stats",
                pretty=args.pretty,
            )
        if args.command == "check":
            return run_check_command(args)
        if args.command == "trace":
            return run_trace(args)
        return _cmd_drive(args)
    except ConfigError as exc:
        print(f"pyvdpa: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (PyvdpaError, OSError) as exc:
        print(f"pyvdpa: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
