"""Against a real HTTP server that misbehaves: failures are counted by type; the run completes."""

from __future__ import annotations

import csv
import json
import socket

from soberana.bench.request import ERROR_TYPES

ALL_FAULTS = [
    "ok",
    "http500",
    "http429",
    "disconnect",
    "drop",
    "malformed",
    "error_event",
    "truncated",
    "stall",
    "no_usage",
]


def test_every_failure_is_counted_under_its_type_and_the_run_completes(
    fake_endpoint, run_bench, tmp_path
):
    url = fake_endpoint(faults=",".join(ALL_FAULTS), ttft=0.005, itl=0.001)
    # 3 full cycles of the 10 faults; the stalled requests end at the 1 s timeout.
    code, out, err = run_bench(
        "--base-url",
        url,
        "--num-prompts",
        "30",
        "--concurrency",
        "5",
        "--timeout",
        "1",
        "--input-len",
        "8",
        "--output-len",
        "6",
        "--output-dir",
        str(tmp_path),
    )
    assert code == 0, err
    summary = json.loads((tmp_path / "summary.json").read_text())
    requests = summary["runs"][0]["requests"]
    assert requests["errors"] == {
        "http_500": 3,
        "http_429": 3,
        "disconnected": 6,  # closed before the response (3) and in the middle of the stream (3)
        "malformed_sse": 3,
        "stream_error": 3,
        "incomplete_stream": 3,
        "timeout": 3,
    }
    assert requests == {"sent": 30, "completed": 6, "failed": 24, "errors": requests["errors"]}
    assert "24 failed" in out and "http_500: 3" in out

    with (tmp_path / "requests.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 30
    by_type: dict[str, list[dict]] = {}
    for row in rows:
        by_type.setdefault(row["error_type"], []).append(row)
    assert {r["status"] for r in by_type["http_500"]} == {"500"}
    assert all("injected fault http500" in r["error_message"] for r in by_type["http_500"])
    assert all(r["ttft_ms"] == "" for r in by_type["http_429"])
    assert {r["status"] for r in by_type["timeout"]} == {"0"}
    assert all("injected error event" in r["error_message"] for r in by_type["stream_error"])
    # Successful requests without usage are counted by the (approximate) tokenizer instead.
    ok = by_type[""]
    assert sorted(r["token_source"] for r in ok) == ["approximate"] * 3 + ["usage"] * 3
    assert all(r["output_tokens"] == "6" for r in ok)


def test_error_types_reported_are_the_documented_ones(fake_endpoint, run_bench, tmp_path):
    url = fake_endpoint(faults=",".join(ALL_FAULTS))
    code, _, err = run_bench(
        "--base-url",
        url,
        "--num-prompts",
        "10",
        "--timeout",
        "1",
        "--input-len",
        "4",
        "--output-len",
        "3",
        "--output-dir",
        str(tmp_path),
    )
    assert code == 0, err
    errors = json.loads((tmp_path / "summary.json").read_text())["runs"][0]["requests"]["errors"]
    documented = {k for k in ERROR_TYPES if not k.startswith("http_")}
    assert {e for e in errors if not e.startswith("http_")} <= documented


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def test_an_unreachable_server_fails_every_request_and_exits_nonzero(run_bench):
    url = f"http://127.0.0.1:{closed_port()}/v1"
    code, out, err = run_bench(
        "--base-url",
        url,
        "--model",
        "m",
        "--num-prompts",
        "4",
        "--input-len",
        "4",
        "--no-server-metrics",
    )
    assert code == 1
    assert "4 failed (connection_error: 4)" in out
    assert "no request succeeded" in err and "connection_error" in err


def test_without_model_an_unreachable_server_is_a_clear_error(run_bench):
    code, _, err = run_bench(
        "--base-url", f"http://127.0.0.1:{closed_port()}", "--num-prompts", "1"
    )
    assert code == 1
    assert "could not list models" in err and "pass --model" not in err


def test_a_stream_of_data_lines_that_are_not_openai_chunks_is_malformed(fake_endpoint, run_bench):
    url = fake_endpoint(faults="malformed")
    code, out, _ = run_bench(
        "--base-url", url, "--num-prompts", "2", "--input-len", "4", "--endpoint", "chat"
    )
    assert code == 1
    assert "(malformed_sse: 2)" in out
