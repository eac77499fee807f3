"""Fixtures: the recording stand-in cloud, and gateway configs with an external pool."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fake_openai import FakeOpenAI
from tests.gateway.conftest import start_gateway, upstreams  # noqa: F401  (fixtures reused)
from tests.gateway.helpers import backend, config, tenant

# Probes that a loaded 2-core CI machine cannot fail by accident: these tests are not about health.
LENIENT_HEALTH = {"interval_s": 1.0, "timeout_s": 10.0, "unhealthy_after": 10, "eject_after": 100}

KEY_A = "sk-tenant-a"
KEY_B = "sk-tenant-b"


@pytest.fixture
def cloud() -> Iterator:
    """Start recording stand-in clouds (the fake OpenAI server answering with the placeholders
    it received); all stopped at teardown."""
    running: list[FakeOpenAI] = []

    def start(**behaviour) -> FakeOpenAI:
        c = FakeOpenAI("cloud", echo=True, **behaviour).start()
        running.append(c)
        return c

    try:
        yield start
    finally:
        for c in running:
            c.stop()


def cloud_config(cloud_server: FakeOpenAI, tenants: list[dict] | None = None, **sections) -> dict:
    """One model `m` served only by the external (cloud) backend; tenants may use it."""
    tenants = tenants or [tenant("a", KEY_A, privacy=["onprem", "external"])]
    cloud_backend = backend(
        "cloud",
        cloud_server.url,
        kind="openai",
        privacy="external",
        capabilities=["chat", "completions", "tool_use"],
    )
    return config({"m": [cloud_backend]}, tenants, health=LENIENT_HEALTH, **sections)
