"""Fixtures for the KV warehouse tests."""

from __future__ import annotations

import pytest

from tests.kv.helpers import RedisServer, small_layout


@pytest.fixture
def layout():
    return small_layout()


@pytest.fixture
def start_redis(tmp_path):
    """Start real `redis-server`s (extra arguments allowed); all are stopped afterwards."""
    servers: list[RedisServer] = []

    def start(*extra_args: str) -> RedisServer:
        workdir = tmp_path / f"redis-{len(servers)}"
        workdir.mkdir()
        server = RedisServer(workdir, *extra_args)
        servers.append(server)
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.stop()
