"""A bfloat16 model's decoder layers on a CPU in one native call per forward pass.

Run as modules, each op of a layer is a Python call into one native kernel (kernels.py), with
its checks and allocations. In a decode step of 64 tokens of a 125M model the Python between
the kernels took ~6 ms of ~53. `NativeStack` hands the whole stack to csrc/cpu_forward.c,
which calls the same kernels in the same order, so the hidden states and the KV cache come
out bit-identical.

The C interface is defined once, in csrc/cpu_forward.h: the ctypes structures here are read
from it (`_Header`), and each is filled through `_fill`, which refuses a field the header does
not have or leaves one unset. It serves models in bfloat16 whose projections all have a native
kernel the C code can call (`stack_linear()`: PackedLinear on soberana's bf16 kernel, int8
QuantLinear on the W8A8 or W8A16 kernel), without q/k norms (Qwen3 runs as modules);
`ops/backend.py` decides once, at start, whether a model gets a stack.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import re
import weakref
from collections.abc import Callable
from ctypes import byref, c_float, c_int32, c_int64, c_void_p
from pathlib import Path

import torch
from torch import nn

from soberana.ops.attention import AttentionMetadata
from soberana.ops.cpu import kernels as cpu_kernels

# The model is typed `nn.Module` (a models.transformer.CausalLM in practice): `ops` never imports
# `models`, which imports `ops` (the import-linter contracts in .importlinter).
SOURCE = cpu_kernels.CSRC / "cpu_forward.c"
HEADER = cpu_kernels.CSRC / "cpu_forward.h"

log = logging.getLogger("soberana.ops")

_C_TYPES = {"int32_t": c_int32, "int64_t": c_int64, "float": c_float}


class _Header:
    """The structs and the stage codes of cpu_forward.h, as ctypes classes and ints."""

    def __init__(self, text: str) -> None:
        self.structs: dict[str, type[ctypes.Structure]] = {}
        for name, body in re.findall(r"typedef struct (\w+) \{(.*?)\} \1;", text, re.S):
            fields = []
            for line in re.sub(r"/\*.*?\*/", "", body, flags=re.S).split(";"):
                decl = line.strip().removeprefix("const ").split(None, 1)
                if not decl:
                    continue
                ctype, names = decl
                for part in names.split(","):
                    field = part.strip()
                    pointer = field.startswith("*") or ctype.endswith("Fn")
                    fields.append((field.lstrip("*"), c_void_p if pointer else _C_TYPES[ctype]))
            self.structs[name] = type(name, (ctypes.Structure,), {"_fields_": fields})
        stages = re.search(r"enum \{ (NORM = .*?) \};", text)
        self.stages = {k: int(v) for k, v in re.findall(r"(\w+) = (\d+)", stages.group(1))}


@functools.cache
def _header() -> _Header:
    return _Header(HEADER.read_text())


def _fill(struct: str, **values) -> ctypes.Structure:
    """An instance of the header's `struct` with every field set from `values`, by name."""
    cls = _header().structs[struct]
    names = [name for name, _ in cls._fields_]
    if set(values) != set(names):
        raise TypeError(f"cpu_forward.h's {struct} has fields {names}; given {sorted(values)}")
    return cls(**values)


def load_forward_library(path: Path) -> ctypes.CDLL:
    """A built cpu_forward library, its function typed."""
    lib = ctypes.CDLL(str(path))
    lib.forward_layers.argtypes = [c_void_p, c_void_p, c_void_p, c_void_p, c_int32]
    lib.forward_layers.restype = ctypes.c_int
    return lib


@functools.cache
def forward_library() -> tuple[ctypes.CDLL, ctypes.Structure] | None:
    """The forward library and the table of the kernels it chains (the linears' come from each
    layer), or None where any of them is unavailable (a failed build)."""
    layers, attention = cpu_kernels.layers_library(), cpu_kernels.attention_library()
    if layers is None or attention is None:
        return None
    lib = cpu_kernels.build_library(SOURCE, load_forward_library)
    if lib is None:
        return None

    def address(fn) -> int:
        return ctypes.cast(fn, c_void_p).value

    table = _fill("Kernels", norm=address(layers.add_rms_norm), rope=address(layers.rope_and_cache), attention=address(attention.paged_attention),
                  silu=address(layers.silu_and_mul),
                  gomp_parallel=cpu_kernels.openmp_parallel())  # fmt: skip
    return lib, table


class NativeStack:
    """One model's decoder layers as csrc/cpu_forward.c runs them, over the KV cache it was
    last bound to (held weakly: the engine's warm-up cache is freed when it is done with)."""

    def __init__(self, model: nn.Module, lib: ctypes.CDLL, kernels: ctypes.Structure) -> None:
        cfg = model.config
        self.lib, self.kernels = lib, kernels
        self.config = cfg
        self.hidden = cfg.hidden_size
        q_size, qkv_size = cfg.q_size, cfg.q_size + 2 * cfg.kv_size
        # Per token, in elements: residual, y, h, qkv, q, attn, gate_up, act. One buffer,
        # grown to the largest step seen and kept, as the heap keeps freed activations
        # (kernels.keep_freed_memory): a step does not fault in fresh pages.
        hidden, inter = cfg.hidden_size, cfg.intermediate_size
        self.widths = (hidden, hidden, hidden, qkv_size, q_size, q_size, 2 * inter, inter)
        self.row_elems = sum(self.widths)
        self.buffer = torch.empty(0, dtype=torch.bfloat16)
        # The tensors whose addresses the structures hold; kept alive with them.
        self.keep: list[torch.Tensor] = [model.norm.weight, model.rotary.cos, model.rotary.sin]
        self.keep_linears: list[nn.Module] = []
        layers = []
        for layer in model.layers:
            attn = layer.self_attn
            linears = {"qkv": attn.qkv_proj, "o": attn.o_proj, "gate_up": layer.gate_up_proj,
                       "down": layer.down_proj}  # fmt: skip
            weights = {}
            for name, lin in linears.items():
                weights[f"{name}_fn"], weights[name], weights[f"{name}_bias"] = lin.stack_linear()
                self.keep_linears.append(lin)  # which hold the weights and biases
            self.keep += [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
            layers.append(_fill("Layer", input_norm=layer.input_layernorm.weight.data_ptr(),
                                post_norm=layer.post_attention_layernorm.weight.data_ptr(),
                                k_cache=None, v_cache=None, **weights))  # fmt: skip
        self.layers = (_header().structs["Layer"] * len(layers))(*layers)
        self.model = _fill(
            "Model", kernels=ctypes.addressof(kernels), layers=ctypes.addressof(self.layers),
            final_norm=model.norm.weight.data_ptr(), cos=model.rotary.cos.data_ptr(),
            sin=model.rotary.sin.data_ptr(), max_positions=model.rotary.cos.shape[0],
            num_layers=cfg.num_layers, hidden=cfg.hidden_size, num_heads=cfg.num_heads,
            num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
            intermediate=cfg.intermediate_size, num_blocks=0, block_size=0,
            dtype=cpu_kernels.DTYPES[torch.bfloat16], eps=cfg.rms_norm_eps,
            scale=cfg.head_dim**-0.5,
        )  # fmt: skip
        self.cache: Callable[[], torch.Tensor | None] = lambda: None  # a weak reference

    def bind(self, kv_cache: torch.Tensor) -> None:
        """Point the layers at kv_cache [L, 2, blocks, block size, kv heads, head dim]
        (contiguous, bfloat16); ValueError where it is laid out otherwise."""
        cfg = self.config
        self.cache = lambda: None
        if not (kv_cache.device.type == "cpu" and kv_cache.dtype == torch.bfloat16
                and kv_cache.is_contiguous() and kv_cache.dim() == 6
                and kv_cache.shape[0] == cfg.num_layers and kv_cache.shape[1] == 2
                and tuple(kv_cache.shape[4:]) == (cfg.num_kv_heads, cfg.head_dim)):  # fmt: skip
            raise ValueError(f"kv_cache: the native stack needs a contiguous bfloat16 CPU cache "
                             f"[{cfg.num_layers}, 2, blocks, block_size, {cfg.num_kv_heads}, "
                             f"{cfg.head_dim}]; got {kv_cache.dtype} {tuple(kv_cache.shape)}")  # fmt: skip
        for i, layer in enumerate(self.layers):
            layer.k_cache, layer.v_cache = kv_cache[i, 0].data_ptr(), kv_cache[i, 1].data_ptr()
        self.model.num_blocks, self.model.block_size = kv_cache.shape[2:4]
        self.cache = weakref.ref(kv_cache)

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                 meta: AttentionMetadata) -> torch.Tensor:  # fmt: skip
        """The final hidden states [T, hidden] of the embeddings x [T, hidden] (left as they
        are), this step's K/V written to kv_cache."""
        if self.cache() is not kv_cache:
            self.bind(kv_cache)
        tokens = x.shape[0]
        decode_only = meta.num_decodes == len(meta.query_lens_cpu)
        if not _step_servable(x, self.hidden, positions, meta, decode_only):
            raise ValueError("native stack: bfloat16 embeddings [T, hidden], int64 positions "
                             "and slot_mapping [T], int32 metadata on the CPU expected")  # fmt: skip
        if self.buffer.numel() < tokens * self.row_elems:
            self.buffer = torch.empty(tokens * self.row_elems, dtype=torch.bfloat16)
        at, parts = self.buffer.data_ptr(), {}
        for name, width in zip(("residual", "y", "h", "qkv", "q", "attn", "gate_up", "act"),
                               self.widths):  # fmt: skip
            parts[name] = at
            at += tokens * width * self.buffer.element_size()
        workspace = _fill("Workspace", embeddings=x.data_ptr(), **parts)
        table = meta.block_table
        step = _fill("Step", tokens=tokens, positions=positions.data_ptr(),
                     slots=meta.slot_mapping.data_ptr(), block_table=table.data_ptr(),
                     table_stride=table.stride(0), max_blocks=table.shape[1],
                     num_seqs=tokens if decode_only else meta.query_start_loc.shape[0] - 1,
                     seq_lens=meta.seq_lens.data_ptr(),
                     query_start=None if decode_only else meta.query_start_loc.data_ptr())  # fmt: skip
        out = torch.empty(tokens, self.hidden, dtype=torch.bfloat16)
        rc = self.lib.forward_layers(byref(self.model), byref(step), byref(workspace),
                                     out.data_ptr(), torch.get_num_threads())  # fmt: skip
        stage, code = rc >> 8, rc & 0xFF
        stages = _header().stages
        if stage == stages["ROPE"]:
            cpu_kernels.raise_rope_error(code, self.model.max_positions,
                                         self.model.num_blocks * self.model.block_size)  # fmt: skip
        if stage == stages["ATTENTION"]:
            cpu_kernels.raise_attention_error(code, self.model.num_blocks, table.shape[1],
                                              self.model.block_size)  # fmt: skip
        if rc != 0:
            stage_name = {v: k for k, v in stages.items()}.get(stage, "?")
            raise ValueError(f"native stack: the {stage_name} kernel refused the step "
                             f"(code {code})")  # fmt: skip
        return out


def _step_servable(x: torch.Tensor, hidden: int, positions: torch.Tensor,
                   meta: AttentionMetadata, decode_only: bool) -> bool:  # fmt: skip
    """Whether a step's tensors are laid out as the native stack reads them (the checks the
    rotary and attention wrappers make)."""
    tokens, slots = x.shape[0], meta.slot_mapping
    return (x.dtype == torch.bfloat16 and x.shape == (tokens, hidden) and x.is_contiguous()
            and tokens > 0 and x.device.type == positions.device.type == slots.device.type == "cpu"
            and positions.dtype == slots.dtype == torch.int64
            and positions.shape == slots.shape == (tokens,)
            and positions.is_contiguous() and slots.is_contiguous()
            and cpu_kernels.attention_metadata_servable(
                meta.block_table, meta.seq_lens, None if decode_only else meta.query_start_loc,
                tokens))  # fmt: skip


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def unservable_reason(model: nn.Module) -> str | None:
    """Why csrc/cpu_forward.c cannot compute `model` (None: it can): it needs bfloat16
    throughout, every projection on a native kernel (`stack_linear`), and no q/k norms."""
    cfg = model.config
    if cfg.num_layers < 1:
        return "no decoder layers"
    rotary = model.rotary
    if not (rotary.cos.dtype == rotary.sin.dtype == torch.float32 and rotary.cos.is_contiguous()
            and rotary.sin.is_contiguous() and rotary.cos.shape == rotary.sin.shape
            and rotary.cos.shape[-1] == cfg.head_dim and cfg.head_dim % 2 == 0):  # fmt: skip
        return "rotary tables laid out otherwise"
    norms = [model.norm] + [n for layer in model.layers
                            for n in (layer.input_layernorm, layer.post_attention_layernorm)]
    if not all(n.weight.dtype == torch.bfloat16 and n.weight.is_contiguous()
               and n.weight.shape == (cfg.hidden_size,) for n in norms):  # fmt: skip
        return "norm weights not bfloat16"
    for layer in model.layers:
        attn = layer.self_attn
        if attn.q_norm is not None:
            return "q/k norms (Qwen3)"
        for lin in (attn.qkv_proj, attn.o_proj, layer.gate_up_proj, layer.down_proj):
            stack_linear = getattr(lin, "stack_linear", None)
            if stack_linear is None or stack_linear() is None:
                return ("a linear without a native bfloat16 kernel (not packed for soberana's "
                        "bf16 kernel, or quantized with no native kernel for its format)")
    return None


def build_stack(model: nn.Module) -> NativeStack | None:
    """The model's native stack, or None (logged why) where csrc/cpu_forward.c cannot
    compute it: its layers then run as modules."""
    found = forward_library()
    why = "the forward library is unavailable" if found is None else unservable_reason(model)
    if why is not None:
        log.info("Decoder layers run as modules, not one native call: %s", why)
        return None
    return NativeStack(model, *found)
