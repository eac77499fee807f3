"""The official `openai` client works against `soberana serve` unchanged."""

from __future__ import annotations

import math
import re

import pytest

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
# Forced generation length: the demo model's EOS would otherwise end answers at random points.
LONG = {"ignore_eos": True}


def test_models_lists_the_served_model_with_its_context_length(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == ["soberana-demo"]
    assert models[0].model_extra["max_model_len"] == 256


def test_chat_completion_returns_text_usage_and_finish_reason(client, model, server):
    resp = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=8, temperature=0, extra_body=LONG
    )
    choice = resp.choices[0]
    assert resp.object == "chat.completion"
    assert resp.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason == "length"
    assert resp.usage.completion_tokens == 8
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 8
    # The prompt is the chat template applied to the messages: more than the user's words.
    tokenized = server.post("/tokenize", json={"messages": MESSAGES}).json()
    assert resp.usage.prompt_tokens == tokenized["count"] > len(MESSAGES[0]["content"].split())


def test_max_completion_tokens_limits_the_answer(client, model):
    resp = client.chat.completions.create(
        model=model, messages=MESSAGES, max_completion_tokens=3, extra_body=LONG
    )
    assert resp.usage.completion_tokens == 3
    assert resp.choices[0].finish_reason == "length"


def test_streamed_chat_equals_non_streamed_for_greedy(client, model):
    whole = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=20, temperature=0, extra_body=LONG
    )
    chunks = list(
        client.chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=20, temperature=0, stream=True,
            extra_body=LONG,
        )
    )
    # OpenAI's shape: the role first, then content deltas, then a chunk with finish_reason.
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert all(c.usage is None for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole.choices[0].message.content


def test_streamed_completion_equals_non_streamed_for_greedy(client, model):
    whole = client.completions.create(
        model=model, prompt="The quick brown fox", max_tokens=20, temperature=0, extra_body=LONG
    )
    chunks = list(
        client.completions.create(
            model=model, prompt="The quick brown fox", max_tokens=20, temperature=0,
            stream=True, extra_body=LONG,
        )
    )
    assert chunks[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert whole.object == "text_completion"
    assert whole.usage.completion_tokens == 20


def test_include_usage_adds_a_last_chunk_with_usage_and_no_choices(client, model):
    chunks = list(
        client.chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=5, stream=True,
            stream_options={"include_usage": True}, extra_body=LONG,
        )
    )
    last = chunks[-1]
    assert last.choices == []
    assert last.usage.completion_tokens == 5
    assert last.usage.total_tokens == last.usage.prompt_tokens + 5
    assert all(c.usage is None for c in chunks[:-1])


def test_n_2_returns_two_choices_each_complete(client, model):
    resp = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=6, n=2, temperature=1.0, seed=7,
        extra_body=LONG,
    )
    assert sorted(c.index for c in resp.choices) == [0, 1]
    assert all(c.finish_reason == "length" for c in resp.choices)
    assert resp.usage.completion_tokens == 12
    streamed = list(
        client.chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=6, n=2, temperature=1.0, seed=7,
            stream=True, extra_body=LONG,
        )
    )
    texts = {0: "", 1: ""}
    finished = set()
    for chunk in streamed:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finished.add(c.index)
    assert finished == {0, 1}
    # Sample i of a seeded request uses seed + i: the same seed gives the same two answers.
    assert texts == {c.index: c.message.content for c in resp.choices}


def test_seed_makes_sampling_repeatable(client, model):
    def sample() -> str:
        return client.completions.create(
            model=model, prompt="Hello", max_tokens=12, temperature=1.0, seed=1234,
            extra_body=LONG,
        ).choices[0].text

    assert sample() == sample()


def test_stop_string_ends_the_answer_before_it(client, model):
    free = client.completions.create(
        model=model, prompt="Numbers:", max_tokens=24, temperature=0, extra_body=LONG
    ).choices[0].text
    # A stop string from the middle of the greedy answer: the answer must end just before it.
    stop = re.search(r"[A-Za-z]{2}", free[len(free) // 3 :]).group(0)
    cut = free[: free.index(stop)]
    for stream in (False, True):
        resp = client.completions.create(
            model=model, prompt="Numbers:", max_tokens=24, temperature=0, stop=[stop],
            stream=stream, extra_body=LONG,
        )
        if stream:
            chunks = list(resp)
            text = "".join(c.choices[0].text for c in chunks)
            finish = chunks[-1].choices[0].finish_reason
        else:
            text, finish = resp.choices[0].text, resp.choices[0].finish_reason
        assert text == cut
        assert finish == "stop"


def test_chat_logprobs_give_each_token_with_its_top_alternatives(client, model):
    resp = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=5, temperature=0, logprobs=True,
        top_logprobs=3, extra_body=LONG,
    )
    content = resp.choices[0].logprobs.content
    assert len(content) == 5
    text = resp.choices[0].message.content
    # Tokens holding part of a UTF-8 character decode alone to U+FFFD; whole ones are in the text.
    assert all(t.token in text for t in content if "\ufffd" not in t.token)
    for token in content:
        assert len(token.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one.
        assert token.top_logprobs[0].token == token.token
        assert token.top_logprobs[0].logprob == pytest.approx(token.logprob, abs=1e-4)
        probs = [t.logprob for t in token.top_logprobs]
        assert probs == sorted(probs, reverse=True)
        assert all(p <= 0 for p in probs)
        assert sum(math.exp(p) for p in probs) <= 1.0 + 1e-4


def test_completion_logprobs_and_echo(client, model):
    resp = client.completions.create(
        model=model, prompt="Hello world", max_tokens=4, temperature=0, logprobs=2, echo=True,
        extra_body=LONG,
    )
    choice = resp.choices[0]
    assert choice.text.startswith("Hello world")
    lp = choice.logprobs
    prompt_len = resp.usage.prompt_tokens
    assert len(lp.tokens) == prompt_len + 4
    assert lp.token_logprobs[0] is None  # nothing predicts the first prompt token
    assert all(v <= 0 for v in lp.token_logprobs[1:])
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == sorted(lp.text_offset)
    generated = lp.top_logprobs[prompt_len:]
    assert all(len(alts) == 2 for alts in generated)


def test_completion_accepts_token_ids_and_batches_of_prompts(client, model, server):
    ids = server.post("/tokenize", json={"prompt": "The quick brown fox"}).json()["tokens"]
    by_text = client.completions.create(model=model, prompt="The quick brown fox",
                                        max_tokens=6, temperature=0, extra_body=LONG)
    batch = client.completions.create(
        model=model, prompt=[ids, ids], max_tokens=6, temperature=0, n=2, extra_body=LONG
    )
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert {c.text for c in batch.choices} == {by_text.choices[0].text}
    assert batch.usage.prompt_tokens == 2 * len(ids)
    assert batch.usage.completion_tokens == 4 * 6


def test_repeated_prompt_reports_cached_prompt_tokens(client, model):
    # 40 words: well over two 16-token KV blocks, which the second request finds cached.
    prompt = " ".join(["The engine reads a prompt and fills a cache of keys and values."] * 4)
    first = client.completions.create(model=model, prompt=prompt, max_tokens=2, extra_body=LONG)
    second = client.completions.create(model=model, prompt=prompt, max_tokens=2, extra_body=LONG)
    assert second.usage.prompt_tokens == first.usage.prompt_tokens
    assert second.usage.prompt_tokens_details.cached_tokens >= 32


def test_cache_salt_separates_prefix_caches(client, model):
    prompt = " ".join(["Operators watch queues, cache usage and latency on dashboards."] * 4)
    client.completions.create(model=model, prompt=prompt, max_tokens=1,
                              extra_body={"cache_salt": "tenant-a"})
    other = client.completions.create(model=model, prompt=prompt, max_tokens=1,
                                      extra_body={"cache_salt": "tenant-b"})
    same = client.completions.create(model=model, prompt=prompt, max_tokens=1,
                                     extra_body={"cache_salt": "tenant-a"})
    assert other.usage.prompt_tokens_details.cached_tokens == 0
    assert same.usage.prompt_tokens_details.cached_tokens >= 16


def test_vllm_extras_are_honoured(client, model, server):
    greedy = client.completions.create(
        model=model, prompt="Hello", max_tokens=8, temperature=0, extra_body=LONG
    ).choices[0].text
    top1 = client.completions.create(
        model=model, prompt="Hello", max_tokens=8, temperature=1.0, seed=3,
        extra_body={"top_k": 1, **LONG},
    ).choices[0].text
    assert top1 == greedy  # top_k=1 leaves only the most likely token
    first_token = client.completions.create(
        model=model, prompt="Hello", max_tokens=1, temperature=0, logprobs=0
    ).choices[0].logprobs.tokens[0]
    ids = server.post("/tokenize", json={"prompt": first_token, "add_special_tokens": False}).json()["tokens"]
    stopped = client.completions.create(
        model=model, prompt="Hello", max_tokens=8, temperature=0,
        extra_body={"stop_token_ids": [ids[0]], **LONG},
    ).choices[0]
    assert stopped.finish_reason == "stop"
    assert stopped.model_extra["stop_reason"] == ids[0]
    at_least = client.completions.create(
        model=model, prompt="Hello", max_tokens=8, temperature=0,
        extra_body={"min_tokens": 8, "priority": 5, "repetition_penalty": 1.1, "min_p": 0.01},
    ).choices[0]
    assert at_least.finish_reason == "length"


def test_tokenize_detokenize_round_trip(server):
    tokens = server.post("/tokenize", json={"prompt": "Hello world"}).json()
    assert tokens["count"] == len(tokens["tokens"]) > 0
    text = server.post("/detokenize", json={"tokens": tokens["tokens"]}).json()["prompt"]
    assert text.endswith("Hello world")


def test_version_and_health(server):
    assert server.get("/version").json()["version"]
    assert server.get("/health").status_code == 200


def test_startup_log_names_the_address_readiness_and_the_demo_model(server):
    log = server.log()
    assert f"listening on {server.url}" in log
    assert "ready: serving soberana-demo" in log
    assert "random weights" in log and "To serve a real model" in log
