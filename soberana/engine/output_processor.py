"""Front-end side of the engine: detokenize, find stop strings, assemble RequestOutputs.

Runs where the tokenizer lives (LLM's process, or the API process), never in the engine core.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from soberana.engine.detokenizer import IncrementalDetokenizer, TokenDecoder
from soberana.engine.outputs import (
    CompletionOutput,
    EngineCoreOutput,
    Logprob,
    RequestOutput,
    TokenLogprobs,
)
from soberana.engine.sampling_params import SamplingParams

_KEEP_SENT_TEXT = 4096  # characters of already-delivered text a delta sample keeps at most


@dataclass
class _Sample:
    detok: IncrementalDetokenizer
    text: str = ""  # in delta mode, the text from some point before `sent_text` on
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    sent_text: int = 0  # characters already delivered (delta mode)
    sent_tokens: int = 0


@dataclass
class _RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    delta: bool
    final_only: bool
    samples: list[_Sample]
    arrival_time: float
    stop_hold: int  # characters a delta holds back: they could still grow into a stop string
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    num_cached_tokens: int = 0
    metrics: dict[str, float] = field(default_factory=dict)


class OutputProcessor:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.requests: dict[str, _RequestState] = {}
        self.num_tokens = len(tokenizer)  # ids at or past this have no text (logprob pieces)
        # One decoder per skip_special_tokens value, shared by every request's detokenizer.
        self.decoders = {skip: TokenDecoder(tokenizer, skip) for skip in (False, True)}

    def add_request(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        delta: bool = False,
        arrival_time: float | None = None,
        final_only: bool = False,
    ) -> None:
        """Track a request. `delta`: each RequestOutput carries only what is new;
        `final_only`: a RequestOutput only once the request finished (the whole result)."""
        decoder = self.decoders[params.skip_special_tokens]
        samples = [
            _Sample(IncrementalDetokenizer(self.tokenizer, prompt_token_ids,
                                           params.skip_special_tokens, decoder),
                    logprobs=[] if params.logprobs is not None else None,
                    cumulative_logprob=0.0 if params.logprobs is not None else None)
            for _ in range(params.n)
        ]
        self.requests[request_id] = _RequestState(
            request_id, prompt, prompt_token_ids, params, delta, final_only, samples,
            arrival_time if arrival_time is not None else time.time(),
            stop_hold=max((len(s) for s in params.stop), default=1) - 1,
        )

    def abort_request(self, request_id: str) -> None:
        self.requests.pop(request_id, None)

    def process_outputs(
        self, outputs: list[EngineCoreOutput]
    ) -> tuple[list[RequestOutput], list[tuple[str, int]]]:
        """Apply one engine step's outputs; return updated RequestOutputs and the samples
        (request_id, index) that stop strings ended, for `EngineCore.abort_requests`."""
        touched: dict[str, _RequestState] = {}
        to_abort: list[tuple[str, int]] = []
        now = time.time()
        for out in outputs:
            state = self.requests.get(out.request_id)
            if state is None:
                continue  # aborted meanwhile
            sample = state.samples[out.index]
            if sample.finish_reason is not None:
                continue  # a stop string already ended it; the core is catching up
            if out.prompt_logprobs is not None and state.prompt_logprobs is None:
                state.prompt_logprobs = [self._to_dict(lp) for lp in out.prompt_logprobs]
            if out.scheduled_time is not None:
                state.num_cached_tokens = out.num_cached_tokens
                state.metrics.setdefault("scheduled_time", out.scheduled_time)
                state.metrics.setdefault("first_token_time", now)
            self._append(state, sample, out)
            touched[state.request_id] = state
            if sample.finish_reason is not None and out.finish_reason is None:
                # A stop string ended this sample; the core has not noticed.
                to_abort.append((state.request_id, out.index))
        results = []
        for state in touched.values():
            finished = all(s.finish_reason is not None for s in state.samples)
            if finished:
                state.metrics["finished_time"] = now
                del self.requests[state.request_id]
            elif state.final_only:
                continue
            results.append(self._request_output(state, finished))
        return results, to_abort

    def _append(self, state: _RequestState, sample: _Sample, out: EngineCoreOutput) -> None:
        params = state.params
        sample.token_ids.extend(out.new_token_ids)
        if out.new_logprobs and sample.logprobs is not None:
            for lp in out.new_logprobs:
                sample.logprobs.append(self._to_dict(lp))
                sample.cumulative_logprob += lp.logprob
        if not params.detokenize:
            sample.finish_reason = out.finish_reason
            sample.stop_reason = out.stop_reason
            return
        before = len(sample.text)
        sample.text += sample.detok.add(out.new_token_ids)
        if params.stop and len(sample.token_ids) >= params.min_tokens:
            hit = _find_stop(sample.text, params.stop, before)
            if hit is not None:
                pos, stop = hit
                end = pos + len(stop) if params.include_stop_str_in_output else pos
                sample.text = sample.text[:end]
                sample.finish_reason, sample.stop_reason = "stop", stop
                return
        if out.finish_reason is not None:
            sample.finish_reason = out.finish_reason
            sample.stop_reason = out.stop_reason

    def _to_dict(self, lp: TokenLogprobs | None) -> dict[int, Logprob] | None:
        if lp is None:
            return None
        d = {lp.token_id: Logprob(lp.logprob, lp.rank, self._piece(lp.token_id))}
        for rank, (tid, val) in enumerate(zip(lp.top_token_ids, lp.top_logprobs), start=1):
            if tid not in d:
                d[tid] = Logprob(val, rank, self._piece(tid))
        return d

    def _piece(self, token_id: int) -> str | None:
        if token_id >= self.num_tokens:
            return None
        return self.decoders[False].decode([token_id])

    def _request_output(self, state: _RequestState, finished: bool) -> RequestOutput:
        outs = []
        hold = state.stop_hold
        for i, s in enumerate(state.samples):
            if state.delta:
                # Hold back text that could still grow into a stop string.
                limit = len(s.text) if s.finish_reason is not None else max(
                    s.sent_text, len(s.text) - hold)
                text, tokens = s.text[s.sent_text:limit], s.token_ids[s.sent_tokens:]
                lps = s.logprobs[s.sent_tokens:] if s.logprobs is not None else None
                s.sent_text, s.sent_tokens = limit, len(s.token_ids)
                if s.sent_text - hold > _KEEP_SENT_TEXT:
                    # Sent text is needed only as far back as a stop string can reach; keeping
                    # all of it would make every append copy the whole answer so far.
                    cut = s.sent_text - hold
                    s.text, s.sent_text = s.text[cut:], hold
            else:
                text, tokens, lps = s.text, list(s.token_ids), s.logprobs
            outs.append(CompletionOutput(i, text, tokens, s.finish_reason, s.stop_reason, lps,
                                         s.cumulative_logprob))
        return RequestOutput(
            request_id=state.request_id, prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids, outputs=outs, finished=finished,
            prompt_logprobs=state.prompt_logprobs, num_cached_tokens=state.num_cached_tokens,
            metrics=dict(state.metrics, arrival_time=state.arrival_time),
        )


def _find_stop(text: str, stops: list[str], new_from: int) -> tuple[int, str] | None:
    """Earliest stop string that ends inside the newly added text."""
    best: tuple[int, str] | None = None
    for stop in stops:
        pos = text.find(stop, max(0, new_from - len(stop) + 1))
        if pos != -1 and (best is None or pos < best[0]):
            best = (pos, stop)
    return best
