"""The engine's speculation state: which requests draft this step, how many tokens, and
the acceptance counters (vLLM's spec_decode metrics).

Turn-down rule (per step, then per request):
- more than `disable_by_batch_size` running requests: nobody drafts (a large batch is
  compute-bound; verifying k extra tokens per request costs throughput there);
- a request whose acceptance (an exponential moving average of accepted / drafted, weight
  0.3 on the newest step) falls below `min_acceptance_rate` pauses drafting for 8 steps,
  doubling on each pause up to 256, then tries again from the threshold;
- a request drafts at most what its max_tokens and the context length leave room for; a
  structured-output request keeps only the drafts its grammar accepts (`trim_drafts`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from soberana.engine.request import Request
from soberana.engine.spec_decode.config import SpeculativeConfig
from soberana.engine.spec_decode.proposer import Proposer

_EMA_WEIGHT = 0.3
_FIRST_PAUSE, _MAX_PAUSE = 8, 256


@dataclass
class SpecDecodingStats:
    """Cumulative counters, vLLM's spec_decode_* metrics."""

    num_drafts: int = 0  # verification steps that carried at least one draft token
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_accepted_tokens_per_pos: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0


@dataclass
class _RequestState:
    ema: float = 1.0
    paused_until: int = 0
    pause: int = _FIRST_PAUSE


class SpecDecode:
    def __init__(self, config: SpeculativeConfig, proposer: Proposer, max_model_len: int,
                 trim_drafts: Callable[[Request, list[int]], list[int]] | None = None) -> None:
        self.config = config
        self.proposer = proposer
        # (request, drafts) -> the leading drafts worth verifying (a grammar's valid prefix)
        self.trim_drafts = trim_drafts
        self.max_model_len = max_model_len
        self.stats = SpecDecodingStats(
            num_accepted_tokens_per_pos=[0] * config.num_speculative_tokens)
        self.state: dict[tuple[str, int], _RequestState] = {}
        self.step = 0

    def propose(self, running: list[Request]) -> None:
        """Set `spec_token_ids` on the running requests that draft this step."""
        self.step += 1
        live = {r.key for r in running}
        self.proposer.forget_except(live)
        for key in [k for k in self.state if k not in live]:
            del self.state[key]
        for r in running:
            r.spec_token_ids = []
        if len(running) > self.config.disable_by_batch_size:
            return
        chosen, counts = [], []
        for r in running:
            k = self._num_drafts(r)
            if k > 0:
                chosen.append(r)
                counts.append(k)
        if not chosen:
            return
        for r, drafts, k in zip(chosen, self.proposer.propose(chosen, counts), counts):
            drafts = list(drafts[:k])
            r.spec_token_ids = self.trim_drafts(r, drafts) if self.trim_drafts else drafts

    def would_draft(self, running: list[Request]) -> bool:
        """Whether a request would draft this step once its in-flight token is known (async
        scheduling reads the step in flight back first only then)."""
        if len(running) > self.config.disable_by_batch_size:
            return False
        return any(self._num_drafts(r, ignore_in_flight=True) > 0 for r in running)

    def _num_drafts(self, r: Request, ignore_in_flight: bool = False) -> int:
        """Drafts `r` may carry this step (0: it decodes one token)."""
        if r.num_computed_tokens != r.num_tokens - 1 or (r.num_placeholders
                                                         and not ignore_in_flight):
            return 0  # still prefilling, or a token in flight
        st = self.state.get(r.key)
        if st is not None and self.step < st.paused_until:
            return 0
        # Every accepted draft plus the bonus token is output: keep within max_tokens and
        # the context (the last draft's position is num_tokens - 1 + k).
        room = min(r.max_tokens - len(r.output_token_ids), self.max_model_len - r.num_tokens)
        return max(0, min(self.config.num_speculative_tokens, room - 1))

    def record(self, r: Request, num_drafts: int, num_accepted: int) -> None:
        """Count one verification and update the request's acceptance average."""
        if num_drafts == 0:
            return
        s = self.stats
        s.num_drafts += 1
        s.num_draft_tokens += num_drafts
        s.num_accepted_tokens += num_accepted
        for pos in range(num_accepted):
            s.num_accepted_tokens_per_pos[pos] += 1
        st = self.state.setdefault(r.key, _RequestState())
        st.ema = (1 - _EMA_WEIGHT) * st.ema + _EMA_WEIGHT * num_accepted / num_drafts
        if st.ema < self.config.min_acceptance_rate:
            st.paused_until = self.step + st.pause
            st.pause = min(2 * st.pause, _MAX_PAUSE)
            st.ema = self.config.min_acceptance_rate


def build_proposer(config: SpeculativeConfig, target, load_draft, num_tokens: int,
                   block_size: int, device, dtype, vocab_size: int) -> Proposer:
    """The proposer `config.method` names. `load_draft(path)` loads a draft CausalLM."""
    k = config.num_speculative_tokens
    if config.method == "ngram":
        from soberana.engine.spec_decode.ngram import NgramProposer

        return NgramProposer(k, config.prompt_lookup_min, config.prompt_lookup_max)
    from soberana.engine.spec_decode.draft_model import DraftModelProposer, first_layers

    if config.method == "layer_skip":
        n = config.num_draft_layers or max(1, target.config.num_layers // 4)
        # Under tensor parallelism every rank builds the view of its shard (TPModel).
        model = target.first_layers(n) if hasattr(target, "first_layers") else (
            first_layers(target, n))
    else:
        model = load_draft(config.model)
        if model.config.vocab_size < vocab_size:
            raise ValueError(f"speculative_config.model has a vocabulary of "
                             f"{model.config.vocab_size} tokens; the target has {vocab_size}")
    return DraftModelProposer(model, k, num_tokens, block_size, device, dtype, vocab_size)
