"""GGUF checkpoints (llama.cpp's format) read natively: config, weights and tokenizer.

Three entry points, each taking the path of a `.gguf` file:

- `gguf_config(path)`: our `ModelConfig` (and its Hugging Face-shaped dict) from the metadata.
- `gguf_tensors(path, cfg)`: (Hugging Face tensor name, float32 tensor) pairs, dequantized by
  gguf-py (`gguf.quants`), with llama.cpp's names and rotary row order mapped back to
  transformers' (the loader then fuses q/k/v and gate/up as for safetensors).
  `GGUFFile.raw(name)` gives a tensor's bytes as stored, for loaders that keep weights quantized.
  With `repack=(QuantizationConfig of int8 | int4, model dtype)` the decoder projections come as
  `gguf_repack.Repacked` rows in our quantized layout instead (`--quantization` on a GGUF).
- `gguf_tokenizer(path)`: a transformers fast tokenizer built from the file's vocabulary,
  merges, special tokens and chat template (transformers' own GGUF converter).

The header is parsed here rather than with `gguf.GGUFReader`: that reader builds a numpy view
per array element, ~4 s for a 49k-token vocabulary on a small CPU; this parser takes ~0.1 s.
Tensor data is memory-mapped, so only the tensors read are paged in.
"""

from __future__ import annotations

import functools
import mmap
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from soberana.models.config import ModelConfig
from soberana.quantization import gguf_repack

_MAGIC = b"GGUF"
# GGUF metadata value types (gguf.GGUFValueType): struct formats of the scalars.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}  # fmt: skip
_STRING, _ARRAY = 8, 9

# llama.cpp architecture -> (transformers architecture, whether q/k rows were permuted for
# ggml's interleaved rotary by convert_hf_to_gguf.py: Llama-family only).
_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", True),
    "mistral": ("MistralForCausalLM", True),
    "qwen2": ("Qwen2ForCausalLM", False),
    "qwen3": ("Qwen3ForCausalLM", False),
}

# llama.cpp tensor name (after "blk.N.") -> transformers' (after "model.layers.N.").
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


def is_gguf(path: Path) -> bool:
    """Whether `path` is a GGUF file (by its magic bytes)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == _MAGIC
    except OSError:
        return False


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # PyTorch order (GGUF lists the fastest dimension first)
    qtype: int  # gguf.GGMLQuantizationType value
    offset: int  # from the start of the file
    nbytes: int


class GGUFFile:
    """A GGUF file's metadata and tensor directory, its data memory-mapped."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        buf = memoryview(self._map)
        if bytes(buf[:4]) != _MAGIC:
            raise ValueError(f"{self.path} is not a GGUF file (no GGUF magic)")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version < 2:
            raise ValueError(f"{self.path}: GGUF version {version} is not supported (2 or 3)")
        pos = 24
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key, pos = _read_string(buf, pos)
            (vtype,), pos = struct.unpack_from("<I", buf, pos), pos + 4
            self.metadata[key], pos = _read_value(buf, pos, vtype)
        infos = []
        for _ in range(n_tensors):
            name, pos = _read_string(buf, pos)
            (n_dims,), pos = struct.unpack_from("<I", buf, pos), pos + 4
            dims = struct.unpack_from(f"<{n_dims}Q", buf, pos)
            pos += 8 * n_dims
            qtype, offset = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            infos.append((name, tuple(reversed(dims)), qtype, offset))
        align = int(self.metadata.get("general.alignment", 32))
        data_start = -(-pos // align) * align
        self.tensors: dict[str, TensorInfo] = {}
        for name, shape, qtype, offset in infos:
            block, type_size = _quant_sizes(qtype, name)
            if shape[-1] % block:
                raise ValueError(f"{self.path}: tensor {name!r} rows of {shape[-1]} are not "
                                 f"whole blocks of {block}")  # fmt: skip
            nbytes = int(np.prod(shape)) // block * type_size
            begin = data_start + offset
            if begin + nbytes > len(self._map):
                raise ValueError(f"{self.path}: tensor {name!r} runs past the end of the file")
            self.tensors[name] = TensorInfo(name, shape, qtype, begin, nbytes)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def raw(self, name: str) -> np.ndarray:
        """Tensor `name` as stored: uint8 [rows, bytes per row] (a view of the mapped file)."""
        info = self.tensors[name]
        data = np.frombuffer(self._map, dtype=np.uint8, count=info.nbytes, offset=info.offset)
        rows = int(np.prod(info.shape[:-1]))
        return data.reshape(rows, info.nbytes // max(rows, 1))

    def dequantize(self, name: str) -> torch.Tensor:
        """Tensor `name` in float32, in its PyTorch shape: the common llama.cpp types in
        whole-tensor PyTorch ops (`_FAST`), any other one through gguf-py's `gguf.quants`
        (numpy, a few rows at a time: ~10x slower)."""
        info = self.tensors[name]
        return _dequantize(self.raw(name), info.qtype).reshape(info.shape)

    def block_aligned(self, name: str, start: int, stop: int) -> bool:
        """Whether columns start:stop of 2-D tensor `name` are whole blocks of its type."""
        block = _quant_sizes(self.tensors[name].qtype, name)[0]
        return start % block == 0 and stop % block == 0

    def raw_part(self, name: str, rows: slice, cols: slice) -> np.ndarray:
        """The bytes of rows `rows` and columns `cols` (whole blocks) of 2-D tensor `name`:
        uint8 [rows, bytes per row of the part]; only those bytes are read from the file."""
        info = self.tensors[name]
        start, stop, _ = cols.indices(info.shape[1])
        if not self.block_aligned(name, start, stop):
            raise ValueError(f"columns {start}:{stop} of {name!r} cut its blocks")
        block, type_size = _quant_sizes(info.qtype, name)
        return self.raw(name)[rows, start // block * type_size:stop // block * type_size]

    def dequantize_part(self, name: str, rows: slice, cols: slice) -> torch.Tensor:
        """float32 rows `rows` x columns `cols` of 2-D tensor `name`, dequantizing only
        those rows, and only those columns where they are whole blocks."""
        info = self.tensors[name]
        start, stop, _ = cols.indices(info.shape[1])
        if self.block_aligned(name, start, stop):
            raw = self.raw_part(name, rows, cols)
            return _dequantize(raw, info.qtype).reshape(raw.shape[0], stop - start)
        raw = self.raw(name)[rows]
        return _dequantize(raw, info.qtype).reshape(raw.shape[0], info.shape[1])[:, cols]


def _dequantize(raw: np.ndarray, qtype: int) -> torch.Tensor:
    """float32 values (flat) of stored bytes `raw` of GGML type `qtype`."""
    fast = _FAST.get(qtype)
    if fast is not None:
        values = fast(np.ascontiguousarray(raw).reshape(-1))
    else:
        from gguf.quants import dequantize

        values = dequantize(np.ascontiguousarray(raw), _qtype(qtype))
    # A copy where `values` still views the read-only map (float32 stored as is).
    return torch.from_numpy(np.array(values, dtype=np.float32, copy=not values.flags.writeable
                                     )).reshape(-1)


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The float16 scale at byte `at` of each block, as float32 [blocks, 1]."""
    return blocks[:, at:at + 2].copy().view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """16 bytes a block -> 32 values: low nibbles are elements 0..15, high ones 16..31."""
    out = np.empty((qs.shape[0], 32), dtype=np.float32)
    np.bitwise_and(qs, 0x0F, out=out[:, :16], casting="unsafe")
    np.right_shift(qs, 4, out=out[:, 16:], casting="unsafe")
    return out


def _q8_0(raw: np.ndarray) -> np.ndarray:  # d, 32 x int8: d * q
    b = raw.reshape(-1, 34)
    return b[:, 2:].view(np.int8).astype(np.float32) * _f16(b, 0)


def _q4_0(raw: np.ndarray) -> np.ndarray:  # d, 16 bytes: d * (q - 8)
    b = raw.reshape(-1, 18)
    out = _nibbles(b[:, 2:])
    out -= 8.0
    out *= _f16(b, 0)
    return out


def _q4_1(raw: np.ndarray) -> np.ndarray:  # d, m, 16 bytes: d * q + m
    b = raw.reshape(-1, 20)
    out = _nibbles(b[:, 4:])
    out *= _f16(b, 0)
    out += _f16(b, 2)
    return out


# Whole-tensor numpy (one thread: torch's OpenMP team is slow on a busy machine for these
# small ops). GGMLQuantizationType values: F32, F16, Q4_0, Q4_1, Q8_0, Q4_K, Q6_K, BF16.
_FAST = {
    0: lambda raw: raw.view(np.float32),
    1: lambda raw: raw.view(np.float16).astype(np.float32),
    2: _q4_0,
    3: _q4_1,
    8: _q8_0,
    12: gguf_repack.dequantize_q4_k,
    14: gguf_repack.dequantize_q6_k,
    30: lambda raw: (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32),
}


def open_gguf(path: Path | str) -> GGUFFile:
    """GGUFFile(path), parsed once per process while the file is unchanged (config, weights and
    tokenizer each read it at start-up)."""
    p = Path(path).resolve()
    stat = p.stat()
    return _open_cached(p, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _open_cached(path: Path, size: int, mtime_ns: int) -> GGUFFile:
    return GGUFFile(path)


def _quant_sizes(qtype: int, name: str) -> tuple[int, int]:
    from gguf.constants import GGML_QUANT_SIZES

    try:
        return GGML_QUANT_SIZES[_qtype(qtype)]
    except (KeyError, ValueError):
        raise ValueError(f"tensor {name!r} has a GGML type ({qtype}) gguf-py does not know") from None


def _qtype(value: int):
    from gguf.constants import GGMLQuantizationType

    return GGMLQuantizationType(value)


def _read_string(buf: memoryview, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", buf, pos)
    end = pos + 8 + n
    return bytes(buf[pos + 8:end]).decode("utf-8", errors="replace"), end


def _read_value(buf: memoryview, pos: int, vtype: int) -> tuple[Any, int]:
    if vtype == _STRING:
        return _read_string(buf, pos)
    if vtype in _SCALARS:
        fmt = _SCALARS[vtype]
        return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
    if vtype != _ARRAY:
        raise ValueError(f"GGUF metadata value of unknown type {vtype}")
    etype, count = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    if etype in _SCALARS:  # numbers: one numpy read, not `count` unpacks
        fmt = _SCALARS[etype]
        size = struct.calcsize(fmt)
        values = np.frombuffer(buf, dtype=np.dtype(fmt), count=count, offset=pos).tolist()
        return values, pos + size * count
    values = []
    for _ in range(count):
        value, pos = _read_value(buf, pos, etype)
        values.append(value)
    return values, pos


def gguf_config(path: Path | str, file: GGUFFile | None = None) -> tuple[ModelConfig, dict]:
    """Our ModelConfig, and the Hugging Face config.json-shaped dict it was built from."""
    f = file or open_gguf(path)
    arch = f.architecture
    if arch not in _ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: "
                         f"{sorted(_ARCHITECTURES)}")  # fmt: skip
    m = f.metadata

    def key(name: str, default: Any = None) -> Any:
        value = m.get(f"{arch}.{name}", default)
        if value is None:
            raise ValueError(f"{f.path}: GGUF metadata lacks {arch}.{name}")
        return value

    heads = int(key("attention.head_count"))
    hidden = int(key("embedding_length"))
    vocab = m.get(f"{arch}.vocab_size") or len(m.get("tokenizer.ggml.tokens", ()))
    hf = {
        "architectures": [_ARCHITECTURES[arch][0]],
        "model_type": arch,
        "vocab_size": int(vocab) or f.tensors["token_embd.weight"].shape[0],
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", heads)),
        "head_dim": int(m.get(f"{arch}.attention.key_length") or hidden // heads),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": int(key("context_length")),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in f.tensors,
        "hidden_act": "silu",
        "bos_token_id": m.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": m.get("tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",  # what the dequantized weights are
    }
    if f"{arch}.rope.scaling.type" in m and m[f"{arch}.rope.scaling.type"] not in ("none", ""):
        raise ValueError(f"{f.path}: rope scaling {m[f'{arch}.rope.scaling.type']!r} in GGUF "
                         "is not supported")  # fmt: skip
    if "blk.0.attn_q.bias" in f.tensors:
        hf["attention_bias"] = arch != "qwen2"  # Qwen2 has q/k/v biases by architecture
    if arch == "qwen2":
        hf["use_sliding_window"] = False
    return ModelConfig.from_hf(hf), hf


def hf_name(gguf_name: str) -> str | None:
    """transformers' name for a llama.cpp tensor name, or None (not a weight we load)."""
    stem, _, suffix = gguf_name.rpartition(".")
    if stem.startswith("blk."):
        _, layer, part = stem.split(".", 2)
        if part not in _LAYER_NAMES:
            return None
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{suffix}"
    if stem in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[stem]}.{suffix}"
    return None  # e.g. rope_freqs (recomputed from the config)


def gguf_tensors(path: Path | str, cfg: ModelConfig, file: GGUFFile | None = None,
                 repack: tuple[Any, torch.dtype] | None = None,
                 ) -> Iterator[tuple[str, torch.Tensor | gguf_repack.Repacked]]:  # fmt: skip
    """(transformers name, float32 tensor) for every weight of the file, dequantized; with
    `repack` (a QuantizationConfig of int8 / int4, and the model dtype) the decoder projections'
    weights come as `Repacked` rows of that layout instead.

    llama.cpp's converter permutes the q and k rows of Llama-family models for ggml's
    interleaved rotary; they are permuted back to the half-split order our rotary uses.
    """
    f = file or open_gguf(path)
    for name in f.tensors:
        target = hf_name(name)
        if target is None:
            continue
        info = f.tensors[name]
        if repack is not None and _is_projection(target) and len(info.shape) == 2:
            qcfg, dtype = repack
            tensor = gguf_repack.repack(
                f.raw(name), info.qtype, _qtype(info.qtype).name, info.shape, qcfg.method,
                qcfg.group_size, dtype, lambda name=name: f.dequantize(name),
                float_zero=qcfg.float_zero)  # fmt: skip
            reorder = tensor.permute_rows
        else:
            tensor = f.dequantize(name)
            reorder = None
        heads = permuted_heads(f, name, cfg)
        if heads is not None:
            if reorder is None:
                tensor = unpermute(tensor, heads)
            else:
                reorder(lambda t, heads=heads: unpermute(t, heads))
        yield target, tensor


def permuted_heads(f: GGUFFile, name: str, cfg: ModelConfig) -> int | None:
    """The head count of a q or k tensor (weight or bias) whose rows llama.cpp's converter
    permuted for ggml's rotary (Llama-family files), else None."""
    if not _ARCHITECTURES.get(f.architecture, ("", False))[1]:
        return None
    if ".attn_q." in name:
        return cfg.num_heads
    return cfg.num_kv_heads if ".attn_k." in name else None


def _is_projection(hf: str) -> bool:
    """A decoder projection's weight (what quantization replaces), by transformers' name."""
    return hf.endswith("_proj.weight") and ".layers." in hf


def linear_types(f: GGUFFile) -> dict[str, int]:
    """How many decoder projection weights the file stores in each GGML type."""
    counts: dict[str, int] = {}
    for name, info in f.tensors.items():
        target = hf_name(name)
        if target is not None and _is_projection(target):
            key = _qtype(info.qtype).name
            counts[key] = counts.get(key, 0) + 1
    return counts


def unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo convert_hf_to_gguf.py's `permute`: per head, rows (pair, 2) -> (2, pair)."""
    rows = w.shape[0]
    a = w.contiguous().numpy().reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2)
    return torch.from_numpy(np.ascontiguousarray(a)).reshape(w.shape)


def fingerprint(path: Path | str) -> str:
    """Cheap identity of a GGUF file: its size, header and tail (as loader._fingerprint)."""
    import hashlib

    p = Path(path)
    size = p.stat().st_size
    h = hashlib.sha256(f"gguf:{size}".encode())
    with open(p, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 16)))
        h.update(f.read(1 << 16))
    return h.hexdigest()


def gguf_tokenizer(path: Path | str, file: GGUFFile | None = None):
    """A transformers fast tokenizer from the file's tokenizer.* metadata."""
    # The submodule, not `from transformers import ...`: LLM imports transformers in a thread
    # meanwhile, and the package's lazy attribute lookup is not thread-safe.
    from transformers.tokenization_utils_fast import PreTrainedTokenizerFast

    f = file or open_gguf(path)
    m = f.metadata
    if "tokenizer.ggml.tokens" not in m:
        raise ValueError(f"{f.path} has no tokenizer (tokenizer.ggml.tokens)")
    renames = {"model": "tokenizer_type", "pre": "pre_tokenizer_type", "tokens": "tokens",
               "scores": "scores", "token_type": "token_type", "merges": "merges",
               "precompiled_charsmap": "precompiled_charsmap", "bos_token_id": "bos_token_id",
               "eos_token_id": "eos_token_id", "unknown_token_id": "unk_token_id",
               "padding_token_id": "pad_token_id", "add_space_prefix": "add_prefix_space"}  # fmt: skip
    tokenizer_dict = {new: m[f"tokenizer.ggml.{old}"] for old, new in renames.items()
                      if f"tokenizer.ggml.{old}" in m}  # fmt: skip
    backend = _convert(f.architecture, tokenizer_dict)
    tokens = m["tokenizer.ggml.tokens"]

    def token(key: str) -> str | None:
        i = m.get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=token("bos_token_id"),
        eos_token=token("eos_token_id"),
        unk_token=token("unknown_token_id"),
        pad_token=token("padding_token_id"),
        chat_template=m.get("tokenizer.chat_template"),
        model_max_length=int(m.get(f"{f.architecture}.context_length", 2048)),
    )
    return tok


def _convert(architecture: str, tokenizer_dict: dict):
    """transformers' GGUF tokenizer converter (its module moved between 4.x and 5.x)."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer
    except ImportError:
        from transformers.integrations.ggml import convert_gguf_tokenizer
    backend, _ = convert_gguf_tokenizer(architecture, tokenizer_dict)
    return backend
