"""CPU cost of the API process per generated token, without the engine or sockets.

The real FastAPI app and EngineClient run in one event loop; a simulated engine core takes
the requests the client sends and answers with one EngineCoreOutputs per step (one new token for
every running request, seeded random ids from the demo vocabulary), handed over exactly as
the reader thread does. Every request's SSE events (or JSON body) are read through the ASGI
interface, so this times validation, tokenization, detokenization, stop-string search,
metrics, stream wake-ups and SSE/JSON rendering — what the API process spends per token —
and leaves out uvicorn's HTTP parsing and the kernel's socket work.

One step is delivered only after every handler woke for the previous one: each token costs a
full wake-up (the case of an engine faster than the API process can read).

    python benchmarks/server_api_path.py                     # this checkout
    python benchmarks/server_api_path.py --trees /tmp/old .  # A/B, interleaved rounds
        --labels "HEAD" "HEAD + working tree" --output benchmarks/results/server_api_path.json
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

SCENARIOS = ("completions_stream", "chat_stream", "completions")


class SimulatedCore:
    """Stands in for the engine-core process: reads the client's outbox, emits steps."""

    def __init__(self, engine, vocab_size: int, seed: int) -> None:
        self.engine = engine
        self.vocab_size = vocab_size
        self.rng = random.Random(seed)
        self.running: dict[str, list[int]] = {}  # request_id -> [generated, max_tokens]
        self.num_received = 0
        self.steps = 0
        self.inbox: list = []  # what the client sent to the core
        engine.core.send = self.inbox.append

    def step(self) -> bool:
        """One engine step; False when nothing is running."""
        from soberana.engine.core_process import EngineCoreOutputs
        from soberana.engine.outputs import EngineCoreOutput, EngineCoreRequest, SchedulerStats

        inbox, self.inbox = self.inbox, []
        for message in inbox:
            if isinstance(message, EngineCoreRequest):
                self.num_received += 1
                self.running[message.request_id] = [0, message.sampling_params.max_tokens]
        if not self.running:
            return False
        outputs = []
        now = time.time()
        for request_id, progress in list(self.running.items()):
            progress[0] += 1
            done = progress[0] >= progress[1]
            outputs.append(
                EngineCoreOutput(
                    request_id, 0, [self.rng.randrange(self.vocab_size)],
                    finish_reason="length" if done else None,
                    scheduled_time=now if progress[0] == 1 else None,
                )
            )
            if done:
                del self.running[request_id]
        stats = SchedulerStats(num_running_reqs=len(self.running))
        self.engine._on_messages([EngineCoreOutputs(outputs, stats, self.num_received, now)])
        self.steps += 1
        return True


async def _call(app, path: str, body: dict, sink: list[int]) -> None:
    """One HTTP request through the ASGI app; counts the response bytes into `sink`."""
    payload = json.dumps(body).encode()
    finished = asyncio.Event()
    sent_body = False

    async def receive() -> dict:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": payload, "more_body": False}
        await finished.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            assert message["status"] == 200, message
        elif message["type"] == "http.response.body":
            sink[0] += len(message.get("body", b""))
            if not message.get("more_body", False):
                finished.set()

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "headers": [(b"content-type", b"application/json"),
                                     (b"content-length", str(len(payload)).encode())],
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000),
    }  # fmt: skip
    await app(scope, receive, send)


def _request(scenario: str, prompt: list[int], prompt_text: str, output_len: int) -> tuple[str, dict]:
    common = {"model": "bench", "max_tokens": output_len, "temperature": 0, "ignore_eos": True}
    if scenario == "chat_stream":
        return "/v1/chat/completions", {
            **common, "messages": [{"role": "user", "content": prompt_text}], "stream": True,
            "stream_options": {"include_usage": True},
        }  # fmt: skip
    stream = scenario == "completions_stream"
    body = {**common, "prompt": prompt, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return "/v1/completions", body


async def run_scenario(
    scenario: str, num_requests: int, input_len: int, output_len: int, iterations: int
) -> dict:
    """Time `iterations` batches of `num_requests` concurrent requests, `output_len` tokens each."""
    from soberana.engine.output_processor import OutputProcessor
    from soberana.models.loader import resolve_model_path
    from soberana.models.tokenizer import load_tokenizer
    from soberana.server.app import ServerSettings, build_app
    from soberana.server.engine_client import EngineClient
    from soberana.server.metrics import ServerMetrics

    path = resolve_model_path(None)
    tokenizer = load_tokenizer(path)
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    engine = EngineClient(SimpleNamespace(max_num_seqs=num_requests), max_waiting_requests=10**6)
    engine._loop = asyncio.get_running_loop()
    info = SimpleNamespace(name="bench", path=str(path), vocab_size=vocab,
                           max_model_len=input_len * 4 + output_len + 64)  # fmt: skip
    app = build_app(engine, ServerSettings(served_model_names=["bench"]))
    if hasattr(engine, "_attach"):  # what EngineClient.start does once the core is ready
        engine._attach(info, tokenizer)
    else:  # trees from before _attach existed
        engine.model_info, engine.tokenizer = info, tokenizer
        engine._processor = OutputProcessor(tokenizer)
        engine.metrics = ServerMetrics("bench", info.max_model_len)
    engine.ready = True

    rng = random.Random(0)
    prompts = [[rng.randrange(vocab) for _ in range(input_len)] for _ in range(num_requests)]
    texts = [tokenizer.decode(p, skip_special_tokens=True) for p in prompts]
    core = SimulatedCore(engine, vocab, seed=1)
    sink = [0]
    gc_time = [0.0, 0]
    started: list[float] = []

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            gc_time[0] += time.perf_counter() - started.pop()
            gc_time[1] += info["generation"] == 2

    async def one_batch() -> None:
        tasks = [
            asyncio.ensure_future(_call(app, *_request(scenario, p, t, output_len), sink))
            for p, t in zip(prompts, texts)
        ]
        while not all(t.done() for t in tasks):
            # Let every handler finish with the previous step before the next one arrives.
            for _ in range(8):
                await asyncio.sleep(0)
            core.step()
        await asyncio.gather(*tasks)

    await one_batch()  # warm-up: first-call costs (pydantic, jinja, imports) stay out
    sink[0], core.steps = 0, 0
    gc.callbacks.append(on_gc)
    cpu0, t0 = time.process_time(), time.perf_counter()
    for _ in range(iterations):
        await one_batch()
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    gc.callbacks.remove(on_gc)
    tokens = num_requests * output_len * iterations
    return {
        "scenario": scenario, "seconds": elapsed, "cpu_seconds": cpu,
        "us_per_token": elapsed / tokens * 1e6, "tokens": tokens, "response_bytes": sink[0],
        "gc_seconds": gc_time[0], "gc_full_collections": gc_time[1], "steps": core.steps,
    }  # fmt: skip


def _one_round(args: argparse.Namespace) -> None:
    try:  # the event loop `soberana serve` runs on
        import uvloop

        run = uvloop.run
    except ImportError:
        run = asyncio.run
    results = [run(run_scenario(s, args.num_requests, args.input_len, args.output_len,
                                args.iterations))
               for s in args.scenarios]  # fmt: skip
    print(json.dumps(results))


def _commit(tree: Path) -> str:
    try:
        head = subprocess.run(["git", "-C", str(tree), "rev-parse", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain"],
                               capture_output=True, text=True).stdout.strip()  # fmt: skip
        return head + ("+dirty" if dirty else "")
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown (not a git checkout)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trees", nargs="+", type=Path, default=[Path(".")],
                    help="source trees to compare (each run with its own PYTHONPATH)")
    ap.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=192)
    ap.add_argument("--rounds", type=int, default=5, help="processes per tree, interleaved")
    ap.add_argument("--iterations", type=int, default=3, help="timed batches per process")
    ap.add_argument("--labels", nargs="+", default=None,
                    help="what each tree is (e.g. its commit), where it is no git checkout")
    ap.add_argument("--output", type=Path, default=None)
    ap.add_argument("--one-round", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one_round:
        _one_round(args)
        return 0

    trees = [t.resolve() for t in args.trees]
    runs: dict[str, list[dict]] = {str(t): [] for t in trees}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one-round",
           "--num-requests", str(args.num_requests), "--input-len", str(args.input_len),
           "--output-len", str(args.output_len), "--iterations", str(args.iterations),
           "--scenarios", *args.scenarios]  # fmt: skip
    for r in range(args.rounds):
        for tree in trees:  # interleaved, so drift on a shared machine hits every tree alike
            env = dict(os.environ, PYTHONPATH=str(tree))
            out = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
            if out.returncode != 0:
                raise RuntimeError(f"{tree}: {out.stderr}")
            results = json.loads(out.stdout.strip().splitlines()[-1])
            load = os.getloadavg()[0]
            for res in results:
                res["load_avg"] = load
                runs[str(tree)].append(res)
                print(f"round {r} {tree.name:12s} {res['scenario']:20s} "
                      f"{res['us_per_token']:7.2f} us/token  gc {res['gc_seconds']:.3f} s "
                      f"({res['gc_full_collections']} full)  load {load:.2f}", flush=True)  # fmt: skip
    summary = {
        str(t): {s: statistics.median(x["us_per_token"] for x in runs[str(t)] if x["scenario"] == s)
                 for s in args.scenarios}
        for t in trees
    }  # fmt: skip
    for tree, medians in summary.items():
        print(tree, {s: round(v, 2) for s, v in medians.items()})
    if args.output is not None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from offline_throughput import machine

        result = {
            "benchmark": "server_api_path",
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": machine(),
            "workload": {"num_requests": args.num_requests, "input_len": args.input_len,
                         "output_len": args.output_len, "model": "soberana-demo tokenizer",
                         "rounds": args.rounds, "iterations": args.iterations},  # fmt: skip
            "trees": {str(t): {"commit": _commit(t), "label": label}
                      for t, label in zip(trees, args.labels or [None] * len(trees))},  # fmt: skip
            "median_us_per_token": summary,
            "runs": runs,
        }
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
