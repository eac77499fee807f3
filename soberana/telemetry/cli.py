"""`soberana telemetry`: the GPU exporter alone, for hosts that run other engines (or none)."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST

from soberana.log import setup_logging
from soberana.telemetry.collector import GPUCollector
from soberana.telemetry.monitor import TelemetryMonitor

logger = logging.getLogger("soberana.telemetry")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `soberana telemetry`."""
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=9400,
                        help="port to bind (default 9400, dcgm-exporter's); 0 picks a free one")
    parser.add_argument("--interval", type=float, default=5.0,
                        help="seconds between GPU polls (default 5)")
    parser.add_argument("--hostname", default=None,
                        help="the Hostname label (default: this host's name)")


def serve(monitor: TelemetryMonitor, host: str, port: int,
          hostname: str | None = None) -> ThreadingHTTPServer:
    """An HTTP server answering GET /metrics (and /health) from the monitor's latest poll."""
    collector = GPUCollector(monitor, hostname)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path.split("?")[0] == "/metrics":
                body, ctype, code = collector.render(), CONTENT_TYPE_LATEST, 200
            elif self.path == "/health":
                body, ctype, code = b'{"status":"ok"}', "application/json", 200
            else:
                body, ctype, code = b"not found\n", "text/plain", 404
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # scrapes every few seconds: no access lines
            pass

    return ThreadingHTTPServer((host, port), Handler)


def run(args: argparse.Namespace) -> int:
    """Export until SIGTERM/SIGINT; exit 2 on bad arguments."""
    setup_logging()
    if args.interval <= 0:
        logger.error("--interval must be > 0 seconds; got %s", args.interval)
        return 2
    monitor = TelemetryMonitor(interval_s=args.interval)
    if not monitor.available:
        logger.warning("no NVIDIA (NVML) or AMD (amdsmi) GPU found: /metrics will hold no GPU series")
    monitor.start()
    try:
        httpd = serve(monitor, args.host, args.port, args.hostname)
    except OSError as exc:
        logger.error("cannot listen on %s:%d: %s", args.host, args.port, exc.strerror)
        monitor.stop()
        return 2
    host, port = httpd.server_address[:2]
    logger.info("GPU telemetry for %d device(s) at http://%s:%d/metrics",
                len(monitor.latest), host, port)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    stop.wait()
    httpd.shutdown()
    monitor.stop()
    return 0
