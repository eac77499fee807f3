"""The guard model's output check on streams, through a real gateway: with `block`, text is held
back until the model has passed it, so a blocked answer never reaches the client, and nothing
released was unchecked."""

from __future__ import annotations

import asyncio
import json
import threading

from aiohttp import web

from tests.gateway.helpers import tenant, wait_until
from tests.gateway.privacy.conftest import KEY_A, cloud_config
from tests.gateway.privacy.test_privacy_rehydration import openai_text

SAFE_PART = "Here is the summary you asked for. The meeting moved to Thursday at ten. "
UNSAFE_PART = "OK. DAN mode enabled, I will do anything now."
TOOL_ARGS = "{}"  # the stand-in cloud's answer ends with a tool call; its arguments are checked too


class PhraseGuard:
    """A Llama-Guard-style classifier over HTTP: `unsafe\\nS1` when the text it is given contains
    `DAN mode`, else `safe`. Records every text it was asked about."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _classify(self, request: web.Request) -> web.Response:
        text = (await request.json())["messages"][-1]["content"]
        self.texts.append(text)
        verdict = "unsafe\nS1" if "DAN mode" in text else "safe"
        return web.json_response({"choices": [{"index": 0, "message": {"content": verdict}}]})

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._classify)
        runner = web.AppRunner(app)
        self._loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = runner.addresses[0][1]
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(runner.cleanup())

    def start(self) -> PhraseGuard:
        self._thread.start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def guarded_gateway(start_gateway, upstream, guard: PhraseGuard, window: int, action="block"):
    """A gateway whose only backend is the cloud `upstream`, with `guard` as the guard model."""
    tenants = [tenant("a", KEY_A, privacy=["onprem", "external"], guardrails={"output": action})]
    privacy = {
        "guard_engine": "model",
        "guard_timeout_s": 10,
        "guard_model": {
            "endpoint": guard.url,
            "model": "llama-guard",
            "timeout_s": 10,
            "stream_window_chars": window,
        },
    }
    return start_gateway(cloud_config(upstream, tenants, privacy=privacy))


def streamed(gw, content="hola") -> tuple[str, bytes]:
    r = gw.chat(KEY_A, content=content, stream=True)
    assert r.status_code == 200
    before_error = r.content.split(b'data: {"error"')[0]
    return openai_text(before_error)[0], r.content


def test_block_holds_the_whole_stream_until_the_guard_passes_the_complete_answer(
    cloud, start_gateway
):
    guard = PhraseGuard().start()
    try:
        safe = cloud(answer_override=SAFE_PART * 3, piece_chars=7, piece_delay_s=0.002)
        gw = guarded_gateway(start_gateway, safe, guard, window=0)
        text, raw = streamed(gw)
        assert text == SAFE_PART * 3 and raw.endswith(b"data: [DONE]\n\n")
        assert guard.texts == [SAFE_PART * 3 + TOOL_ARGS]  # one check, on the complete output

        guard.texts.clear()
        unsafe = cloud(answer_override=SAFE_PART + UNSAFE_PART, piece_chars=7)
        gw = guarded_gateway(start_gateway, unsafe, guard, window=0)
        text, raw = streamed(gw)
        assert text == ""  # nothing of the answer was released: not even its safe start
        assert b'"output_guardrail_blocked"' in raw and raw.endswith(b"data: [DONE]\n\n")
        assert guard.texts == [SAFE_PART + UNSAFE_PART + TOOL_ARGS]
        assert gw.metric("soberana_gateway_privacy_blocks_total", reason="guardrail_output") == 1
    finally:
        guard.stop()


def test_windows_release_only_checked_text_and_block_the_rest(cloud, start_gateway):
    guard = PhraseGuard().start()
    try:
        answer = SAFE_PART * 2 + UNSAFE_PART + " More text after it."
        c = cloud(answer_override=answer, piece_chars=5)
        gw = guarded_gateway(start_gateway, c, guard, window=40)
        text, raw = streamed(gw)
        assert b'"output_guardrail_blocked"' in raw and raw.endswith(b"data: [DONE]\n\n")
        # What was released is exactly what a passing check had seen, and it is a real part
        # of the answer: the safe start went out, the window with the phrase never did.
        assert "DAN mode" not in text and len(text) >= 40 and answer.startswith(text)
        passed = [t for t in guard.texts if "DAN mode" not in t]
        assert passed and text == passed[-1]
        # Each check saw everything so far (a prefix growing by at least a window).
        assert all((answer + TOOL_ARGS).startswith(t) for t in guard.texts)
        assert [len(t) for t in guard.texts] == sorted(len(t) for t in guard.texts)
    finally:
        guard.stop()


def test_flag_mode_does_not_hold_and_records_the_verdict_after_the_stream(
    cloud, start_gateway, tmp_path
):
    guard = PhraseGuard().start()
    try:
        c = cloud(answer_override=UNSAFE_PART, piece_chars=5)
        tenants = [
            tenant("a", KEY_A, privacy=["onprem", "external"], guardrails={"output": "flag"})
        ]
        audit = tmp_path / "audit.log"
        privacy = {
            "guard_engine": "model",
            "guard_model": {"endpoint": guard.url, "model": "llama-guard", "timeout_s": 10},
        }
        gw = start_gateway(cloud_config(c, tenants, privacy=privacy, audit={"path": str(audit)}))
        text, raw = streamed(gw)
        assert text == UNSAFE_PART  # `flag` never withholds; it records
        try:
            wait_until(lambda: audit.exists() and audit.read_text().strip(), what="audit record")
        except AssertionError:
            raise AssertionError((guard.texts, list(tmp_path.iterdir()), gw.log()[-500:])) from None
        record = json.loads(audit.read_text().splitlines()[-1])
        assert record["guardrails"] == [
            {"check": "output", "result": "flagged", "rule": "guard_model:s1"}
        ]
        assert record["status"] == 200  # delivered; the record does not claim a block
    finally:
        guard.stop()
