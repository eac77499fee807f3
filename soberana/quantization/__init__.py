"""Quantized weights and KV cache: int8 / int4 weight-only, FP8 W8A8, compressed-tensors
checkpoints, FP8 KV cache (docs/quantization.md)."""

from soberana.quantization.config import (
    KV_CACHE_DTYPES,
    QUANTIZATION_METHODS,
    QuantizationConfig,
    gguf_quantization,
    resolve_quantization,
    with_lm_head,
)
from soberana.quantization.linear import QuantLinear

__all__ = ["KV_CACHE_DTYPES", "QUANTIZATION_METHODS", "QuantLinear", "QuantizationConfig",
           "gguf_quantization", "quantize_loaded_linears", "resolve_quantization",
           "replace_linears", "with_lm_head"]  # fmt: skip


def replace_linears(model, cfg: QuantizationConfig) -> int:
    """Swap each decoder projection `nn.Linear` of `model` (built on the meta device, before
    its memory is allocated) for a QuantLinear, and the output head too where
    `cfg.lm_head_quantized`; a tied model then holds the matrix once, in the head, and its
    embedding lookup reads the head's int8 rows (`embed_tokens` is None); returns how many."""
    import torch
    from torch import nn

    count = 0
    for layer in model.layers:
        for parent in (layer, layer.self_attn):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    setattr(parent, name, _quant_linear_like(child, cfg))
                    count += 1
    if cfg.lm_head_quantized:
        embedding = model.embed_tokens.weight  # the head's shape, dtype and device, tied or not
        with torch.device(embedding.device):
            model.lm_head = QuantLinear(embedding.shape[1], embedding.shape[0], False,
                                        cfg.linear_method(), embedding.dtype)  # fmt: skip
        if model.config.tie_word_embeddings:  # one int8 copy serves the lookup and the head
            model.embed_tokens = None
        count += 1
    return count


def quantize_loaded_linears(modules, cfg: QuantizationConfig, kernels) -> list[str]:
    """Swap each `nn.Linear` inside `modules` (weights already loaded: an encoder's layers) for
    a QuantLinear of `cfg`'s method, quantized from its weight, its kernel chosen among the
    compute backend's `kernels`; returns the kernels chosen (for the log and /v1/models)."""
    import torch
    from torch import nn

    chosen = set()
    for parent in list(modules.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            q = _quant_linear_like(child, cfg)
            q.weight_loader(child.weight.detach())
            if child.bias is not None:
                with torch.no_grad():
                    q.bias.copy_(child.bias)
            q.finalize(kernels)
            chosen.add(q.kernel)
            setattr(parent, name, q)
    return sorted(chosen)


def _quant_linear_like(linear, cfg: QuantizationConfig) -> QuantLinear:
    """An empty QuantLinear of `cfg`'s method with `linear`'s shape, bias, dtype and device."""
    import torch

    with torch.device(linear.weight.device):
        return QuantLinear(linear.in_features, linear.out_features, linear.bias is not None,
                           cfg.linear_method(), linear.weight.dtype)  # fmt: skip
