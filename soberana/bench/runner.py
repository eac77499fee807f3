"""Runs a configured benchmark: warm-up, each load point in turn, then the summary and files."""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import random
import socket
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from time import perf_counter, process_time

import aiohttp
from tqdm import tqdm

from soberana import __version__
from soberana.bench.client import StreamingClient, TargetUnavailable, fetch_models
from soberana.bench.config import BenchConfig, LoadPoint
from soberana.bench.load import DispatchBudget, LoadDriver
from soberana.bench.request import RequestResult
from soberana.bench.schema import SCHEMA_VERSION
from soberana.bench.server_metrics import MetricsWatcher
from soberana.bench.stats import summarize
from soberana.bench.tokens import TokenCounter, load_token_counter
from soberana.bench.workloads import build_source, natural_num_prompts

CLIENT_BUSY_WARNING = 0.9  # fraction of one core the client may use before it warns


@dataclass
class BenchOutcome:
    """summary.json's content, and the per-request results of each run (for CSV and plots)."""

    summary: dict
    results: list[tuple[str, list[RequestResult]]] = field(default_factory=list)


def _warn(message: str) -> None:
    print(f"soberana bench: warning: {message}", file=sys.stderr)


async def run_benchmark(cfg: BenchConfig) -> BenchOutcome:
    """Run every load point of `cfg` against its target and summarize each."""
    started_at = datetime.now(UTC)
    # No connection limit: a client-side queue would add its wait to the measured latencies.
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
    async with aiohttp.ClientSession(connector=connector) as session:
        counter = await _resolve_model_and_tokenizer(cfg, session)
        num_prompts = cfg.num_prompts
        if num_prompts is None and cfg.duration_s is None:
            num_prompts = natural_num_prompts(cfg.workload)
        client = StreamingClient(session, cfg.target)
        if cfg.warmup:
            await _warm_up(cfg, client, counter)
        outcome = BenchOutcome(summary={})
        runs = []
        for i, point in enumerate(cfg.loads):
            results, run = await _run_point(cfg, session, client, counter, point, i, num_prompts)
            outcome.results.append((point.label, results))
            runs.append(run)
    outcome.summary = {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "soberana bench", "version": __version__},
        "command_line": cfg.command_line,
        "started_at": started_at.isoformat(),
        "finished_at": datetime.now(UTC).isoformat(),
        "host": {
            "hostname": socket.gethostname(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "target": cfg.target.to_json(),
        "workload": cfg.workload.to_json()
        | {"tokenizer": counter.name, "exact_lengths": counter.exact},
        "settings": {
            "num_prompts": num_prompts,
            "duration_s": cfg.duration_s,
            "warmup": cfg.warmup,
            "seed": cfg.seed,
            "percentiles": cfg.percentiles,
        },
        "runs": runs,
    }
    return outcome


async def _resolve_model_and_tokenizer(
    cfg: BenchConfig, session: aiohttp.ClientSession
) -> TokenCounter:
    """Fill in --model from the server if not given; find the tokenizer to build prompts with."""
    models: list[dict] = []
    if cfg.target.model is None:
        models = await fetch_models(session, cfg.target)
        if not models:
            raise TargetUnavailable(f"{cfg.target.base_url}/models lists no model: pass --model")
        cfg.target.model = str(models[0]["id"])
    elif cfg.tokenizer is None and not os.path.isdir(cfg.target.model):
        with contextlib.suppress(TargetUnavailable):  # only a hint for the tokenizer
            models = await fetch_models(session, cfg.target)
    root = next((m.get("root") for m in models if m["id"] == cfg.target.model), None)
    counter, warning = load_token_counter(cfg.tokenizer, cfg.target.model, root)
    if warning:
        _warn(warning)
    return counter


async def _warm_up(cfg: BenchConfig, client: StreamingClient, counter: TokenCounter) -> None:
    """Send --warmup requests (from their own prompts) whose results are thrown away."""
    point = cfg.loads[0]
    concurrency = min(cfg.warmup, point.concurrency or cfg.warmup)
    source = build_source(cfg.workload, counter, f"{cfg.seed}/warmup", cfg.warmup)
    driver = LoadDriver(source, client.send, DispatchBudget(cfg.warmup, None), lambda r: None)
    results = await driver.run(LoadPoint(concurrency=concurrency), random.Random(0))
    failed = [r for r in results if not r.ok]
    if failed:
        _warn(
            f"{len(failed)} of {len(results)} warm-up requests failed "
            f"(first: {failed[0].error_type}: {failed[0].error_message[:200]})"
        )


async def _run_point(
    cfg: BenchConfig,
    session: aiohttp.ClientSession,
    client: StreamingClient,
    counter: TokenCounter,
    point: LoadPoint,
    index: int,
    num_prompts: int | None,
) -> tuple[list[RequestResult], dict]:
    # Each point gets its own prompts, so one point cannot warm the prefix cache for the next.
    source = build_source(cfg.workload, counter, f"{cfg.seed}/run{index}", num_prompts)
    watcher = MetricsWatcher(session, cfg.target.metrics_url) if cfg.target.metrics_url else None
    if watcher:
        await watcher.start()
    bar = tqdm(
        total=num_prompts,
        unit="req",
        desc=point.label,
        disable=not cfg.progress,
        file=sys.stderr,
        mininterval=0.25,
        dynamic_ncols=True,
    )
    driver = LoadDriver(
        source, client.send, DispatchBudget(num_prompts, cfg.duration_s), lambda r: bar.update(1)
    )
    # Prompts are built; freezing them out of the collector's view keeps GC pauses short and
    # out of the timings.
    gc.collect()
    gc.freeze()
    try:
        start, cpu_start = perf_counter(), process_time()
        client.run_start = start
        results = await driver.run(point, random.Random(f"{cfg.seed}/arrivals{index}"))
        duration, client_cpu = perf_counter() - start, process_time() - cpu_start
    finally:
        gc.unfreeze()
        bar.close()
    server = await watcher.stop() if watcher else None
    if cfg.target.metrics_url and server is None and index == 0:
        _warn(f"no vLLM-style metrics at {cfg.target.metrics_url}; server metrics are omitted")
    _count_missing_tokens(results, counter, chat=cfg.target.endpoint == "chat")
    run = {"load": point.to_json()} | summarize(results, duration, cfg.percentiles, cfg.slo)
    run["server_metrics"] = server
    run["client_cpu_s"] = client_cpu
    if duration > 1.0 and client_cpu / duration > CLIENT_BUSY_WARNING:
        # One event loop uses one core: near 100% the client, not the server, sets the pace.
        _warn(
            f"the client was busy {100 * client_cpu / duration:.0f}% of the run ({point.label}): "
            "its own CPU may limit the load; results above this level understate the server"
        )
    return results, run


def _count_missing_tokens(results: list[RequestResult], counter: TokenCounter, chat: bool) -> None:
    """Count with the tokenizer what the server's `usage` did not report."""
    source = "tokenizer" if counter.exact else "approximate"
    for r in results:
        if not r.ok or (r.prompt_tokens is not None and r.output_tokens is not None):
            continue
        r.token_source = source
        if r.prompt_tokens is None:
            spec = r.spec
            r.prompt_tokens = (
                counter.count_messages(spec.messages) if chat else counter.count(spec.prompt_text())
            )
        if r.output_tokens is None:
            r.output_tokens = counter.count_output(r.text)


def write_outputs(cfg: BenchConfig, outcome: BenchOutcome) -> list[Path]:
    """requests.csv, summary.json and PNG plots in --output-dir; returns the files written."""
    from soberana.bench.report import write_requests_csv, write_summary

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "summary.json", out / "requests.csv"]
    write_summary(written[0], outcome.summary)
    write_requests_csv(written[1], outcome.results)
    try:  # matplotlib is slow to import: only runs that write files pay for it
        from soberana.bench.plots import plot_latency_histograms, plot_sweep
    except ModuleNotFoundError as exc:  # the `plots` extra is not installed
        if exc.name != "matplotlib":
            raise
        print("soberana bench: no PNG plots: matplotlib is not installed "
              "(pip install 'soberana[plots]')", file=sys.stderr)
        return written

    sweep = len(outcome.results) > 1
    for label, results in outcome.results:
        path = out / (f"latency_hist_{label}.png" if sweep else "latency_hist.png")
        plot_latency_histograms(results, path, f"{cfg.target.model} - {label}", cfg.percentiles)
        written.append(path)
    if sweep:
        written.append(out / "sweep.png")
        plot_sweep(outcome.summary["runs"], written[-1], cfg.percentiles)
    return written
