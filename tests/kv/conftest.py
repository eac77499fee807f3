"""Fixtures for the KV warehouse tests."""

from __future__ import annotations

import pytest

from soberana.kv.warehouse import KVWarehouse
from tests.kv.helpers import RedisServer, small_layout


@pytest.fixture
def layout():
    return small_layout()


@pytest.fixture
def start_redis(tmp_path):
    """Start real `redis-server`s (extra arguments allowed); all are stopped afterwards."""
    servers: list[RedisServer] = []

    def start(*extra_args: str, port: int | None = None) -> RedisServer:
        workdir = tmp_path / f"redis-{len(servers)}"
        workdir.mkdir()
        server = RedisServer(workdir, *extra_args, port=port)
        servers.append(server)
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
def warehouses():
    """Warehouses built by a test, closed after it (their threads stopped)."""
    made: list[KVWarehouse] = []

    def make(layout, **kwargs) -> KVWarehouse:
        made.append(KVWarehouse(layout, **kwargs))
        return made[-1]

    try:
        yield make
    finally:
        for w in made:
            w.close()
