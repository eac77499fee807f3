"""Build one rank's shard of the model and read only that shard from safetensors.

With int8 weight-only quantization each rank quantizes its shard at load. Scales are per
output channel: a column-parallel shard (q/k/v, gate/up) takes its rows and their scales; a
row-parallel one (o_proj, down_proj, split along the input) keeps the scale of the whole row,
so every rank's int8 values are the one-rank engine's and the summed partial products equal
its output up to float summation order. That needs the whole row: those two are read whole,
one tensor at a time."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from soberana.distributed.group import TPGroup
from soberana.distributed.layers import VocabParallelEmbedding
from soberana.distributed.sharding import TPShard, plan_shard
from soberana.models import loader as base
from soberana.models.config import rope_inv_freq
from soberana.models.transformer import CausalLM, RotaryEmbedding
from soberana.ops.backend import Backend, select_backend
from soberana.quantization import QuantizationConfig, replace_linears
from soberana.quantization.linear import QuantLinear

# Quantization schemes whose shards are exact slices of the one-rank layers (see above).
TP_QUANTIZATION = ("int8",)


def load_sharded_model(path: Path, dtype: torch.dtype, device: torch.device,
                       max_positions: int, load_format: str, group: TPGroup,
                       backend: Backend | None = None,
                       quantization: QuantizationConfig | None = None) -> base.LoadedModel:
    """`loader.load_model` for rank `group.rank` of `group.world_size`; the returned config
    has this rank's head counts and MLP width and the full vocabulary. Linears stay unpacked
    and the layers run as modules (`model.tp` keeps the native stack off)."""
    full, _ = base.read_model_config(path)
    shard = plan_shard(full, group.rank, group.world_size)
    cfg = shard.shard_config(full)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = CausalLM(cfg, max_positions)
            model.embed_tokens = VocabParallelEmbedding(shard.vocab_per_rank, cfg.hidden_size,
                                                        shard.vocab_start, group)
            if model.lm_head is not None:
                model.lm_head = nn.Linear(cfg.hidden_size, shard.vocab_per_rank, bias=False)
            if quantization is not None:
                check_tp_quantization(quantization)
                # the vocabulary-parallel head stays in the model dtype
                quantization = dataclasses.replace(quantization, lm_head_quantized=False)
                quantization.verify_supported(device)
                replace_linears(model, quantization)
    finally:
        torch.set_default_dtype(previous)
    model.to_empty(device=device)
    model.rotary = RotaryEmbedding(rope_inv_freq(cfg.rope, cfg.head_dim), max_positions).to(device)
    model.tp = group
    for layer in model.layers:
        layer.tp = group
    if load_format == "dummy":
        if quantization is not None:
            raise ValueError("load_format dummy does not quantize under tensor parallelism")
        base._fill_random(model)  # noqa: SLF001 - the same fill, per shard
        fingerprint = hashlib.sha256(b"dummy" + (path / "config.json").read_bytes()).hexdigest()
    elif load_format == "safetensors":
        files = base._safetensors_files(path)  # noqa: SLF001
        _load_shard(model, full.vocab_size, shard, files)
        fingerprint = base._fingerprint(path, files)  # noqa: SLF001
    else:
        raise ValueError(f"load_format must be 'safetensors' or 'dummy'; got {load_format!r}")
    kernels = (backend or select_backend("auto", device, dtype)).kernels
    if quantization is not None:  # the one-rank engine's name for quantized weights
        fingerprint = hashlib.sha256(f"{fingerprint}|{quantization.kv_identity()}".encode()).hexdigest()
    if group.rank != 0:  # before the quantized layers copy their biases for their kernels
        _zero_row_parallel_biases(model)
    if quantization is not None:
        base._finalize_quantized(model, quantization, kernels)  # noqa: SLF001
    model.eval()
    model.use_kernels(kernels)
    return base.LoadedModel(model=model, config=cfg, path=path, fingerprint=fingerprint,
                            quantization=quantization)


def check_tp_quantization(quantization: QuantizationConfig) -> None:
    """ValueError unless `quantization` can be sharded exactly (TP_QUANTIZATION)."""
    if quantization.method not in TP_QUANTIZATION or quantization.source != "on-the-fly":
        raise ValueError(f"quantization {quantization.method} ({quantization.source}) is not "
                         f"supported with tensor_parallel_size > 1; supported: int8 quantized "
                         f"at load (docs/distributed.md)")
    if quantization.lm_head_quantized:
        raise ValueError("lm_head_quantized is not supported with tensor_parallel_size > 1: "
                         "the vocabulary-parallel output head stays in the model dtype (omit "
                         "the option; docs/distributed.md)")  # fmt: skip


def _load_shard(model: CausalLM, vocab_size: int, shard: TPShard, files: list[Path]) -> None:
    params = dict(model.named_parameters())
    # a quantized layer's weight is loaded through the layer (quantized rows, not a copy)
    quant_layers = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    params.update(dict.fromkeys(quant_layers))
    cfg = model.config
    part_sizes = {"qkv_proj": [cfg.q_size, cfg.kv_size, cfg.kv_size],
                  "gate_up_proj": [cfg.intermediate_size, cfg.intermediate_size]}
    loaded: set[str] = set()
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                target = base._target(name)  # noqa: SLF001
                if target is None:
                    continue
                pname, part, _ = target
                if pname == "lm_head.weight" and model.lm_head is None:
                    continue
                if pname not in params:
                    raise ValueError(f"unexpected tensor {name!r} in {file.name}")
                if pname in quant_layers:
                    _load_quantized(quant_layers[pname], f.get_slice(name), shard.rows(pname, part),
                                    sum(part_sizes[pname.split(".")[-2]][:part]) if part else 0,
                                    name)
                    loaded.add(f"{pname}#{part}")
                    continue
                param = params[pname].data
                if part is not None:
                    sizes = part_sizes[pname.split(".")[-2]]
                    begin = sum(sizes[:part])
                    param = param[begin:begin + sizes[part]]
                _copy_slice(param, f.get_slice(name), shard.rows(pname, part), vocab_size, name)
                loaded.add(f"{pname}#{part}")
    base.check_all_loaded(params, part_sizes, loaded)


def _load_quantized(layer: QuantLinear, src, rows: tuple[int, int, int], begin: int,
                    name: str) -> None:
    """Quantize one rank's part of a checkpoint weight into `layer` at row `begin`."""
    dim, start, length = rows
    if dim == 0:  # column parallel: whole output rows, each with its own scale
        layer.weight_loader(src[start:start + length], begin)
        return
    whole = src[:]  # row parallel: the scale of each output channel covers the whole row
    if whole.shape[1] < start + length:
        raise ValueError(f"tensor {name!r} has shape {tuple(whole.shape)}: too small for the "
                         f"columns {start}:{start + length}")
    parts = layer.method.quantize_rows(whole.to(layer.weight_scale.device))
    parts["weight"] = parts["weight"][:, start:start + length]
    layer.load_quantized(parts, begin)


def _copy_slice(dst: torch.Tensor, src, rows: tuple[int, int, int] | None, vocab_size: int,
                name: str) -> None:
    """Read only `rows` (dim, start, length) of the checkpoint tensor into `dst`."""
    shape = list(src.get_shape())
    with torch.no_grad():
        if rows is None:
            tensor = src[:]
        else:
            dim, start, length = rows
            # The vocabulary is padded to a multiple of the world size: rows past it are zero.
            stop = min(start + length, shape[dim]) if dim == 0 and shape[0] == vocab_size else (
                start + length)
            if stop > shape[dim]:
                raise ValueError(f"tensor {name!r} has shape {tuple(shape)}: too small for the "
                                 f"rows {start}:{start + length} of dim {dim}")
            index = [slice(None)] * len(shape)
            index[dim] = slice(start, max(start, stop))
            tensor = src[tuple(index)]
            if tensor.shape[dim] < length:
                dst.zero_()
                dst = dst.narrow(dim, 0, tensor.shape[dim])
        base._copy_checked(dst, tensor, name)  # noqa: SLF001


def _zero_row_parallel_biases(model: CausalLM) -> None:
    """Row-parallel outputs are summed over ranks: only rank 0 adds the bias."""
    with torch.no_grad():
        for layer in model.layers:
            for linear in (layer.self_attn.o_proj, layer.down_proj):
                if linear.bias is not None:
                    linear.bias.zero_()
