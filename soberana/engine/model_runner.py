"""Turns a SchedulerOutput into batch tensors, runs the model, and samples.

Input preparation is vectorised with numpy: Python work per step is O(batch), never
O(tokens), apart from slicing each request's token ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from soberana.engine.cuda_graphs import DecodeGraphs
from soberana.engine.kv_cache_manager import KVCacheManager
from soberana.engine.outputs import TokenLogprobs
from soberana.engine.request import Request
from soberana.engine.sampler import Sampler, SamplerOutput, gather_logprobs
from soberana.engine.scheduler import SchedulerOutput
from soberana.engine.verify_graphs import VerifyGraphs
from soberana.models.transformer import CausalLM
from soberana.ops.attention import AttentionMetadata, GatherWorkspace
from soberana.structured.manager import StructuredOutputManager


@dataclass
class ModelRunnerOutput:
    """One launched step's results on the host (vLLM's name), keyed by (request_id, index)."""

    sampled: dict[tuple[str, int], int] = field(default_factory=dict)
    logprobs: dict[tuple[str, int], TokenLogprobs] = field(default_factory=dict)
    prompt_logprobs: dict[tuple[str, int], list[TokenLogprobs]] = field(default_factory=dict)
    # Speculative decoding: per verified request, its emitted tokens and their logprobs.
    verified: dict[tuple[str, int], tuple[list[int], list[TokenLogprobs] | None]] = field(
        default_factory=dict)


class PendingStep:
    """A launched step. Its sampled ids stay on the device for the next step's input and are
    copied to the host without blocking; `result()` waits for that copy only."""

    def __init__(
        self,
        sched: SchedulerOutput,
        requests: list[Request],
        sampled: SamplerOutput | None,
        prompt_logprobs: dict[tuple[str, int], list[TokenLogprobs]],
        device: torch.device,
    ) -> None:
        self.scheduled = sched.scheduled
        self.requests = requests  # the sampled rows, in order
        self.row_of = {r.key: i for i, r in enumerate(requests)}
        self.output_index: list[int] = []  # where each row's id goes in output_token_ids
        self.prompt_logprobs = prompt_logprobs
        self.verified: dict = {}  # filled by ModelRunner.launch (synchronously)
        self.tokens = sampled.token_ids if sampled is not None else None
        self._logprobs = sampled.logprobs if sampled is not None else None
        tensors = [] if sampled is None else [self.tokens]
        if self._logprobs is not None:
            tensors += self._logprobs.host_tensors()
        self._event: torch.cuda.Event | None = None
        if device.type == "cuda" and tensors:
            self._host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
            for h, t in zip(self._host, tensors):
                h.copy_(t, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = tensors

    def result(self) -> ModelRunnerOutput:
        """The step's sampled ids and logprobs on the host (waits for this step only)."""
        if self._event is not None:
            self._event.synchronize()
        out = ModelRunnerOutput(prompt_logprobs=self.prompt_logprobs, verified=self.verified)
        if not self.requests:
            return out
        ids = self._host[0].tolist()
        lps = self._logprobs.build(self._host[1:]) if self._logprobs is not None else None
        for i, r in enumerate(self.requests):
            out.sampled[r.key] = ids[i]
            if lps is not None and lps[i] is not None:
                out.logprobs[r.key] = lps[i]
        return out


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        kv_cache: torch.Tensor,
        kv: KVCacheManager,
        sampler: Sampler,
        device: torch.device,
        graphs: DecodeGraphs | None = None,
        structured: StructuredOutputManager | None = None,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.kv = kv
        self.sampler = sampler
        self.device = device
        self.block_size = kv.block_size
        self.graphs = graphs
        self.structured = structured
        # Speculative decoding: verify(logits [k+1, V], request, drafts, bitmask [k+1, W] or
        # None) -> (tokens, logprobs); set by the engine when a speculative_config is given.
        self.verify = None
        # CUDA graphs of verification steps (engine/verify_graphs.py), set with `verify`.
        self.verify_graphs: VerifyGraphs | None = None
        self.workspace = GatherWorkspace() if device.type == "cpu" else None

    @torch.inference_mode()
    def launch(self, sched: SchedulerOutput, prev: PendingStep | None = None) -> PendingStep:
        """Queue the step's forward pass and sampling on the device without waiting for it.

        `prev` is the step still in flight: requests it sampled for decode here from its
        placeholder, whose id is taken from `prev`'s tokens on the device.
        """
        batch = self._prepare(sched, prev)
        meta = batch.meta
        # Structured outputs: the host computes the token mask while the model runs.
        masks = (self.structured.start_masks(batch.sample_requests)
                 if self.structured is not None and batch.sample_requests else None)
        draft_masks = (self.structured.start_draft_masks(
            [(s.request, s.draft_token_ids) for s, _, _ in batch.verify_rows])
            if self.structured is not None and batch.verify_rows else None)
        layout = None
        if (self.verify_graphs is not None and batch.verify_rows
                and not batch.prompt_logprob_rows):
            layout = self.verify_graphs.plan(meta)
        if layout is not None:  # decodes and verifications only: the bucket's graph
            hidden = self.verify_graphs.run(layout, batch.input_ids, meta.slot_mapping,
                                            meta.block_table)
        elif (self.graphs is not None and meta.num_decodes == len(meta.query_lens_cpu)
                and meta.num_decodes <= self.graphs.max_batch and not batch.prompt_logprob_rows):
            hidden = self.graphs.run(batch.input_ids, batch.positions, meta.slot_mapping,
                                     meta.seq_lens, meta.block_table)
        else:
            hidden = self.model(batch.input_ids, batch.positions, self.kv_cache, meta)
        sampled = None
        if batch.sample_rows:
            if len(batch.sample_rows) == hidden.shape[0]:  # every row samples (decodes)
                rows = hidden
            else:
                rows = hidden[_on(batch.sample_rows, self.device)]
            logits = self.model.compute_logits(rows, float32=False)
            sampled = self.sampler(logits, batch.sample_requests,
                                   masks.result() if masks is not None else None)
        prompt_logprobs = {}
        for req, rows, targets in batch.prompt_logprob_rows:  # rare: read back at once
            logits = self.model.compute_logits(hidden[_on(rows, self.device)])
            lps = torch.log_softmax(logits, dim=-1)
            tgt = _on(targets, self.device)
            n = [req.params.prompt_logprobs] * len(targets)
            prompt_logprobs[req.key] = gather_logprobs(lps, tgt, n)
        pending = PendingStep(sched, batch.sample_requests, sampled, prompt_logprobs, self.device)
        if batch.verify_rows:  # speculative decoding: every row of a drafted entry
            rows = [i for _, first, last in batch.verify_rows for i in range(first, last)]
            logits = self.model.compute_logits(hidden[_on(rows, self.device)], float32=False)
            bitmask = draft_masks.result() if draft_masks is not None else None
            at = 0
            for s, first, last in batch.verify_rows:
                n = last - first
                pending.verified[s.request.key] = self.verify(
                    logits[at:at + n], s.request, s.draft_token_ids,
                    bitmask[at:at + n] if bitmask is not None else None)
                at += n
        return pending

    def _prepare(self, sched: SchedulerOutput, prev: PendingStep | None) -> _Batch:
        entries = sched.scheduled
        reqs = [s.request for s in entries]
        q_lens = np.array([s.num_new_tokens for s in entries], dtype=np.int64)
        starts = np.array([r.num_computed_tokens for r in reqs], dtype=np.int64)
        cu = np.zeros(len(entries) + 1, dtype=np.int64)
        np.cumsum(q_lens, out=cu[1:])
        total = int(cu[-1])

        token_ids: list[int] = []
        for e, s, q in zip(entries, starts.tolist(), q_lens.tolist()):
            drafts = e.draft_token_ids
            token_ids.extend(e.request.token_slice(s, s + q - len(drafts)))
            token_ids.extend(drafts)
        req_of_token = np.repeat(np.arange(len(entries)), q_lens)
        positions = np.repeat(starts, q_lens) + (np.arange(total) - np.repeat(cu[:-1], q_lens))

        tables = [self.kv.block_table(r) for r in reqs]
        width = max(len(t) for t in tables)
        table_np = np.zeros((len(entries), width), dtype=np.int32)
        for i, t in enumerate(tables):
            table_np[i, : len(t)] = t
        bs = self.block_size
        slots = table_np[req_of_token, positions // bs].astype(np.int64) * bs + positions % bs
        seq_lens = starts + q_lens

        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.from_numpy(slots).to(dev, non_blocking=True),
            query_start_loc=torch.from_numpy(cu.astype(np.int32)).to(dev, non_blocking=True),
            seq_lens=torch.from_numpy(seq_lens.astype(np.int32)).to(dev, non_blocking=True),
            block_table=torch.from_numpy(table_np).to(dev, non_blocking=True),
            num_decodes=sum(1 for s in entries if s.num_new_tokens == 1),
            query_lens_cpu=q_lens.tolist(),
            seq_lens_cpu=seq_lens.tolist(),
            workspace=self.workspace,
        )
        batch = _Batch(
            input_ids=torch.tensor(token_ids, dtype=torch.long).to(dev, non_blocking=True),
            positions=torch.from_numpy(positions).to(dev, non_blocking=True),
            meta=meta,
        )
        if prev is not None:
            self._fill_placeholders(batch.input_ids, entries, cu, prev)
        for i, s in enumerate(entries):
            r = s.request
            if s.draft_token_ids:
                batch.verify_rows.append((s, int(cu[i]), int(cu[i + 1])))
            elif s.samples:
                batch.sample_rows.append(int(cu[i + 1]) - 1)
                batch.sample_requests.append(r)
            if r.wants_prompt_logprobs:
                # Row p predicts prompt token p + 1; the prompt's last row predicts the output.
                first = int(starts[i])
                last = min(first + s.num_new_tokens, r.num_prompt_tokens - 1)
                if last > first:
                    rows = list(range(int(cu[i]), int(cu[i]) + last - first))
                    targets = r.prompt_token_ids[first + 1 : last + 1]
                    batch.prompt_logprob_rows.append((r, rows, targets))
        return batch


    def _fill_placeholders(self, input_ids: torch.Tensor, entries: list, cu: np.ndarray,
                           prev: PendingStep) -> None:
        """Put the ids `prev` sampled (still on the device) where this step decodes them."""
        rows: list[int] = []
        src: list[int] = []
        for i, s in enumerate(entries):
            j = prev.row_of.get(s.request.key)
            if j is not None and s.request.num_placeholders:
                rows.append(int(cu[i + 1]) - 1)  # the placeholder is the entry's last token
                src.append(j)
        if rows:
            dev = self.device
            input_ids.index_copy_(0, _on(rows, dev), prev.tokens.index_select(0, _on(src, dev)))


def _on(values: list[int], device: torch.device) -> torch.Tensor:
    """Host ints as an index tensor on the device, without synchronising the stream."""
    return torch.tensor(values, dtype=torch.long).to(device, non_blocking=True)


@dataclass
class _Batch:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    sample_rows: list[int] = field(default_factory=list)
    sample_requests: list[Request] = field(default_factory=list)
    prompt_logprob_rows: list[tuple[Request, list[int], list[int]]] = field(default_factory=list)
    verify_rows: list[tuple] = field(default_factory=list)  # (entry, first row, end row)
