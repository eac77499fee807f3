"""The engine-core process and its client, without the server: typed messages both ways, one
loop turn's outputs per message, refusals named, a clean stop, and a start-up failure reported."""

from __future__ import annotations

import queue
import time

import pytest

from soberana.engine.config import EngineConfig
from soberana.engine.core_client import EngineCoreClient, EngineDeadError
from soberana.engine.core_process import EngineCoreOutputs
from soberana.engine.outputs import EngineCoreRequest, ModelInfo
from soberana.engine.sampling_params import SamplingParams


def _request(request_id: str, prompt: list[int], max_tokens: int) -> EngineCoreRequest:
    return EngineCoreRequest(request_id, prompt, SamplingParams(max_tokens=max_tokens,
                                                                temperature=0), time.time())


def test_a_core_process_answers_requests_and_refusals_then_stops_on_shutdown():
    client = EngineCoreClient(EngineConfig(model="demo", max_model_len=256, max_num_seqs=4))
    client.start()
    info = client.wait_ready()
    assert isinstance(info, ModelInfo) and info.is_demo and info.max_model_len == 256
    arrived: queue.SimpleQueue = queue.SimpleQueue()
    client.run_io(arrived.put)
    client.send(_request("ok", [1, 2, 3], max_tokens=4))
    client.send(_request("bad", [info.vocab_size], max_tokens=1))  # an id past the vocabulary
    tokens, finish, rejected = [], None, []
    deadline = time.monotonic() + 120
    while finish is None or not rejected:
        for message in arrived.get(timeout=max(1.0, deadline - time.monotonic())):
            assert isinstance(message, EngineCoreOutputs), message
            rejected += message.rejected
            for out in message.outputs:
                assert out.request_id == "ok"
                tokens += out.new_token_ids
                finish = out.finish_reason or finish
    assert len(tokens) == 4 and finish == "length"
    assert rejected == [("bad", f"prompt token ids must be in [0, {info.vocab_size - 1}]")]
    assert client.stop(timeout=60), "the core had to be killed"
    # 0 when this process reaped it (None only if something else in the test process reaped
    # the child first; the sentinel above already proved it exited by itself).
    assert client.wait_exit() in (0, None)


def test_a_core_that_cannot_load_its_model_reports_why(tmp_path):
    client = EngineCoreClient(EngineConfig(model=str(tmp_path / "no-such-model")))
    client.start()
    with pytest.raises(EngineDeadError, match="engine core failed to start"):
        client.wait_ready()
    assert client.wait_exit() is not None
