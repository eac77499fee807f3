"""The engine core of an embedding or reranking model: packed batches under a token budget.

It speaks the same loop contract as `EngineCore` (add_request / abort_requests /
has_unfinished_requests / step / get_stats / model_info), so the engine-core process and `LLM`
serve either. A step takes waiting inputs first come, first served, up to
`max_num_batched_tokens` tokens and `max_num_seqs` inputs, and runs them as one packed batch:
no pad token passes through a linear layer.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Iterable
from pathlib import Path

import torch

from soberana.engine.config import EngineConfig
from soberana.engine.outputs import ModelInfo, PoolingOutput, PoolingRequest, SchedulerStats
from soberana.engine.worker import resolve_device
from soberana.models.decoder_embedder import is_decoder_embedder_dir, load_decoder_embedder
from soberana.models.encoder import PackedBatch, load_encoder
from soberana.models.encoder_config import EncoderConfig, is_encoder_dir
from soberana.models.loader import resolve_model_path
from soberana.models.pooling import PoolingConfig, pool
from soberana.ops.backend import select_backend
from soberana.ops.cpu import linear as cpu_linear
from soberana.quantization import QuantizationConfig, quantize_loaded_linears

log = logging.getLogger(__name__)

TASKS = ("auto", "generate", "embed", "rerank")
# An encoder's linears quantized at load; int4 and fp8 have no encoder path.
ENCODER_QUANTIZATION = ("int8", "int8_w8a16")


def resolve_task(task: str, path: Path) -> str:
    """`generate`, `embed` or `rerank` for the model at `path`; `auto` follows its architecture
    (an encoder with a classification head reranks, one without embeds; a decoder embeds when
    it is headless or ships sentence-transformers modules, as Qwen3-Embedding, else
    generates). `embed` on any decoder pools its last token."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}; got {task!r}")
    encoder = is_encoder_dir(path)
    if task == "auto":
        if not encoder:
            return "embed" if path.is_dir() and is_decoder_embedder_dir(path) else "generate"
        return "rerank" if EncoderConfig.from_dir(path).num_labels is not None else "embed"
    if task == "generate" and encoder:
        raise ValueError(f"{path} is an encoder model: it serves task embed or rerank, not generate")
    if task == "generate" and path.is_dir() and _headless(path):
        raise ValueError(f"{path} is a decoder without its LM head: it serves task embed, "
                         "not generate")
    if task == "rerank" and not encoder:
        raise ValueError(f"task rerank needs a cross-encoder (BERT, XLM-RoBERTa with a "
                         f"classification head); {path} is a decoder")
    if task == "embed" and not encoder and not path.is_dir():
        raise ValueError(f"task embed needs a model directory; {path} is a file")
    return task


def _headless(path: Path) -> bool:
    raw = json.loads((path / "config.json").read_text())
    return (raw.get("architectures") or [""])[0].endswith("Model")


class PoolingCore:
    """Embeds or scores packed batches of token sequences."""

    def __init__(self, config: EngineConfig, path: Path | None = None) -> None:
        config.validate()
        self.config = config
        t0 = time.perf_counter()
        self.device = resolve_device(config.device)
        path = path or resolve_model_path(config.model, config.revision)
        self.task = resolve_task(config.task, path)
        # float32 on CPUs (embeddings are compared by cosine to 1e-5); bfloat16 on GPUs.
        if config.dtype != "auto":
            self.dtype = getattr(torch, config.dtype)
        else:
            self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        encoder = is_encoder_dir(path)
        if config.quantization is not None and (not encoder
                                                or config.quantization not in ENCODER_QUANTIZATION):
            raise ValueError(f"quantization {config.quantization}: task {self.task} quantizes "
                             f"encoders (BERT, XLM-R) with {' or '.join(ENCODER_QUANTIZATION)}"
                             f"{'' if encoder else f'; {path} is a decoder'}")  # fmt: skip
        if encoder:
            self.model = load_encoder(path, self.dtype, self.device)
            compute = self._use_backend(config)
            default_mode = "cls"
        else:  # a decoder embedder: the decoder's own ops (Triton on CUDA, native on CPUs)
            backend = select_backend(config.compute_backend, self.device, self.dtype,
                                     cpu_isa=config.cpu_isa)  # fmt: skip
            self.model = load_decoder_embedder(path, self.dtype, self.device,
                                               config.max_model_len, backend)
            compute = backend.report()
            default_mode = "last"
        cfg = self.model.cfg
        if self.task == "rerank" and cfg.num_labels != 1:
            raise ValueError(f"{path}: a reranker needs one output label; this one has "
                             f"{cfg.num_labels}")
        self.pooling = PoolingConfig.from_dir(path, default_mode=default_mode)
        limits = [cfg.max_tokens, self.pooling.max_seq_length, config.max_model_len]
        self.max_model_len = min(n for n in limits if n)
        self.waiting: deque[PoolingRequest] = deque()
        self.num_prompt_tokens = 0
        name = config.served_model_name or (config.model or path.name)
        self.model_info = ModelInfo(
            name=name, path=str(path), max_model_len=self.max_model_len,
            vocab_size=cfg.vocab_size, eos_token_ids=[], dtype=str(self.dtype).removeprefix("torch."),
            device=str(self.device), num_blocks=0, block_size=config.block_size,
            fingerprint="", is_demo=False, task=self.task, compute=compute,
        )
        log.info("%s model %s loaded in %.1fs: %d layers, hidden %d, pooling %s%s, max %d tokens",
                 self.task, path, time.perf_counter() - t0, cfg.num_layers, cfg.hidden_size,
                 self.pooling.mode, " + normalize" if self.pooling.normalize else "",
                 self.max_model_len)

    def _use_backend(self, config: EngineConfig) -> dict:
        """The encoder's ops as ops/backend.py chooses them (once, logged); what /v1/models
        shows of the choice."""
        backend = select_backend(config.compute_backend, self.device, self.dtype,
                                 cpu_isa=config.cpu_isa)  # fmt: skip
        self.model.use_kernels(backend.kernels)
        quantized = []
        if config.quantization is not None:
            # the layers' linears only: a cross-encoder's head runs on one row per input
            scheme = QuantizationConfig.named(config.quantization)
            quantized = quantize_loaded_linears(self.model.layers, scheme, backend.kernels)
            if self.model.fuse_int8_mlps():
                quantized.append("MLP: GELU and the down linear's int8 activations fused into "
                                 "the up linear")  # fmt: skip
            log.info("Quantization: %s; kernels: %s", scheme.describe(), "; ".join(quantized))
        # On CPUs the linears are packed once (soberana's kernels, else oneDNN's): F.linear
        # repacks every call, measured ~15% of a MiniLM batch of 14k tokens on Zen 4.
        packed = backend.kernels.pack_cpu_linears and cpu_linear.pack_linears(self.model) > 0
        impls = backend.implementations
        linears = (next((v for k, v in impls.items() if "linears" in k), "PyTorch") if packed
                   else "PyTorch F.linear")  # fmt: skip
        kernels = {"linears": f"{config.quantization}: {'; '.join(quantized)}" if quantized
                   else linears,
                   "attention/LayerNorm": impls.get("encoder attention/LayerNorm",
                                                    "PyTorch SDPA over length groups")}
        if kernels["attention/LayerNorm"].startswith("PyTorch") and backend.name == "native":
            log.warning("Slower path: encoder attention and LayerNorm via PyTorch (%s)",
                        kernels["attention/LayerNorm"])
        return {"compute_backend": backend.name, "requested": config.compute_backend,
                "kernels": kernels, "fallbacks": list(backend.fallbacks)}

    def add_request(self, req: PoolingRequest) -> None:
        n = len(req.prompt_token_ids)
        if n == 0:
            raise ValueError("the input is empty")
        if n > self.max_model_len:
            raise ValueError(f"the input has {n} tokens; this model's limit is {self.max_model_len}")
        if req.token_type_ids is not None and len(req.token_type_ids) != n:
            raise ValueError("token_type_ids must have one id per token")
        self.waiting.append(req)

    def abort_requests(self, request_ids: Iterable[str | tuple[str, int]]) -> None:
        ids = {r if isinstance(r, str) else r[0] for r in request_ids}
        self.waiting = deque(r for r in self.waiting if r.request_id not in ids)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting)

    def step(self) -> list[PoolingOutput]:
        """Run the next packed batch; every input in it finishes."""
        batch: list[PoolingRequest] = []
        tokens = 0
        while self.waiting and len(batch) < self.config.max_num_seqs:
            n = len(self.waiting[0].prompt_token_ids)
            if batch and tokens + n > self.config.max_num_batched_tokens:
                break
            batch.append(self.waiting.popleft())
            tokens += n
        if not batch:
            return []
        self.num_prompt_tokens += tokens
        packed = PackedBatch.build([r.prompt_token_ids for r in batch],
                                   [r.token_type_ids for r in batch],
                                   self.model.position_offset, self.device)
        with torch.inference_mode():
            hidden = self.model(packed)
            if self.task == "rerank":
                first = hidden[torch.tensor([0, *packed.seq_lens[:-1]],
                                            device=hidden.device).cumsum(0)]
                scores = torch.sigmoid(self.model.classify(first).float()[:, 0]).tolist()
                return [PoolingOutput(r.request_id, None, s, len(r.prompt_token_ids))
                        for r, s in zip(batch, scores)]
            vectors = pool(hidden, packed.seq_lens, self.pooling).cpu().tolist()
        return [PoolingOutput(r.request_id, v, None, len(r.prompt_token_ids))
                for r, v in zip(batch, vectors)]

    def shutdown(self) -> None:
        """Nothing to stop: a pooling core owns no worker processes or threads."""

    def get_stats(self) -> SchedulerStats:
        return SchedulerStats(num_waiting_reqs=len(self.waiting),
                              prompt_tokens=self.num_prompt_tokens)


def build_engine_core(config: EngineConfig):
    """The core that serves `config.model`: `EngineCore` for generation, else `PoolingCore`."""
    from soberana.engine.core import EngineCore

    if config.model is None and config.task in ("auto", "generate"):
        return EngineCore(config)  # the default/demo model generates
    path = resolve_model_path(config.model, config.revision)
    if resolve_task(config.task, path) == "generate":
        return EngineCore(config)
    return PoolingCore(config, path)
