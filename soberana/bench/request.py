"""One benchmark request as plain data: what is sent and what was seen."""

from __future__ import annotations

from dataclasses import dataclass, field

# Error types a failed request is counted under (summary.json `errors`, requests.csv `error_type`).
ERROR_TYPES = {
    "http_<code>": "the server answered with a non-200 HTTP status, e.g. http_500, http_429",
    "timeout": "no complete answer within --timeout seconds",
    "connection_error": "could not connect to the server",
    "disconnected": "the server closed the connection before the answer was complete",
    "malformed_sse": "a stream line was not valid server-sent events with a JSON payload",
    "stream_error": "the server sent an error object inside the stream",
    "incomplete_stream": "the stream ended without [DONE] or a finish_reason",
}


@dataclass
class RequestSpec:
    """One request to send: chat messages (rendered as plain text for /v1/completions)."""

    request_id: str
    messages: list[dict[str, str]]
    max_tokens: int
    target_prompt_tokens: int | None = None  # what the workload aimed for, in tokens
    user: int | None = None  # multiturn: which conversation
    turn: int | None = None  # multiturn: which round of it
    prefix: int | None = None  # prefix workload: which shared prefix

    def prompt_text(self) -> str:
        """The prompt for /v1/completions: the lone message as is, or a plain transcript."""
        if len(self.messages) == 1:
            return self.messages[0]["content"]
        return render_transcript(self.messages)


def render_transcript(messages: list[dict[str, str]]) -> str:
    """Messages as `System...\n\nUser: ...\nAssistant: ...` ending with `Assistant:`.

    Append-only: an answer that begins with a space (as generated text after `Assistant:`
    usually does) is rendered exactly as the server produced it, so each round's prompt
    starts with the previous prompt plus its answer (what prefix caching needs).
    """
    lines = []
    for m in messages:
        content = m["content"]
        if m["role"] == "system":
            lines.append(content + "\n")
        else:
            sep = "" if content[:1].isspace() else " "
            lines.append(f"{'User' if m['role'] == 'user' else 'Assistant'}:{sep}{content}")
    return "\n".join(lines) + "\nAssistant:"


@dataclass
class RequestResult:
    """What the client observed for one request. Times are seconds (perf_counter based)."""

    spec: RequestSpec
    start_s: float = 0.0  # when it was sent, relative to the start of the run
    status: int = 0  # HTTP status; 0 when no response arrived
    ttft_s: float | None = None  # to the first non-empty content chunk
    itl_s: list[float] = field(default_factory=list)  # between successive content chunks
    e2e_s: float | None = None  # to the end of the stream
    queue_time_s: float | None = None  # only when the server reports it
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens, if sent
    token_source: str = "usage"  # usage | tokenizer | approximate
    finish_reason: str | None = None
    error_type: str | None = None
    error_message: str = ""
    text: str = ""  # generated text (multiturn appends it to the conversation)

    @property
    def ok(self) -> bool:
        """True when the request completed without error."""
        return self.error_type is None

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first: (e2e - ttft) / (output_tokens - 1)."""
        if not self.ok or self.ttft_s is None or self.e2e_s is None or not self.output_tokens:
            return None
        if self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)
