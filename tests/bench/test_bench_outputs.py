"""What a run leaves behind: summary.json (schema-valid), requests.csv, plots, and `compare`."""

from __future__ import annotations

import csv
import json

import jsonschema
import pytest

from soberana.bench.config import Target
from soberana.bench.report import CSV_COLUMNS
from soberana.bench.request import RequestSpec
from soberana.bench.schema import SUMMARY_SCHEMA, validate_summary

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def is_png(path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_MAGIC


def test_a_run_writes_csv_json_and_histograms(fake_endpoint, run_bench, tmp_path):
    url = fake_endpoint(ttft=0.01, itl=0.001)
    code, out, err = run_bench(
        "--base-url",
        url,
        "--num-prompts",
        "20",
        "--concurrency",
        "4",
        "--input-len",
        "16",
        "--output-len",
        "5",
        "--slo",
        "ttft=1000,tpot=500",
        "--api-key",
        "sk-secret",
        "--output-dir",
        str(tmp_path),
    )
    assert code == 0, err
    summary = json.loads((tmp_path / "summary.json").read_text())
    validate_summary(summary)
    assert summary["tool"] == {"name": "soberana bench", "version": "0.1.0"}
    assert summary["target"]["model"] == "fake-model"  # taken from GET /v1/models
    assert summary["target"]["base_url"] == url
    assert "sk-secret" not in json.dumps(summary)  # the key never lands in a shareable file
    run = summary["runs"][0]
    assert run["load"] == {
        "mode": "closed",
        "concurrency": 4,
        "request_rate": None,
        "burstiness": 1.0,
    }
    assert run["requests"]["completed"] == 20
    assert run["tokens"] == {
        "prompt": 320,
        "output": 100,
        "cached_prompt": None,
        "sources": {"usage": 20},
    }
    assert run["goodput"]["good_requests"] == 20
    assert set(run["latency_ms"]["ttft"]) >= {"mean", "p50", "p90", "p95", "p99"}

    with (tmp_path / "requests.csv").open() as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == CSV_COLUMNS
    assert len(rows) == 20 and len({r["request_id"] for r in rows}) == 20
    assert all(len(r["itl_ms"].split(";")) == 4 for r in rows)  # 5 tokens, 4 gaps
    assert all(float(r["ttft_ms"]) >= 10.0 for r in rows)
    assert is_png(tmp_path / "latency_hist.png")
    for header in ("TTFT", "TPOT", "ITL", "E2E", "p50", "p95", "p99", "Goodput"):
        assert header in out


def test_server_metrics_and_queue_time_are_read_from_the_server(fake_endpoint, run_bench, tmp_path):
    # The fake server reports a 50% prefix-cache hit rate, its delay as queue time (header
    # x-queue-time and the vllm:request_queue_time_seconds histogram), and KV usage as
    # requests in flight / 64.
    url = fake_endpoint(ttft=0.3)
    code, out, err = run_bench(
        "--base-url",
        url,
        "--num-prompts",
        "40",
        "--concurrency",
        "8",
        "--input-len",
        "10",
        "--output-len",
        "2",
        "--output-dir",
        str(tmp_path),
    )
    assert code == 0, err
    run = json.loads((tmp_path / "summary.json").read_text())["runs"][0]
    server = run["server_metrics"]
    assert server["prefix_cache_queries"] == 400 and server["prefix_cache_hits"] == 200
    assert server["prefix_cache_hit_rate"] == pytest.approx(0.5)
    assert server["mean_queue_time_ms"] == pytest.approx(300.0)
    assert 0 < server["kv_cache_usage_peak"] <= 8 / 64
    assert server["num_preemptions"] is None  # not exported by this server
    assert run["latency_ms"]["queue_time"]["mean"] == pytest.approx(300.0)
    assert "prefix-cache hit rate 50.0%" in out


def test_a_sweep_writes_one_run_per_load_and_plots_against_load(fake_endpoint, run_bench, tmp_path):
    url = fake_endpoint(ttft=0.005)
    code, out, err = run_bench(
        "--base-url",
        url,
        "--sweep",
        "concurrency=1,2,4",
        "--num-prompts",
        "12",
        "--input-len",
        "8",
        "--output-len",
        "3",
        "--output-dir",
        str(tmp_path),
    )
    assert code == 0, err
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["load"]["concurrency"] for r in summary["runs"]] == [1, 2, 4]
    assert all(r["requests"]["completed"] == 12 for r in summary["runs"])
    for name in ("latency_hist_c1.png", "latency_hist_c2.png", "latency_hist_c4.png", "sweep.png"):
        assert is_png(tmp_path / name), name
    assert "sweep" in out
    with (tmp_path / "requests.csv").open() as f:
        assert sorted({r["load"] for r in csv.DictReader(f)}) == ["c1", "c2", "c4"]


def test_a_rate_sweep_runs_open_loops(fake_endpoint, run_bench, tmp_path):
    url = fake_endpoint()
    code, _, err = run_bench(
        "--base-url",
        url,
        "--sweep",
        "rate=50,inf",
        "--num-prompts",
        "10",
        "--input-len",
        "4",
        "--output-len",
        "2",
        "--output-dir",
        str(tmp_path),
    )
    assert code == 0, err
    loads = [r["load"] for r in json.loads((tmp_path / "summary.json").read_text())["runs"]]
    assert [(ld["mode"], ld["request_rate"]) for ld in loads] == [("open", 50.0), ("open", "inf")]
    assert is_png(tmp_path / "sweep.png")


def test_the_api_key_is_sent_as_a_bearer_token(fake_endpoint, run_bench):
    url = fake_endpoint(api_key="sk-right")
    code, out, _ = run_bench(
        "--base-url",
        url,
        "--model",
        "m",
        "--api-key",
        "sk-wrong",
        "--num-prompts",
        "2",
        "--input-len",
        "4",
        "--no-server-metrics",
    )
    assert code == 1 and "(http_401: 2)" in out
    code, out, err = run_bench(
        "--base-url",
        url,
        "--api-key",
        "sk-right",
        "--num-prompts",
        "2",
        "--input-len",
        "4",
        "--no-server-metrics",
    )
    assert code == 0, err
    assert "2 completed, 0 failed" in out


def test_request_body_streams_with_usage_and_carries_extra_fields():
    target = Target(
        "http://127.0.0.1:1/v1", "completions", "m", None, {"ignore_eos": True, "min_tokens": 3}
    )
    from soberana.bench.client import StreamingClient

    class NoSession:
        pass

    body = StreamingClient(NoSession(), target).body(
        RequestSpec("r0", [{"role": "user", "content": "hello"}], max_tokens=9)
    )
    assert body == {
        "model": "m",
        "max_tokens": 9,
        "stream": True,
        "stream_options": {"include_usage": True},
        "prompt": "hello",
        "ignore_eos": True,
        "min_tokens": 3,
    }


def test_summary_schema_rejects_a_summary_with_missing_fields():
    with pytest.raises(jsonschema.ValidationError):
        validate_summary({"schema_version": 1})
    jsonschema.Draft202012Validator.check_schema(SUMMARY_SCHEMA)


def make_summary(fake_endpoint, run_bench, out_dir, itl: float) -> str:
    url = fake_endpoint(ttft=0.01, itl=itl)
    code, _, err = run_bench(
        "--base-url",
        url,
        "--num-prompts",
        "8",
        "--concurrency",
        "2",
        "--input-len",
        "4",
        "--output-len",
        "5",
        "--output-dir",
        str(out_dir),
    )
    assert code == 0, err
    return str(out_dir / "summary.json")


def test_compare_prints_both_runs_side_by_side_with_ratios(
    fake_endpoint, run_bench, tmp_path, capsys
):
    from soberana.cli import main

    a = make_summary(fake_endpoint, run_bench, tmp_path / "a", itl=0.001)
    b = make_summary(fake_endpoint, run_bench, tmp_path / "b", itl=0.02)
    capsys.readouterr()
    assert main(["bench", "compare", a, b]) == 0
    out = capsys.readouterr().out
    assert f"A: {a}" in out and f"B: {b}" in out
    rows = {line[:28].strip(): line[28:].split() for line in out.splitlines() if len(line) > 28}
    tpot_a, tpot_b, ratio = rows["TPOT mean (ms)"]
    assert float(ratio.rstrip("x")) == pytest.approx(float(tpot_b) / float(tpot_a), rel=1e-3)
    assert float(ratio.rstrip("x")) > 5  # 20 ms between tokens against 1 ms
    assert rows["requests completed"] == ["8", "8", "1.000x"]


def test_compare_rejects_a_file_that_is_not_a_summary(tmp_path, capsys):
    from soberana.cli import main

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"runs": []}))
    assert main(["bench", "compare", str(bad), str(bad)]) == 2
    assert "not a soberana bench summary.json" in capsys.readouterr().err
    assert main(["bench", "compare", str(tmp_path / "missing.json"), str(bad)]) == 2
    assert "cannot read" in capsys.readouterr().err


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_ttft_is_the_first_chunk_with_text_not_the_role_chunk(
    fake_endpoint, run_bench, tmp_path, endpoint
):
    # The fake chat stream opens with a role-only chunk, then waits --itl before each chunk.
    url = fake_endpoint(itl=0.05)
    code, _, err = run_bench(
        "--base-url",
        url,
        "--endpoint",
        endpoint,
        "--num-prompts",
        "2",
        "--input-len",
        "4",
        "--output-len",
        "3",
        "--output-dir",
        str(tmp_path),
    )
    assert code == 0, err
    with (tmp_path / "requests.csv").open() as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        ttft = float(row["ttft_ms"])
        assert (ttft >= 50.0) if endpoint == "chat" else (ttft < 50.0)
        assert len(row["itl_ms"].split(";")) == 2  # 3 text chunks, 2 gaps
        # The server waits 50 ms between chunks; delivery jitter can shorten one gap a little.
        assert all(float(gap) >= 25.0 for gap in row["itl_ms"].split(";"))
