"""Rank 0 (the engine core) drives ranks 1..N-1, spawned worker processes, step by step.

The scheduler, the KV block manager and the sampler stay in the engine core. Rank 0's model
is a `TPModel`: each forward first broadcasts the step's inputs (a pickled header over gloo,
the tensors over the device group), then every rank runs its shard of the same forward and
the collectives inside it; `compute_logits` broadcasts the rows to score and gathers the
vocabulary shards; `gather_blocks` / `scatter_blocks` move whole KV blocks between the
sharded pools and the KV warehouse (`kv_blocks.py`). Workers only ever mirror those calls
(`worker_main`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import subprocess
import sys
import weakref
from pathlib import Path

import torch
import torch.distributed as dist

from soberana.distributed.group import TPGroup, set_launcher_env
from soberana.distributed.kv_blocks import gather_blocks, scatter_blocks
from soberana.distributed.loader import check_tp_quantization, load_sharded_model
from soberana.distributed.sharding import TPShard, check_tensor_parallel, plan_shard
from soberana.engine.spec_decode.draft_model import first_layers
from soberana.models.loader import LoadedModel, read_model_config
from soberana.ops.attention import AttentionMetadata, GatherWorkspace
from soberana.ops.backend import Backend, select_backend
from soberana.quantization import QuantizationConfig

log = logging.getLogger("soberana.distributed")

_META = ("slot_mapping", "query_start_loc", "seq_lens", "block_table")


class TPModel:
    """Rank 0's model under tensor parallelism: the local shard, driving the workers."""

    def __init__(self, model, group: TPGroup, shard: TPShard, num_kv_heads: int,
                 name: str = "target") -> None:
        self.model, self.group = model, group
        self.name = name  # which of the workers' models mirrors this one: target or draft
        self.config = model.config
        self.shard = shard  # rank 0's part of every weight and of every KV block
        self.num_kv_heads = num_kv_heads  # the model's, over all ranks
        self.kv_cache: torch.Tensor | None = None

    def share_kv_cache(self, kv_cache: torch.Tensor) -> None:
        """Workers allocate a pool of the same shape (their own heads) and dtype."""
        self.kv_cache = kv_cache
        self.group.send_header(("kv", self.name, tuple(kv_cache.shape), kv_cache.dtype))

    def first_layers(self, num_layers: int) -> TPModel:
        """The layer-skip drafter (`spec_decode.draft_model.first_layers`) on every rank: the
        first `num_layers` layers of each rank's shard, then the final norm and the head."""
        view = first_layers(self.model, num_layers)  # checks num_layers before the workers
        self.group.send_header(("first_layers", num_layers))
        return TPModel(view, self.group, self.shard, self.num_kv_heads, name="draft")

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                 meta: AttentionMetadata) -> torch.Tensor:
        tensors = [input_ids, positions] + [getattr(meta, name) for name in _META]
        temp_kv = None if kv_cache is self.kv_cache else (tuple(kv_cache.shape), kv_cache.dtype)
        self.group.send_header(("forward", self.name, [(tuple(t.shape), t.dtype) for t in tensors],
                                temp_kv, meta.num_decodes, meta.query_lens_cpu,
                                meta.seq_lens_cpu))
        for t in tensors:
            self.group.broadcast(t.contiguous())
        return self.model(input_ids, positions, kv_cache, meta)

    def compute_logits(self, hidden: torch.Tensor, float32: bool = True) -> torch.Tensor:
        hidden = hidden.contiguous()
        self.group.send_header(("logits", tuple(hidden.shape), hidden.dtype))
        self.group.broadcast(hidden)
        return self.model.compute_logits(hidden, float32)

    def gather_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """Pool blocks `block_ids` with every KV head, from all ranks (for the warehouse)."""
        self.group.send_header(("kv_gather", block_ids))
        return gather_blocks(self.group, self.kv_cache, block_ids, self.num_kv_heads)

    def scatter_blocks(self, whole: torch.Tensor, block_ids: list[int]) -> None:
        """Write whole blocks (from the warehouse) into every rank's pool at `block_ids`."""
        whole = whole.contiguous()
        self.group.send_header(("kv_scatter", block_ids, tuple(whole.shape), whole.dtype))
        scatter_blocks(self.group, self.kv_cache, block_ids, whole, self.shard)


class TensorParallel:
    """Worker processes and rank 0's group; `loaded.model` is the `TPModel`."""

    def __init__(self, config, path: Path, dtype: torch.dtype, device: torch.device,
                 max_len: int, backend: Backend | None = None,
                 quantization: QuantizationConfig | None = None) -> None:
        world = config.tensor_parallel_size
        full = read_model_config(path)[0]
        check_tensor_parallel(full, world)
        if quantization is not None:
            check_tp_quantization(quantization, full, world)
        if device.type == "cuda" and torch.cuda.device_count() < world:
            raise ValueError(f"tensor_parallel_size {world} needs {world} GPUs; "
                             f"{torch.cuda.device_count()} are visible")
        set_launcher_env()
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        threads = max(1, (os.cpu_count() or 1) // world)
        # Workers are fresh interpreters (`python -m`), not forks: no copied CUDA or thread
        # state, and no re-import of the caller's __main__ (the spawn method's trap).
        self.workers = []
        for rank in range(1, world):
            args = {"rank": rank, "world": world, "init_method": init_method, "path": str(path),
                    "dtype": str(dtype).removeprefix("torch."), "max_len": max_len,
                    "device": f"cuda:{rank}" if device.type == "cuda" else "cpu",
                    "load_format": config.load_format, "threads": threads,
                    "compute_backend": config.compute_backend, "cpu_isa": config.cpu_isa,
                    "kv_cache_dtype": config.kv_cache_dtype,
                    # every field: `activations` decides W8A8 vs W8A16 for int8
                    "quantization": dataclasses.asdict(quantization) if quantization else None}
            self.workers.append(subprocess.Popen(
                [sys.executable, "-m", "soberana.distributed.executor", json.dumps(args)]))
        self.group = TPGroup(0, world, init_method, device)
        error = None
        try:
            loaded = load_sharded_model(path, dtype, device, max_len, config.load_format,
                                        self.group, backend, quantization)
        except Exception as exc:  # the workers must hear of it, or they wait forever
            error, loaded = exc, None
        if not _all_ok(self.group, error is None):
            self.close()
            raise error or RuntimeError("a tensor-parallel worker failed to load its shard "
                                        "(see its log above)")
        self.model = TPModel(loaded.model, self.group, plan_shard(full, 0, world),
                             full.num_kv_heads)
        self.loaded = LoadedModel(model=self.model, config=loaded.config, path=loaded.path,
                                  fingerprint=loaded.fingerprint,
                                  quantization=loaded.quantization)
        self._finalizer = weakref.finalize(self, _stop, self.group, self.workers)
        log.info("tensor parallel: %d ranks (%s), %d heads and %d KV heads per rank", world,
                 dist.get_backend(), loaded.config.num_heads, loaded.config.num_kv_heads)

    def close(self) -> None:
        if getattr(self, "_finalizer", None) is not None:
            self._finalizer()
        else:
            _stop(self.group, self.workers, send=False)


def _stop(group: TPGroup, workers: list, send: bool = True) -> None:
    if send:
        try:
            group.send_header(("stop",))
        except Exception:  # a worker already gone: nothing to tell it
            pass
    for p in workers:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    group.close()


def _all_ok(group: TPGroup, ok: bool) -> bool:
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group.cpu_group)
    return bool(flag.item())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_main(rank: int, world: int, init_method: str, path: str, dtype: str, device: str,
                max_len: int, load_format: str, threads: int, compute_backend: str = "auto",
                cpu_isa: str = "native", kv_cache_dtype: str = "auto",
                quantization: dict | None = None) -> None:
    """Rank `rank`: load its shard, then mirror rank 0's forwards until told to stop."""
    torch.set_num_threads(threads)
    path, dtype = Path(path), getattr(torch, dtype)
    dev = torch.device(device)
    group = TPGroup(rank, world, init_method, dev)
    try:
        kv_dtype = torch.float8_e4m3fn if kv_cache_dtype == "fp8" else dtype
        backend = select_backend(compute_backend, dev, dtype, kv_dtype, cpu_isa)
        quant = QuantizationConfig(**quantization) if quantization else None
        model = load_sharded_model(path, dtype, dev, max_len, load_format, group, backend,
                                   quant).model
        ok = True
    except Exception:
        log.exception("tensor-parallel rank %d could not load its shard", rank)
        ok = False
    if not _all_ok(group, ok):
        group.close()
        return
    models = {"target": model}  # and "draft": the layer-skip drafter, when rank 0 builds one
    caches: dict[str, torch.Tensor] = {}  # each model's KV pool
    shard = plan_shard(read_model_config(path)[0], rank, world)
    workspace = GatherWorkspace() if dev.type == "cpu" else None
    with torch.inference_mode():
        while True:
            header = group.send_header(None)
            op = header[0]
            if op == "stop":
                break
            if op == "kv":
                caches[header[1]] = torch.zeros(header[2], dtype=header[3], device=dev)
            elif op == "first_layers":
                models["draft"] = first_layers(model, header[1])
            elif op == "forward":
                name, specs, temp_kv, num_decodes, q_lens, seq_lens = header[1:]
                tensors = [group.broadcast(torch.empty(s, dtype=d, device=dev)) for s, d in specs]
                meta = AttentionMetadata(*tensors[2:], num_decodes=num_decodes,
                                         query_lens_cpu=q_lens, seq_lens_cpu=seq_lens,
                                         workspace=workspace)
                cache = caches[name] if temp_kv is None else torch.zeros(
                    temp_kv[0], dtype=temp_kv[1], device=dev)
                models[name](tensors[0], tensors[1], cache, meta)
            elif op == "logits":
                hidden = group.broadcast(torch.empty(header[1], dtype=header[2], device=dev))
                model.compute_logits(hidden)
            elif op == "kv_gather":
                gather_blocks(group, caches["target"], header[1], shard.num_kv_heads)
            elif op == "kv_scatter":
                whole = torch.empty(header[2], dtype=header[3], device=dev)
                scatter_blocks(group, caches["target"], header[1], whole, shard)
    group.close()


if __name__ == "__main__":
    from soberana.log import setup_logging

    setup_logging()
    worker_main(**json.loads(sys.argv[1]))
