"""One real stack (server, gateway, GPU exporter, Prometheus) shared by the deploy tests."""

from __future__ import annotations

import shutil

import pytest

from tests.deploy.stack import start_stack, stop_stack


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus not installed (Debian: apt-get install prometheus)")
    s = start_stack(tmp_path_factory.mktemp("stack"))
    try:
        yield s
    finally:
        stop_stack(s)
