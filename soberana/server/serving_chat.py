"""POST /v1/chat/completions: render the conversation, run it, answer whole or as SSE chunks."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from soberana.engine.outputs import Logprob
from soberana.server.agent_request import plan_chat, prepare_constraint
from soberana.server.chat_output import ChatOutputParser
from soberana.server.engine_client import EngineClient
from soberana.server.engine_inputs import (
    check_common,
    check_prompt,
    fit_context,
    render_chat_off_loop,
    sampling_params,
)
from soberana.server.errors import bad_request
from soberana.server.protocol import ChatCompletionRequest
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
from soberana.server.tenancy import effective_cache_salt


async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, engine: EngineClient, model_name: str
) -> Response:
    """Validate and tokenize, hand the request to the engine, and answer."""
    check_common(body)
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")
    info = engine.model_info
    plan = plan_chat(body, engine.agent_options, getattr(engine.tokenizer, "chat_template", None))
    prompt = await render_chat_off_loop(engine, body, plan.template_tools)
    check_prompt(prompt, info.vocab_size, "messages")
    constraint = await prepare_constraint(plan, engine, prompt.text)
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    max_tokens = fit_context(len(prompt.token_ids), requested, info.max_model_len, "messages")
    top_n = body.top_logprobs or 0
    params = sampling_params(body, max_tokens, info.vocab_size, top_n if body.logprobs else None,
                             structured_outputs=constraint)
    engine.check_capacity(1)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    stream = engine.add_request(
        request_id,
        prompt.text,
        prompt.token_ids,
        params,
        streaming=body.stream,
        priority=body.priority,
        cache_salt=effective_cache_salt(request.scope, body.cache_salt),
    )
    header = {"id": request_id, "created": int(time.time()), "model": model_name}
    if body.stream:
        parsers = ({i: plan.output_parser(prompt.text) for i in range(body.n)}
                   if plan.parses_output else None)
        return EventStream(
            _stream(engine, stream, body, header, len(prompt.token_ids), top_n, parsers)
        )
    try:
        result = await cancel_on_disconnect(collect(stream), request.receive)
    finally:
        engine.abort(request_id)  # no-op when finished; frees the KV blocks when not
    if result is None:
        return Response(status_code=499)  # client gone; nobody reads this
    choices, last = result
    generated = sum(len(c.token_ids) for c in choices.values())
    messages = {}
    for c in choices.values():
        if plan.parses_output:  # reasoning, content and tool calls apart
            messages[c.index] = plan.output_parser(prompt.text).message(c.text, c.finish_reason)
        else:
            messages[c.index] = ({"role": "assistant", "content": c.text}, c.finish_reason)
    return JSONResponse(
        {
            **header,
            "object": "chat.completion",
            "choices": [
                {
                    "index": c.index,
                    "message": messages[c.index][0],
                    "logprobs": _logprobs(c.token_ids, c.logprobs, top_n) if body.logprobs else None,
                    "finish_reason": messages[c.index][1],
                    "stop_reason": c.stop_reason,
                }
                for c in sorted(choices.values(), key=lambda c: c.index)
            ],
            "usage": usage(len(prompt.token_ids), generated, last.num_cached_tokens),
        }
    )


def _stream(
    engine: EngineClient,
    stream,
    body: ChatCompletionRequest,
    header: dict,
    prompt_tokens: int,
    top_n: int,
    parsers: dict[int, ChatOutputParser] | None = None,
) -> AsyncIterator[str]:
    out = ChunkStream(header, "chat.completion.chunk", body.stream_options, prompt_tokens)

    def chunk(index: int, delta: dict, choice: Choice | None = None) -> str:
        entry: dict = {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}
        if choice is not None and body.logprobs:
            entry["logprobs"] = _logprobs(choice.token_ids, choice.logprobs, top_n)
        return out.event(entry)

    # A content delta without logprobs or running usage is the same JSON around new text.
    plain = not body.logprobs and not out.continuous and parsers is None
    content_events = (
        [text_events(chunk(i, {"content": TEXT_SLOT})) for i in range(body.n)] if plain else []
    )

    async def events() -> AsyncIterator[str]:
        for index in range(body.n):
            yield chunk(index, {"role": "assistant", "content": ""})
        done: set[int] = set()
        while len(done) < body.n:
            outputs = await stream.get()
            out.cached = outputs[-1].num_cached_tokens
            batch: dict[int, Choice] = {}
            merge_outputs(outputs, batch)
            for index in sorted(batch):
                choice = batch[index]
                if index in done:
                    continue
                out.generated += len(choice.token_ids)
                finish_reason = choice.finish_reason
                if plain:
                    if choice.text:
                        yield content_events[index](choice.text)
                elif parsers is not None:  # reasoning / tool-call deltas
                    deltas = parsers[index].feed(choice.text)
                    if finish_reason is not None:
                        rest, finish_reason = parsers[index].finish(finish_reason)
                        deltas += rest
                    for j, delta in enumerate(deltas):
                        yield chunk(index, delta, choice if j == 0 else None)
                    if not deltas and body.logprobs and choice.token_ids:
                        yield chunk(index, {"content": ""}, choice)
                elif choice.text or (body.logprobs and choice.token_ids):
                    yield chunk(index, {"content": choice.text}, choice)
                if choice.finish_reason is not None:
                    done.add(index)
                    yield out.finish({"index": index, "delta": {}}, choice, finish_reason)
            if outputs[-1].finished:
                break

    return out.run(events(), lambda: engine.abort(stream.request_id))


def _logprobs(
    token_ids: list[int], logprobs: list[dict[int, Logprob]] | None, top_n: int
) -> dict:
    """OpenAI chat logprobs: each generated token with its top alternatives."""
    content = []
    for token_id, entries in zip(token_ids, logprobs or [], strict=True):
        chosen = entries[token_id]
        content.append(
            {
                **_token_entry(chosen),
                "top_logprobs": [_token_entry(lp) for _, lp in ranked(entries, top_n)],
            }
        )
    return {"content": content}


def _token_entry(lp: Logprob) -> dict:
    token = lp.decoded_token or ""
    return {"token": token, "logprob": safe_logprob(lp.logprob), "bytes": list(token.encode())}
