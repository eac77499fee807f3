"""Fixtures for `soberana bench` tests: a real fake-OpenAI endpoint process, a tiny tokenizer."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest

from soberana.cli import main as soberana_main
from tests.bench.bench_helpers import REPO, stop_process, wait_for_line


@pytest.fixture
def fake_endpoint() -> Iterator[Callable[..., str]]:
    """Start `python -m soberana.bench.fake_endpoint` processes; returns their base URL."""
    procs: list[subprocess.Popen] = []

    def start(
        faults: str = "ok",
        ttft: float = 0.0,
        itl: float = 0.0,
        model: str = "fake-model",
        api_key: str | None = None,
    ) -> str:
        cmd = [
            sys.executable,
            "-m",
            "soberana.bench.fake_endpoint",
            "--port",
            "0",
            "--faults",
            faults,
            "--ttft",
            str(ttft),
            "--itl",
            str(itl),
            "--model",
            model,
        ]
        proc = subprocess.Popen(
            cmd + (["--api-key", api_key] if api_key else []),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            cwd=REPO,
        )
        procs.append(proc)
        line = wait_for_line(proc, "listening on ", timeout_s=30)
        return line.removeprefix("listening on ") + "/v1"

    try:
        yield start
    finally:
        for proc in procs:
            stop_process(proc)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> str:
    """A byte-level BPE tokenizer that adds BOS, trained here (no download), saved as a HF dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from soberana.bench.tokens import _FALLBACK_WORDS

    rng = random.Random(0)
    corpus = [" ".join(rng.choice(_FALLBACK_WORDS) for _ in range(12)) + "." for _ in range(3000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=800,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    out = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>"
    ).save_pretrained(out)
    return str(out)


@pytest.fixture
def run_bench(capsys) -> Callable[..., tuple[int, str, str]]:
    """Run `soberana bench ARGS` in this process; returns (exit code, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = soberana_main(["bench", "--no-progress", *args])
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture(autouse=True)
def _no_stray_api_key(monkeypatch) -> None:
    # The default --api-key comes from the environment; tests must not depend on it.
    if "OPENAI_API_KEY" in os.environ:
        monkeypatch.delenv("OPENAI_API_KEY")
