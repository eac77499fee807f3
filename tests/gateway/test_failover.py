"""Failover: retries before the first byte, SSE error events after it, ejection and recovery."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest

from tests.gateway.helpers import backend, config, run_load, tenant, wait_until

KEY = "sk-acme"


def preferred_and_spare(upstreams, start_gateway, preferred_mode: str, **sections):
    """Backend `first` is in the tenant's region (always tried first); `spare` is elsewhere."""
    first, spare = upstreams("first", mode=preferred_mode), upstreams("spare")
    gw = start_gateway(
        config(
            {
                "m": [
                    backend("first", first, region="here"),
                    backend("spare", spare, region="there"),
                ]
            },
            [tenant("acme", KEY, region="here")],
            **sections,
        )
    )
    return gw, first, spare


def stream_text(gw, key: str = KEY, **fields) -> tuple[int, str]:
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}], **fields}
    with httpx.stream(
        "POST",
        gw.url + "/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    ) as r:
        return r.status_code, r.read().decode()


@pytest.mark.parametrize("mode", ["fail", "drop"])
def test_a_backend_failing_before_the_first_byte_is_retried_and_then_ejected(
    upstreams, start_gateway, mode
):
    # A cooldown far longer than the test, so the gauge read at the end still sees the ejection.
    gw, first, spare = preferred_and_spare(
        upstreams, start_gateway, mode, health={"cooldown_s": 30.0}
    )
    for i in range(6):
        r = gw.chat(KEY, content=f"q{i}")
        assert r.status_code == 200 and r.headers["X-Gateway-Backend"] == "spare"
    # eject_after is 2: two failures eject it for the 1 s cooldown, so it sees no third request.
    assert len(first.received) == 2 and len(spare.received) == 6
    reason = "http_5xx" if mode == "fail" else "disconnected"
    assert gw.metric("soberana_gateway_errors_total", backend="first", reason=reason) == 2
    assert gw.metric("soberana_gateway_retries_total", backend="first") == 2
    assert gw.metric("soberana_gateway_ejections_total", backend="first") == 1
    assert gw.metric("soberana_gateway_backend_ejected", backend="first") == 1


def test_an_ejected_backend_is_readmitted_after_its_cooldown(upstreams, start_gateway):
    gw, first, spare = preferred_and_spare(upstreams, start_gateway, "fail")
    for i in range(3):
        assert gw.chat(KEY, content=f"q{i}").status_code == 200
    assert gw.metric("soberana_gateway_backend_ejected", backend="first") == 1
    first.behaviour.mode = "ok"  # repaired
    wait_until(
        lambda: gw.metric("soberana_gateway_backend_healthy", backend="first") == 1,
        what="readmission",
    )
    assert gw.chat(KEY, content="after").headers["X-Gateway-Backend"] == "first"


def test_a_backend_that_never_answers_times_out_and_is_retried(upstreams, start_gateway):
    gw, first, spare = preferred_and_spare(
        upstreams, start_gateway, "hang", timeouts={"first_byte_s": 0.5}
    )
    started = time.monotonic()
    r = gw.chat(KEY)
    assert r.status_code == 200 and r.headers["X-Gateway-Backend"] == "spare"
    assert time.monotonic() - started < 3
    assert gw.metric("soberana_gateway_errors_total", backend="first", reason="timeout") == 1


def test_a_stream_failing_before_its_first_byte_is_retried(upstreams, start_gateway):
    gw, first, spare = preferred_and_spare(upstreams, start_gateway, "fail")
    status, text = stream_text(gw)
    assert status == 200 and "spare-0" in text and text.endswith("data: [DONE]\n\n")
    assert len(first.received) == 1


def test_a_stream_broken_after_its_first_byte_ends_with_an_error_event(upstreams, start_gateway):
    gw, first, spare = preferred_and_spare(upstreams, start_gateway, "drop_mid_stream")
    status, text = stream_text(gw)
    assert status == 200
    events = [e.removeprefix("data: ") for e in text.strip().split("\n\n")]
    assert "first-0" in events[0] and "first-1" in events[1]  # what arrived was relayed
    error = json.loads(events[2])["error"]
    assert error["code"] == "upstream_stream_interrupted" and "first" in error["message"]
    assert events[3] == "[DONE]"
    assert len(spare.received) == 0  # bytes had reached the client: no silent retry
    assert (
        gw.metric("soberana_gateway_errors_total", backend="first", reason="stream_interrupted")
        == 1
    )


def test_when_every_backend_fails_the_client_gets_a_502_naming_the_attempts(
    upstreams, start_gateway
):
    a, b = upstreams("a", mode="fail"), upstreams("b", mode="drop")
    gw = start_gateway(config({"m": [backend("a", a), backend("b", b)]}, [tenant("acme", KEY)]))
    r = gw.chat(KEY)
    assert r.status_code == 502
    error = r.json()["error"]
    assert (
        error["code"] == "upstream_unavailable"
        and "a: HTTP 500" in error["message"]
        and "b:" in error["message"]
    )


def test_a_client_error_from_the_backend_is_passed_through_not_retried(upstreams, start_gateway):
    gw, first, spare = preferred_and_spare(upstreams, start_gateway, "reject")
    r = gw.chat(KEY, temperature=-5)
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    assert len(first.received) == 1 and len(spare.received) == 0
    assert gw.metric("soberana_gateway_backend_ejected", backend="first") == 0


def test_no_healthy_backend_gives_503(upstreams, start_gateway):
    down = upstreams("down", health_status=503)
    gw = start_gateway(config({"m": [backend("down", down)]}, [tenant("acme", KEY)]))
    wait_until(
        lambda: gw.metric("soberana_gateway_backend_healthy", backend="down") == 0,
        what="marked down",
    )
    r = gw.chat(KEY)
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_healthy_backend"
    assert down.received == []


def test_killing_a_backend_under_load_fails_no_request_that_had_not_started_streaming(
    upstream_process, start_gateway
):
    slow_stream = ("--delay", "0.05", "--chunk-delay", "0.08", "--chunks", "5")
    victim, victim_port = upstream_process("victim", 0, *slow_stream)
    _, survivor_port = upstream_process("survivor", 0, *slow_stream)
    gw = start_gateway(
        config(
            {
                "m": [
                    backend("victim", f"http://127.0.0.1:{victim_port}"),
                    backend("survivor", f"http://127.0.0.1:{survivor_port}"),
                ]
            },
            [tenant("acme", KEY)],
            routing={"prefix_affinity": False},
        )
    )
    killed_at: list[float] = []

    def kill_later() -> None:
        time.sleep(1.0)
        killed_at.append(time.monotonic())
        os.kill(victim.pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_later)
    killer.start()
    outcomes = run_load(gw.url, KEY, workers=8, seconds=3.0)
    killer.join()
    kill_time = killed_at[0]

    assert len(outcomes) > 40
    assert all(o.exception is None for o in outcomes), [
        o.exception for o in outcomes if o.exception
    ]
    assert all(o.status == 200 for o in outcomes), sorted({o.status for o in outcomes})
    broken = [o for o in outcomes if not o.complete]
    # The only requests allowed to fail are streams the victim had already started to send;
    # each of them ends with an explicit error event, never a silent cut.
    assert all(
        o.error_event and o.first_byte is not None and o.first_byte < kill_time + 0.5
        for o in broken
    )
    after_kill = [o for o in outcomes if o.started > kill_time]
    assert after_kill and all(o.complete for o in after_kill)
    # The kill did hit work in flight: streams were cut or requests retried on the survivor.
    assert len(broken) + gw.metric("soberana_gateway_retries_total", backend="victim") >= 1

    wait_until(
        lambda: gw.metric("soberana_gateway_backend_healthy", backend="victim") == 0,
        what="victim ejected",
    )
    upstream_process("victim", victim_port)  # back on the same port
    wait_until(
        lambda: gw.metric("soberana_gateway_backend_healthy", backend="victim") == 1,
        what="victim readmitted",
    )
    served = {gw.chat(KEY, content=f"after {i}").headers["X-Gateway-Backend"] for i in range(8)}
    assert "victim" in served


def test_a_backend_dying_after_its_role_only_chunk_is_retried_invisibly(upstreams, start_gateway):
    # Soberana sends `{"delta": {"role": "assistant", "content": ""}}` when a request is
    # scheduled, seconds before its first token: that chunk must not commit the stream.
    gw, first, spare = preferred_and_spare(upstreams, start_gateway, "drop_after_role")
    status, text = stream_text(gw)
    assert status == 200 and "error" not in text
    assert "spare-0" in text and text.endswith("data: [DONE]\n\n")
    assert len(first.received) == 1 and len(spare.received) == 1
    assert gw.metric("soberana_gateway_retries_total", backend="first") == 1


def test_a_role_only_chunk_is_relayed_with_the_tokens_that_follow_it(upstreams, start_gateway):
    gw, first, spare = preferred_and_spare(upstreams, start_gateway, "ok")
    first.behaviour.role_chunk = True
    status, text = stream_text(gw)
    events = [json.loads(e.removeprefix("data: ")) for e in text.strip().split("\n\n")[:-1]]
    assert status == 200 and text.endswith("data: [DONE]\n\n")
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [e["choices"][0]["delta"]["content"] for e in events[1:]] == [
        f"first-{i} " for i in range(4)
    ]
    assert spare.received == []


def test_a_stream_cut_without_finish_reason_or_done_ends_with_an_error_event(
    upstreams, start_gateway
):
    gw, first, spare = preferred_and_spare(upstreams, start_gateway, "truncate")
    status, text = stream_text(gw)
    assert status == 200
    events = [e.removeprefix("data: ") for e in text.strip().split("\n\n")]
    assert [json.loads(e)["choices"][0]["delta"]["content"] for e in events[:4]] == [
        f"first-{i} " for i in range(4)
    ]
    error = json.loads(events[4])["error"]
    assert error["code"] == "upstream_stream_truncated" and "first" in error["message"]
    assert events[5] == "[DONE]"
    assert (
        gw.metric("soberana_gateway_errors_total", backend="first", reason="stream_truncated") == 1
    )


def test_a_backend_marked_down_fails_over_the_requests_it_has_not_answered(
    upstreams, start_gateway
):
    gw, first, spare = preferred_and_spare(
        upstreams, start_gateway, "hang", timeouts={"first_byte_s": 60.0}
    )
    results: dict[str, object] = {}

    def call(name: str, stream: bool) -> None:
        if stream:
            results[name] = stream_text(gw)
        else:
            results[name] = gw.chat(KEY, content=name)

    threads = [
        threading.Thread(target=call, args=("plain", False)),
        threading.Thread(target=call, args=("stream", True)),
    ]
    for t in threads:
        t.start()
    wait_until(lambda: first.in_flight == 2, what="both requests to reach the hung backend")
    marked_down = time.monotonic()
    first.behaviour.health_status = 503  # its probes now fail: the gateway marks it down
    for t in threads:
        t.join(60)
    # Both were retried on the spare once the probe took `first` out, not after first_byte_s.
    assert time.monotonic() - marked_down < 15
    plain = results["plain"]
    assert plain.status_code == 200 and plain.headers["X-Gateway-Backend"] == "spare"
    status, text = results["stream"]
    assert status == 200 and "spare-0" in text and "error" not in text
    assert gw.metric("soberana_gateway_errors_total", backend="first", reason="backend_down") == 2
    assert any(line.startswith("WARNING ") and "2 request(s) it had not answered fail over" in line
               for line in gw.log().splitlines())
    wait_until(lambda: first.in_flight == 0, what="the hung backend to see its requests dropped")


def test_a_client_leaving_a_non_streaming_request_aborts_it_upstream(upstreams, start_gateway):
    slow = upstreams("slow", delay_s=60.0)
    gw = start_gateway(
        config(
            {"m": [backend("slow", slow)]},
            [tenant("acme", KEY, max_concurrency=1)],
            timeouts={"first_byte_s": 120.0, "idle_s": 120.0},
        )
    )
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            gw.url + "/v1/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "long"}]},
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=httpx.Timeout(10.0, read=1.0),
        )
    # The backend stops generating for nobody, and the tenant's only slot is free again.
    wait_until(lambda: slow.cancelled == 1 and slow.in_flight == 0, what="the upstream abort")
    wait_until(
        lambda: gw.metric("soberana_gateway_backend_outstanding_requests", backend="slow") == 0,
        what="the backend slot to free",
    )
    slow.behaviour.delay_s = 0.0
    assert gw.chat(KEY, content="next").status_code == 200  # not 429 concurrency_limit_exceeded


def test_anthropic_preamble_events_do_not_commit_a_stream():
    from soberana.gateway.stream_start import first_token_reached

    start = (b'event: message_start\ndata: {"type": "message_start", "message": {"id": "m"}}\n\n'
             b'event: content_block_start\ndata: {"type": "content_block_start", "index": 0, '
             b'"content_block": {"type": "text", "text": ""}}\n\nevent: ping\n'
             b'data: {"type": "ping"}\n\n')
    assert not first_token_reached(start)
    delta = (b'event: content_block_delta\ndata: {"type": "content_block_delta", "index": 0, '
             b'"delta": {"type": "text_delta", "text": "Hi"}}\n\n')
    assert first_token_reached(start + delta)
    tool = (b'event: content_block_start\ndata: {"type": "content_block_start", "index": 1, '
            b'"content_block": {"type": "tool_use", "id": "t", "name": "f", "input": {}}}\n\n')
    assert first_token_reached(start + tool)
