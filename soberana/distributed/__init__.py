"""Tensor parallelism: process groups, worker processes, sharded layers and weight loading.

The engine core (rank 0) keeps the scheduler and the sampler; ranks 1..N-1 are worker
processes that run only the forward pass of their shard (docs/distributed.md).
"""
