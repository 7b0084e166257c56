"""Per-queue counters as OpenMetrics text, served over HTTP for Prometheus.

Theory of operation (OpenMetrics 1.0 text format; Prometheus exposition):
:func:`render_openmetrics` turns the ``stats`` result of the manager into
one ``counter`` family per queue counter, ``pyvdpa_queue_<counter>_total``,
with a sample per queue labelled ``device``, ``mgmtdev`` and ``queue`` (and
``queue_type``), and a ``pyvdpa_devices`` gauge; it is sans I/O.
:class:`MetricsServer` answers ``GET /metrics`` with it from a standard
library HTTP server on its own thread, by default on the loopback address
only: the counters are not secret, but nothing else should reach the
process.
"""

from __future__ import annotations

import argparse
import http.server
import socket
import threading
from collections.abc import Callable
from typing import Final

from pyvdpa.errors import ConfigError

__all__ = ["CONTENT_TYPE", "MetricsServer", "parse_address", "render_openmetrics"]

#: The OpenMetrics text content type.
CONTENT_TYPE: Final = "application/openmetrics-text; version=1.0.0; charset=utf-8"

_LABEL_KEYS: Final = ("queue_index", "queue_type")


def parse_address(text: str) -> tuple[str, int]:
    """``ADDR:PORT`` or ``PORT`` (loopback) as ``(host, port)`` (``argparse`` type)."""
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host = "127.0.0.1"
    host = host.strip("[]") or "127.0.0.1"
    try:
        port = int(port_text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid address {text!r} (ADDR:PORT)") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} out of range 0..65535")
    return host, port


def _label(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_openmetrics(stats: dict[str, object]) -> str:
    """The ``stats`` result as OpenMetrics text (ends with ``# EOF``)."""
    families: dict[str, list[str]] = {}
    devices = stats.get("devices", {})
    assert isinstance(devices, dict)
    for name, device in devices.items():
        for queue in device["queues"]:
            labels = (
                f'device="{_label(name)}",mgmtdev="{_label(device["mgmtdev"])}",'
                f'queue="{queue["queue_index"]}",queue_type="{_label(queue["queue_type"])}"'
            )
            for counter, value in queue.items():
                if counter in _LABEL_KEYS or not isinstance(value, int):
                    continue
                families.setdefault(counter, []).append(
                    f"pyvdpa_queue_{counter}_total{{{labels}}} {value}"
                )
    lines = [
        "# TYPE pyvdpa_devices gauge",
        "# HELP pyvdpa_devices Devices this pyvdpa run serves.",
        f"pyvdpa_devices {len(devices)}",
    ]
    for counter, samples in families.items():
        lines.append(f"# TYPE pyvdpa_queue_{counter} counter")
        lines.append(f"# HELP pyvdpa_queue_{counter} Per-queue {counter} (dev vstats show).")
        lines.extend(samples)
    lines.append("# EOF")
    return "\n".join(lines) + "\n"


class MetricsServer:
    """``GET /metrics`` on ``address`` from ``stats`` (the manager's :meth:`stats`)."""

    def __init__(self, address: tuple[str, int], stats: Callable[[], dict[str, object]]) -> None:
        def render() -> str:
            return render_openmetrics(stats())

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404, "try /metrics")
                    return
                try:
                    body = render().encode()
                except Exception as exc:  # a device went away mid-read: say so, go on
                    self.send_error(500, str(exc))
                    return
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                """Quiet: scrapes come every few seconds."""

        class Server(http.server.ThreadingHTTPServer):
            address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET

        try:
            self._httpd = Server(address, Handler)
        except OSError as exc:
            raise ConfigError(f"--metrics {address[0]}:{address[1]}: {exc.strerror}") from None
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="pyvdpa-metrics", daemon=True
        )

    @property
    def address(self) -> str:
        """``host:port`` served (the port the system chose for port 0)."""
        host, port = self._httpd.server_address[:2]
        return f"{host!s}:{port}"

    def start(self) -> None:
        """Serve on a thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()
