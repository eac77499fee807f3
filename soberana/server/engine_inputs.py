"""From validated request bodies to engine inputs: token ids, context checks, SamplingParams."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from soberana.engine.sampling_params import SamplingParams
from soberana.server.agent_request import template_message_tool_fields
from soberana.server.errors import bad_request
from soberana.server.protocol import (
    ChatMessage,
    CompletionRequest,
    SamplingFields,
    unsupported_params,
)
from soberana.structured.params import StructuredOutputsParams


@dataclass
class Prompt:
    """One prompt ready for the engine: its text when we have it, and its token ids."""

    text: str | None
    token_ids: list[int]


def check_common(body: SamplingFields) -> None:
    """400 naming the first parameter Soberana cannot honour, or one that needs another."""
    found = unsupported_params(body)
    if found:
        raise bad_request(
            f"{found[0]} is not supported by Soberana yet; remove it from the request",
            param=found[0],
            code="unsupported_parameter",
        )
    if body.stream_options is not None and not body.stream:
        raise bad_request("stream_options is only allowed when stream is true", "stream_options")


def render_chat(
    tokenizer: Any,
    messages: list[ChatMessage],
    add_generation_prompt: bool,
    continue_final_message: bool,
    chat_template_kwargs: dict[str, Any] | None,
    tools: list[dict] | None = None,
) -> Prompt:
    """Apply the model's chat template and tokenize the result (the template adds BOS);
    `tools` (OpenAI's function definitions) are passed to the template as `tools`."""
    if continue_final_message and add_generation_prompt:
        raise bad_request(
            "continue_final_message and add_generation_prompt cannot both be true",
            param="continue_final_message",
        )
    if continue_final_message and messages[-1].role != "assistant":
        raise bad_request(
            "continue_final_message needs an assistant message last", param="messages"
        )
    conversation = [_template_message(m, i) for i, m in enumerate(messages)]
    kwargs = dict(chat_template_kwargs or {})
    for reserved in ("messages", "conversation", "tokenize", "add_generation_prompt", "tools"):
        if reserved in kwargs:
            raise bad_request(
                f"chat_template_kwargs may not set {reserved!r}", param="chat_template_kwargs"
            )
    if getattr(tokenizer, "chat_template", None) is None:
        raise bad_request(
            "this model has no chat template; use /v1/completions or serve it with "
            "--chat-template",
            param="messages",
        )
    try:
        text = tokenizer.apply_chat_template(
            conversation,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            **({"tools": tools} if tools else {}),
            **kwargs,
        )
    except Exception as exc:  # jinja raises TemplateError and friends for bad input
        raise bad_request(f"the chat template failed on these messages: {exc}", "messages") from exc
    return Prompt(text, tokenizer.encode(text, add_special_tokens=False))


async def render_chat_off_loop(engine: Any, body: Any, tools: list[dict] | None = None) -> Prompt:
    """`render_chat` for a request with chat fields (chat completions, /tokenize), run on the
    engine client's tokenizer pool when the messages are long."""
    return await engine.run_tokenizer(
        chat_chars(body.messages),
        render_chat,
        engine.tokenizer,
        body.messages,
        body.add_generation_prompt,
        body.continue_final_message,
        body.chat_template_kwargs,
        tools,
    )


def check_prompt_chars(engine: Any, prompts: list, param: str) -> None:
    """400 for a prompt too long to fit the context whatever it tokenizes to, before it is
    tokenized (a 5 MB prompt took 13.6 s to be refused after tokenizing).

    No token stands for more characters than the longest vocabulary entry (byte-level BPE
    entries are at least as long as the text they decode to), so a prompt of more than
    `max_model_len * max_token_chars` characters has more than `max_model_len` tokens.
    `prompts` is a completions `prompt` or a list holding one conversation.
    """
    max_model_len = engine.model_info.max_model_len
    limit = max_model_len * engine.max_token_chars
    if isinstance(prompts, str):
        prompts = [prompts]
    for prompt in prompts:
        if isinstance(prompt, str):
            chars = len(prompt)
        elif isinstance(prompt, list) and prompt and isinstance(prompt[0], ChatMessage):
            chars = chat_chars(prompt)
        else:
            continue  # token ids: their count is checked exactly, later
        if chars > limit:
            raise bad_request(
                f"This model's maximum context length is {max_model_len} tokens. However, your "
                f"{param} has {chars} characters, more than any {max_model_len} tokens can hold "
                f"({limit}). Please reduce the length of the {param}.",
                param=param,
                code="context_length_exceeded",
            )


def chat_chars(messages: list[ChatMessage]) -> int:
    """Characters of text in a conversation: what rendering and tokenizing it costs."""
    total = 0
    for message in messages:
        if isinstance(message.content, str):
            total += len(message.content)
        elif message.content is not None:
            total += sum(len(part.text or "") for part in message.content)
    return total


def prompt_chars(prompt: str | list[str] | list[int] | list[list[int]]) -> int:
    """Characters of text to tokenize in a completions prompt (token ids need none)."""
    if isinstance(prompt, str):
        return len(prompt)
    return sum(len(item) for item in prompt if isinstance(item, str))


def _template_message(message: ChatMessage, index: int) -> dict[str, Any]:
    # "developer" is OpenAI's newer name for the system role; templates know "system".
    role = "system" if message.role == "developer" else message.role
    content = message.content
    if isinstance(content, list):
        content = "".join(part.text or "" for part in content)
    entry: dict[str, Any] = {"role": role, "content": content or ""}
    if message.name is not None:
        entry["name"] = message.name
    entry.update(template_message_tool_fields(message, index))
    return entry


def completion_prompts(tokenizer: Any, body: CompletionRequest) -> list[Prompt]:
    """Every prompt of a /v1/completions body, tokenized (ids are taken as given)."""
    raw = body.prompt
    items: list[str | list[int]]
    if isinstance(raw, str):
        items = [raw]
    elif raw and isinstance(raw[0], int):
        items = [raw]  # one prompt given as token ids
    else:
        items = list(raw)
    prompts = []
    for item in items:
        if isinstance(item, str):
            prompts.append(Prompt(item, tokenizer.encode(item, add_special_tokens=body.add_special_tokens)))
        else:
            prompts.append(Prompt(None, list(item)))
    return prompts


def check_prompt(prompt: Prompt, vocab_size: int, param: str) -> None:
    """400 for an empty prompt or a token id the model does not have."""
    if not prompt.token_ids:
        raise bad_request(f"{param} is empty after tokenization", param=param)
    bad = [t for t in prompt.token_ids if t >= vocab_size]
    if bad:
        raise bad_request(
            f"{param} holds token id {bad[0]}, outside the vocabulary [0, {vocab_size - 1}]",
            param=param,
        )


def fit_context(
    prompt_len: int, max_tokens: int | None, max_model_len: int, prompt_param: str
) -> int:
    """The max_tokens to send: the request's, or what the context leaves; 400 if none fits."""
    if max_tokens is None:
        if prompt_len >= max_model_len:
            raise bad_request(
                f"This model's maximum context length is {max_model_len} tokens. However, your "
                f"{prompt_param} has {prompt_len} tokens, which leaves no room for a completion. "
                f"Please reduce the length of the {prompt_param}.",
                param=prompt_param,
                code="context_length_exceeded",
            )
        return max_model_len - prompt_len
    if prompt_len + max_tokens > max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the {prompt_param}, "
            f"{max_tokens} in the completion). Please reduce the length of the {prompt_param} "
            "or completion.",
            param=prompt_param,
            code="context_length_exceeded",
        )
    return max_tokens


def sampling_params(
    body: SamplingFields,
    max_tokens: int,
    vocab_size: int,
    logprobs: int | None,
    prompt_logprobs: int | None = None,
    structured_outputs: StructuredOutputsParams | None = None,
) -> SamplingParams:
    """SamplingParams for the engine; any range error becomes a 400 naming the parameter."""
    stop_ids = body.stop_token_ids or []
    bad = [t for t in stop_ids if t >= vocab_size]
    if bad:
        raise bad_request(
            f"stop_token_ids holds {bad[0]}, outside the vocabulary [0, {vocab_size - 1}]",
            param="stop_token_ids",
        )
    try:
        return SamplingParams(
            n=body.n,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=body.top_k,
            min_p=body.min_p,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            repetition_penalty=body.repetition_penalty,
            seed=body.seed,
            stop=body.stop,
            stop_token_ids=stop_ids,
            ignore_eos=body.ignore_eos,
            max_tokens=max_tokens,
            min_tokens=body.min_tokens,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=body.skip_special_tokens,
            include_stop_str_in_output=body.include_stop_str_in_output,
            structured_outputs=structured_outputs,
        )
    except ValueError as exc:
        message = str(exc)
        raise bad_request(message, param=message.split(" ", 1)[0]) from exc
