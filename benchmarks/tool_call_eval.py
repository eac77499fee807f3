"""Tool-calling evaluation of a real model through a real `soberana serve` and the official
openai client, with `tool_choice: auto` (benchmarks/tool_call_cases.py: eight tools, 55
prompts written for this project).

Per answer: was a call made, is every call valid (a known function, arguments that parse as
JSON and validate against that function's schema), is the first call the function the prompt
asks for (or no call where none fits), and are its arguments the ones asked for. Greedy
(temperature 0), all cases of a part at once.

    python benchmarks/tool_call_eval.py --model /work/models/hf/Qwen2.5-Coder-1.5B-Instruct \
        --cases 0:28 --out benchmarks/results/tool_call_eval_qwen25coder_part1.json
    python benchmarks/tool_call_eval.py --table benchmarks/results/tool_call_eval_qwen25coder_part*.json \
        --out benchmarks/results/tool_call_eval_qwen25coder.md
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jsonschema
import openai

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.structured_compile import cpu_model  # noqa: E402
from benchmarks.structured_throughput import _wait_ready  # noqa: E402
from benchmarks.tool_call_cases import CASES, TOOLS, matches  # noqa: E402

SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
FORMATS = jsonschema.Draft202012Validator.FORMAT_CHECKER


def start_server(model: str, log: Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "soberana.cli", "serve", model, "--port", "0",
         "--served-model-name", "eval", "--tool-call-parser", "hermes",
         "--max-model-len", "2048", "--disable-uvicorn-access-log", *extra],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        return _wait_ready(proc, log)
    except BaseException:
        proc.kill()
        raise


def grade(case: dict, choice) -> dict:
    """One answer against its case."""
    calls = choice.message.tool_calls or []
    invalid = []
    parsed = []
    for k, call in enumerate(calls):
        name = call.function.name
        if (choice.finish_reason == "length" and k == len(calls) - 1
                and not _is_json(call.function.arguments)):
            continue  # cut by max_tokens (the arguments written so far): not a malformed call
        try:
            arguments = json.loads(call.function.arguments)
            jsonschema.validate(arguments, SCHEMAS[name], format_checker=FORMATS)
            parsed.append((name, arguments))
        except (KeyError, json.JSONDecodeError, jsonschema.ValidationError) as exc:
            invalid.append({"name": name, "arguments": call.function.arguments,
                            "error": str(exc)[:300]})
    first = parsed[0] if parsed and not invalid else None
    want = case["function"]
    function_ok = (not calls) if want is None else (first is not None and first[0] == want)
    arguments_ok = None
    if want is not None:
        arguments_ok = bool(function_ok) and matches(case["arguments"], first[1])
    return {
        "prompt": case["prompt"], "expected_function": want,
        "expected_arguments": repr(case["arguments"]),
        "calls": [{"name": c.function.name, "arguments": c.function.arguments} for c in calls],
        "content": choice.message.content, "finish_reason": choice.finish_reason,
        "invalid_calls": invalid, "function_ok": function_ok, "arguments_ok": arguments_ok,
    }


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except json.JSONDecodeError:
        return False


def run_part(args: argparse.Namespace) -> None:
    lo, hi = (int(x) if x else None for x in args.cases.split(":"))
    cases = CASES[lo:hi]
    log = Path(args.server_log)
    load_start = Path("/proc/loadavg").read_text().split()[:3]
    commit = _commit()  # the code the server runs
    t_start = time.monotonic()
    proc, url = start_server(args.model, log, args.server_arg)
    startup_s = time.monotonic() - t_start
    try:
        ai = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=3600)

        def ask(case: dict):
            return ai.chat.completions.create(
                model="eval", messages=[{"role": "user", "content": case["prompt"]}],
                tools=TOOLS, tool_choice="auto", temperature=0, max_tokens=args.max_tokens)

        t0 = time.monotonic()
        with ThreadPoolExecutor(len(cases)) as pool:
            answers = list(pool.map(ask, cases))
        wall = time.monotonic() - t0
    finally:
        proc.terminate()
        proc.wait(60)
    results = [grade(c, a.choices[0]) | {"completion_tokens": a.usage.completion_tokens}
               for c, a in zip(cases, answers)]
    out = {
        "model": args.model, "cases": args.cases, "tool_choice": "auto", "temperature": 0,
        "max_tokens": args.max_tokens, "cpu": cpu_model(), "commit": commit,
        "server_args": args.server_arg, "startup_s": startup_s, "wall_s": wall,
        "loadavg_start": load_start, "loadavg_end": Path("/proc/loadavg").read_text().split()[:3],
        "results": results,
    }
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(table([out]))


def _commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()


def table(parts: list[dict]) -> str:
    """Markdown table per expected function and overall."""
    rows: dict[str, list[dict]] = {}
    for part in parts:
        for r in part["results"]:
            rows.setdefault(r["expected_function"] or "(no call)", []).append(r)
    everything = [r for rs in rows.values() for r in rs]
    lines = ["| expected | prompts | answers with calls | valid calls | function ok | "
             "arguments ok | cut by max_tokens |", "|---|---|---|---|---|---|---|"]
    for name, rs in [*sorted(rows.items()), ("**all**", everything)]:
        calls = sum(len(r["calls"]) for r in rs)
        valid = calls - sum(len(r["invalid_calls"]) for r in rs)
        with_args = [r for r in rs if r["arguments_ok"] is not None]
        args_ok = sum(bool(r["arguments_ok"]) for r in with_args)
        lines.append(
            f"| {name} | {len(rs)} | {sum(bool(r['calls']) for r in rs)} | "
            f"{valid}/{calls} ({_pct(valid, calls)}) | "
            f"{sum(r['function_ok'] for r in rs)}/{len(rs)} "
            f"({_pct(sum(r['function_ok'] for r in rs), len(rs))}) | "
            + (f"{args_ok}/{len(with_args)} ({_pct(args_ok, len(with_args))}) |"
               if with_args else "- |")
            + f" {sum(r['finish_reason'] == 'length' for r in rs)} |")
    return "\n".join(lines)


def misses(parts: list[dict]) -> str:
    lines = []
    for part in parts:
        for r in part["results"]:
            if r["function_ok"] and r["arguments_ok"] is not False:
                continue
            got = ([f"{c['name']}({' '.join(c['arguments'].split())})" for c in r["calls"]]
                   or [f"text ({r['finish_reason']}): {' '.join((r['content'] or '').split())[:160]}"])
            lines.append(f"- {r['prompt']!r}: {r['expected_function']} "
                         f"{r['expected_arguments']} -> {'; '.join(got)}")
    return "\n".join(lines)


def _pct(a: int, b: int) -> str:
    return f"{100 * a / b:.1f}%" if b else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="/work/models/hf/Qwen2.5-Coder-1.5B-Instruct")
    ap.add_argument("--cases", default=":", help="slice of the cases, e.g. 0:28")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--server-arg", action="append", default=[],
                    help="extra `soberana serve` argument (repeat)")
    ap.add_argument("--server-log", default="/tmp/tool_call_eval_server.log")
    ap.add_argument("--table", nargs="+", help="part result files to merge into one table")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.table:
        parts = [json.loads(Path(p).read_text()) for p in args.table]
        text = table(parts)
        meta = [{k: p[k] for k in ("cases", "commit", "cpu", "wall_s", "loadavg_start",
                                   "loadavg_end")} for p in parts]
        Path(args.out).write_text(
            f"# Tool-calling evaluation: {parts[0]['model']}\n\n`tool_choice: auto`, "
            f"temperature 0, max_tokens {parts[0]['max_tokens']}, hermes parser, through "
            f"`soberana serve` and the openai client (benchmarks/tool_call_eval.py).\n\n"
            f"{text}\n\nParts: {json.dumps(meta)}\n")
        print(text)
        with Path(args.out).open("a") as f:
            f.write("\nMisses (expected -> answer):\n\n" + misses(parts) + "\n")
        return
    run_part(args)


if __name__ == "__main__":
    main()
