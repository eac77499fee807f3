"""The two pieces whose correctness hinges on cases HTTP tests rarely produce: SSE events split
across arbitrary chunk boundaries, and how keys move on the affinity ring."""

from __future__ import annotations

import json

from hypothesis import example, given, settings
from hypothesis import strategies as st

from soberana.gateway.affinity import HashRing
from soberana.gateway.backend import BackendState
from soberana.gateway.config import BackendConfig
from soberana.gateway.usage import SseUsageTap


def event(payload: dict | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\n\n".encode()


CONTENT = [
    event({"choices": [{"index": 0, "delta": {"content": f'tok{i} says "prompt_tokens": 99'}}]})
    for i in range(5)
]
USAGE = event(
    {"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}}
)
STREAM = b"".join(CONTENT) + USAGE + event("[DONE]")


def relay(tap: SseUsageTap, data: bytes, cuts: list[int]) -> bytes:
    out, start = [], 0
    for cut in sorted(set(cuts)) + [len(data)]:
        out.append(tap.feed(data[start:cut]))
        start = cut
    out.append(tap.flush())
    return b"".join(out)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=len(STREAM) - 1), max_size=20))
@example(list(range(1, len(STREAM))))  # byte by byte
def test_the_usage_event_the_gateway_asked_for_is_removed_wherever_chunks_split(cuts):
    tap = SseUsageTap(strip_usage_event=True)
    assert relay(tap, STREAM, cuts) == b"".join(CONTENT) + event("[DONE]")
    assert (tap.usage.prompt_tokens, tap.usage.completion_tokens, tap.usage.reported) == (
        12,
        5,
        True,
    )


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=len(STREAM) - 1), max_size=20))
@example(list(range(1, len(STREAM))))  # byte by byte
def test_a_stream_the_client_asked_usage_for_passes_byte_for_byte(cuts):
    tap = SseUsageTap(strip_usage_event=False)
    assert relay(tap, STREAM, cuts) == STREAM
    assert (tap.usage.prompt_tokens, tap.usage.completion_tokens) == (12, 5)


def test_quoted_usage_inside_generated_text_is_not_mistaken_for_usage():
    tap = SseUsageTap(strip_usage_event=False)
    relay(tap, b"".join(CONTENT) + event("[DONE]"), [])
    assert not tap.usage.reported


def backends(names: list[str]) -> list[BackendState]:
    return [
        BackendState(
            "m",
            BackendConfig(
                name=n, endpoint=f"http://{n}:1", kind="vllm", model="x", privacy="onprem"
            ),
        )
        for n in names
    ]


def test_removing_a_replica_only_moves_the_conversations_it_held():
    names = ["r1", "r2", "r3", "r4"]
    ring = HashRing([(n, 1.0) for n in names])
    everyone = backends(names)
    keys = [f"conversation-{i}".encode() for i in range(2000)]
    before = {k: ring.pick(k, everyone, 100.0).name for k in keys}
    survivors = [b for b in everyone if b.name != "r2"]
    after = {k: ring.pick(k, survivors, 100.0).name for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert moved and all(before[k] == "r2" for k in moved)
    shares = [sum(1 for v in before.values() if v == n) / len(keys) for n in names]
    assert all(0.15 < share < 0.35 for share in shares), shares


def test_bounded_load_caps_every_replica_near_the_mean():
    group = backends(["r1", "r2", "r3"])
    ring = HashRing([(b.name, 1.0) for b in group])
    for _ in range(30):  # the same hot conversation, over and over, none finishing
        ring.pick(b"one hot conversation", group, 1.25).outstanding += 1
    loads = sorted(b.outstanding for b in group)
    assert loads[-1] <= -(-1.25 * 30 // 3)  # ceil(1.25 * mean)
    assert loads[0] > 0
