"""The tokenizer pool: long texts run beside each other, the queue is bounded, and a job whose
client left before it started never runs."""

from __future__ import annotations

import asyncio
import threading

import pytest

from soberana.engine.config import EngineConfig
from soberana.server import engine_client
from soberana.server.engine_client import EngineClient, QueueFullError

LONG = engine_client.OFFLOAD_TOKENIZATION_CHARS  # characters that leave the event loop


def _client() -> EngineClient:
    return EngineClient(EngineConfig(), max_waiting_requests=8)  # no core started


def test_long_texts_are_tokenized_side_by_side_and_a_left_clients_job_never_runs():
    client = _client()
    release = threading.Event()
    started: list[str] = []

    def work(name: str) -> str:
        started.append(name)
        release.wait(30)
        return name

    async def scenario() -> None:
        busy = [asyncio.ensure_future(client.run_tokenizer(LONG, work, f"w{i}"))
                for i in range(engine_client.TOKENIZER_WORKERS)]
        queued = asyncio.ensure_future(client.run_tokenizer(LONG, work, "gone"))
        while len(started) < engine_client.TOKENIZER_WORKERS:  # every worker holds a job
            await asyncio.sleep(0.01)
        queued.cancel()  # its client disconnected while the job waited for a thread
        await asyncio.sleep(0.05)
        release.set()
        assert await asyncio.gather(*busy) == [f"w{i}" for i in range(len(busy))]
        await asyncio.sleep(0.1)

    asyncio.run(scenario())
    assert "gone" not in started


def test_the_tokenizer_queue_is_bounded(monkeypatch):
    monkeypatch.setattr(engine_client, "MAX_TOKENIZER_JOBS", 2)
    client = _client()
    release = threading.Event()

    async def scenario() -> None:
        jobs = [asyncio.ensure_future(client.run_tokenizer(LONG, release.wait, 30))
                for _ in range(2)]
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFullError, match="limit 2"):
            await client.run_tokenizer(LONG, release.wait, 30)
        assert await client.run_tokenizer(10, len, "short") == 5  # short texts stay inline
        release.set()
        await asyncio.gather(*jobs)

    asyncio.run(scenario())
