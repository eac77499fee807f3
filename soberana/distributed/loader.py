"""Build one rank's shard of the model and read only that shard from the checkpoint.

Quantized weights are sharded as vLLM shards them. A column-parallel shard (q/k/v, gate/up:
output rows) takes its rows with their scales, group scales and zero points. A row-parallel
one (o_proj, down_proj: split along the input) takes its columns:
- int4 (scales and zero points per group of inputs): whole groups, so each rank quantizes (or
  reads, from a compressed-tensors checkpoint or a GGUF file) only its columns; a shard
  boundary that would cut a group is refused before any worker starts (`check_tp_quantization`,
  naming the layer, the shard width and the group);
- int8 and fp8 quantized at load (one scale per output row over all its inputs): the rank
  finds each row's largest |value| reading a few columns at a time, then quantizes only its
  columns with it, so its values and scales are exactly the one-rank engine's and only the
  float summation order of the all-reduce differs; stored per-channel or per-tensor scales
  are read whole, the weight's columns alone.
GGUF files are read block by block (`gguf_shard.py`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from soberana.distributed.gguf_shard import GGUFSlice, gguf_slices
from soberana.distributed.group import TPGroup
from soberana.distributed.layers import VocabParallelEmbedding
from soberana.distributed.sharding import TPShard, plan_shard
from soberana.models import loader as base
from soberana.models.config import ModelConfig
from soberana.models.gguf import fingerprint as gguf_fingerprint
from soberana.models.transformer import CausalLM
from soberana.ops.backend import Backend, select_backend
from soberana.quantization import QuantizationConfig, compressed_tensors, schemes
from soberana.quantization.linear import QuantLinear


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

    def shard_vocab(model: CausalLM) -> None:
        model.embed_tokens = VocabParallelEmbedding(shard.vocab_per_rank, cfg.hidden_size,
                                                    shard.vocab_start, group)
        if model.lm_head is not None:
            model.lm_head = nn.Linear(cfg.hidden_size, shard.vocab_per_rank, bias=False)

    if quantization is not None:
        check_tp_quantization(quantization, full, group.world_size)
        # the vocabulary-parallel head stays in the model dtype
        quantization = dataclasses.replace(quantization, lm_head_quantized=False)
    model = base.build_empty_model(cfg, dtype, device, max_positions, quantization, shard_vocab)
    model.tp = group
    for layer in model.layers:
        layer.tp = group
    if load_format == "dummy":
        if quantization is not None:
            raise ValueError("load_format dummy does not quantize under tensor parallelism")
        base._fill_random(model)  # noqa: SLF001 - the same fill, per shard
        fingerprint = hashlib.sha256(b"dummy" + (path / "config.json").read_bytes()).hexdigest()
    elif load_format == "safetensors" and path.is_file():  # GGUF
        _load_shard(model, full.vocab_size, shard, gguf_slices(path, full), quantization, dtype)
        fingerprint = gguf_fingerprint(path)
    elif load_format == "safetensors":
        files = base._safetensors_files(path)  # noqa: SLF001
        _load_shard(model, full.vocab_size, shard, _safetensors_slices(files), quantization,
                    dtype)
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


def check_tp_quantization(quantization: QuantizationConfig, cfg: ModelConfig,
                          world_size: int) -> None:
    """ValueError, before any worker starts, where a row-parallel shard (o_proj, down_proj:
    `cfg`'s input widths split `world_size` ways) would cut int4's groups of inputs, or the
    int32 words of a compressed-tensors `pack-quantized` checkpoint (vLLM refuses the same),
    or where the output head is asked quantized (the vocabulary-parallel head is not)."""
    if quantization.lm_head_quantized:
        raise ValueError("lm_head_quantized is not supported with tensor_parallel_size > 1: "
                         "the vocabulary-parallel output head stays in the model dtype (omit "
                         "the option; docs/distributed.md)")  # fmt: skip
    widths = {"o_proj": cfg.num_heads * cfg.head_dim, "down_proj": cfg.intermediate_size}
    for layer, k in widths.items():
        shard = k // world_size
        units = []
        if quantization.method == "int4":
            units.append(("group", schemes.group_size_for(k, quantization.group_size)))
        if quantization.checkpoint_format == "pack-quantized":
            units.append(("packed int32 word", 32 // (4 if quantization.method == "int4" else 8)))
        for what, size in units:
            if shard % size:
                raise ValueError(
                    f"quantization {quantization.method} ({quantization.source}) with "
                    f"tensor_parallel_size {world_size}: {layer} is split along its {k} inputs "
                    f"into shards of {shard}, which would cut its {what}s of {size} inputs; "
                    f"use a tensor_parallel_size that leaves whole {what}s in every shard "
                    f"(docs/distributed.md)")


def _safetensors_slices(files: list[Path]) -> Iterator[tuple[str, object]]:
    """(name, safetensors slice) of every tensor: only what is indexed is read."""
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_slice(name)


def _load_shard(model: CausalLM, vocab_size: int, shard: TPShard,
                tensors: Iterable[tuple[str, object]], quantization: QuantizationConfig | None,
                dtype: torch.dtype) -> None:  # fmt: skip
    """Fill this rank's `model` from (transformers name, slice) pairs (`base._load_tensors`
    for one shard); a slice is read only where this rank's part is indexed."""
    params = dict(model.named_parameters())
    # a quantized layer's weight is loaded through the layer (quantized rows, not a copy)
    quant_layers = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    params.update(dict.fromkeys(quant_layers))
    cfg = model.config
    part_sizes = {"qkv_proj": [cfg.q_size, cfg.kv_size, cfg.kv_size],
                  "gate_up_proj": [cfg.intermediate_size, cfg.intermediate_size]}
    source = quantization.source if quantization is not None else ""
    pending: dict[tuple[str, int | None], dict[str, torch.Tensor]] = {}
    loaded: set[str] = set()
    for name, src in tensors:
        target = base._target(name)  # noqa: SLF001
        if target is None:
            continue
        pname, part, suffix = target
        if pname == "lm_head.weight" and model.lm_head is None:
            continue
        layer_name = pname.rsplit(".", 1)[0] + ".weight"
        begin = sum(part_sizes[pname.split(".")[-2]][:part]) if part else 0
        if source == "compressed-tensors" and layer_name in quant_layers and suffix != "bias":
            if suffix in compressed_tensors.IGNORED_PARTS:
                continue
            layer = quant_layers[layer_name]
            parts = pending.setdefault((layer_name, part), {})
            parts[suffix] = _stored_part(src, shard.rows(layer_name, part),
                                         layer.in_features * shard.world_size, name)
            if set(compressed_tensors.required_parts(quantization)) <= set(parts):
                layer.load_quantized(compressed_tensors.to_layer_layout(
                    quantization, pending.pop((layer_name, part)), layer.in_features), begin)
                loaded.add(f"{layer_name}#{part}")
            continue
        if pname not in params:
            raise ValueError(f"unexpected tensor {name!r} in the checkpoint")
        if pname in quant_layers:
            rows = shard.rows(pname, part)
            if source == "re-packed from GGUF":
                _load_repacked(quant_layers[pname], src, rows, begin, quantization, dtype)
            else:
                _load_quantized(quant_layers[pname], src, rows, begin, name)
            loaded.add(f"{pname}#{part}")
            continue
        param = params[pname].data
        if part is not None:
            param = param[begin:begin + part_sizes[pname.split(".")[-2]][part]]
        _copy_slice(param, src, shard.rows(pname, part), vocab_size, name)
        loaded.add(f"{pname}#{part}")
    base.check_all_loaded(params, part_sizes, loaded)


def _load_quantized(layer: QuantLinear, src, rows: tuple[int, int, int], begin: int,
                    name: str) -> None:
    """Quantize one rank's part of a float checkpoint weight into `layer` at row `begin`."""
    dim, start, length = rows
    if dim == 0:  # column parallel: whole output rows, each with its own scales
        layer.weight_loader(src[start:start + length], begin)
        return
    _check_columns(src, start, length, name)
    if not layer.method.per_row_scales:  # int4: groups of inputs, quantized alone
        layer.weight_loader(src[:, start:start + length], begin)
        return
    # a row's scale covers all its inputs: their largest |value| first, read a few columns
    # at a time, then this rank's columns quantized with it (the one-rank values, bit for bit)
    device = layer.weight_scale.device
    amax = _row_amax(src, device)
    layer.load_quantized(layer.method.quantize_rows(src[:, start:start + length].to(device),
                                                    amax), begin)


# Columns per read while finding each row's largest |value| (a multiple of GGUF's 256-value
# super-blocks): 8192 rows x 1024 float32 columns = 32 MiB at a time.
_AMAX_COLUMNS = 1024


def _row_amax(src, device: torch.device) -> torch.Tensor:
    """Each row's largest |value| of a 2-D checkpoint tensor, float32 [rows]."""
    rows, cols = src.get_shape()
    amax = torch.zeros(rows, device=device)
    for c in range(0, cols, _AMAX_COLUMNS):
        part = src[:, c:min(c + _AMAX_COLUMNS, cols)].to(device)
        torch.maximum(amax, part.float().abs().amax(dim=1), out=amax)
    return amax


def _load_repacked(layer: QuantLinear, src: GGUFSlice, rows: tuple[int, int, int], begin: int,
                   quantization: QuantizationConfig, dtype: torch.dtype) -> None:
    """One rank's part of a GGUF weight re-packed into `layer` (gguf_repack.py) at row
    `begin`: only its blocks where a row-parallel shard is whole blocks and the layout's
    scales are per group (int4); else whole rows, re-packed, then its columns."""
    dim, start, length = rows
    if dim == 0:
        layer.load_quantized(src.repacked(slice(start, start + length), slice(None),
                                          quantization, dtype).parts, begin)
        return
    _check_columns(src, start, length, src.name)
    if not layer.method.per_row_scales and src.block_aligned(start, start + length):
        layer.load_quantized(src.repacked(slice(None), slice(start, start + length),
                                          quantization, dtype).parts, begin)
        return
    whole = src.repacked(slice(None), slice(None), quantization, dtype)
    layer.load_quantized(layer.method.slice_inputs(whole.parts, start, length), begin)


def _stored_part(src, rows: tuple[int, int, int], inputs: int, name: str) -> torch.Tensor:
    """This rank's part of one stored tensor of a compressed-tensors linear (weight,
    weight_packed, weight_scale). Column parallel: its rows, where the tensor has a row per
    output (a per-tensor scale is read whole). Row parallel (`inputs`: the whole row's): its
    columns, where each stored column covers `per` inputs (1 for an int8/fp8 weight, 8 for
    int4 in int32 words, the group for group scales); a per-channel or per-tensor scale is
    read whole."""
    dim, start, length = rows
    shape = src.get_shape()
    if dim == 0:
        return src[start:start + length] if shape and shape[0] > 1 else src[:]
    if len(shape) < 2 or shape[1] == 1:
        return src[:]
    per = inputs // shape[1]
    if inputs % shape[1] or start % per or length % per:
        raise ValueError(f"tensor {name!r} of shape {tuple(shape)}: a shard of {length} inputs "
                         f"at {start} would cut its columns of {max(per, 1)} inputs")
    return src[:, start // per:(start + length) // per]


def _check_columns(src, start: int, length: int, name: str) -> None:
    shape = tuple(src.get_shape())
    if shape[1] < start + length:
        raise ValueError(f"tensor {name!r} has shape {shape}: too small for the columns "
                         f"{start}:{start + length}")


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
