"""The `file` workload's input: JSONL of prompts, OpenAI messages or ShareGPT conversations."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

from soberana.bench.config import BenchConfigError

_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "system": "system",
}


@dataclass(frozen=True)
class DatasetEntry:
    """One prompt from the file and, when known, how long its answer should be."""

    messages: list[dict[str, str]]  # ends with a user turn
    reply: str | None = None  # the dataset's own answer; its token length sets max_tokens
    max_tokens: int | None = None  # an explicit per-entry `max_tokens` / `output_len`


@functools.lru_cache(maxsize=4)
def load_dataset(path: str | None) -> list[DatasetEntry]:
    """Parse a JSONL file (or a JSON array, as ShareGPT dumps ship) into entries.

    Accepted per line: `{"prompt": "..."}`, `{"messages": [{"role", "content"}, ...]}` or
    `{"conversations": [{"from": "human"|"gpt", "value": "..."}, ...]}`, each optionally with
    `max_tokens` (or `output_len`). A trailing assistant turn is dropped and its length becomes
    the answer length. Conversations with no user turn are skipped.
    """
    if not path:
        raise BenchConfigError("--workload file needs --dataset-path FILE.jsonl")
    file = Path(path)
    if not file.is_file():
        raise BenchConfigError(f"--dataset-path {path!r} is not a file")
    text = file.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            rows = list(enumerate(json.loads(text), start=1))
        except json.JSONDecodeError as exc:
            raise BenchConfigError(f"{path}: not valid JSON: {exc}") from None
        where = "item"
    else:
        rows = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append((lineno, json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise BenchConfigError(
                        f"{path}: line {lineno}: not valid JSON: {exc}"
                    ) from None
        where = "line"
    entries = [e for n, row in rows if (e := _parse_entry(row, f"{path}: {where} {n}"))]
    if not entries:
        raise BenchConfigError(f"--dataset-path {path!r} holds no usable prompt")
    return entries


def _parse_entry(row: object, where: str) -> DatasetEntry | None:
    """One entry from one JSON object, or None for a conversation without a user turn."""
    if not isinstance(row, dict):
        raise BenchConfigError(f"{where}: expected a JSON object, got {type(row).__name__}")
    max_tokens = row.get("max_tokens", row.get("output_len"))
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise BenchConfigError(f"{where}: max_tokens must be an integer >= 1, got {max_tokens!r}")
    if isinstance(row.get("prompt"), str):
        return DatasetEntry([{"role": "user", "content": row["prompt"]}], None, max_tokens)
    if isinstance(row.get("messages"), list):
        messages = [
            _message(m.get("role"), m.get("content"), where) for m in _dicts(row["messages"], where)
        ]
    elif isinstance(row.get("conversations"), list):
        messages = [
            _message(_SHAREGPT_ROLES.get(str(m.get("from")).lower()), m.get("value"), where)
            for m in _dicts(row["conversations"], where)
        ]
    else:
        raise BenchConfigError(f"{where}: expected a 'prompt', 'messages' or 'conversations' field")
    reply = messages.pop()["content"] if messages and messages[-1]["role"] == "assistant" else None
    if not any(m["role"] == "user" for m in messages):
        return None
    return DatasetEntry(messages, reply, max_tokens)


def _dicts(items: list, where: str) -> list[dict]:
    if not all(isinstance(m, dict) for m in items):
        raise BenchConfigError(f"{where}: every turn must be a JSON object")
    return items


def _message(role: str | None, content: object, where: str) -> dict[str, str]:
    if role not in ("system", "user", "assistant") or not isinstance(content, str):
        raise BenchConfigError(
            f"{where}: each turn needs a role (system/user/assistant, or ShareGPT human/gpt) "
            f"and text content, got role={role!r}"
        )
    return {"role": role, "content": content}
