"""Routing: capability filtering, context windows, region preference and fallback, load, affinity."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from tests.gateway.helpers import backend, concurrently, config, tenant, wait_until

KEY = "sk-acme"


def served_by(upstreams) -> Counter:
    return Counter({u.name: len(u.received) for u in upstreams})


def test_requests_prefer_the_tenants_region_and_the_region_header_overrides_it(
    upstreams, start_gateway
):
    eu, us = upstreams("eu"), upstreams("us")
    gw = start_gateway(
        config(
            {"m": [backend("eu", eu, region="eu-west"), backend("us", us, region="us-east")]},
            [tenant("acme", KEY, region="eu-west")],
        )
    )
    for i in range(6):
        assert gw.chat(KEY, content=f"q{i}").status_code == 200
    assert served_by([eu, us]) == {"eu": 6, "us": 0}
    for i in range(4):
        r = gw.chat(KEY, content=f"r{i}", headers={"X-Region": "us-east"})
        assert r.status_code == 200 and r.headers["X-Gateway-Backend"] == "us"
    assert served_by([eu, us]) == {"eu": 6, "us": 4}


def test_edge_requests_fall_back_to_another_region_while_theirs_is_down(upstreams, start_gateway):
    edge, central = upstreams("edge"), upstreams("central")
    gw = start_gateway(
        config(
            {
                "m": [
                    backend("edge", edge, region="branch"),
                    backend("central", central, region="dc"),
                ]
            },
            [tenant("acme", KEY, region="branch")],
        )
    )
    edge.behaviour.health_status = 503
    wait_until(
        lambda: gw.metric("soberana_gateway_backend_healthy", backend="edge") == 0,
        what="edge marked down",
    )
    for i in range(5):
        r = gw.chat(KEY, content=f"q{i}")
        assert r.status_code == 200 and r.headers["X-Gateway-Backend"] == "central"
    assert len(edge.received) == 0
    assert gw.metric("soberana_gateway_failovers_total", backend="central") == 5

    edge.behaviour.health_status = 200
    wait_until(
        lambda: gw.metric("soberana_gateway_backend_healthy", backend="edge") == 1,
        what="edge back up",
    )
    assert gw.chat(KEY, content="again").headers["X-Gateway-Backend"] == "edge"


def test_embeddings_never_reach_a_chat_only_backend(upstreams, start_gateway):
    chat_only, embedder = upstreams("chat"), upstreams("embed")
    gw = start_gateway(
        config(
            {
                "m": [
                    backend("chat", chat_only, capabilities=["chat", "completions"]),
                    backend("embed", embedder, capabilities=["embeddings"]),
                ],
                "chat-only": [backend("chat2", chat_only, capabilities=["chat"])],
            },
            [tenant("acme", KEY)],
        )
    )
    for i in range(5):
        r = gw.post("/v1/embeddings", KEY, {"model": "m", "input": [f"text {i}"]})
        assert r.status_code == 200 and r.json()["data"][0]["embedding"] == [0.1, 0.2, 0.3]
        assert gw.chat(KEY, content=f"chat {i}").headers["X-Gateway-Backend"] == "chat"
    assert [x.path for x in embedder.received] == ["/v1/embeddings"] * 5
    assert [x.path for x in chat_only.received] == ["/v1/chat/completions"] * 5

    r = gw.post("/v1/embeddings", KEY, {"model": "chat-only", "input": "x"})
    assert r.status_code == 400
    assert (
        r.json()["error"]["code"] == "unsupported_capability"
        and "embeddings" in r.json()["error"]["message"]
    )


def test_tools_and_json_mode_need_backends_that_declare_them(upstreams, start_gateway):
    plain, capable = upstreams("plain"), upstreams("capable")
    gw = start_gateway(
        config(
            {
                "m": [
                    backend("plain", plain, capabilities=["chat"]),
                    backend("capable", capable, capabilities=["chat", "tool_use", "json_mode"]),
                ]
            },
            [tenant("acme", KEY)],
        )
    )
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
    for i in range(4):
        assert gw.chat(KEY, content=f"t{i}", tools=[tool]).headers["X-Gateway-Backend"] == "capable"
        r = gw.chat(KEY, content=f"j{i}", response_format={"type": "json_object"})
        assert r.headers["X-Gateway-Backend"] == "capable"
        r = gw.chat(KEY, content=f"g{i}", guided_choice=["yes", "no"])  # vLLM's extras too
        assert r.headers["X-Gateway-Backend"] == "capable"
    assert len(plain.received) == 0 and len(capable.received) == 12


def test_long_requests_skip_backends_whose_context_window_is_too_small(upstreams, start_gateway):
    small, large = upstreams("small"), upstreams("large")
    gw = start_gateway(
        config(
            {
                "m": [
                    backend("small", small, context_window=512),
                    backend("large", large, context_window=8192),
                ]
            },
            [tenant("acme", KEY)],
        )
    )
    for i in range(3):
        r = gw.chat(KEY, content=f"{i} " + "word " * 800)  # ~4 KB of prompt: ~1000 tokens
        assert r.status_code == 200 and r.headers["X-Gateway-Backend"] == "large"
    r = gw.chat(KEY, content="short", max_tokens=1000)
    assert r.headers["X-Gateway-Backend"] == "large"
    assert len(small.received) == 0

    r = gw.chat(KEY, content="short", max_tokens=100_000)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_concurrent_requests_spread_by_least_outstanding(upstreams, start_gateway):
    a, b = upstreams("a", delay_s=1.0), upstreams("b", delay_s=1.0)
    gw = start_gateway(
        config(
            {"m": [backend("a", a), backend("b", b)]},
            [tenant("acme", KEY)],
            routing={"prefix_affinity": False},
        )
    )
    responses = concurrently(lambda i: gw.chat(KEY, content=f"q{i}"), 8)
    assert all(r.status_code == 200 for r in responses)
    assert served_by([a, b]) == {"a": 4, "b": 4}
    assert a.max_in_flight == 4 and b.max_in_flight == 4


def test_a_conversation_returns_to_the_same_replica(upstreams, start_gateway):
    a, b = upstreams("a"), upstreams("b")
    gw = start_gateway(config({"m": [backend("a", a), backend("b", b)]}, [tenant("acme", KEY)]))
    homes: dict[int, set[str]] = {}
    for conversation in range(12):
        messages = [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": f"conversation {conversation}: first question"},
        ]
        for turn in range(3):
            r = gw.post("/v1/chat/completions", KEY, {"model": "m", "messages": messages})
            assert r.status_code == 200
            homes.setdefault(conversation, set()).add(r.headers["X-Gateway-Backend"])
            messages += [
                {"role": "assistant", "content": r.json()["choices"][0]["message"]["content"]},
                {"role": "user", "content": f"follow-up {turn}"},
            ]
    assert all(len(replicas) == 1 for replicas in homes.values()), homes
    # Conversations as a whole are spread over both replicas.
    assert {next(iter(r)) for r in homes.values()} == {"a", "b"}


def test_session_header_pins_requests_with_different_prompts(upstreams, start_gateway):
    a, b = upstreams("a"), upstreams("b")
    gw = start_gateway(config({"m": [backend("a", a), backend("b", b)]}, [tenant("acme", KEY)]))
    for session in ("alpha", "beta", "gamma", "delta"):
        replicas = {
            gw.chat(KEY, content=f"unrelated {i}", headers={"X-Session-Id": session}).headers[
                "X-Gateway-Backend"
            ]
            for i in range(4)
        }
        assert len(replicas) == 1


def test_affinity_yields_when_its_replica_is_overloaded(upstreams, start_gateway):
    a, b = upstreams("a", delay_s=1.0), upstreams("b", delay_s=1.0)
    gw = start_gateway(config({"m": [backend("a", a), backend("b", b)]}, [tenant("acme", KEY)]))
    with ThreadPoolExecutor(8) as pool:
        responses = list(
            pool.map(lambda i: gw.chat(KEY, content="the same conversation"), range(8))
        )
    assert all(r.status_code == 200 for r in responses)
    counts = served_by([a, b])
    # Bounded load (factor 1.25): neither replica takes more than ceil(1.25 * 8 / 2) = 5.
    assert max(counts.values()) <= 5 and min(counts.values()) >= 3, counts
