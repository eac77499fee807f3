"""Plain data that crosses the engine boundary: core requests/outputs and user-facing results."""

from __future__ import annotations

from dataclasses import dataclass, field

from soberana.engine.sampling_params import SamplingParams
from soberana.kv.stats import WarehouseStats


@dataclass
class ModelInfo:
    """What the engine core tells its front end about the model it serves, once at start."""

    name: str
    path: str
    max_model_len: int
    vocab_size: int
    eos_token_ids: list[int]
    dtype: str
    device: str
    num_blocks: int
    block_size: int
    fingerprint: str  # hex of the KV layout's fingerprint (the block hashes' seed); "" if none
    is_demo: bool
    task: str = "generate"  # or "embed" / "rerank" (soberana.engine.pooling_core)
    quantization: str | None = None  # scheme serving the weights (None: the model dtype)
    quantization_kernels: list[str] | None = None
    kv_cache_dtype: str = "auto"


@dataclass
class EngineCoreRequest:
    """What the front end (LLM or the API process) hands the engine core: token ids only."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float
    priority: int = 0  # lower value is served first (vLLM's convention)
    cache_salt: str | None = None


@dataclass
class TokenLogprobs:
    """Log-probabilities at one position: the chosen token first, then the top-N.

    `rank` is the chosen token's 1-based rank in the distribution.
    """

    token_id: int
    logprob: float
    rank: int
    top_token_ids: list[int]
    top_logprobs: list[float]


@dataclass
class EngineCoreOutput:
    """New tokens of one sample of one request after one engine step.

    `index` is the sample index (0..n-1) for `n > 1`. `finish_reason` is None while running,
    else "stop" (EOS or a stop token; `stop_reason` holds the token id, None for EOS),
    "length" or "abort". Timestamps are `time.time()` seconds, set once.
    """

    request_id: str
    index: int
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    scheduled_time: float | None = None  # first time the request was scheduled (queue time)


@dataclass
class SchedulerStats:
    """Engine state for metrics; counters are cumulative since start."""

    num_running_reqs: int = 0
    num_waiting_reqs: int = 0
    kv_cache_usage: float = 0.0  # fraction of blocks in use by running requests
    num_blocks: int = 0
    prefix_cache_queries: int = 0  # tokens looked up
    prefix_cache_hits: int = 0  # tokens found
    num_preemptions: int = 0
    prompt_tokens: int = 0  # prompt tokens computed (cache hits excluded)
    generation_tokens: int = 0
    kv_warehouse: WarehouseStats | None = None  # when tiers are configured
    spec_decoding: object | None = None  # SpecDecodingStats, when speculating


@dataclass
class CompletionOutput:
    """One sample of a finished (or streaming) request, as the user sees it."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # One dict per generated token: {token_id: Logprob}, the chosen token included.
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class RequestOutput:
    """Result of one prompt (vLLM's shape)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    num_cached_tokens: int = 0
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class PoolingRequest:
    """An embedding or scoring input: token ids (and a cross-encoder pair's segment ids)."""

    request_id: str
    prompt_token_ids: list[int]
    arrival_time: float
    token_type_ids: list[int] | None = None


@dataclass
class PoolingOutput:
    """The result of one PoolingRequest: an embedding (embedders) or a score (cross-encoders)."""

    request_id: str
    embedding: list[float] | None
    score: float | None
    num_prompt_tokens: int
