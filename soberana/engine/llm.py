"""LLM: the offline API (vLLM's shape) over an in-process EngineCore."""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence

from soberana.engine.config import EngineConfig
from soberana.engine.core import EngineCore
from soberana.engine.output_processor import OutputProcessor
from soberana.engine.outputs import EngineCoreRequest, RequestOutput
from soberana.engine.sampling_params import SamplingParams
from soberana.log import setup_logging
from soberana.models.tokenizer import load_tokenizer

Prompt = str | list[int]
Message = dict[str, str]


class LLM:
    """Generate offline: `LLM(model).generate(prompts, SamplingParams(...))`.

    `model` is a local Hugging Face directory, a hub id, or None for the built-in demo model
    (random weights — for smoke tests and trying the stack offline).
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        dtype: str = "auto",
        device: str = "auto",
        max_model_len: int | None = None,
        kv_cache_gb: float | None = None,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 8192,
        enable_prefix_caching: bool = True,
        block_size: int = 16,
        seed: int = 0,
        load_format: str = "safetensors",
        **kwargs,
    ) -> None:
        setup_logging()
        config = EngineConfig(
            model=model, dtype=dtype, device=device, max_model_len=max_model_len,
            kv_cache_gb=kv_cache_gb, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            enable_prefix_caching=enable_prefix_caching, block_size=block_size, seed=seed,
            load_format=load_format, **kwargs,
        )
        self.engine = EngineCore(config)
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
