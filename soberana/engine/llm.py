"""LLM: the offline API (vLLM's shape) over an in-process EngineCore."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Sequence
from typing import Any

from soberana.engine import process_memory
from soberana.engine.config import EngineConfig
from soberana.engine.output_processor import OutputProcessor
from soberana.engine.outputs import EngineCoreRequest, PoolingRequest, RequestOutput
from soberana.engine.pooling_core import build_engine_core
from soberana.engine.sampling_params import SamplingParams
from soberana.log import setup_logging
from soberana.models.pooling import cosine
from soberana.models.tokenizer import load_tokenizer

Prompt = str | list[int]


def _import_transformers() -> None:
    import transformers.tokenization_utils_fast  # noqa: F401


Message = dict[str, str]


class LLM:
    """Generate offline: `LLM(model).generate(prompts, SamplingParams(...))`.

    `model` is a local Hugging Face directory, a `.gguf` file, a hub id, "demo" (random
    weights — for smoke tests and trying the stack offline), or None for the default model,
    SmolLM2-135M-Instruct (soberana/models/default_model.py).

    Every other keyword is a field of `EngineConfig` (`dtype`, `max_num_seqs`, ...: the flags of
    `soberana serve` with `_`), passed to it unchanged; an unknown one is a TypeError naming it.

    `tune_process_memory` (default True) changes this process's allocator settings before the
    model is built: transparent huge pages for large CPU tensors (THP_MEM_ALLOC_ENABLE) and
    glibc's malloc keeping freed activations (mallopt) — faster CPU steps, an RSS that does not
    shrink. Pass False when embedding LLM in an application whose allocator must not change.
    """

    def __init__(
        self, model: str | None = None, *, tune_process_memory: bool = True, **engine_args: Any
    ) -> None:
        setup_logging()
        if tune_process_memory:
            process_memory.tune_process_memory()
        # The keywords are EngineConfig's fields (the flags of `soberana serve`, with _).
        config = EngineConfig(model=model, **engine_args)
        # transformers takes seconds to import on a small CPU: import it beside the engine's
        # start-up, which does not need it.
        importer = threading.Thread(target=_import_transformers, daemon=True)
        importer.start()
        self.engine = build_engine_core(config)  # an embedding/rerank model: PoolingCore
        importer.join()
        self.tokenizer = load_tokenizer(self.engine.model_info.path)
        self.processor = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool | None = None,
    ) -> list[RequestOutput]:
        """Complete each prompt (text or token ids); results come back in input order."""
        self._require_task("generate", "generate")
        if isinstance(prompts, str) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        prompts = list(prompts)
        params = sampling_params if sampling_params is not None else SamplingParams()
        params_list = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(
                f"got {len(prompts)} prompts but {len(params_list)} sampling_params"
            )
        order = []
        for prompt, p in zip(prompts, params_list):
            order.append(self._add(prompt, p))
        done = self._run(len(order), use_tqdm)
        return [done[rid] for rid in order]

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts: list[Prompt] = []
        for conv in conversations:
            ids = self.tokenizer.apply_chat_template(
                conv, tokenize=True, add_generation_prompt=add_generation_prompt
            )
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            prompts.append(list(ids))
        return self.generate(prompts, sampling_params, use_tqdm)

    def embed(self, texts: str | Sequence[str], *, truncate_prompt_tokens: int | None = None
              ) -> list[list[float]]:
        """One embedding per text (an embedding model: `task="embed"`), in input order."""
        self._require_task("embed", "embed")
        texts = [texts] if isinstance(texts, str) else list(texts)
        return [out.embedding for out in self._pool(self._encode(texts, None,
                                                                 truncate_prompt_tokens))]

    def score(self, query: str, documents: Sequence[str], *,
              truncate_prompt_tokens: int | None = None) -> list[float]:
        """How well each document answers `query`: a cross-encoder's score (`task="rerank"`),
        or the cosine similarity of an embedder's vectors."""
        self._require_task("score", "embed", "rerank")
        documents = list(documents)
        if self.engine.model_info.task == "rerank":
            outs = self._pool(self._encode([query] * len(documents), documents,
                                           truncate_prompt_tokens))
            return [out.score for out in outs]
        query_vec, *doc_vecs = self.embed([query, *documents],
                                          truncate_prompt_tokens=truncate_prompt_tokens)
        return [cosine(query_vec, v) for v in doc_vecs]

    def _require_task(self, method: str, *tasks: str) -> None:
        task = self.engine.model_info.task
        if task not in tasks:
            raise ValueError(f"LLM.{method} needs a model with task {' or '.join(tasks)}; "
                             f"this model serves task {task}")

    def _encode(self, left: list[str], right: list[str] | None, truncate: int | None
                ) -> list[tuple[list[int], list[int] | None]]:
        limit = self.engine.model_info.max_model_len
        cut = None if truncate is None else (limit if truncate == -1 else min(truncate, limit))
        args = (left,) if right is None else (left, right)
        how = "only_second" if right is not None else True
        enc = self.tokenizer(*args, add_special_tokens=True, truncation=how if cut else False,
                             max_length=cut)
        types = enc.get("token_type_ids") or [None] * len(enc["input_ids"])
        return list(zip(enc["input_ids"], types))

    def _pool(self, inputs: list[tuple[list[int], list[int] | None]]) -> list:
        now = time.time()
        ids = [str(next(self._ids)) for _ in inputs]
        for rid, (tokens, types) in zip(ids, inputs):
            self.engine.add_request(PoolingRequest(rid, tokens, now, types))
        done = {}
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                done[out.request_id] = out
        return [done[rid] for rid in ids]

    def _add(self, prompt: Prompt, params: SamplingParams) -> str:
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt, add_special_tokens=True)
        else:
            text, ids = None, list(prompt)
        rid = str(next(self._ids))
        now = time.time()
        self.engine.add_request(EngineCoreRequest(rid, ids, params, now))
        if params.structured_outputs is not None:  # offline: a bad grammar raises here
            try:
                for sample in self.engine.requests[rid]:
                    self.engine.structured.check(sample)
            except Exception:
                self.engine.abort_requests([rid])
                raise
        self.processor.add_request(rid, text, ids, params, arrival_time=now)
        return rid

    def _run(self, total: int, use_tqdm: bool | None) -> dict[str, RequestOutput]:
        done: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm or (use_tqdm is None and total >= 64):
            from tqdm import tqdm

            bar = tqdm(total=total, desc="generate", unit="req")
        while self.engine.has_unfinished_requests():
            outputs, to_abort = self.processor.process_outputs(self.engine.step())
            if to_abort:
                self.engine.abort_requests(to_abort)
            for out in outputs:
                if out.finished:
                    done[out.request_id] = out
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        return done
