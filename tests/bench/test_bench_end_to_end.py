"""Every workload against a real `soberana serve` (the demo model) on loopback."""

from __future__ import annotations

import csv
import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from soberana.bench.schema import validate_summary
from tests.bench.bench_helpers import REPO, stop_process

STARTUP_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[str]:
    """`soberana serve` with the demo model, a small context and few sequences; its base URL."""
    port = free_port()
    log = (tmp_path_factory.mktemp("serve") / "serve.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "soberana.cli",
            "serve",
            "demo",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--max-model-len",
            "512",
            "--max-num-seqs",
            "8",
            "--shutdown-timeout",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"soberana serve did not become healthy; see {log.name}")
            time.sleep(0.5)
        yield url + "/v1"
    finally:
        stop_process(proc)
        log.close()


def summary_of(out_dir: Path) -> dict:
    """summary.json of a finished run, validated against its schema, with its histogram."""
    summary = json.loads((out_dir / "summary.json").read_text())
    validate_summary(summary)
    assert (out_dir / "latency_hist.png").stat().st_size > 1000
    return summary


def rows(out_dir: Path) -> list[dict]:
    with (out_dir / "requests.csv").open() as f:
        return list(csv.DictReader(f))


def test_random_workload_sends_exact_lengths_and_never_hits_the_prefix_cache(server, tmp_path):
    # The real command, in its own process (the other tests run it in this one: faster).
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "soberana.cli",
            "bench",
            "--no-progress",
            "--output-dir",
            str(tmp_path),
            "--base-url",
            server,
            "--num-prompts",
            "6",
            "--concurrency",
            "3",
            "--input-len",
            "24",
            "--output-len",
            "6",
            "--ignore-eos",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "6 sent, 6 completed, 0 failed" in proc.stdout
    summary = summary_of(tmp_path)
    assert summary["command_line"][1:3] == ["bench", "--no-progress"]
    # The tokenizer is found through the server's /v1/models `root`: lengths are exact.
    assert summary["workload"]["exact_lengths"] is True
    assert summary["target"]["model"] == "soberana-demo"
    run = summary["runs"][0]
    assert run["requests"] == {"sent": 6, "completed": 6, "failed": 0, "errors": {}}
    for row in rows(tmp_path):
        assert row["prompt_tokens"] == "24" and row["output_tokens"] == "6"
        assert row["token_source"] == "usage" and row["finish_reason"] == "length"
        assert len(row["itl_ms"].split(";")) >= 1
    assert run["tokens"]["prompt"] == 144 and run["tokens"]["output"] == 36
    assert run["server_metrics"]["prefix_cache_hits"] == 0  # every prompt distinct
    assert run["server_metrics"]["prefix_cache_queries"] >= 144
    assert run["latency_ms"]["ttft"]["count"] == 6


def run_in_process(run_bench, out_dir: Path, *args: str) -> dict:
    code, out, err = run_bench("--output-dir", str(out_dir), *args)
    assert code == 0, out + err
    return summary_of(out_dir)


def test_prefix_workload_hits_the_servers_prefix_cache(server, run_bench, tmp_path):
    summary = run_in_process(
        run_bench,
        tmp_path,
        "--base-url",
        server,
        "--workload",
        "prefix",
        "--num-prefixes",
        "2",
        "--suffixes-per-prefix",
        "3",
        "--prefix-len",
        "64",
        "--input-len",
        "8",
        "--output-len",
        "2",
        "--ignore-eos",
        "--concurrency",
        "1",
    )
    run = summary["runs"][0]
    assert run["requests"]["completed"] == 6
    assert {r["prompt_tokens"] for r in rows(tmp_path)} == {"72"}
    # Sequential requests: all but the first of each prefix find its full blocks cached.
    assert run["server_metrics"]["prefix_cache_hits"] >= 4 * 48
    assert run["server_metrics"]["prefix_cache_hit_rate"] > 0.5
    assert run["tokens"]["cached_prompt"] >= 4 * 48


def test_multiturn_chat_grows_each_conversation_by_its_answers(server, run_bench, tmp_path):
    summary = run_in_process(
        run_bench,
        tmp_path,
        "--base-url",
        server,
        "--endpoint",
        "chat",
        "--workload",
        "multiturn",
        "--num-users",
        "2",
        "--num-rounds",
        "2",
        "--system-prompt-len",
        "40",
        "--input-len",
        "8",
        "--output-len",
        "4",
        "--ignore-eos",
        "--concurrency",
        "2",
    )
    run = summary["runs"][0]
    assert run["requests"]["completed"] == 4
    by_user: dict[str, dict[str, int]] = {}
    for row in rows(tmp_path):
        by_user.setdefault(row["user"], {})[row["turn"]] = int(row["prompt_tokens"])
    assert sorted(by_user) == ["0", "1"]
    for turns in by_user.values():
        # Round 2 = round 1's prompt + its 4-token answer + a new 8-token question (+ template).
        assert turns["1"] >= turns["0"] + 4 + 8
    # The shared system prompt and each first round are reused from the cache.
    assert run["server_metrics"]["prefix_cache_hits"] > 0


def test_file_workload_sends_the_datasets_prompts(server, run_bench, tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text(
        json.dumps({"prompt": "The engine reads a prompt", "max_tokens": 3})
        + "\n"
        + json.dumps(
            {
                "conversations": [
                    {"from": "human", "value": "Hello! How are you today?"},
                    {"from": "gpt", "value": "I am fine, thank you."},
                ]
            }
        )
        + "\n"
    )
    out = tmp_path / "out"
    summary = run_in_process(
        run_bench,
        out,
        "--base-url",
        server,
        "--workload",
        "file",
        "--dataset-path",
        str(data),
        "--endpoint",
        "chat",
        "--ignore-eos",
    )
    run = summary["runs"][0]
    assert run["requests"]["completed"] == 2
    assert sorted(int(r["max_tokens"]) for r in rows(out)) == sorted(
        int(r["output_tokens"]) for r in rows(out)
    )
