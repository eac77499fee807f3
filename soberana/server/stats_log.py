"""A periodic engine statistics line, as vLLM's LoggingStatLogger writes it."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

logger = logging.getLogger("soberana.engine.stats")


async def log_engine_stats(engine: Any, interval_s: float) -> None:
    """Every `interval_s`: running, waiting, KV use and token throughput; silent while idle."""
    last_t, last_prompt, last_gen = time.monotonic(), 0, 0
    idle_logged = False
    while True:
        await asyncio.sleep(interval_s)
        stats = engine.stats
        now = time.monotonic()
        prompt, gen = stats.prompt_tokens, stats.generation_tokens
        elapsed = max(now - last_t, 1e-9)
        prompt_tps, gen_tps = (prompt - last_prompt) / elapsed, (gen - last_gen) / elapsed
        last_t, last_prompt, last_gen = now, prompt, gen
        idle = stats.num_running_reqs == 0 and stats.num_waiting_reqs == 0 and gen_tps == 0 == prompt_tps
        if idle and idle_logged:
            continue  # one line says it went idle; then quiet until work arrives
        idle_logged = idle
        hit_rate = stats.prefix_cache_hits / stats.prefix_cache_queries if stats.prefix_cache_queries else 0.0
        fields = {
            "running": stats.num_running_reqs,
            "waiting": stats.num_waiting_reqs,
            "kv_cache_usage": round(stats.kv_cache_usage, 4),
            "prompt_tokens_per_s": round(prompt_tps, 1),
            "generation_tokens_per_s": round(gen_tps, 1),
            "prefix_cache_hit_rate": round(hit_rate, 4),
            "preemptions": stats.num_preemptions,
        }
        logger.info("engine stats", extra={"fields": fields})
