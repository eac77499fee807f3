"""Fixtures for gateway tests: real upstream servers and real `soberana gateway` processes."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.fake_openai import FakeOpenAI
from tests.gateway.helpers import FAKE_UPSTREAM_SCRIPT, REPO, Gateway, read_line, stop_process


@pytest.fixture
def start_gateway(tmp_path: Path) -> Iterator:
    """Start `soberana gateway` on a free port with a config dict; stopped at teardown."""
    started: list[subprocess.Popen] = []

    def start(doc: dict) -> Gateway:
        n = len(started)
        config_path = tmp_path / f"gateway{n}.yaml"
        config_path.write_text(yaml.safe_dump(doc))
        log_path = tmp_path / f"gateway{n}.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "soberana.cli",
                    "gateway",
                    "--config",
                    str(config_path),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    "0",
                    "--log-level",
                    "INFO",
                ],
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                cwd=REPO,
            )
        started.append(proc)
        line = read_line(proc, 30)
        if "listening on" not in line:
            raise AssertionError(f"gateway did not start: {line!r}\n{log_path.read_text()}")
        return Gateway(line.split()[-1], proc, config_path, log_path)

    try:
        yield start
    finally:
        for proc in started:
            stop_process(proc)


@pytest.fixture
def upstreams() -> Iterator:
    """Start in-thread fake upstreams by name; all stopped at teardown."""
    running: list[FakeOpenAI] = []

    def start(name: str, **behaviour) -> FakeOpenAI:
        upstream = FakeOpenAI(name, **behaviour).start()
        running.append(upstream)
        return upstream

    try:
        yield start
    finally:
        for upstream in running:
            upstream.stop()


@pytest.fixture
def upstream_process() -> Iterator:
    """Start fake upstreams as their own processes (so a test can kill them); cleaned up after."""
    started: list[subprocess.Popen] = []

    def start(name: str, port: int = 0, *extra: str) -> tuple[subprocess.Popen, int]:
        proc = subprocess.Popen(
            [
                sys.executable,
                str(FAKE_UPSTREAM_SCRIPT),
                "--name",
                name,
                "--port",
                str(port),
                *extra,
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        started.append(proc)
        line = read_line(proc, 30)
        if "listening on" not in line:
            raise AssertionError(f"fake upstream {name} did not start: {line!r}")
        return proc, int(line.split()[-1])

    try:
        yield start
    finally:
        for proc in started:
            stop_process(proc)
