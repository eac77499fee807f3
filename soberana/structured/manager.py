"""The engine's side of structured outputs: one llguidance matcher per constrained sequence,
the batch's token mask computed on the host (beside the step on an accelerator, in the engine
loop on a CPU), and each sampled token fed back to its matcher."""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from soberana.engine.request import Request
from soberana.structured.compiler import DEFAULT_COMPILE_TIMEOUT_S, GrammarCompiler

log = logging.getLogger("soberana.structured")


@dataclass
class TokenMask:
    """A batch's grammar mask as the sampler applies it: llguidance's bitmask (int32
    [N, ceil(V/32)], bit j of word w allows token 32w + j; unconstrained rows all ones) and,
    when the logits are on the CPU, the constrained rows' mask as an additive bias (float32
    [len(rows), V]: 0 allowed, -inf forbidden) with `rows`, their batch rows (None: all)."""

    bitmask: torch.Tensor
    bias: torch.Tensor | None = None
    rows: list[int] | None = None

    def apply_(self, logits: torch.Tensor) -> torch.Tensor:
        """Forbid the masked tokens in `logits` [N, V] in place; returns them."""
        if self.bias is None:
            return apply_token_bitmask(logits, self.bitmask, inplace=True)
        bias = self.bias[:, : logits.shape[1]]
        if logits.dtype == torch.float32:
            # numpy adds on one thread: torch's add_ of 64 x 934 opens an OpenMP region, 6 us
            # on a quiet core but 3.5 ms wall at load 10 on 2 cores, where a preempted team
            # thread holds the whole region up (Xeon Emerald Rapids, load 10-12).
            out, add = logits.numpy(), bias.numpy()
            if self.rows is None:
                np.add(out, add, out=out)
            else:
                out[self.rows] += add
            return logits
        if self.rows is None:
            return logits.add_(bias)
        return logits.index_add_(0, torch.tensor(self.rows), bias.to(logits.dtype))


class LazyTokenMask:
    """A CPU batch's grammar mask, computed only for the rows asked for. The sampler samples
    from the unmasked logits first and masks (and samples again) just the rows whose token
    a grammar refuses: checking a token costs ~1.6 us (forced bytes, then validate_tokens),
    its row's mask ~8 us (mean per row, demo model's 934-token vocabulary, Xeon Emerald
    Rapids). `matchers`: each
    constrained row's usable matcher, by batch row."""

    def __init__(self, batch: int, vocab_size: int, matchers: list[tuple[int, Any]]) -> None:
        self.batch = batch
        self.vocab_size = vocab_size
        self.matchers = dict(matchers)

    def refused(self, tokens: list[int]) -> list[int]:
        """The constrained rows whose token (`tokens[i]` for batch row i) their mask would
        forbid, or may forbid: exactly none that it allows. The matchers do not move.

        validate_tokens checks the token's bytes against the grammar, which is what the mask
        allows unless bytes are forced: then llguidance's mask holds only the forced bytes'
        canonical first token (or tokens starting with them), where validate_tokens takes
        any tokenization, and it allows EOS once stopped, where validate_tokens refuses.
        So a row with forced bytes counts as refused, and the mask decides; it is asked
        first, ~0.5 us against validate_tokens' ~1.1 us, which such a row would waste."""
        return [i for i, m in self.matchers.items()
                if m.compute_ff_bytes() or not m.validate_tokens([tokens[i]])]

    def apply_(self, logits: torch.Tensor) -> torch.Tensor:
        """Forbid the masked tokens of every constrained row in `logits` [N, V] in place
        (masking first, for batches that truncate); returns them."""
        return self.mask().apply_(logits)

    def mask(self) -> TokenMask:
        """The mask of every constrained row (the other rows allow everything), as the
        additive bias of TokenMask."""
        rows = list(self.matchers)
        words = self._words(rows)
        bias = token_bias(torch.from_numpy(words), self.vocab_size)
        if rows == list(range(self.batch)):  # every row masked: one add over the batch
            return TokenMask(torch.from_numpy(words), bias)
        bitmask = np.full((self.batch, words.shape[1]), -1, dtype=np.int32)
        bitmask[rows] = words  # numpy: a torch index op costs ~30 us here
        return TokenMask(torch.from_numpy(bitmask), bias, rows)

    def allowed(self, rows: list[int], width: int) -> np.ndarray:
        """Whether the grammar of each of `rows` allows each token: bool [len(rows), width],
        False past the mask. For the sampler's second choice, which needs no float bias."""
        bits = np.unpackbits(self._words(rows).view(np.uint8), axis=1, count=width,
                             bitorder="little")  # count past the words pads with 0
        return bits.view(np.bool_)

    def _words(self, rows: list[int]) -> np.ndarray:
        """llguidance's bitmask of `rows` (int32 [len(rows), ceil(V/32)]), one row after
        another in the engine loop: handing them to llguidance's worker threads made the
        loop wait for those threads to be scheduled: 3.6 ms a step at load 10 on 2 cores,
        and with a 2-thread LLExecutor +19% wall against +15% inline (medians of 8 rounds,
        demo model, load 4), for ~8 us of work a row."""
        words = np.empty((len(rows), (self.vocab_size + 31) // 32), dtype=np.int32)
        ptr, row_bytes = words.ctypes.data, words.shape[1] * words.itemsize
        for j, i in enumerate(rows):
            self.matchers[i].unsafe_compute_mask_ptr(ptr + j * row_bytes, row_bytes)
        return words


class _Sequence:
    """A constrained sequence: its matcher (once compiled) and whether reasoning has ended."""

    def __init__(self, matcher: Future, reasoning_end: list[int]) -> None:
        self.matcher = matcher
        self.ready: Any = None  # the matcher once compiled (no future's lock per token)
        self.reasoning_end = reasoning_end
        self.active = not reasoning_end  # the constraint applies from this token on
        self.failed = False


class StructuredOutputManager:
    """Matchers of the constrained requests in the engine, keyed by `Request.key`."""

    def __init__(
        self,
        tokenizer_path: Path | str,
        vocab_size: int,
        eos_token_ids: list[int],
        timeout_s: float = DEFAULT_COMPILE_TIMEOUT_S,
        device: torch.device | str = "cpu",
    ) -> None:
        self.tokenizer_path = tokenizer_path
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.timeout_s = timeout_s
        # Logits on the CPU take the mask as an additive bias.
        self.bias_on_host = torch.device(device).type == "cpu"
        self._compiler: GrammarCompiler | None = None  # built on the first constrained request
        self._executor: Any = None  # llguidance's thread pool for the batch's masks
        self.sequences: dict[tuple[str, int], _Sequence] = {}
        # On an accelerator one host thread computes the mask while the device runs the step.
        # On a CPU the step's OpenMP team already holds every core, so the engine loop
        # computes it: a third runnable thread only took turns with the team, and at load the
        # hand-offs (engine -> mask thread -> llguidance's worker) each waited for a time slice
        # (benchmarks/structured_mask.py: +71% wall threaded vs +34% inline at load 7-10).
        self._mask_thread = (_InlineExecutor() if self.bias_on_host else
                             ThreadPoolExecutor(max_workers=1, thread_name_prefix="token-mask"))

    @property
    def compiler(self) -> GrammarCompiler:
        if self._compiler is None:
            import llguidance

            from soberana.models.tokenizer import load_tokenizer
            from soberana.structured.compiler import build_ll_tokenizer

            tokenizer = load_tokenizer(self.tokenizer_path)
            ll_tok = build_ll_tokenizer(tokenizer, self.vocab_size, self.eos_token_ids)
            self._compiler = GrammarCompiler(ll_tok, self.timeout_s)
            self._executor = llguidance.LLExecutor()
        return self._compiler

    def add(self, request: Request) -> None:
        """Start compiling the request's constraint (GrammarError at once if malformed)."""
        spec = request.params.structured_outputs
        if spec is None:
            return
        self.sequences[request.key] = _Sequence(
            self.compiler.submit(spec), list(spec.reasoning_end_token_ids)
        )

    def check(self, request: Request) -> None:
        """Wait for the request's grammar within the time limit (offline LLM: errors raise)."""
        seq = self.sequences.get(request.key)
        if seq is not None:
            seq.matcher.result(timeout=self.timeout_s)

    def forget(self, request: Request) -> None:
        self.sequences.pop(request.key, None)

    def is_constrained(self, request: Request) -> bool:
        return request.key in self.sequences

    def start_masks(self, requests: list[Request]) -> Future | None:
        """Begin the batch's token mask (on a host thread beside an accelerator's step); its
        result is a TokenMask of len(requests) rows (unconstrained rows allow everything), or
        None if no row needs one. Call before launching the forward pass, so the two overlap.
        On a CPU the result is a LazyTokenMask, which computes a row's mask only if asked."""
        sequences = self.sequences
        rows = [(i, seq) for i, r in enumerate(requests)
                if (seq := sequences.get(r.key)) is not None and seq.active]
        if not rows:
            return None
        if self.bias_on_host:
            matchers = [(i, m) for i, seq in rows if (m := self._matcher(seq)) is not None]
            done: Future = Future()
            done.set_result(LazyTokenMask(len(requests), self.vocab_size, matchers)
                            if matchers else None)
            return done
        return self._mask_thread.submit(self._fill, len(requests), rows)

    def _fill(self, batch: int, rows: list[tuple[int, _Sequence]]) -> TokenMask | None:
        from llguidance.torch import fill_next_token_bitmask_par

        bitmask = torch.full((batch, (self.vocab_size + 31) // 32), -1, dtype=torch.int32)
        matchers = []
        for i, seq in rows:
            matcher = self._matcher(seq)
            if matcher is not None:
                matchers.append((matcher, i))
        if not matchers:
            return None
        fill_next_token_bitmask_par(self._executor, matchers, bitmask)
        return TokenMask(bitmask)

    def valid_drafts(self, request: Request, drafts: list[int]) -> list[int]:
        """The leading drafts worth verifying for `request` (speculative decoding): those its
        grammar accepts, checked without moving the matcher. While the constraint has not
        started (reasoning), drafts stop before the token that starts it, so that no
        verified position needs a mask the step did not compute."""
        seq = self.sequences.get(request.key)
        if seq is None or seq.failed or not drafts:
            return drafts
        if not seq.active:
            end, tokens = seq.reasoning_end, list(request.output_token_ids)
            for j, d in enumerate(drafts):
                tokens.append(d)
                if tokens[len(tokens) - len(end):] == end:
                    return drafts[:j]
            return drafts
        if not seq.matcher.done():
            return []  # still compiling: decode one token (the mask waits for it)
        matcher = seq.matcher.result()
        if matcher.is_error():
            return drafts
        return drafts[:matcher.validate_tokens(drafts)]

    def start_draft_masks(self, entries: list[tuple[Request, list[int]]]) -> Future | None:
        """Begin the masks of verification rows on the host thread: entry i owns
        len(drafts) + 1 consecutive rows, row j being the mask after its drafts[:j] (the
        matcher advances through the drafts and rolls back, llguidance's draft-token
        masks). Result: an int32 bitmask [rows, ceil(V/32)], all ones where unconstrained,
        or None when no entry is constrained."""
        rows, first = [], 0
        for r, drafts in entries:
            seq = self.sequences.get(r.key)
            if seq is not None and seq.active:
                rows.append((first, seq, drafts))
            first += len(drafts) + 1
        if not rows:
            return None
        return self._mask_thread.submit(self._fill_drafts, first, rows)

    def _fill_drafts(self, batch: int, rows: list[tuple[int, _Sequence, list[int]]]
                     ) -> torch.Tensor | None:
        from llguidance.torch import fill_next_token_bitmask_par_with_draft_tokens

        bitmask = torch.full((batch, (self.vocab_size + 31) // 32), -1, dtype=torch.int32)
        matchers = []
        for first, seq, drafts in rows:
            matcher = self._matcher(seq)
            if matcher is not None:
                matchers.append((matcher, first, list(drafts)))
        if not matchers:
            return None
        fill_next_token_bitmask_par_with_draft_tokens(self._executor, matchers, bitmask)
        return bitmask

    def _matcher(self, seq: _Sequence):
        """The sequence's usable matcher, or None (compile failed, or in an error state)."""
        matcher = seq.ready
        if matcher is None:
            try:
                matcher = seq.ready = seq.matcher.result(timeout=self.timeout_s)
            except Exception as exc:  # cannot happen for what the server validated first
                if not seq.failed:
                    log.error("structured output dropped for a sequence: %s", exc)
                seq.failed = True
                return None
        return None if matcher.is_error() else matcher

    def accept(self, request: Request, token: int) -> None:
        """Feed the sampled token to the request's matcher (once its reasoning has ended)."""
        seq = self.sequences.get(request.key)
        if seq is None or seq.failed:
            return
        if not seq.active:
            end = seq.reasoning_end
            out = request.output_token_ids
            # The token is already in output_token_ids; the constraint starts after it.
            seq.active = len(out) >= len(end) and out[len(out) - len(end):] == end
            return
        matcher = seq.ready if seq.ready is not None else seq.matcher.result()
        if not matcher.consume_token(token) and not matcher.is_error():
            log.warning("token %d refused by the grammar of %s", token, request.request_id)


class _InlineExecutor:
    """An executor that runs the task in the caller (the engine loop on a CPU)."""

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except Exception as exc:  # raised where the result is read, as from a thread
            future.set_exception(exc)
        return future


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor,
                        inplace: bool = False) -> torch.Tensor:
    """Logits with every token a row's bitmask forbids set to -inf (bit j of word w: token
    32w + j allowed; on the CPU tokens past the bitmask are forbidden too); `logits` itself is left as it
    was unless `inplace` (a caller that owns them).

    On an accelerator every bit is unpacked at once (no host sync). On the CPU the bitmask
    becomes an additive bias (`token_bias`) and one add applies it: 0.4 ms for 64 rows of a
    49k vocabulary, where a masked_fill_ took 4.4 ms and unpacking 32 bits per word with
    torch 16 ms (benchmarks/results/structured_mask_*.json)."""
    if logits.device.type != "cpu":
        mask = bitmask.to(logits.device, non_blocking=True)
        allowed = ((mask.unsqueeze(-1) >> _SHIFTS.to(logits.device)) & 1).bool()
        return logits.masked_fill(~allowed.flatten(1)[:, : logits.shape[1]], float("-inf"))
    out = logits if inplace else logits.clone()
    return out.add_(token_bias(bitmask, logits.shape[1]))


def token_bias(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """The CPU bitmask as an additive float32 bias [N, vocab]: 0.0 where a token is allowed,
    -inf where it is forbidden or past the bitmask. Numpy, single-threaded on purpose: a
    torch op this small would open an OpenMP region for microseconds of work."""
    words = bitmask.contiguous().numpy().view(np.uint8)  # little-endian: byte k holds tokens 8k..8k+7
    bits = np.unpackbits(words, axis=1, count=min(vocab, words.shape[1] * 8),
                         bitorder="little")
    bias = np.zeros((bits.shape[0], vocab), dtype=np.int32)
    # allowed 1 -> 0 -> +0.0; forbidden 0 -> -1 (all bits set) -> the bits of float -inf
    np.subtract(bits, 1, out=bias[:, : bits.shape[1]], dtype=np.int32)
    bias[:, bits.shape[1]:] = _NEG_INF_BITS
    np.bitwise_and(bias, _NEG_INF_BITS, out=bias)
    return torch.from_numpy(bias.view(np.float32))


_SHIFTS = torch.arange(32, dtype=torch.int32)
_NEG_INF_BITS = np.int32(-8388608)  # 0xFF800000, float32 -inf
