"""`soberana telemetry`'s real HTTP exporter over the replayed NVML (for Prometheus tests).

Prints `listening on http://HOST:PORT` once serving. The recording's pid 4242 plays the
Soberana process, so the VRAM headroom series exist as they do on a GPU host's `serve`.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from soberana.telemetry.cli import serve
from soberana.telemetry.monitor import TelemetryMonitor
from soberana.telemetry.nvml import NVMLReader
from tests.telemetry.fake_nvml import FakeNVML


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--recording", default="h100_sxm_x2")
    parser.add_argument("--hostname", default="gpu-host-1")
    args = parser.parse_args()
    monitor = TelemetryMonitor([NVMLReader(FakeNVML(args.recording))], interval_s=1.0,
                               own_pids=lambda: {4242}, threshold=0.9)
    monitor.start()
    httpd = serve(monitor, "127.0.0.1", args.port, hostname=args.hostname)
    print(f"listening on http://127.0.0.1:{httpd.server_address[1]}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    stop.wait()
    httpd.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
