"""A real stack on loopback: `soberana serve` (demo model, KV warehouse tiers, JSON logs), the
gateway in front of it, the GPU exporter over a replayed NVML, and a real Prometheus scraping
all three with deploy/prometheus's rules loaded."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

from tests.deploy.otlp_receiver import OTLPReceiver
from tests.gateway.helpers import REPO, read_line, stop_process, tenant
from tests.server.helpers import ServerProcess

GATEWAY_KEY = "sk-ops"
LIMITED_KEY = "sk-limited"  # one request a minute: the second is refused
MODEL = "soberana-demo"
BROKEN_MODEL = "broken"


@dataclass
class Stack:
    server: ServerProcess
    gateway_url: str
    exporter_url: str
    prometheus_url: str
    tmp: Path
    traces: OTLPReceiver
    procs: list[subprocess.Popen] = field(default_factory=list)

    def chat(self, content: str, request_id: str | None = None, stream: bool = False,
             key: str = GATEWAY_KEY, model: str = MODEL, traceparent: str | None = None,
             **fields) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"}
        if traceparent:
            headers["traceparent"] = traceparent
        if request_id:
            headers["X-Request-Id"] = request_id
        body = {"model": model, "messages": [{"role": "user", "content": content}],
                "max_tokens": 8, "stream": stream, **fields}
        return httpx.post(f"{self.gateway_url}/v1/chat/completions", json=body, headers=headers,
                          timeout=120)

    def query(self, expr: str) -> list[dict]:
        """An instant PromQL query; raises on a query error (a typo in a dashboard)."""
        r = httpx.get(f"{self.prometheus_url}/api/v1/query", params={"query": expr}, timeout=30)
        body = r.json()
        if body.get("status") != "success":
            raise AssertionError(f"query failed: {expr}\n{body}")
        return body["data"]["result"]

    def wait_for(self, expr: str, timeout: float = 60.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = self.query(expr)
            if result:
                return result
            time.sleep(0.5)
        raise TimeoutError(f"no series for {expr} within {timeout}s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_stack(tmp: Path) -> Stack:
    procs: list[subprocess.Popen] = []
    traces = OTLPReceiver()
    server = ServerProcess(
        tmp / "serve.log", "--log-format", "json", "--stats-log-interval", "1",
        "--otlp-traces-endpoint", traces.url,
        "--kv-offload-gb", "0.05", "--kv-disk-dir", str(tmp / "kv-disk"), "--kv-disk-gb", "0.1",
        api_key=None,
    )
    try:
        # The uvicorn access log stays on here: the tests check probes are filtered from it.
        server.args.remove("--disable-uvicorn-access-log")
        server.start()
        exporter = _start_line_printer(
            [sys.executable, "-m", "tests.telemetry.fake_exporter"], tmp / "exporter.log", procs)
        # A second host whose one GPU is failing in every way the GPU alerts watch for.
        faulty = _start_line_printer(
            [sys.executable, "-m", "tests.telemetry.fake_exporter", "--recording", "l4_faulty",
             "--hostname", "gpu-host-faulty"], tmp / "exporter-faulty.log", procs)
        gateway_cfg = {
            "health": {"interval_s": 0.5, "timeout_s": 2.0, "eject_after": 3, "cooldown_s": 5.0,
                       "metrics_interval_s": 0.5},
            "timeouts": {"connect_s": 2.0, "first_byte_s": 120.0, "idle_s": 120.0},
            "models": {
                MODEL: {"backends": [{"name": "engine-0", "endpoint": server.url,
                                      "kind": "soberana", "model": MODEL, "privacy": "onprem"}]},
                # A real HTTP server that is no model server (the GPU exporter answers POST with
                # 501): the gateway's error, retry and ejection series get real events.
                BROKEN_MODEL: {"backends": [{"name": "not-a-model-server", "endpoint": exporter,
                                             "kind": "soberana", "model": BROKEN_MODEL,
                                             "privacy": "onprem"}]},
            },
            "tenants": [tenant("acme", GATEWAY_KEY),
                        tenant("limited", LIMITED_KEY, requests_per_minute=1)],
        }
        (tmp / "gateway.yaml").write_text(yaml.safe_dump(gateway_cfg))
        gateway = _start_line_printer(
            [sys.executable, "-m", "soberana.cli", "gateway", "--config", str(tmp / "gateway.yaml"),
             "--host", "127.0.0.1", "--port", "0", "--log-level", "INFO", "--log-format", "json",
             "--otlp-traces-endpoint", traces.url],
            tmp / "gateway.log", procs)
        prometheus = _start_prometheus(tmp, server.url, gateway, [exporter, faulty], procs)
        return Stack(server, gateway, exporter, prometheus, tmp, traces, procs)
    except BaseException:
        stop_stack_procs(server, procs)
        traces.close()
        raise


def stop_stack(stack: Stack) -> None:
    stop_stack_procs(stack.server, stack.procs)
    stack.traces.close()


def stop_stack_procs(server: ServerProcess, procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        stop_process(proc)
    server.stop()


def _start_line_printer(args: list[str], log_path: Path, procs: list) -> str:
    """Start a process that prints `listening on URL` on stdout; return the URL."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log, text=True, cwd=REPO)
    procs.append(proc)
    line = read_line(proc, 60)
    if "listening on" not in line:
        raise AssertionError(f"{args} did not start: {line!r}\n{log_path.read_text()}")
    return line.split()[-1].rstrip("/")


def _start_prometheus(tmp: Path, server: str, gateway: str, exporters: list[str],
                      procs: list) -> str:
    binary = shutil.which("prometheus")
    assert binary, "prometheus not installed (Debian: apt-get install prometheus)"
    rules = REPO / "deploy" / "prometheus"
    host = lambda url: url.split("://", 1)[1]  # noqa: E731
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules / "alerts.yaml"), str(rules / "slo.yaml")],
        "scrape_configs": [
            {"job_name": "soberana-engine", "static_configs": [{"targets": [host(server)]}]},
            {"job_name": "soberana-gateway", "static_configs": [{"targets": [host(gateway)]}]},
            {"job_name": "gpu", "static_configs": [{"targets": [host(e) for e in exporters]}]},
        ],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    with open(tmp / "prometheus.log", "w") as log:
        proc = subprocess.Popen(
            [binary, f"--config.file={tmp / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT)
    procs.append(proc)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                return url
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.3)
    raise AssertionError(f"prometheus did not start:\n{(tmp / 'prometheus.log').read_text()}")
