"""What a request needs from a backend, read from its endpoint, body and headers."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

# endpoint path -> the capability a backend must list to serve it
ENDPOINT_CAPABILITY = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
    "/v1/messages": "chat",  # Anthropic Messages API (vLLM serves it); privacy covers its blocks
}
_JSON_RESPONSE_FORMATS = ("json_object", "json_schema")
# vLLM's ways of constraining the output (Soberana's server takes them too)
_CONSTRAINT_FIELDS = ("structured_outputs", "guided_json", "guided_regex", "guided_choice",
                      "guided_grammar")
_BYTES_PER_TOKEN = 4  # rough for byte-level BPE on English text; only used to filter by context
# Chat and Messages bodies nest about 8 levels (tool schemas a few more); a deeper body can only
# exhaust the recursion of whoever walks it (Python's limit is 1,000 frames).
MAX_JSON_DEPTH = 64


@dataclass(frozen=True)
class RequestNeeds:
    """The routing-relevant facts of one request."""

    capabilities: tuple[str, ...]
    prompt_tokens: int  # estimated from the body's size
    context_tokens: int  # estimated prompt tokens plus max_tokens
    stream: bool
    affinity_key: bytes | None  # same key -> same replica (prefix cache), unless overloaded


def request_needs(
    path: str, body: dict[str, Any], raw_size: int, session_id: str | None, namespace: str
) -> RequestNeeds:
    """Derive the capabilities, context size and affinity key a request needs.

    `namespace` (the tenant's cache salt) keeps tenants' conversations apart: their KV blocks
    are salted apart anyway, so equal conversations of two tenants share nothing on a replica.
    """
    caps = [ENDPOINT_CAPABILITY[path]]
    if body.get("tools") or body.get("functions"):
        caps.append("tool_use")
    fmt = body.get("response_format")
    if (isinstance(fmt, dict) and fmt.get("type") in _JSON_RESPONSE_FORMATS) or any(
        body.get(name) is not None for name in _CONSTRAINT_FIELDS
    ):
        caps.append("json_mode")  # any constrained output: JSON schema, regex, choice, grammar
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    prompt = estimate_prompt_tokens(raw_size)
    context = prompt
    if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens > 0:
        context += max_tokens
    return RequestNeeds(
        capabilities=tuple(caps),
        prompt_tokens=prompt,
        context_tokens=context,
        stream=body.get("stream") is True,
        affinity_key=_affinity_key(body, session_id, namespace.encode()),
    )


def estimate_prompt_tokens(body_bytes: int) -> int:
    """Prompt tokens guessed from the request body's size (the gateway has no tokenizer)."""
    return body_bytes // _BYTES_PER_TOKEN


def _affinity_key(body: dict[str, Any], session_id: str | None, namespace: bytes) -> bytes | None:
    if session_id:
        return namespace + b"|session:" + session_id.encode()
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return None
    # A conversation is named by its leading messages: everything up to and including the first
    # user turn. Every later turn repeats them, so the whole conversation shares one key.
    leading = []
    for message in messages:
        leading.append(message)
        if isinstance(message, dict) and message.get("role") == "user":
            break
    encoded = json.dumps(leading, sort_keys=True, separators=(",", ":")).encode()
    return namespace + b"|conversation:" + hashlib.blake2b(encoded, digest_size=16).digest()


def json_depth(node: Any, limit: int = MAX_JSON_DEPTH) -> int:
    """How deep `node` (parsed JSON) nests, counted without recursion; stops past `limit`."""
    deepest, stack = 0, [(node, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = list(item.values())
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > limit:
            break
        stack.extend((child, depth + 1) for child in children)
    return deepest
