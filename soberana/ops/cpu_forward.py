"""A bfloat16 model's decoder layers on a CPU in one native call per forward pass.

`CausalLM.forward` runs its layers as modules: each op is a Python call into one native
kernel (cpu_kernels.py), with its checks and allocations. In a decode step of 64 tokens of a
125M model the Python between the kernels took ~6 ms of ~53. `NativeStack` hands the whole
stack to csrc/cpu_forward.c, which calls the same kernels in the same order, so the hidden
states and the KV cache come out bit-identical.

It serves models in bfloat16 whose linears all run soberana's bf16 kernel (PackedLinear on a
CPU with AVX512_BF16), without q/k norms (Qwen3 runs as modules). `SOBERANA_CPU_FORWARD=modules`
turns it off.
"""

from __future__ import annotations

import ctypes
import functools
import os
import weakref
from collections.abc import Callable
from ctypes import POINTER, byref, c_float, c_int32, c_int64, c_void_p
from pathlib import Path

import torch
from torch import nn

from soberana.ops import cpu_kernels
from soberana.ops.attention import AttentionMetadata
from soberana.ops.cpu_linear import PackedLinear

# The model is typed `nn.Module` (a models.transformer.CausalLM in practice): `ops` never imports
# `models`, which imports `ops` (the import-linter contracts in .importlinter).
SOURCE = Path(__file__).parent / "csrc" / "cpu_forward.c"

# forward_layers' return value: which kernel failed (stage << 8) and its code.
_ROPE, _ATTENTION = 3, 4


# Mirrors of the structures in cpu_forward.c, field for field.
class _Kernels(ctypes.Structure):
    _fields_ = [(name, c_void_p) for name in ("norm", "linear", "rope", "attention", "silu",
                                              "gomp_parallel")]  # fmt: skip


class _Layer(ctypes.Structure):
    _fields_ = [(name, c_void_p) for name in (
        "input_norm", "post_norm", "qkv", "qkv_bias", "o", "o_bias", "gate_up", "gate_up_bias",
        "down", "down_bias", "k_cache", "v_cache")]  # fmt: skip


class _Model(ctypes.Structure):
    _fields_ = [
        ("kernels", POINTER(_Kernels)), ("layers", POINTER(_Layer)), ("final_norm", c_void_p),
        ("cos", c_void_p), ("sin", c_void_p), ("max_positions", c_int64),
        *[(name, c_int32) for name in ("num_layers", "hidden", "num_heads", "num_kv_heads",
                                       "head_dim", "intermediate", "num_blocks", "block_size",
                                       "dtype")],
        ("eps", c_float), ("scale", c_float),
    ]  # fmt: skip


class _Step(ctypes.Structure):
    _fields_ = [
        ("tokens", c_int64), ("positions", c_void_p), ("slots", c_void_p),
        ("block_table", c_void_p), ("table_stride", c_int64), ("max_blocks", c_int32),
        ("num_seqs", c_int32), ("seq_lens", c_void_p), ("query_start", c_void_p),
    ]  # fmt: skip


class _Workspace(ctypes.Structure):
    _fields_ = [(name, c_void_p) for name in ("embeddings", "residual", "y", "h", "qkv", "q",
                                              "attn", "gate_up", "act")]  # fmt: skip


def load_forward_library(path: Path) -> ctypes.CDLL:
    """A built cpu_forward library, its function typed."""
    lib = ctypes.CDLL(str(path))
    lib.forward_layers.argtypes = [c_void_p, c_void_p, c_void_p, c_void_p, c_int32]
    lib.forward_layers.restype = ctypes.c_int
    return lib


@functools.cache
def _kernels() -> tuple[ctypes.CDLL, _Kernels] | None:
    """The forward library and the addresses of the kernels it chains, or None where any of
    them is unavailable."""
    layers, attention = cpu_kernels._layers_library(), cpu_kernels._library()
    linear = cpu_kernels._linear_library()
    if layers is None or attention is None or linear is None:
        return None
    lib = cpu_kernels.build_library(SOURCE, load_forward_library)
    if lib is None:
        return None

    def address(fn) -> int:
        return ctypes.cast(fn, c_void_p).value

    table = _Kernels(address(layers.add_rms_norm), address(linear.linear_bf16),
                     address(layers.rope_and_cache), address(attention.paged_attention),
                     address(layers.silu_and_mul), cpu_kernels.openmp_parallel())  # fmt: skip
    return lib, table


class NativeStack:
    """One model's decoder layers as csrc/cpu_forward.c runs them, over the KV cache it was
    last bound to (held weakly: the engine's warm-up cache is freed when it is done with)."""

    def __init__(self, model: nn.Module, lib: ctypes.CDLL, kernels: _Kernels) -> None:
        cfg = model.config
        self.lib, self.kernels = lib, kernels
        self.config = cfg
        self.hidden = cfg.hidden_size
        q_size, qkv_size = cfg.q_size, cfg.q_size + 2 * cfg.kv_size
        # Per token, in elements: residual, y, h, qkv, q, attn, gate_up, act. One buffer,
        # grown to the largest step seen and kept, as the heap keeps freed activations
        # (cpu_kernels.keep_freed_memory): a step does not fault in fresh pages.
        hidden, inter = cfg.hidden_size, cfg.intermediate_size
        self.widths = (hidden, hidden, hidden, qkv_size, q_size, q_size, 2 * inter, inter)
        self.row_elems = sum(self.widths)
        self.buffer = torch.empty(0, dtype=torch.bfloat16)
        # The tensors whose addresses the structures hold; kept alive with them.
        self.keep: list[torch.Tensor] = [model.norm.weight, model.rotary.cos, model.rotary.sin]
        layers = []
        for layer in model.layers:
            attn = layer.self_attn
            linears = (attn.qkv_proj, attn.o_proj, layer.gate_up_proj, layer.down_proj)
            weights = [ptr for lin in linears for ptr in (lin.native.data_ptr(), _ptr(lin.bias))]
            self.keep += [t for lin in linears for t in (lin.native, lin.bias) if t is not None]
            self.keep += [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
            layers.append(_Layer(layer.input_layernorm.weight.data_ptr(),
                                 layer.post_attention_layernorm.weight.data_ptr(), *weights))  # fmt: skip
        self.layers = (_Layer * len(layers))(*layers)
        self.model = _Model(
            ctypes.pointer(kernels), self.layers, model.norm.weight.data_ptr(),
            model.rotary.cos.data_ptr(), model.rotary.sin.data_ptr(), model.rotary.cos.shape[0],
            cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
            cfg.intermediate_size, 0, 0, cpu_kernels.DTYPES[torch.bfloat16], cfg.rms_norm_eps,
            cfg.head_dim**-0.5,
        )  # fmt: skip
        self.cache: Callable[[], torch.Tensor | None] = lambda: None  # a weak reference

    def bind(self, kv_cache: torch.Tensor) -> bool:
        """Point the layers at kv_cache [L, 2, blocks, block size, kv heads, head dim]
        (contiguous, bfloat16); False, and unbound, where it is laid out otherwise."""
        cfg = self.config
        self.cache = lambda: None
        if not (kv_cache.device.type == "cpu" and kv_cache.dtype == torch.bfloat16
                and kv_cache.is_contiguous() and kv_cache.dim() == 6
                and kv_cache.shape[0] == cfg.num_layers and kv_cache.shape[1] == 2
                and tuple(kv_cache.shape[4:]) == (cfg.num_kv_heads, cfg.head_dim)):  # fmt: skip
            return False
        for i, layer in enumerate(self.layers):
            layer.k_cache, layer.v_cache = kv_cache[i, 0].data_ptr(), kv_cache[i, 1].data_ptr()
        self.model.num_blocks, self.model.block_size = kv_cache.shape[2:4]
        self.cache = weakref.ref(kv_cache)
        return True

    def __call__(self, x: torch.Tensor, positions: torch.Tensor,
                 meta: AttentionMetadata) -> torch.Tensor | None:  # fmt: skip
        """The final hidden states [T, hidden] of the embeddings x [T, hidden] (left as they
        are), this step's K/V written to the cache; None where a kernel could not serve the
        step: the caller runs the modules, which write the same K/V again."""
        tokens = x.shape[0]
        decode_only = meta.num_decodes == len(meta.query_lens_cpu)
        if not _step_servable(x, self.hidden, positions, meta, decode_only):
            return None
        if self.buffer.numel() < tokens * self.row_elems:
            self.buffer = torch.empty(tokens * self.row_elems, dtype=torch.bfloat16)
        at, parts = self.buffer.data_ptr(), []
        for width in self.widths:
            parts.append(at)
            at += tokens * width * self.buffer.element_size()
        workspace = _Workspace(x.data_ptr(), *parts)
        table = meta.block_table
        step = _Step(tokens, positions.data_ptr(), meta.slot_mapping.data_ptr(),
                     table.data_ptr(), table.stride(0), table.shape[1],
                     tokens if decode_only else meta.query_start_loc.shape[0] - 1,
                     meta.seq_lens.data_ptr(),
                     None if decode_only else meta.query_start_loc.data_ptr())  # fmt: skip
        out = torch.empty(tokens, self.hidden, dtype=torch.bfloat16)
        rc = self.lib.forward_layers(byref(self.model), byref(step), byref(workspace),
                                     out.data_ptr(), torch.get_num_threads())  # fmt: skip
        stage, code = rc >> 8, rc & 0xFF
        if stage == _ROPE:
            cpu_kernels.raise_rope_error(code, self.model.max_positions,
                                         self.model.num_blocks * self.model.block_size)  # fmt: skip
        if stage == _ATTENTION:
            cpu_kernels.raise_attention_error(code, self.model.num_blocks, table.shape[1],
                                              self.model.block_size)  # fmt: skip
        return out if rc == 0 else None


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


def _servable(model: nn.Module) -> bool:
    """Whether the model is what csrc/cpu_forward.c computes: bfloat16 throughout, every
    linear on soberana's bf16 kernel, no q/k norms."""
    cfg = model.config
    if os.environ.get("SOBERANA_CPU_FORWARD", "native") == "modules" or cfg.num_layers < 1:
        return False
    rotary = model.rotary
    if not (rotary.cos.dtype == rotary.sin.dtype == torch.float32 and rotary.cos.is_contiguous()
            and rotary.sin.is_contiguous() and rotary.cos.shape == rotary.sin.shape
            and rotary.cos.shape[-1] == cfg.head_dim and cfg.head_dim % 2 == 0):  # fmt: skip
        return False
    norms = [model.norm] + [n for layer in model.layers
                            for n in (layer.input_layernorm, layer.post_attention_layernorm)]
    if not all(n.weight.dtype == torch.bfloat16 and n.weight.is_contiguous()
               and n.weight.shape == (cfg.hidden_size,) for n in norms):  # fmt: skip
        return False
    for layer in model.layers:
        attn = layer.self_attn
        if attn.q_norm is not None:
            return False
        for lin in (attn.qkv_proj, attn.o_proj, layer.gate_up_proj, layer.down_proj):
            if not (type(lin) is PackedLinear and lin.native is not None):
                return False
    return True


# model -> its stack, or None where the model is not served; weak, so a dropped model frees
# its entry.
_stacks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def stack_for(model: nn.Module) -> NativeStack | None:
    """The model's native stack (built at first use), or None where it is not served."""
    if model not in _stacks:
        found = _kernels()
        _stacks[model] = NativeStack(model, *found) if found and _servable(model) else None
    return _stacks[model]


def forward(model: nn.Module, x: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
            meta: AttentionMetadata) -> torch.Tensor | None:  # fmt: skip
    """`model`'s decoder layers and final norm over the embeddings x in one native call, or
    None where the native stack does not serve this model, cache or step."""
    stack = stack_for(model)
    if stack is None or (stack.cache() is not kv_cache and not stack.bind(kv_cache)):
        return None
    return stack(x, positions, meta)
