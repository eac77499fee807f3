"""Many concurrent streaming clients are batched together and each gets its own answer."""

from __future__ import annotations

import asyncio

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families

PROMPTS = [f"Request {i}: the quick brown fox jumps over the lazy dog" for i in range(8)]
NUM_CLIENTS = 64
MAX_TOKENS = 16


async def _stream_text(client: openai.AsyncOpenAI, model: str, prompt: str) -> tuple[str, str]:
    stream = await client.completions.create(
        model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True,
        extra_body={"ignore_eos": True},
    )
    text, finish = "", None
    async for chunk in stream:
        for choice in chunk.choices:
            text += choice.text
            finish = choice.finish_reason or finish
    return text, finish


async def _running_peak(url: str, stop: asyncio.Event) -> float:
    """Highest vllm:num_requests_running seen while the clients run."""
    peak = 0.0
    async with httpx.AsyncClient() as http:
        while not stop.is_set():
            text = (await http.get(f"{url}/metrics")).text
            for family in text_string_to_metric_families(text):
                if family.name == "vllm:num_requests_running":
                    peak = max(peak, family.samples[0].value)
            await asyncio.sleep(0.05)
    return peak


def test_64_concurrent_streams_each_get_the_tokens_they_get_alone(server, model):
    async def run() -> tuple[dict[str, tuple[str, str]], list[tuple[str, str]], float]:
        async with openai.AsyncOpenAI(
            base_url=f"{server.url}/v1", api_key=server.api_key, max_retries=0, timeout=300
        ) as client:
            alone = {p: await _stream_text(client, model, p) for p in PROMPTS}
            stop = asyncio.Event()
            watcher = asyncio.create_task(_running_peak(server.url, stop))
            together = await asyncio.gather(
                *(_stream_text(client, model, PROMPTS[i % len(PROMPTS)]) for i in range(NUM_CLIENTS))
            )
            stop.set()
            return alone, together, await watcher

    alone, together, peak = asyncio.run(run())
    assert len(together) == NUM_CLIENTS
    for i, result in enumerate(together):
        assert result == alone[PROMPTS[i % len(PROMPTS)]], f"client {i} differs from alone"
        assert result[1] == "length"
    # They really ran together: the engine batched many of them in the same steps.
    assert peak >= NUM_CLIENTS // 2
