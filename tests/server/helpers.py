"""A real `soberana serve` process on loopback for the server tests, always cleaned up."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

API_KEY = "test-key"
ALLOWED_ORIGIN = "https://app.example.org"  # the shared server's one CORS origin
# Small and short so the whole suite stays within a few minutes on 2 shared cores.
BASE_ARGS = ["--max-model-len", "256", "--kv-cache-gb", "0.05", "--disable-uvicorn-access-log"]


class ServerProcess:
    """`python -m soberana.cli serve MODEL` (the demo model unless `model` names another) in its
    own process group."""

    def __init__(self, log_path: Path, *extra_args: str, api_key: str | None = API_KEY,
                 model: str = "demo") -> None:
        self.log_path = log_path
        args = [sys.executable, "-m", "soberana.cli", "serve", model, "--port", "0", *BASE_ARGS]
        if api_key is not None:
            args += ["--api-key", api_key]
        self.args = args + list(extra_args)
        self.api_key = api_key
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self, wait_ready: bool = True, timeout: float = 180.0) -> ServerProcess:
        """Start the server; return once it listens (and, by default, once /health is 200)."""
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.log_path, "wb") as log:
            # A new session: teardown can kill the server and its engine process together.
            self.proc = subprocess.Popen(
                self.args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        match = self._wait_log(r"listening on (http://127\.0\.0\.1:\d+)", deadline)
        self.url = match.group(1)
        if wait_ready:
            self.wait_healthy(deadline)
        return self

    def wait_healthy(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not healthy in time; log:\n{self.log()}")

    def _wait_log(self, pattern: str, deadline: float) -> re.Match:
        while time.monotonic() < deadline:
            found = re.search(pattern, self.log())
            if found:
                return found
            self._check_alive()
            time.sleep(0.1)
        raise TimeoutError(f"{pattern!r} not in the server log in time:\n{self.log()}")

    def _check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"server exited with {self.proc.returncode}; log:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def engine_pid(self) -> int:
        """The engine-core process, as the server logs it."""
        return int(re.search(r"engine core process started \(pid (\d+)\)", self.log()).group(1))

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def post(self, path: str, timeout: float = 60.0, **kwargs) -> httpx.Response:
        headers = {**self.headers, **kwargs.pop("headers", {})}
        return httpx.post(f"{self.url}{path}", headers=headers, timeout=timeout, **kwargs)

    def get(self, path: str, timeout: float = 30.0, **kwargs) -> httpx.Response:
        headers = {**self.headers, **kwargs.pop("headers", {})}
        return httpx.get(f"{self.url}{path}", headers=headers, timeout=timeout, **kwargs)

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics, parsed by prometheus_client, keyed `name{labels}`."""
        text = httpx.get(f"{self.url}/metrics", timeout=30).text
        samples = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                samples[f"{s.name}{{{labels}}}"] = s.value
        return samples

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL the whole process group; never leaves a process behind."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the engine process shares the group
        except ProcessLookupError:
            pass
        if self.proc.poll() is None:
            self.proc.wait(timeout=10)


def metric(samples: dict[str, float], name: str, **labels: str) -> float:
    """One sample's value; `model_name` and `engine` labels are implied for the demo model."""
    labels = {"engine": "0", "model_name": "soberana-demo", **labels}
    key = name + "{" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())) + "}"
    return samples[key]


def wait_until(predicate, timeout: float, interval: float = 0.1) -> bool:
    """Poll `predicate` until true or `timeout` seconds pass; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)
