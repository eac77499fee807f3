"""Which part of each weight a tensor-parallel rank holds (Megatron-style, as vLLM).

q/k/v are split by heads (column parallel); with fewer KV heads than ranks each KV head is
replicated on `tp // num_kv_heads` ranks. o_proj and down_proj are split along their input
(row parallel, an all-reduce after them); gate/up by rows; the embedding and the LM head by
vocabulary rows, padded to a multiple of the world size.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from soberana.models.config import ModelConfig


@dataclass(frozen=True)
class TPShard:
    rank: int
    world_size: int
    num_heads: int  # query heads on this rank
    num_kv_heads: int  # KV heads on this rank
    kv_head_start: int  # the first of this rank's KV heads in the checkpoint
    intermediate: int  # MLP width on this rank
    vocab_per_rank: int  # rows of the (padded) vocabulary on this rank
    head_dim: int

    @property
    def vocab_start(self) -> int:
        return self.rank * self.vocab_per_rank

    def shard_config(self, cfg: ModelConfig) -> ModelConfig:
        """The config this rank's modules are built from; the vocabulary stays the full one
        (the sampler and request checks see whole logits rows)."""
        return replace(cfg, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                       intermediate_size=self.intermediate)

    def rows(self, pname: str, part: int | None) -> tuple[int, int, int] | None:
        """(dim, start, length) of the checkpoint slice a parameter part takes, or None when
        the rank holds the whole tensor. `part` is the q/k/v or gate/up index."""
        d = self.head_dim
        if ".qkv_proj." in pname:
            if part == 0:
                return 0, self.rank * self.num_heads * d, self.num_heads * d
            return 0, self.kv_head_start * d, self.num_kv_heads * d
        if ".gate_up_proj." in pname:
            return 0, self.rank * self.intermediate, self.intermediate
        if pname.endswith((".o_proj.weight", ".down_proj.weight")):
            width = self.num_heads * d if ".o_proj." in pname else self.intermediate
            return 1, self.rank * width, width
        if pname in ("embed_tokens.weight", "lm_head.weight"):
            return 0, self.vocab_start, self.vocab_per_rank
        return None


def plan_shard(cfg: ModelConfig, rank: int, world_size: int) -> TPShard:
    """Rank `rank`'s shard; ValueError naming the shape when the model cannot be split."""
    check_tensor_parallel(cfg, world_size)
    kv = cfg.num_kv_heads
    if kv >= world_size:
        local_kv, kv_start = kv // world_size, rank * (kv // world_size)
    else:  # replicate: ranks r*k .. r*k+k-1 share KV head r (k = world_size // kv)
        local_kv, kv_start = 1, rank // (world_size // kv)
    return TPShard(
        rank=rank, world_size=world_size, num_heads=cfg.num_heads // world_size,
        num_kv_heads=local_kv, kv_head_start=kv_start,
        intermediate=cfg.intermediate_size // world_size,
        vocab_per_rank=-(-cfg.vocab_size // world_size), head_dim=cfg.head_dim,
    )


def check_tensor_parallel(cfg: ModelConfig, world_size: int) -> None:
    """Raise ValueError when `cfg` cannot be split over `world_size` ranks."""
    if world_size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1; got {world_size}")
    if cfg.num_heads % world_size:
        raise ValueError(
            f"tensor_parallel_size {world_size} must divide the model's {cfg.num_heads} "
            f"attention heads (allowed: {_divisors(cfg.num_heads)})")
    kv = cfg.num_kv_heads
    if kv % world_size and world_size % kv:
        raise ValueError(
            f"tensor_parallel_size {world_size} must divide the model's {kv} KV heads or be a "
            f"multiple of them (KV heads are then replicated)")
    if cfg.intermediate_size % world_size:
        raise ValueError(
            f"tensor_parallel_size {world_size} must divide the MLP width "
            f"{cfg.intermediate_size}")


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)
