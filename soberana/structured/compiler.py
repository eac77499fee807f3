"""Grammar compilation with llguidance: a time limit, and a cache keyed by the schema's hash.

llguidance was measured against xgrammar (benchmarks/structured_compile.py, results in
benchmarks/results/structured_compile_*.txt) and compiles JSON schemas faster; its matcher
builds the lexer lazily, so compilation is mostly grammar translation.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from soberana.structured.params import StructuredOutputsParams

log = logging.getLogger("soberana.structured")

DEFAULT_COMPILE_TIMEOUT_S = 5.0
_CACHE_SIZE = 512


class GrammarError(ValueError):
    """A constraint that is malformed or did not compile in time; the message names it."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def build_ll_tokenizer(tokenizer: Any, vocab_size: int, eos_token_ids: list[int]) -> Any:
    """llguidance's view of a Hugging Face tokenizer, sized to the model's logits."""
    import llguidance.hf

    eos = list(eos_token_ids) or (
        [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else None
    )
    return llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos)


def describe(params: StructuredOutputsParams) -> str:
    """A short name of the constraint for error messages: the schema's title or its start."""
    if params.json is not None and isinstance(params.json, dict) and params.json.get("title"):
        return f"{params.kind} schema {str(params.json['title'])[:80]!r}"
    text = params.source()
    return f"{params.kind} {text[:80]!r}{'...' if len(text) > 80 else ''}"


class GrammarCompiler:
    """Compiles constraints into llguidance matchers, at most `timeout_s` each, and keeps the
    last compiled ones (a fresh matcher per request is a cheap deep copy of the cached one)."""

    def __init__(self, ll_tokenizer: Any, timeout_s: float = DEFAULT_COMPILE_TIMEOUT_S) -> None:
        self.ll_tokenizer = ll_tokenizer
        self.timeout_s = timeout_s
        self._compiled: OrderedDict[str, Any] = OrderedDict()  # key -> pristine LLMatcher
        self._too_slow: set[str] = set()  # keys that ran out of time: refused at once
        self._running: dict[str, Future] = {}  # key -> compilation in flight (shared)
        self._lock = threading.Lock()
        # Two threads: llguidance drops the GIL while it builds, and a pathological grammar
        # that overruns its limit keeps at most one of them busy until it is done.
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="grammar")

    def submit(self, params: StructuredOutputsParams) -> Future:
        """Start compiling (or find the cached matcher); the future gives a fresh LLMatcher.
        Raises GrammarError at once for a malformed constraint."""
        key = params.key()
        with self._lock:
            if key in self._too_slow:
                raise self._timeout_error(params)
            cached = self._compiled.get(key)
            if cached is not None:
                self._compiled.move_to_end(key)
                done: Future = Future()
                done.set_result(cached.deep_copy())
                return done
            running = self._running.get(key)
        if running is None:
            grammar = _grammar_text(params)
            running = self._pool.submit(self._build, key, grammar, params)
            with self._lock:
                self._running[key] = running
        fresh: Future = Future()
        running.add_done_callback(lambda f: _copy_into(f, fresh))
        return fresh

    def compile(self, params: StructuredOutputsParams) -> Any:
        """A fresh matcher for `params`, waiting at most `timeout_s`; GrammarError otherwise."""
        future = self.submit(params)
        try:
            return future.result(timeout=self.timeout_s)
        except FutureTimeout:
            with self._lock:
                self._too_slow.add(params.key())
            raise self._timeout_error(params) from None

    def _build(self, key: str, grammar: str, params: StructuredOutputsParams) -> Any:
        from llguidance import LLMatcher

        try:
            try:
                matcher = LLMatcher(self.ll_tokenizer, grammar, log_level=0)
            except Exception as exc:  # llguidance documents none; never let one be a 500
                raise GrammarError(f"{describe(params)} does not compile: {exc}",
                                   _param(params)) from exc
            if matcher.is_error():
                raise GrammarError(
                    f"{describe(params)} does not compile: {matcher.get_error()}",
                    _param(params),
                )
            with self._lock:
                self._compiled[key] = matcher
                while len(self._compiled) > _CACHE_SIZE:
                    self._compiled.popitem(last=False)
            return matcher
        finally:
            with self._lock:
                self._running.pop(key, None)

    def _timeout_error(self, params: StructuredOutputsParams) -> GrammarError:
        return GrammarError(
            f"{describe(params)} did not compile within {self.timeout_s:g} s; simplify it",
            _param(params),
        )


def _grammar_text(params: StructuredOutputsParams) -> str:
    try:
        return params.llguidance_grammar()
    except GrammarError:
        raise
    except (ValueError, TypeError, json.JSONDecodeError) as exc:
        raise GrammarError(f"{describe(params)} is not a valid constraint: {exc}",
                           _param(params)) from exc
    except Exception as exc:  # llguidance raises plain exceptions for unsupported schemas
        raise GrammarError(f"{describe(params)} is not supported: {exc}", _param(params)) from exc


def _param(params: StructuredOutputsParams) -> str:
    return f"structured_outputs.{params.kind}"


def _copy_into(source: Future, target: Future) -> None:
    exc = source.exception()
    if exc is not None:
        target.set_exception(exc)
    else:
        target.set_result(source.result().deep_copy())
