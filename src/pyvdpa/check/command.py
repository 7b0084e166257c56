"""``pyvdpa check``: its arguments and what it runs.

``pyvdpa check --socket PATH [--type net|blk] [--json]`` runs every case
against one back-end, printing one line per case as it ends (on standard
error with ``--json``, whose single JSON object goes to standard output);
it exits 1 when a case fails.  ``pyvdpa check --report NAME.json ...``
renders saved ``--json`` outputs side by side as Markdown, each column
named after its file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pyvdpa.check.model import CaseResult, Verdict
from pyvdpa.check.report import case_line, load_report, render_markdown, summary_line
from pyvdpa.check.runner import run_check
from pyvdpa.drive.info import DEVICE_TYPES
from pyvdpa.errors import ConfigError

__all__ = ["add_check_arguments", "run_check_command"]

EXIT_FAILED = 1


def add_check_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``pyvdpa check``."""
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--socket", help="vhost-user socket of the back-end to check")
    what.add_argument(
        "--report",
        nargs="+",
        metavar="JSON",
        help="render saved --json results (one file per back-end, named NAME.json) as Markdown",
    )
    parser.add_argument(
        "--type",
        choices=tuple(DEVICE_TYPES),
        default=None,
        help="device type (vhost-user does not tell it; inferred from the features otherwise)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--timeout", type=float, default=5.0, help="seconds any answer may take (default 5)"
    )
    parser.add_argument("--output", help="with --report: write the Markdown to this file")
    parser.add_argument(
        "--generated-by",
        metavar="COMMAND",
        default=None,
        help="with --report: the command line shown at the top of the page",
    )


def run_check_command(args: argparse.Namespace) -> int:
    """Run ``pyvdpa check``; return the exit status."""
    if args.report is not None:
        named = [load_report(path) for path in args.report]
        command = args.generated_by or "pyvdpa check --report " + " ".join(args.report)
        page = render_markdown(named, command) + "\n"
        if args.output:
            Path(args.output).write_text(page)
        else:
            sys.stdout.write(page)
        return 0
    if args.timeout <= 0:
        raise ConfigError(f"--timeout must be positive: {args.timeout}")
    stream = sys.stderr if args.json else sys.stdout

    def progress(number: int, total: int, result: CaseResult) -> None:
        print(case_line(number, total, result), file=stream, flush=True)

    device = None if args.type is None else DEVICE_TYPES[args.type]
    report = run_check(args.socket, device, timeout=args.timeout, progress=progress)
    if args.json:
        print(json.dumps(report.as_dict()))
    print(summary_line(report), file=stream)
    return EXIT_FAILED if report.counts()[Verdict.FAIL.value] else 0
