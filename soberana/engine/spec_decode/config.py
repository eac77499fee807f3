"""SpeculativeConfig: vLLM's `speculative_config` shape."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields

METHODS = ("ngram", "draft_model", "layer_skip")


@dataclass
class SpeculativeConfig:
    """`method`: `ngram` (prompt lookup), `draft_model` (`model`: a smaller checkpoint with
    the target's vocabulary) or `layer_skip` (self-speculation: the target's first
    `num_draft_layers` layers plus its final norm and head draft; no second model).

    Speculation is turned down per request when its acceptance falls below
    `min_acceptance_rate` and for the whole step when more than `disable_by_batch_size`
    requests run (vLLM's name): large batches are compute-bound, verification costs there.
    """

    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 4
    model: str | None = None
    num_draft_layers: int | None = None  # layer_skip; default: a quarter of the target's
    disable_by_batch_size: int = 32
    min_acceptance_rate: float = 0.2

    @classmethod
    def from_any(cls, value) -> SpeculativeConfig | None:
        """A SpeculativeConfig from itself, a dict or a JSON string (None passes through);
        ValueError names an unknown key."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"speculative_config is not valid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise ValueError("speculative_config must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(
                f"speculative_config: unknown key(s) {unknown}; allowed: {sorted(known)}")
        cfg = cls(**value)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative_config.method must be one of {METHODS}; "
                             f"got {self.method!r}")
        if not 1 <= self.num_speculative_tokens <= 16:
            raise ValueError("speculative_config.num_speculative_tokens must be in [1, 16]; "
                             f"got {self.num_speculative_tokens}")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max <= 32:
            raise ValueError("speculative_config: need 1 <= prompt_lookup_min <= "
                             f"prompt_lookup_max <= 32; got {self.prompt_lookup_min}, "
                             f"{self.prompt_lookup_max}")
        if self.method == "draft_model" and not self.model:
            raise ValueError("speculative_config.model (a checkpoint path) is required for "
                             "method draft_model")
        if self.num_draft_layers is not None and self.num_draft_layers < 1:
            raise ValueError("speculative_config.num_draft_layers must be >= 1; "
                             f"got {self.num_draft_layers}")
        if self.disable_by_batch_size < 1:
            raise ValueError("speculative_config.disable_by_batch_size must be >= 1; "
                             f"got {self.disable_by_batch_size}")
        if not 0 <= self.min_acceptance_rate < 1:
            raise ValueError("speculative_config.min_acceptance_rate must be in [0, 1); "
                             f"got {self.min_acceptance_rate}")
