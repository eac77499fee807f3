"""Fixtures: one shared real server for the API tests; tests that stop servers start their own."""

from __future__ import annotations

import openai
import pytest

from tests.server.helpers import ALLOWED_ORIGIN, API_KEY, ServerProcess


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """The shared server: demo model, API key required, 64+ sequences at once, one CORS origin."""
    proc = ServerProcess(
        tmp_path_factory.mktemp("server") / "server.log", "--allowed-origins", ALLOWED_ORIGIN
    )
    try:
        yield proc.start()
    finally:
        proc.stop()


@pytest.fixture
def start_server(tmp_path):
    """Start extra servers (extra CLI arguments allowed); all are stopped afterwards."""
    started: list[ServerProcess] = []

    def start(*extra_args: str, wait_ready: bool = True) -> ServerProcess:
        proc = ServerProcess(tmp_path / f"server-{len(started)}.log", *extra_args)
        started.append(proc)
        return proc.start(wait_ready=wait_ready)

    try:
        yield start
    finally:
        for proc in started:
            proc.stop()


@pytest.fixture(scope="session")
def client(server) -> openai.OpenAI:
    """The official OpenAI client pointed at the shared server."""
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def model(client) -> str:
    return client.models.list().data[0].id
