"""Bidirectional encoders (BERT, RoBERTa / XLM-RoBERTa) over packed variable-length batches.

Sentence embedders (all-MiniLM, BGE, E5, GTE, multilingual-E5) and cross-encoder rerankers
(ms-marco MiniLM, bge-reranker) are these two architectures. The batch is packed: every
sequence's tokens are concatenated ([T, hidden], no padding), so the linears and norms, most of
the work, never touch a pad token. Attention alone needs sequences apart: the layers call the
attention and add + LayerNorm that `ops/backend.py` chose at start (`Encoder.use_kernels`):
on CPUs with AVX-512 a native kernel reading each sequence from the packed rows, on CUDA GPUs
(bf16/fp16, sm80+) FlashAttention's variable-length kernel doing the same, else PyTorch SDPA
over groups of similar length (`ops/encoder.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from soberana.models.encoder_config import EncoderConfig
from soberana.ops.backend import TORCH_KERNELS, Kernels
from soberana.ops.encoder import PackedSeqs
from soberana.quantization.linear import w8a8_gelu_mlp


@dataclass
class PackedBatch:
    """Sequences concatenated: `input_ids`, `token_type_ids` and `positions` are [T]."""

    input_ids: torch.Tensor
    token_type_ids: torch.Tensor
    positions: torch.Tensor
    seq_lens: list[int]

    @classmethod
    def build(cls, sequences: list[list[int]], token_types: list[list[int] | None],
              position_offset: int, device: torch.device) -> PackedBatch:
        ids = [t for seq in sequences for t in seq]
        types = [t for seq, tt in zip(sequences, token_types)
                 for t in (tt if tt is not None else [0] * len(seq))]
        positions = [position_offset + i for seq in sequences for i in range(len(seq))]

        def tensor(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        return cls(tensor(ids), tensor(types), tensor(positions), [len(s) for s in sequences])


class _Layer(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_heads, h // cfg.num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(h, 3 * h)
        self.attn_out = nn.Linear(h, h)
        self.attn_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.up = nn.Linear(h, cfg.intermediate_size)
        self.down = nn.Linear(cfg.intermediate_size, h)
        self.out_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.act_ = _activation_(cfg.hidden_act)
        self.use_kernels(TORCH_KERNELS)

    def use_kernels(self, kernels: Kernels) -> None:
        self.attention, self.add_layer_norm = kernels.encoder_attention, kernels.add_layer_norm

    def forward(self, x: torch.Tensor, seqs: PackedSeqs) -> torch.Tensor:
        attn = self.attention(self.qkv(x), seqs, self.num_heads, self.scale)
        norm = self.attn_norm
        x = self.add_layer_norm(self.attn_out(attn), x, norm.weight, norm.bias, norm.eps)
        norm = self.out_norm
        return self.add_layer_norm(self.mlp(x), x, norm.weight, norm.bias, norm.eps)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        """down(act(up(x))); `Encoder.fuse_int8_mlps` may replace it with one fused call."""
        return self.down(self.act_(self.up(x)))


class Encoder(nn.Module):
    """Token embeddings → layers → final hidden states [T, hidden], and the optional
    classification head of a cross-encoder."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_size
        self.word_embeddings = nn.Embedding(cfg.vocab_size, h)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, h)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, h)
        self.embed_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(_Layer(cfg) for _ in range(cfg.num_layers))
        self.head: nn.Module | None = None
        if cfg.num_labels is not None:
            self.head = _BertHead(cfg) if cfg.family == "bert" else _RobertaHead(cfg)

    def use_kernels(self, kernels: Kernels) -> None:
        """Serve attention and LayerNorm with the implementations chosen at start."""
        for layer in self.layers:
            layer.use_kernels(kernels)

    def fuse_int8_mlps(self) -> bool:
        """Run each layer's MLP as one W8A8 call (GELU and the down linear's activation
        quantization fused into the up linear) where the int8 CPU kernel serves both linears
        and the activation is the exact GELU; whether it does (asked once, after the layers'
        linears are quantized)."""
        if self.cfg.hidden_act != "gelu":
            return False
        fused = [w8a8_gelu_mlp(layer.up, layer.down) for layer in self.layers]
        if any(f is None for f in fused):
            return False
        for layer, f in zip(self.layers, fused):
            layer.mlp = f
        return True

    @property
    def position_offset(self) -> int:
        return self.cfg.pad_token_id + 1 if self.cfg.family == "roberta" else 0

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        x = (self.word_embeddings(batch.input_ids) + self.position_embeddings(batch.positions)
             + self.token_type_embeddings(batch.token_type_ids))
        x = self.embed_norm(x)
        seqs = PackedSeqs(batch.seq_lens, x.device)
        for layer in self.layers:
            x = layer(x, seqs)
        return x

    def classify(self, first_tokens: torch.Tensor) -> torch.Tensor:
        """The cross-encoder's logits [B, num_labels] from each sequence's first token."""
        assert self.head is not None
        return self.head(first_tokens)


class _BertHead(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.pooler = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.classifier = nn.Linear(cfg.hidden_size, cfg.num_labels)

    def forward(self, first: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.tanh(self.pooler(first)))


class _RobertaHead(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.num_labels)

    def forward(self, first: torch.Tensor) -> torch.Tensor:
        return self.out_proj(torch.tanh(self.dense(first)))


def _activation_(name: str):
    """The activation, in place (its input is a linear's output, used once)."""
    if name == "gelu":
        return torch.ops.aten.gelu_
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return lambda x: torch.ops.aten.gelu_(x, approximate="tanh")
    if name == "relu":
        return F.relu_
    raise ValueError(f"hidden_act {name!r} is not supported (gelu, gelu_new, relu)")


def load_encoder(path: Path, dtype: torch.dtype, device: torch.device) -> Encoder:
    """The encoder of `path` (a Hugging Face directory with safetensors) on `device`."""
    cfg = EncoderConfig.from_dir(path)
    tensors = _read_safetensors(path)
    with torch.device("meta"):
        model = Encoder(cfg)
    state = _our_names(tensors, cfg)
    missing = set(model.state_dict()) - set(state)
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {sorted(missing)[:5]}")
    model.load_state_dict(state, assign=True)
    return model.to(device=device, dtype=dtype).eval()


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path}: no *.safetensors weights")
    tensors = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                tensors[name] = f.get_tensor(name)
    return tensors


def _our_names(tensors: dict[str, torch.Tensor], cfg: EncoderConfig) -> dict[str, torch.Tensor]:
    """Hugging Face names (with or without the `bert.`/`roberta.` prefix) → this module's."""
    plain = {}
    for name, t in tensors.items():
        for prefix in ("bert.", "roberta.", "model."):
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        plain[name] = t.float()
    out = {
        "word_embeddings.weight": plain.get("embeddings.word_embeddings.weight"),
        "position_embeddings.weight": plain.get("embeddings.position_embeddings.weight"),
        "token_type_embeddings.weight": plain.get("embeddings.token_type_embeddings.weight"),
        "embed_norm.weight": plain.get("embeddings.LayerNorm.weight"),
        "embed_norm.bias": plain.get("embeddings.LayerNorm.bias"),
    }
    for i in range(cfg.num_layers):
        src, dst = f"encoder.layer.{i}.", f"layers.{i}."
        for kind in ("weight", "bias"):
            parts = [plain.get(f"{src}attention.self.{p}.{kind}") for p in ("query", "key", "value")]
            out[f"{dst}qkv.{kind}"] = None if any(p is None for p in parts) else torch.cat(parts)
            out[f"{dst}attn_out.{kind}"] = plain.get(f"{src}attention.output.dense.{kind}")
            out[f"{dst}attn_norm.{kind}"] = plain.get(f"{src}attention.output.LayerNorm.{kind}")
            out[f"{dst}up.{kind}"] = plain.get(f"{src}intermediate.dense.{kind}")
            out[f"{dst}down.{kind}"] = plain.get(f"{src}output.dense.{kind}")
            out[f"{dst}out_norm.{kind}"] = plain.get(f"{src}output.LayerNorm.{kind}")
    if cfg.num_labels is not None:
        for kind in ("weight", "bias"):
            if cfg.family == "bert":
                out[f"head.pooler.{kind}"] = plain.get(f"pooler.dense.{kind}")
                out[f"head.classifier.{kind}"] = plain.get(f"classifier.{kind}")
            else:
                out[f"head.dense.{kind}"] = plain.get(f"classifier.dense.{kind}")
                out[f"head.out_proj.{kind}"] = plain.get(f"classifier.out_proj.{kind}")
    return {k: v for k, v in out.items() if v is not None}

