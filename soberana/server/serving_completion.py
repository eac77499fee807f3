"""POST /v1/completions: one engine request per prompt; choice i*n+j is sample j of prompt i."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from soberana.engine.outputs import Logprob
from soberana.server.engine_client import EngineClient, RequestStream
from soberana.server.engine_inputs import (
    Prompt,
    check_common,
    check_prompt,
    completion_prompts,
    fit_context,
    prompt_chars,
    sampling_params,
)
from soberana.server.protocol import CompletionRequest
from soberana.server.streaming import (
    TEXT_SLOT,
    Choice,
    ChunkStream,
    EventStream,
    cancel_on_disconnect,
    collect,
    merge_outputs,
    ranked,
    safe_logprob,
    text_events,
    usage,
)
from soberana.server.structured_request import check_constraint, requested_constraint
from soberana.server.tenancy import effective_cache_salt


async def create_completion(
    body: CompletionRequest, request: Request, engine: EngineClient, model_name: str
) -> Response:
    """Validate and tokenize every prompt, run them, and answer."""
    check_common(body)
    info = engine.model_info
    prompts = await engine.run_tokenizer(
        prompt_chars(body.prompt), completion_prompts, engine.tokenizer, body
    )
    constraint, param = requested_constraint(body)
    if constraint is not None:
        await check_constraint(engine, constraint, param or "structured_outputs")
    params = []
    for prompt in prompts:
        check_prompt(prompt, info.vocab_size, "prompt")
        max_tokens = fit_context(len(prompt.token_ids), body.max_tokens, info.max_model_len, "prompt")
        params.append(
            sampling_params(
                body,
                max_tokens,
                info.vocab_size,
                body.logprobs,
                prompt_logprobs=body.logprobs if body.echo else None,
                structured_outputs=constraint,
            )
        )
    engine.check_capacity(len(prompts))
    request_id = f"cmpl-{uuid.uuid4().hex}"
    streams = [
        engine.add_request(
            f"{request_id}-{i}",
            prompt.text,
            prompt.token_ids,
            p,
            streaming=body.stream,
            priority=body.priority,
            cache_salt=effective_cache_salt(request.scope, body.cache_salt),
        )
        for i, (prompt, p) in enumerate(zip(prompts, params, strict=True))
    ]
    header = {"id": request_id, "created": int(time.time()), "model": model_name}
    render = _Renderer(engine, body, prompts)
    if body.stream:
        return EventStream(_stream(engine, streams, body, header, render))
    try:
        results = await cancel_on_disconnect(
            asyncio.gather(*(collect(s) for s in streams)), request.receive
        )
    finally:
        for s in streams:
            engine.abort(s.request_id)
    if results is None:
        return Response(status_code=499)  # client gone; nobody reads this
    choices, generated, cached = [], 0, 0
    for i, (sample_choices, last) in enumerate(results):
        cached += last.num_cached_tokens
        for choice in sorted(sample_choices.values(), key=lambda c: c.index):
            generated += len(choice.token_ids)
            choices.append(render.choice(i, choice, last.prompt_logprobs, first=True, final=True))
    prompt_tokens = sum(len(p.token_ids) for p in prompts)
    return JSONResponse(
        {
            **header,
            "object": "text_completion",
            "choices": choices,
            "usage": usage(prompt_tokens, generated, cached),
        }
    )


class _Renderer:
    """Turns a prompt's choice (whole or a delta) into OpenAI's completion choice object."""

    def __init__(self, engine: EngineClient, body: CompletionRequest, prompts: list[Prompt]) -> None:
        self.body = body
        self.tokenizer = engine.tokenizer
        self.prompts = prompts
        self.text_offset: dict[int, int] = {}  # choice index -> characters sent so far

    def choice(
        self,
        prompt_index: int,
        choice: Choice,
        prompt_logprobs: list[dict[int, Logprob] | None] | None,
        first: bool,
        final: bool,
    ) -> dict:
        body = self.body
        index = prompt_index * body.n + choice.index
        prompt = self.prompts[prompt_index]
        text = choice.text
        token_ids, logprobs = list(choice.token_ids), choice.logprobs
        if body.echo and first:
            prompt_text = prompt.text if prompt.text is not None else self.tokenizer.decode(prompt.token_ids)
            text = prompt_text + text
            if body.logprobs is not None:
                token_ids = prompt.token_ids + token_ids
                logprobs = list(prompt_logprobs or [None] * len(prompt.token_ids)) + list(logprobs or [])
        entry = {
            "index": index,
            "text": text,
            "logprobs": None,
            "finish_reason": choice.finish_reason if final else None,
            "stop_reason": choice.stop_reason if final else None,
        }
        if body.logprobs is not None:
            entry["logprobs"] = self._logprobs(index, token_ids, logprobs or [])
        return entry

    def _logprobs(
        self, index: int, token_ids: list[int], logprobs: list[dict[int, Logprob] | None]
    ) -> dict:
        tokens, token_logprobs, top, offsets = [], [], [], []
        offset = self.text_offset.get(index, 0)
        for token_id, entries in zip(token_ids, logprobs, strict=True):
            if entries is None:  # the first prompt token has no logprob
                piece = self.tokenizer.decode([token_id])
                tokens.append(piece)
                token_logprobs.append(None)
                top.append(None)
            else:
                chosen = entries[token_id]
                piece = chosen.decoded_token or ""
                tokens.append(piece)
                token_logprobs.append(safe_logprob(chosen.logprob))
                top.append(
                    {
                        (lp.decoded_token or ""): safe_logprob(lp.logprob)
                        for _, lp in ranked(entries, self.body.logprobs or 0)
                    }
                )
            offsets.append(offset)
            offset += len(piece)
        self.text_offset[index] = offset
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top,
            "text_offset": offsets,
        }


def _stream(
    engine: EngineClient,
    streams: list[RequestStream],
    body: CompletionRequest,
    header: dict,
    render: _Renderer,
) -> AsyncIterator[str]:
    prompt_tokens = sum(len(p.token_ids) for p in render.prompts)
    out = ChunkStream(header, "text_completion", body.stream_options, prompt_tokens)
    cached = [0] * len(streams)  # per prompt; out.cached is their sum
    started: set[int] = set()  # choice indices that sent their first chunk (echo goes there)
    done: set[int] = set()

    # A text delta without logprobs, echo or running usage is the same JSON around new text.
    plain = body.logprobs is None and not body.echo and not out.continuous
    text_event: dict[int, Callable[[str], str]] = {}  # choice index -> its events (plain)

    async def events() -> AsyncIterator[str]:
        async for prompt_index, outputs in _merge(streams):
            cached[prompt_index] = outputs[-1].num_cached_tokens
            out.cached = sum(cached)
            batch: dict[int, Choice] = {}
            merge_outputs(outputs, batch)
            for j in sorted(batch):
                choice = batch[j]
                index = prompt_index * body.n + j
                if index in done:
                    continue
                first = index not in started
                out.generated += len(choice.token_ids)
                if plain:
                    if choice.text:
                        if first:
                            started.add(index)
                            slot = Choice(j, TEXT_SLOT)
                            template = out.event(render.choice(prompt_index, slot, None, False, False))
                            text_event[index] = text_events(template)
                        yield text_event[index](choice.text)
                elif (
                    choice.text
                    or (body.logprobs is not None and choice.token_ids)
                    or (first and body.echo)
                ):
                    started.add(index)
                    entry = render.choice(prompt_index, choice, outputs[0].prompt_logprobs, first, False)
                    yield out.event(entry)
                if choice.finish_reason is not None:
                    done.add(index)
                    yield out.finish({"index": index, "text": ""}, choice)

    def abort() -> None:
        for s in streams:
            engine.abort(s.request_id)

    return out.run(events(), abort)


async def _merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, list]]:
    """Outputs of several requests as they arrive, tagged with the prompt index, until all end."""
    if len(streams) == 1:  # the common case needs no task per wake-up
        while True:
            outputs = await streams[0].get()
            yield 0, outputs
            if outputs[-1].finished:
                return
    pending = {asyncio.ensure_future(s.get()): i for i, s in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                i = pending.pop(task)
                outputs = task.result()
                yield i, outputs
                if not outputs[-1].finished:
                    pending[asyncio.ensure_future(streams[i].get())] = i
    finally:
        for task in pending:
            task.cancel()
