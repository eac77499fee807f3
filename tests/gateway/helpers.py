"""Helpers for gateway tests: config builders, a handle on a running gateway, polling."""

from __future__ import annotations

import json
import select
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from soberana.gateway.tenants import hash_key
from tests.fake_openai import FakeOpenAI

REPO = Path(__file__).resolve().parents[2]
FAKE_UPSTREAM_SCRIPT = Path(__file__).parents[1] / "fake_openai.py"

# Fast health settings so tests observe ejection and recovery within a second or two.
TEST_HEALTH = {
    "interval_s": 0.2,
    "timeout_s": 0.5,
    "unhealthy_after": 1,
    "eject_after": 2,
    "cooldown_s": 1.0,
    "metrics_interval_s": 0.2,
}


def backend(name: str, upstream: FakeOpenAI | str, **fields) -> dict:
    """A backend entry for gateway.yaml pointing at a test upstream."""
    endpoint = upstream if isinstance(upstream, str) else upstream.url
    entry = {
        "name": name,
        "endpoint": endpoint,
        "kind": "vllm",
        "model": f"upstream-{name}",
        "privacy": "onprem",  # test upstreams listen on loopback
    }
    entry.update(fields)
    return entry


def tenant(name: str, key: str, **fields) -> dict:
    """A tenant entry whose API key is `key` (stored hashed)."""
    entry = {"name": name, "key_sha256": [hash_key(key)]}
    entry.update(fields)
    return entry


def config(models: dict[str, list[dict]], tenants: list[dict], **sections) -> dict:
    """A whole gateway.yaml as a dict."""
    doc = {
        "health": dict(TEST_HEALTH),
        "timeouts": {"connect_s": 1.0, "first_byte_s": 5.0, "idle_s": 5.0},
        "metrics": {"tenant_labels": True},  # tests read per-tenant series
        "models": {name: {"backends": backends} for name, backends in models.items()},
        "tenants": tenants,
    }
    for key, value in sections.items():
        doc[key] = {**doc.get(key, {}), **value}
    return doc


@dataclass
class Gateway:
    """A running `soberana gateway` process."""

    url: str
    proc: subprocess.Popen
    config_path: Path
    log_path: Path

    def post(self, path: str, key: str | None, body: dict, **kwargs) -> httpx.Response:
        headers = kwargs.pop("headers", {})
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        return httpx.post(self.url + path, json=body, headers=headers, timeout=30, **kwargs)

    def chat(self, key: str, model: str = "m", content: str = "hello", **fields) -> httpx.Response:
        headers = fields.pop("headers", {})
        body = {"model": model, "messages": [{"role": "user", "content": content}], **fields}
        return self.post("/v1/chat/completions", key, body, headers=headers)

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """Every sample on /metrics, keyed by (name, sorted labels)."""
        text = httpx.get(self.url + "/metrics", timeout=10).raise_for_status().text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels` (0 if none)."""
        return sum(
            value
            for (sample, sample_labels), value in self.metrics().items()
            if sample == name and labels.items() <= dict(sample_labels).items()
        )

    def write_config(self, doc: dict) -> None:
        self.config_path.write_text(yaml.safe_dump(doc))

    def reload(self) -> None:
        self.proc.send_signal(signal.SIGHUP)

    def log(self) -> str:
        return self.log_path.read_text()


def concurrently(call, n: int) -> list:
    """`call(i)` for i in 0..n-1 from n threads released together; results in order."""
    barrier = threading.Barrier(n)

    def run(i: int):
        barrier.wait()
        return call(i)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(run, range(n)))


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    """Poll `predicate` until it returns a truthy value; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def stop_process(proc: subprocess.Popen) -> None:
    """Terminate, then kill if it does not exit in time."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    if proc.stdout:
        proc.stdout.close()


def read_line(proc: subprocess.Popen, timeout: float) -> str:
    """One line of the process's stdout, or '' after `timeout` seconds or at exit."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline() if ready else ""


@dataclass
class Outcome:
    """One request of the load test, as the client saw it."""

    started: float
    first_byte: float | None = None
    status: int | None = None
    complete: bool = False  # ended normally ([DONE] for streams, a JSON body otherwise)
    error_event: bool = False  # a stream ended with the gateway's SSE error event
    exception: str | None = None


def run_load(
    url: str, key: str, workers: int, seconds: float, extra: dict | None = None, timeout: float = 30
) -> list[Outcome]:
    """Workers alternate streaming and plain chat requests back to back for `seconds`."""
    outcomes: list[Outcome] = []
    stop_at = time.monotonic() + seconds

    def worker(w: int) -> None:
        with httpx.Client(timeout=timeout, headers={"Authorization": f"Bearer {key}"}) as client:
            i = 0
            while time.monotonic() < stop_at:
                stream = (w + i) % 2 == 0
                body = {
                    "model": "m",
                    "stream": stream,
                    "messages": [{"role": "user", "content": f"w{w} i{i}"}],
                    **(
                        extra or {}
                    ),  # e.g. max_tokens: real replicas otherwise run to max_model_len
                }
                outcome = Outcome(started=time.monotonic())
                outcomes.append(outcome)
                try:
                    with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
                        outcome.status = r.status_code
                        text = ""
                        for chunk in r.iter_text():
                            if outcome.first_byte is None:
                                outcome.first_byte = time.monotonic()
                            text += chunk
                    if stream:
                        outcome.error_event = '"upstream_stream_interrupted"' in text
                        outcome.complete = (
                            text.endswith("data: [DONE]\n\n") and not outcome.error_event
                        )
                    else:
                        outcome.complete = r.status_code == 200 and "choices" in json.loads(text)
                except Exception as e:  # a failure the test must see, not a crash of the worker
                    outcome.exception = repr(e)
                i += 1

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + timeout + 30)
    return outcomes
