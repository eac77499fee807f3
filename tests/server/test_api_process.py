"""The API process's per-request machinery, without an engine: SSE event templates, the
tokenizer thread, and the streams that hand outputs to handlers."""

from __future__ import annotations

import asyncio
import json
import threading
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from soberana.engine.config import EngineConfig
from soberana.engine.outputs import RequestOutput
from soberana.server.engine_client import (
    OFFLOAD_TOKENIZATION_CHARS,
    EngineClient,
    EngineDeadError,
    RequestStream,
)
from soberana.server.streaming import TEXT_SLOT, sse, text_events


def _chunk(text: str, usage: bool) -> dict:
    payload = {
        "id": "chatcmpl-1", "created": 1700000000, "model": "m\u00e9 \"quoted\"",
        "object": "chat.completion.chunk",
        "choices": [{"index": 3, "delta": {"content": text}, "logprobs": None, "finish_reason": None}],
    }  # fmt: skip
    if usage:
        payload["usage"] = None
    return payload


@settings(max_examples=300, deadline=None)
@given(text=st.text(), usage=st.booleans())
def test_templated_events_are_byte_identical_to_encoding_the_payload(text, usage):
    event = text_events(sse(_chunk(TEXT_SLOT, usage)))
    assert event(text) == sse(_chunk(text, usage))
    assert json.loads(event(text)[len("data: "):])["choices"][0]["delta"]["content"] == text


def _ticks_while(work) -> int:
    """How often a 5 ms ticker ran on the event loop while `work()` was awaited."""

    async def main() -> int:
        ticks = 0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not stop.is_set():
                await asyncio.sleep(0.005)
                ticks += 1

        task = asyncio.ensure_future(ticker())
        await asyncio.sleep(0)
        await work()
        stop.set()
        await task
        return ticks

    return asyncio.run(main())


def test_long_prompts_are_tokenized_off_the_event_loop():
    client = EngineClient(EngineConfig(model="demo"), max_waiting_requests=10)
    threads: list[str] = []

    def slow_tokenize(text: str) -> list[int]:
        threads.append(threading.current_thread().name)
        time.sleep(0.3)  # stands for a tokenizer busy with a very long prompt
        return [len(text)]

    long_text = "x" * OFFLOAD_TOKENIZATION_CHARS
    assert _ticks_while(lambda: client.run_tokenizer(len(long_text), slow_tokenize, long_text)) >= 10
    # A short prompt is cheaper to tokenize in place than to hand over.
    assert _ticks_while(lambda: client.run_tokenizer(5, slow_tokenize, "short")) <= 1
    assert threads[0] != threading.main_thread().name
    assert threads[1] == threading.main_thread().name


def _output(finished: bool) -> RequestOutput:
    return RequestOutput("r", None, [1], [], finished=finished)


def test_a_stream_wakes_its_reader_with_everything_that_arrived():
    async def main() -> None:
        stream = RequestStream("r", streaming=True)
        reader = asyncio.ensure_future(stream.get())
        await asyncio.sleep(0)
        first, second = _output(False), _output(True)
        stream.put(first)
        stream.put(second)
        assert await reader == [first, second]

    asyncio.run(main())


def test_a_non_streaming_reader_wakes_only_for_the_end():
    async def main() -> None:
        stream = RequestStream("r", streaming=False)
        reader = asyncio.ensure_future(stream.get())
        stream.put(_output(False))
        await asyncio.sleep(0.01)
        assert not reader.done()
        stream.put(_output(True))
        assert len(await reader) == 2

    asyncio.run(main())


def test_a_failed_stream_raises_in_its_reader_and_a_cancelled_reader_can_read_again():
    async def main() -> None:
        stream = RequestStream("r", streaming=True)
        reader = asyncio.ensure_future(stream.get())
        await asyncio.sleep(0)
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        reader = asyncio.ensure_future(stream.get())
        await asyncio.sleep(0)
        stream.fail(EngineDeadError("gone"))
        try:
            await reader
        except EngineDeadError as exc:
            assert str(exc) == "gone"
        else:
            raise AssertionError("the reader did not see the failure")

    asyncio.run(main())
