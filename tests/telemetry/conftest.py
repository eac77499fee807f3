"""Telemetry tests: NVML is replaced at the library boundary by a replay of a recording."""

from __future__ import annotations

import pytest

from tests.telemetry.fake_nvml import FakeNVML


@pytest.fixture
def fake_nvml() -> FakeNVML:
    return FakeNVML("h100_sxm_x2")
